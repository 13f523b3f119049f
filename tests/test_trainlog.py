"""What training tells the people watching it (tuneserve.trainlog): metrics.jsonl across resumes, the trackers
REPORT_TO may name, their credentials as secrets, and the loss-curve picture. The progress lines and metrics.jsonl
of real interrupted runs are checked in tests/test_train.py, TensorBoard's event files there too."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, clean_env, train_cmd
from tuneserve.exitcodes import ConfigError, ExitCode
from tuneserve.trainlog import MetricsFile, plot_curves, trackers


def logged_run(file: MetricsFile, first: int, last: int, total: int, every: int, evals: int = 0) -> None:
    """What the progress callback writes for steps first..last of `total` (a segment, resumed at first - 1)."""
    file.keep_until(first - 1)
    for step in range(first, last + 1):
        if step % every == 0:
            file.append({"kind": "train", "step": step, "loss": 1.0 / step})
        if evals and step % evals == 0:
            file.append({"kind": "eval", "step": step, "eval_loss": 2.0 / step})
    if last == total:  # a segment that ends by a kill leaves no summary
        file.append({"kind": "summary", "step": last})


@pytest.mark.parametrize("seed", range(6))
def test_metrics_hold_each_logged_step_once_however_often_a_run_resumes(tmp_path, seed):
    """Any sequence of segments, each killed somewhere after its checkpoint and resumed from the newest one (a line
    cut short by the kill included), leaves exactly the entries of one uninterrupted run."""
    rng = random.Random(seed)
    total, every, evals, save = 60, rng.choice([1, 2, 5]), rng.choice([0, 3, 10]), rng.choice([4, 7, 10])
    straight = MetricsFile(tmp_path / "straight.jsonl")
    logged_run(straight, 1, total, total, every, evals)
    file = MetricsFile(tmp_path / "metrics.jsonl")
    resume = 0
    while resume < total:
        killed = min(total, resume + rng.randint(1, 25))
        logged_run(file, resume + 1, killed, total, every, evals)
        if killed < total and rng.random() < 0.5:
            with file.path.open("a") as f:
                f.write('{"kind": "train", "st')  # the line a kill cut short
        resume = total if killed == total else max(resume, killed // save * save)  # the newest checkpoint
    assert [(e["kind"], e["step"]) for e in file.entries()] == [(e["kind"], e["step"]) for e in straight.entries()]


def test_the_curves_are_drawn_from_the_entries_and_rewritten_only_when_they_change(tmp_path):
    png = tmp_path / "curves.png"
    assert not plot_curves([{"kind": "summary", "step": 3}], png) and not png.exists()
    entries = [{"kind": "train", "step": s, "loss": 3.0 / s} for s in range(1, 9)]
    entries += [{"kind": "eval", "step": s, "eval_loss": 4.0 / s} for s in (4, 8)]
    assert plot_curves(entries, png)
    first = png.read_bytes()
    assert first.startswith(b"\x89PNG\r\n\x1a\n")
    mtime = png.stat().st_mtime_ns
    assert plot_curves(entries, png) and png.stat().st_mtime_ns == mtime  # the same figures: not rewritten
    assert plot_curves(entries[:-1], png) and png.read_bytes() != first  # eval point gone: a new picture
    assert plot_curves(entries[-2:], png)  # eval points alone


@pytest.mark.parametrize(
    ("report_to", "says"),
    [
        (["nonsense"], "'nonsense' is not a tracker transformers knows"),
        (["tensorboard", "wandb"], "'wandb' is not installed in this image"),
        (["mlflow"], "'mlflow' is not installed in this image"),
        (["none", "tensorboard"], "'none' cannot be combined"),
        (["all", "wandb"], "'all' cannot be combined"),
    ],
)
def test_a_tracker_that_is_unknown_or_not_installed_is_a_configuration_error_naming_what_is_available(report_to, says):
    with pytest.raises(ConfigError, match="Available here: none, tensorboard") as caught:
        trackers(report_to)
    assert says in caught.value.message


@pytest.mark.parametrize(
    ("report_to", "chosen"),
    [
        (["tensorboard"], ["tensorboard"]),
        (["all"], ["tensorboard"]),
        (["none"], []),
        ([], []),
        ([" tensorboard "], ["tensorboard"]),
    ],
)
def test_installed_trackers_all_and_none_are_accepted(report_to, chosen):
    assert trackers(report_to) == chosen


@pytest.mark.slow
def test_the_entrypoint_exits_2_for_a_missing_tracker_before_preflight_and_never_shows_its_key(
    tmp_path, chatml_base, qa_dataset
):
    secret = "wandb-secret-value-1234"
    (tmp_path / "key").write_text(secret + "\n")
    env = clean_env(
        BASE_MODEL=str(chatml_base),
        DATASET=str(qa_dataset),
        OUTPUT_DIR=str(tmp_path / "out"),
        REPORT_TO="wandb",
        WANDB_API_KEY_FILE=str(tmp_path / "key"),
    )
    for args in ((), ("--check",)):
        res = subprocess.run(train_cmd(*args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == ExitCode.CONFIG, res.stderr[-3000:]
        assert (
            "REPORT_TO=wandb: 'wandb' is not installed" in res.stderr
            and "Available here: none, tensorboard" in res.stderr
        )
        assert "==== preflight ====" not in res.stderr  # before anything is loaded or claimed
        assert secret not in res.stderr + res.stdout and not (tmp_path / "out").exists()


def test_tracker_credentials_are_secrets_read_from_files_and_never_printed(tmp_path):
    from tuneserve.config import TRACKER_SECRETS, TRAIN_SCHEMA
    from tuneserve.pipeline import use_token

    values = {name: f"{name.lower()}-value-{i}" for i, name in enumerate(TRACKER_SECRETS)}
    env = {"BASE_MODEL": "org/model", "DATASET": "org/data"}
    for name, value in values.items():
        (tmp_path / name).write_text(value + "\n")
        env[f"{name}_FILE"] = str(tmp_path / name)
    cfg = TRAIN_SCHEMA.load(env)
    assert set(values.values()) <= set(cfg.secrets())  # redacted from every log line
    assert not set(values.values()) & set(json.dumps(cfg.masked()).split('"'))  # config.json
    res = subprocess.run(
        [sys.executable, "-m", "entrypoints.train", "--print-config"],
        env=clean_env(**env, **{k: v for k, v in values.items() if k == "WANDB_API_KEY"}),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and not any(v in res.stdout + res.stderr for v in values.values())
    with pytest.MonkeyPatch.context() as mp:
        for name in values:
            mp.delenv(name, raising=False)
        use_token(cfg)  # the libraries read them from the environment
        assert {name: os.environ.get(name) for name in values} == values
    (tmp_path / "MLFLOW_TRACKING_TOKEN").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_TOKEN_FILE=.*cannot be read"):
        TRAIN_SCHEMA.load(env)


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of every TensorBoard event file under `folder` (TFRecord frames of Event protos)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
