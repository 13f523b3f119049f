"""Run state through the training entrypoint: a directory that is not a tuneserve run is refused untouched; a
rerun with settings that change the weights is refused with each change listed once something was trained
(RESTART=true starts over, removing only this tool's own files), claimed again before; other changes go on; every
input counts by content (local) or pinned commit (Hub); one run holds the folder at a time; a full disk anywhere
exits 74 and an unwritable folder 2; a checkpoint resumes whatever its layout, and an unverified ledger stops the
run before anything is published. Piece by piece: test_runstate.py."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    LEARN_ENV,
    STEP_LOGGED,
    copy_output,
    qa_messages,
    run_train,
    start_train,
    wait_for,
    write_jsonl,
)
from tests.hub_server import FakeHub
from tests.test_runstate import HOLD
from tuneserve.exitcodes import ExitCode

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
    """Every file under `root` and its bytes; the lock aside (a refused rerun takes it to read the run's state)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".tuneserve.lock"
    }


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
    # Verification and evaluation settings changed: both are redone on the unchanged merged folder.
    assert "verification passed before with other settings (VERIFY_SAMPLES: 4 -> 2; EVAL_MAX_SAMPLES" in res.stderr
    settings = json.loads((out / "verify.json").read_text())["settings"]
    assert settings["VERIFY_SAMPLES"] == 2 and settings["EVAL_MAX_SAMPLES"] == 3
    again = run_train(rerun_env(chatml_base, moved, out, VERIFY_SAMPLES="2", EVAL_MAX_SAMPLES="3"), cwd=tmp_path)
    assert again.returncode == 0 and "verification already passed" in again.stderr, again.stderr[-3000:]


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


# ------------------------------------------------------------------------------------------- claim and lock
HOST = socket.gethostname()


def test_a_run_that_failed_on_its_data_is_claimed_again_and_holds_the_folder_alone(tmp_path, chatml_base, qa_dataset):
    out, rows = tmp_path / "out", tmp_path / "rows.jsonl"
    rows.write_text("")
    env = {
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(rows),
        "OUTPUT_DIR": str(out),
        "MAX_STEPS": "30",
        "LOGGING_STEPS": "1",
        "MERGE": "false",
    }
    failed = run_train(env, cwd=tmp_path)
    assert failed.returncode == ExitCode.DATA and (out / "run.json").is_file(), failed.stderr[-3000:]
    rows.write_text(qa_dataset.read_text())  # the user fixes the file
    # A run that died holding the folder (SIGKILL: it released nothing) does not block the next one.
    dead = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline().strip() == "held"
    dead.kill()
    dead.wait()
    first = start_train(env, tmp_path)
    log = wait_for(first, STEP_LOGGED)  # training under way: the folder is held
    first.send_signal(signal.SIGSTOP)
    try:
        second = run_train(env, cwd=tmp_path)
    finally:
        first.send_signal(signal.SIGCONT)
    log += first.communicate(timeout=300)[0]
    assert second.returncode == ExitCode.CONFIG, second.stderr[-3000:]
    assert f"is in use by another run (host {HOST}, process {first.pid}, running since" in second.stderr
    assert first.returncode == 0, log[-3000:]
    assert f"taking over the lock of {out} from a run that ended without releasing it (host {HOST}, process " in log
    assert "holds an earlier attempt that trained nothing" in log and "dataset content: 'sha256:" in log
    report = json.loads((out / "train_report.json").read_text())
    assert report["global_step"] == 30 and report["ledger_check"]["verified"] is True


# ------------------------------------------------------------------------------------------- what counts
@pytest.fixture
def claims(tmp_path):
    """claim(env, placement, write) as the pipeline calls it, releasing the lock a writing claim takes."""
    from tuneserve import runlock
    from tuneserve.config import load_train_config
    from tuneserve.layout import Layout
    from tuneserve.rundir import claim

    def call(env: dict[str, str], placement, write: bool = False) -> None:
        claim(load_train_config(env), Layout.of(env["OUTPUT_DIR"]), placement, write=write)

    yield call
    if runlock._held is not None:
        runlock._held.release()
        runlock._held = None


