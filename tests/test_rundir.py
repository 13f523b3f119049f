"""OUTPUT_DIR ownership and the run fingerprint, through the training entrypoint: a directory that is not a
tuneserve run is refused untouched; a rerun with settings that change the weights is refused with each change
listed (RESTART=true starts over, removing only this tool's own files); other changes go on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import LEARN_ENV, copy_output, run_train

pytestmark = pytest.mark.slow  # they read the trained run


def rerun_env(base: Path, dataset: Path, out: Path, **changes: str) -> dict[str, str]:
    """The environment trained_output was made with (conftest), on `out`, with `changes`."""
    return {
        "BASE_MODEL": str(base),
        "DATASET": str(dataset),
        "OUTPUT_DIR": str(out),
        "VERIFY_COMPARE_MERGE_BASES": "true",
        **LEARN_ENV,
        **changes,
    }


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_directory_that_is_not_a_run_is_refused_and_left_as_it_was(tmp_path, chatml_base, qa_dataset):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "notes.txt").write_text("my notes")
    (out / "config.json").write_text("{}")
    before = tree(out)
    res = run_train(rerun_env(chatml_base, qa_dataset, out), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "is not empty and is not a tuneserve run (no run.json): it holds adapter, config.json" in res.stderr
    assert tree(out) == before and "Traceback" not in res.stderr


def test_a_changed_setting_or_dataset_is_refused_with_each_change_listed(
    tmp_path, trained_output, chatml_base, qa_dataset
):
    out = copy_output(trained_output, tmp_path / "out")
    before = tree(out)
    changed = tmp_path / "changed.jsonl"
    changed.write_text(qa_dataset.read_text().replace("Paris", "Lyon"))
    res = run_train(rerun_env(chatml_base, changed, out, LORA_R="16", LEARNING_RATE="1e-3"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr
    assert "holds a run made with other settings" in err
    assert "LORA_R: 32 -> 16" in err and "LEARNING_RATE: 0.005 -> 0.001" in err
    assert "dataset content: 'sha256:" in err  # the same path, other content, would count too
    assert "Use a new OUTPUT_DIR, or set RESTART=true" in err
    assert "training already done" not in err and tree(out) == before
    # Only the content counts: the same rows from another path pass; one more row at that path does not.
    data = tmp_path / "data.jsonl"
    data.write_text(qa_dataset.read_text())
    same = rerun_env(chatml_base, data, copy_output(trained_output, tmp_path / "again"))
    assert run_train(same, "--check", cwd=tmp_path).returncode == 0
    data.write_text(qa_dataset.read_text() + qa_dataset.read_text().splitlines(keepends=True)[0])
    grown = run_train(same, "--check", cwd=tmp_path)
    assert grown.returncode == 2 and "dataset content: 'sha256:" in grown.stderr, grown.stderr[-2000:]


def test_settings_that_cannot_change_the_weights_go_on(tmp_path, trained_output, chatml_base, qa_dataset):
    out = copy_output(trained_output, tmp_path / "out")
    moved = tmp_path / "elsewhere.jsonl"  # the same rows from another path
    moved.write_bytes(qa_dataset.read_bytes())
    res = run_train(
        rerun_env(
            chatml_base,
            moved,
            out,
            VERIFY_SAMPLES="2",
            EVAL_MAX_SAMPLES="3",
            LOG_LEVEL="debug",
            LOGGING_STEPS="5",
            MERGE_BASE="original",
        ),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training already done" in res.stderr


def test_restart_removes_only_this_tools_files_and_trains_anew(tmp_path, trained_output, chatml_base, qa_dataset):
    out = copy_output(trained_output, tmp_path / "out")
    (out / "my-notes.txt").write_text("keep me")
    (out / "my-folder").mkdir()
    (out / "my-folder" / "keep.bin").write_bytes(b"\0")
    env = rerun_env(chatml_base, qa_dataset, out, LORA_R="8", MAX_STEPS="2", MERGE="false", RESTART="true")
    res = run_train(env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RESTART=true and the settings changed" in res.stderr and "LORA_R: 32 -> 8" in res.stderr
    assert (out / "my-notes.txt").read_text() == "keep me" and (out / "my-folder" / "keep.bin").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert not (out / "merged").exists() and not (out / "verify.json").exists()  # the old run's, removed
    record = json.loads((out / "run.json").read_text())
    assert record["tool"] == "tuneserve" and record["fingerprint"]["LORA_R"] == 8
    # The same settings again, RESTART still set: an identical rerun resumes, nothing is removed.
    again = run_train(env, cwd=tmp_path)
    assert again.returncode == 0 and "training already done" in again.stderr, again.stderr[-3000:]


def test_a_long_value_is_cut_in_the_error(tmp_path):
    long = "9" * 50 + "x" * 100_000
    res = run_train({"BASE_MODEL": "x", "DATASET": "y.jsonl", "LORA_R": long}, "--check", cwd=tmp_path)
    assert res.returncode == 2
    line = next(li for li in res.stderr.splitlines() if "LORA_R=" in li)
    assert "... (100052 characters)" in line and len(line) < 400


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 600 KB (root only: mount); `resize(kb)` grows it as an operator would enlarge a volume."""
    import os
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a small tmpfs for the disk-full test: {res.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {res.stderr.strip()}")

    def resize(kb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kb}k", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_exits_74_keeps_what_is_finished_and_a_rerun_with_space_continues(
    tmp_path, small_disk, chatml_base, qa_dataset
):
    disk, resize = small_disk
    out = disk / "out"
    env = rerun_env(chatml_base, qa_dataset, out, SAVE_STEPS="20")
    # 600 KB: the data and reports fit, the first checkpoint (about 0.9 MB) does not.
    res = run_train(env, cwd=tmp_path)
    assert res.returncode == 74, res.stderr[-3000:]
    assert f"no space left on the disk of {out}" in res.stderr and "Traceback" not in res.stderr
    assert (out / "run.json").is_file() and (out / "data" / "train.jsonl").is_file()
    assert not list((out / "checkpoints").glob("checkpoint-*")), "the cut-short checkpoint is removed"
    # 1.6 MB: training finishes (its last checkpoint and the adapter fit); the merged model does not.
    resize(1600)
    res = run_train({**env, "SAVE_STEPS": "1000"}, cwd=tmp_path)
    assert res.returncode == 74, res.stderr[-3000:]
    assert "==== merge" in res.stderr and f"no space left on the disk of {out}" in res.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "merged").exists() and not (out / ".merged.tmp").exists()
    # Room again: the rerun merges and verifies without training again.
    resize(8192)
    res = run_train({**env, "SAVE_STEPS": "1000"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training already done" in res.stderr
    assert json.loads((out / "verify.json").read_text())["passed"] is True
