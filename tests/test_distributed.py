"""Data-parallel training through torch's elastic launcher (torchrun's engine): two processes on this
machine with the gloo backend, started by `python -m entrypoints.train` itself (NPROC_PER_NODE=2), the
way the image starts one process per GPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.helpers import LEARN_ENV, STEP_LOGGED, clean_env, run_train, train_cmd, write_jsonl
from tuneserve.exitcodes import ExitCode

TWO = {"NPROC_PER_NODE": "2", "DEVICE": "cpu"}


def test_distributed_settings_are_checked_before_anything_starts(tmp_path):
    res = run_train(
        {
            "BASE_MODEL": "org/model",
            "DATASET": "org/data",
            "NNODES": "2",
            "NODE_RANK": "2",
            "NPROC_PER_NODE": "zero",
            "DISTRIBUTED_STRATEGY": "fsdp",
            "DEVICE": "cpu",
        },
        cwd=tmp_path,
    )
    assert res.returncode == ExitCode.CONFIG, res.stderr[-2000:]
    for expected in (
        "NPROC_PER_NODE='zero': expected auto or a number",
        "NODE_RANK=2: must be below NNODES=2",
        "NNODES=2 needs MASTER_ADDR",
        "DISTRIBUTED_STRATEGY=fsdp needs CUDA GPUs",
    ):
        assert expected in res.stderr, expected
    assert "starting" not in res.stderr  # no process was launched


@pytest.mark.slow
def test_two_processes_split_the_data_reduce_gradients_and_merge_once(tmp_path, chatml_base, qa_dataset):
    out = tmp_path / "out"
    # 8 rows, 2 a micro-batch: each process takes 2 micro-batches, its own 4 rows, per epoch
    env = {
        **LEARN_ENV,
        **TWO,
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(qa_dataset),
        "OUTPUT_DIR": str(out),
        "PER_DEVICE_TRAIN_BATCH_SIZE": "2",
        "MAX_SEQ_LENGTH": "48",
    }
    res = run_train(env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "starting 2 training processes on this node" in res.stderr
    assert "process 1 of 2 (local 1, gloo backend)" in res.stderr

    processes = json.loads((out / "train_report.json").read_text())["processes"]
    assert [p["rank"] for p in processes] == [0, 1] and {p["world_size"] for p in processes} == {2}
    # Each process trained on its own half of the 8 rows in the first epoch ...
    trained = [[r for seg in p["ledger"]["segments"] for batch in seg["batches"] for r in batch] for p in processes]
    first_epoch = [set(rows[:4]) for rows in trained]
    assert all(len(rows) == 4 for rows in first_epoch)
    assert first_epoch[0].isdisjoint(first_epoch[1]) and len(first_epoch[0] | first_epoch[1]) == 8
    check = json.loads((out / "train_report.json").read_text())["ledger_check"]
    assert check["verified"] is True and check["epochs"] == int(LEARN_ENV["NUM_TRAIN_EPOCHS"])
    assert processes[0]["rows_seen"] == processes[1]["rows_seen"] == 4 * int(LEARN_ENV["NUM_TRAIN_EPOCHS"])
    # ... yet both end with the same weights: the gradients were averaged across them every step.
    assert processes[0]["trainable_sha256"] == processes[1]["trainable_sha256"]

    # The launcher alone merged and verified, once, after both processes left the group and exited cleanly
    # (a process group left to the interpreter's exit can abort a finished worker, failing the run).
    assert res.stderr.count("==== merge") == 1 and res.stderr.count("==== verify") == 1
    assert res.stderr.count("nothing else to do here; the launcher on node 0 merges") == 2
    finished = res.stderr.index("all 2 training processes on this node finished and exited")
    assert finished < res.stderr.index("==== merge")
    assert "terminate called" not in res.stderr
    assert json.loads((out / "verify.json").read_text())["passed"] is True
    assert (out / "merged" / "model.safetensors").is_file()

    # A retry once training is done (say publishing failed) starts no group: node 0 finishes the later
    # stages by itself, another node has nothing to wait for.
    again = run_train(env, cwd=tmp_path)
    assert again.returncode == 0 and "starting 2 training processes" not in again.stderr, again.stderr[-3000:]
    assert "training already done" in again.stderr and "verification already passed" in again.stderr
    other = run_train({**env, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.255.255.1"}, cwd=tmp_path)
    assert other.returncode == 0 and "node 1: nothing else to do here" in other.stderr, other.stderr[-3000:]


@pytest.mark.slow
def test_three_processes_train_with_the_default_batch(tmp_path, chatml_base, qa_dataset):
    """The default batch of 4 cannot be shared by 3 processes: it becomes 6, 2 rows each per step, and the log says
    so. 8 rows over 3 processes: each epoch deals every row once, and the processes' last micro-batches are
    completed with rows from the epoch's start (accelerate's even batches), which the ledger tells apart."""
    out = tmp_path / "out"
    env = {
        "NPROC_PER_NODE": "3",
        "DEVICE": "cpu",
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(qa_dataset),
        "OUTPUT_DIR": str(out),
        "NUM_TRAIN_EPOCHS": "2",
        "MERGE": "false",
    }
    res = run_train(env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "starting 3 training processes on this node" in res.stderr
    assert (
        "batch 6 sequence(s) per optimizer step = 2 per micro-batch x 1 accumulation step(s) x 3 process(es) "
        "(BATCH_SIZE default 4, rounded up to 6 so that 3 training process(es) take equal shares" in res.stderr
    )
    report = json.loads((out / "train_report.json").read_text())
    processes = report["processes"]
    assert [p["rank"] for p in processes] == [0, 1, 2] and len({p["trainable_sha256"] for p in processes}) == 1
    assert report["global_step"] == 2 * 2  # 8 rows, 6 a step: 2 steps an epoch
    check = report["ledger_check"]
    assert check["verified"] is True and check["epochs"] == 2 and check["padding_repeats"] == 2 * (12 - 8)
    first_epoch = [r for p in processes for b in p["ledger"]["segments"][0]["batches"][:2] for r in b]
    assert set(first_epoch) == set(range(8))


@pytest.mark.slow
def test_under_a_users_own_torchrun_rank_0_merges_once_after_training(tmp_path, chatml_base, qa_dataset):
    out = tmp_path / "out"
    env = clean_env(
        **{
            **LEARN_ENV,
            **TWO,
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(out),
            "PER_DEVICE_TRAIN_BATCH_SIZE": "4",
        }
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "entrypoints.train",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "starting 2 training processes" not in res.stderr  # torchrun's workers start no launcher of their own
    assert "rank 1: nothing else to do here" in res.stderr
    assert res.stderr.count("==== merge") == 1 and res.stderr.count("==== verify") == 1
    assert json.loads((out / "verify.json").read_text())["passed"] is True
    assert [p["rank"] for p in json.loads((out / "train_report.json").read_text())["processes"]] == [0, 1]


@pytest.mark.slow
def test_a_workers_exit_code_is_the_launchers_exit_code(tmp_path, chatml_base):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "no messages here"}] * 4)
    res = run_train(
        {**TWO, "BASE_MODEL": str(chatml_base), "DATASET": str(bad), "OUTPUT_DIR": str(tmp_path / "o")}, cwd=tmp_path
    )
    assert "starting 2 training processes" in res.stderr
    assert res.returncode == ExitCode.DATA, res.stderr[-3000:]  # not torchrun's blanket 1


@pytest.mark.slow
def test_sigterm_to_the_group_saves_one_checkpoint_exits_143_and_a_rerun_resumes(tmp_path, chatml_base, qa_dataset):
    out = tmp_path / "out"
    env = {
        **TWO,
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(qa_dataset),
        "OUTPUT_DIR": str(out),
        "MAX_STEPS": "150",
        "SAVE_STEPS": "1000",
        "PER_DEVICE_TRAIN_BATCH_SIZE": "1",
        "GRADIENT_ACCUMULATION_STEPS": "1",
        "LOGGING_STEPS": "1",
        "MERGE": "false",
    }
    proc = subprocess.Popen(
        train_cmd(), env=clean_env(**env), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = []
    try:
        for line in proc.stdout:
            log.append(line)
            if STEP_LOGGED in line:  # both processes are in the training loop
                break
        proc.send_signal(signal.SIGTERM)  # what `docker stop` / the kubelet sends to the container's process
        log.append(proc.communicate(timeout=300)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(log)
    assert proc.returncode == ExitCode.TERMINATED, text[-4000:]
    assert text.count("stopped by SIGTERM at step") == 2  # both processes stopped at the same step
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "checkpoint_complete.json").is_file(), text[-3000:]
    assert sorted(p.name for p in ckpts[0].glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    step = int(ckpts[0].name.split("-")[1])
    assert 0 < step < 150

    res = run_train(env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count(f"resuming from {ckpts[0]} (step {step})") == 2
    assert json.loads((out / "train_report.json").read_text())["global_step"] == 150