def test_each_input_refuses_when_its_content_changes_and_goes_on_when_only_its_path_moved(
    tmp_path, chatml_base, claims
):
    from tuneserve.model import Placement

    def inputs(root: Path) -> dict[str, str]:
        """A local base and tokenizer, a template file, a tools file, a folder holding train.jsonl.gz."""
        root.mkdir()
        shutil.copytree(chatml_base, root / "base")
        shutil.copytree(chatml_base, root / "tok")
        (root / "chat.jinja").write_text((chatml_base / "chat_template.jinja").read_text())
        (root / "tools.json").write_text(json.dumps([{"type": "function", "function": {"name": "f"}}]))
        (root / "data").mkdir()
        rows = "".join(json.dumps(r) + "\n" for r in qa_messages())
        (root / "data" / "train.jsonl.gz").write_bytes(gzip.compress(rows.encode(), mtime=0))
        return {
            "BASE_MODEL": str(root / "base"),
            "TOKENIZER": str(root / "tok"),
            "CHAT_TEMPLATE": str(root / "chat.jinja"),
            "TOOLS": str(root / "tools.json"),
            "DATASET": str(root / "data"),
        }

    out = tmp_path / "out"
    bf16 = Placement("cpu", "bfloat16")
    env = {**inputs(tmp_path / "a"), "OUTPUT_DIR": str(out)}
    claims(env, bf16, write=True)  # the first run's claim
    (out / "adapter").mkdir()  # and what it trained: from here on a change is refused
    moved = {**inputs(tmp_path / "b"), "OUTPUT_DIR": str(out)}
    claims(moved, bf16)  # every input at another path, the same content: goes on

    edits = {
        "base model": lambda: _flip_last_byte(Path(moved["BASE_MODEL"]) / "model.safetensors"),
        "tokenizer": lambda: _flip_last_byte(Path(moved["TOKENIZER"]) / "tokenizer.json"),
        "chat template": lambda: Path(moved["CHAT_TEMPLATE"]).write_text("{{ messages }}"),
        "tools": lambda: Path(moved["TOOLS"]).write_text("[]"),
        "dataset content": lambda: (Path(moved["DATASET"]) / "eval.jsonl.gz").write_bytes(gzip.compress(b"{}")),
    }
    for label, edit in edits.items():
        edit()
        with pytest.raises(Exception, match=f"{label}: 'sha256:[0-9a-f]{{64}}' -> 'sha256:") as refused:
            claims(moved, bf16)
        assert "holds a run made with other settings" in str(refused.value)
        shutil.rmtree(tmp_path / "b")
        moved = {**inputs(tmp_path / "b"), "OUTPUT_DIR": str(out)}
    # DTYPE=auto on a device class or GPU that resolves it otherwise
    with pytest.raises(Exception, match="compute: 'cpu/bfloat16' -> 'cpu/float32'"):
        claims(moved, Placement("cpu", "float32"))
    with pytest.raises(Exception, match="compute: 'cpu/bfloat16' -> 'cuda/bfloat16'"):
        claims(moved, Placement("cuda", "bfloat16"))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2] ^= 1
    path.write_bytes(bytes(data))


def test_a_hub_base_model_is_pinned_at_the_first_claim_for_every_later_stage_and_retry(
    tmp_path, chatml_base, qa_dataset
):
    upstream = shutil.copytree(chatml_base, tmp_path / "upstream")
    _flip_last_byte(upstream / "model.safetensors")
    out = tmp_path / "out"
    with FakeHub() as hub:
        first = hub.add_model("org/tiny", chatml_base)
        env = {
            "BASE_MODEL": "org/tiny",
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(out),
            **LEARN_ENV,  # verify passes only on a model that learned to end its answers
            "MERGE": "false",
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "cache-1"),
        }
        res = run_train(env, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        record = json.loads((out / "run.json").read_text())
        assert record["fingerprint"]["base model"] == f"hub:org/tiny@{first}"
        assert record["pins"]["BASE_MODEL"] == {"ref": "org/tiny", "revision": None, "commit": first}
        second = hub.add_model("org/tiny", upstream)  # upstream moves on
        hub.requests.clear()
        # A retry pod (an empty cache) merges and verifies against the commit the run trained on.
        retry = run_train({**env, "MERGE": "true", "HF_HOME": str(tmp_path / "cache-2")}, cwd=tmp_path)
        assert retry.returncode == 0, retry.stderr[-3000:]
        assert f"BASE_MODEL=org/tiny is pinned to commit {first} (run.json)" in retry.stderr
        downloads = [r for r in hub.requests if "/resolve/" in r]
        assert downloads and [r for r in downloads if f"/resolve/{first}/" not in r] == []
        assert json.loads((out / "merged" / "merge_info.json").read_text())["base_model_revision"] == first
        # Asking for the new commit is another base model.
        moved = run_train({**env, "BASE_MODEL_REVISION": second}, "--check", cwd=tmp_path)
        assert moved.returncode == ExitCode.CONFIG, moved.stderr[-3000:]
        assert f"base model: 'hub:org/tiny@{first}' -> 'hub:org/tiny@{second}'" in moved.stderr


def test_a_hub_dataset_whose_commit_cannot_be_resolved_is_not_a_change(tmp_path, chatml_base, claims, monkeypatch):
    from huggingface_hub import constants

    from tuneserve.model import Placement

    bf16 = Placement("cpu", "bfloat16")
    out = tmp_path / "out"
    env = {"BASE_MODEL": str(chatml_base), "DATASET": "org/rows", "OUTPUT_DIR": str(out)}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        commit = hub.add_dataset("org/rows", chatml_base)
        claims(env, bf16, write=True)
        url = hub.url
    assert json.loads((out / "run.json").read_text())["fingerprint"]["dataset content"] == f"hub:org/rows@{commit}"
    (out / "adapter").mkdir()
    monkeypatch.setattr(constants, "ENDPOINT", url)  # the Hub is down now: a Job's retry goes on
    claims(env, bf16)
    with FakeHub() as hub:  # and when it answers with another commit for another request, that is a change
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        hub.add_dataset("org/rows", chatml_base, commit="c" * 40)
        with pytest.raises(Exception, match=f"dataset content: 'hub:org/rows@{commit}' -> 'hub:org/rows@c{{40}}'"):
            claims({**env, "DATASET_REVISION": "main"}, bf16)


# ------------------------------------------------------------------------------------------- failures
def test_a_full_disk_while_downloading_or_caching_the_dataset_exits_74_and_leaves_no_temporary_files(
    tmp_path, small_disk, chatml_base, qa_dataset
):
    disk, _resize = small_disk  # 600 KB; the base's weights are 1.1 MB
    big = write_jsonl(tmp_path / "big.jsonl", qa_messages() * 1500)  # about 1.3 MB
    with FakeHub() as hub:
        hub.add_model("org/tiny", chatml_base)
        env = {
            "BASE_MODEL": "org/tiny",
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(tmp_path / "out-1"),
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(disk / "hf"),
        }
        res = run_train(env, cwd=tmp_path)
    assert res.returncode == ExitCode.DISK_FULL, res.stderr[-3000:]
    assert f"no space left on the disk of {disk}" in res.stderr and "Traceback" not in res.stderr
    assert not [p for p in disk.rglob("*.incomplete")]
    shutil.rmtree(disk / "hf")
    # The dataset's Arrow cache on the full disk.
    env = {
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(big),
        "OUTPUT_DIR": str(tmp_path / "out-2"),
        "HF_DATASETS_CACHE": str(disk / "datasets"),
    }
    res = run_train(env, cwd=tmp_path)
    assert res.returncode == ExitCode.DISK_FULL, res.stderr[-3000:]
    assert f"no space left on the disk of {disk}" in res.stderr and "Traceback" not in res.stderr
    assert not [p for p in (disk / "datasets").rglob("*") if p.is_file() and ".incomplete" in str(p)]
    shutil.rmtree(disk / "datasets")
    # OUTPUT_DIR's shaped rows on the full disk.
    res = run_train({**env, "OUTPUT_DIR": str(disk / "out"), "HF_DATASETS_CACHE": str(tmp_path / "ds")}, cwd=tmp_path)
    assert res.returncode == ExitCode.DISK_FULL, res.stderr[-3000:]
    assert f"no space left on the disk of {disk / 'out'}" in res.stderr
    assert (disk / "out" / "run.json").is_file() and not list((disk / "out").rglob("*.tmp"))


def test_an_output_dir_this_user_cannot_write_exits_2_naming_the_folder_the_user_and_the_fix(tmp_path, chatml_base):
    import tempfile

    from tests.helpers import clean_env, train_cmd

    # Inputs another user can read (pytest's own folders are its user's alone), an OUTPUT_DIR it cannot write.
    shared = Path(tempfile.mkdtemp(prefix="tuneserve-unwritable-"))
    try:
        os.chmod(shared, 0o755)
        base = shutil.copytree(chatml_base, shared / "base")
        rows = write_jsonl(shared / "rows.jsonl", qa_messages())
        out = shared / "volume" / "out"
        out.parent.mkdir()
        env = {"BASE_MODEL": str(base), "DATASET": str(rows), "OUTPUT_DIR": str(out), "HOME": str(shared)}
        if os.getuid() == 0:  # root writes anywhere: run as the image's user, whom the folder does not belong to
            uid, prefix = 10001, ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups"]
        else:
            uid, prefix = os.getuid(), []
            os.chmod(out.parent, 0o555)
        for args in ((), ("--check",)):
            res = subprocess.run(
                [*prefix, *train_cmd(*args)], env=clean_env(**env), cwd=shared, capture_output=True, text=True
            )
            assert res.returncode == ExitCode.CONFIG, res.stderr[-3000:]
            assert f"OUTPUT_DIR={str(out)!r} cannot be written by this process (user id {uid}" in res.stderr
            assert f"chown -R {uid}:" in res.stderr and "fsGroup" in res.stderr and "Traceback" not in res.stderr
        assert not out.exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ------------------------------------------------------------------------------------------- resume and ledger
def test_a_checkpoint_without_optimizer_pt_resumes_and_an_unverified_ledger_blocks_publishing(
    tmp_path, chatml_base, qa_dataset
):
    from tuneserve.checkpoints import COMPLETE_MARKER

    # 8 rows one at a time, 3 per step: 3 steps an epoch (3 + 3 + 2 micro-batches), 6 in all; a checkpoint at 4.
    env = {
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(qa_dataset),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "NUM_TRAIN_EPOCHS": "2",
        "PER_DEVICE_TRAIN_BATCH_SIZE": "1",
        "GRADIENT_ACCUMULATION_STEPS": "3",
        "SAVE_STEPS": "4",
        "MERGE": "false",
        "SFT_SAVE_ONLY_MODEL": "true",  # no optimizer file, as FSDP writes none named optimizer.pt
    }
    first = run_train(env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = Path(env["OUTPUT_DIR"])
    ckpt = out / "checkpoints" / "checkpoint-4"
    assert not (ckpt / "optimizer.pt").exists() and "optimizer.pt" not in (ckpt / COMPLETE_MARKER).read_text()
    # Preempted after step 4: what came after it is gone (the trainer's final checkpoint-6 too).
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    (out / "train_report.json").unlink()
    tampered = copy_output(out, tmp_path / "tampered")
    # The rerun resumes at step 4, and the ledger of both segments verifies.
    res = run_train(env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {ckpt} (step 4)" in res.stderr
    report = json.loads((out / "train_report.json").read_text())
    assert report["ledger_check"] == {"verified": True, "epochs": 2, "segments": [2], "epochs_not_once_each": []}
    # A checkpoint whose ledger lost a micro-batch (a resume that skipped data): nothing is merged or published.
    ledger_file = tampered / "checkpoints" / "checkpoint-4" / "ledger-rank0.json"
    ledger = json.loads(ledger_file.read_text())
    ledger["segments"][-1]["batches"].pop(0)
    ledger_file.write_text(json.dumps(ledger))
    res = run_train({**env, "OUTPUT_DIR": str(tampered), "MERGE": "true"}, cwd=tmp_path)
    assert res.returncode == ExitCode.VERIFY, res.stderr[-3000:]
    assert "the training ledger does not show every row trained once per epoch" in res.stderr
    assert '"epochs_not_once_each": [0]' in res.stderr
    assert not (tampered / "merged").exists() and "==== merge" not in res.stderr


def test_a_full_disk_while_quantizing_is_named_and_leaves_no_scratch_folder(small_disk, trained_output):
    from tuneserve.exitcodes import disk_full_message
    from tuneserve.quantize import quantize

    disk, resize = small_disk
    resize(200)  # the int8 weights alone are larger
    with pytest.raises(Exception) as full:
        quantize(trained_output / "merged", disk / "quantized", scheme="int8")
    assert disk_full_message(full.value, str(disk)).startswith(f"no space left on the disk of {disk}")
    assert list(disk.iterdir()) == []  # neither quantized/ nor its scratch folder
