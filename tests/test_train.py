"""Training through the exact command the image runs: real bitsandbytes 4-bit layers on the CPU, exit
codes, SIGTERM then resume, corrupted checkpoints, secrets."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import (
    LEARN_ENV,
    QA,
    STEP_LOGGED,
    qa_messages,
    run_train,
    start_train,
    wait_for,
    write_jsonl,
)
from tests.test_trainlog import tensorboard_scalars
from tuneserve.exitcodes import ExitCode
from tuneserve.trainlog import MetricsFile

pytestmark = pytest.mark.slow


def greedy_answers(base: Path, adapter: Path, questions: list[str]) -> list[str]:
    """Generate with base + adapter (PEFT), stopping at the end-of-turn token recorded by training."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    meta = json.loads((adapter / "training_meta.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(model, adapter).eval()
    eot = tok.convert_tokens_to_ids(meta["end_of_turn"])
    answers = []
    for q in questions:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=eot)
        answers.append(tok.decode(out[0][enc["input_ids"].shape[1] :]))
    return answers


def cpu_dtype() -> str:
    from tuneserve.model import cpu_native_bf16

    return "bfloat16" if cpu_native_bf16()[0] else "float32"


def test_model_is_loaded_with_bitsandbytes_4bit_layers(chatml_base, qa_dataset):
    import bitsandbytes as bnb

    from tuneserve.config import load_train_config
    from tuneserve.model import load_model, resolve_placement
    from tuneserve.tokenizer import prepare_tokenizer

    cfg = load_train_config({"BASE_MODEL": str(chatml_base), "DATASET": str(qa_dataset)})
    placement = resolve_placement(cfg)
    model = load_model(cfg, prepare_tokenizer(cfg, needs_template=True), placement)
    linear = [m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert linear and all(isinstance(m, bnb.nn.Linear4bit) for m in linear)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linear)
    assert linear[0].weight.quant_state.nested  # double quantization
    # DTYPE=auto: bfloat16 where this CPU computes it natively, else float32.
    assert placement.dtype_name == cpu_dtype() and repr(linear[0].compute_dtype) == f"torch.{cpu_dtype()}"


def test_qlora_learns_the_pairs_and_stops_at_end_of_turn(tmp_path, chatml_base, qa_dataset):
    out = tmp_path / "out"
    res = run_train(
        {"BASE_MODEL": str(chatml_base), "DATASET": str(qa_dataset), "OUTPUT_DIR": str(out), **LEARN_ENV}, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"==== train: QLoRA SFT on cpu ({cpu_dtype()}) ====" in res.stderr
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_meta.json"):
        assert (out / "adapter" / name).is_file()
    report = json.loads((out / "train_report.json").read_text())
    assert report["data"]["train_rows"] == len(QA) and report["global_step"] == 60
    assert json.loads((out / "config.json").read_text())["LORA_R"] == 32
    answers = greedy_answers(chatml_base, out / "adapter", [q for q, _ in QA])
    assert answers == [f"{a}<|im_end|>" for _, a in QA]

    # A finished training stage is not repeated.
    mtime = (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = run_train(
        {"BASE_MODEL": str(chatml_base), "DATASET": str(qa_dataset), "OUTPUT_DIR": str(out), **LEARN_ENV}, cwd=tmp_path
    )
    assert again.returncode == 0 and "training already done" in again.stderr
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_base_model_with_added_template_tokens_trains_new_rows(tmp_path, pt_base, qa_dataset):
    out = tmp_path / "out"
    res = run_train(
        {
            "BASE_MODEL": str(pt_base),
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(out),
            "CHAT_TEMPLATE": "chatml",
            "MAX_STEPS": "2",
            "PER_DEVICE_TRAIN_BATCH_SIZE": "4",
            "MERGE": "false",
        },
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "added them as special tokens" in res.stderr and "resized the embeddings" in res.stderr
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    vocab = json.loads((pt_base / "config.json").read_text())["vocab_size"]
    assert adapter_cfg["trainable_token_indices"] == {"embed_tokens": [vocab, vocab + 1]}
    assert "lm_head" in adapter_cfg["modules_to_save"]
    from safetensors import safe_open

    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("lm_head" in k for k in keys) and any("trainable_tokens" in k for k in keys)
    tok_cfg = (out / "adapter" / "tokenizer.json").read_text()
    assert "<|im_start|>" in tok_cfg and "<|im_end|>" in tok_cfg


def test_plain_lora_without_quantization(tmp_path, chatml_base, qa_dataset):
    res = run_train(
        {
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(tmp_path / "o"),
            "LOAD_IN_4BIT": "false",
            "MAX_STEPS": "1",
            "DTYPE": "float32",
            "MERGE": "false",
        },
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "==== train: LoRA SFT on cpu (float32) ====" in res.stderr


# ------------------------------------------------------------------------------------------- exit codes
def test_exit_2_for_configuration_and_3_for_data(tmp_path, chatml_base, qa_dataset):
    res = run_train({"BASE_MODEL": str(chatml_base)}, cwd=tmp_path)
    assert res.returncode == ExitCode.CONFIG and "DATASET is required" in res.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    out = tmp_path / "out"
    res = run_train({"BASE_MODEL": str(chatml_base), "DATASET": str(bad), "OUTPUT_DIR": str(out)}, cwd=tmp_path)
    assert res.returncode == ExitCode.DATA, res.stderr[-2000:]
    assert "cannot tell its format from its columns ['question', 'answer']" in res.stderr
    assert "Traceback" not in res.stderr and not (out / "checkpoints").exists()
    long = write_jsonl(
        tmp_path / "long.jsonl",
        qa_messages()
        + [{"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "x"}]}],
    )
    res = run_train({"BASE_MODEL": str(chatml_base), "DATASET": str(long), "MAX_SEQ_LENGTH": "128"}, cwd=tmp_path)
    assert res.returncode == ExitCode.DATA and "long.jsonl:9 (" in res.stderr  # the file and its 1-based line


def test_check_runs_preflight_only_and_writes_nothing(tmp_path, chatml_base, qa_dataset):
    out = tmp_path / "out"
    res = run_train(
        {"BASE_MODEL": str(chatml_base), "DATASET": str(qa_dataset), "OUTPUT_DIR": str(out)}, "--check", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "preflight passed" in res.stderr and "assistant turns end with '<|im_end|>'" in res.stderr
    assert not out.exists()
    res = run_train(
        {
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "CHAT_TEMPLATE": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        },
        "--check",
        cwd=tmp_path,
    )
    assert res.returncode == ExitCode.CONFIG and "does not close the assistant turn" in res.stderr


# ------------------------------------------------------------------------------------------- preemption
def test_sigterm_saves_checkpoint_exits_143_and_rerun_resumes_to_the_same_final_step(tmp_path, chatml_base, qa_dataset):
    out = tmp_path / "out"
    env = {
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(qa_dataset),
        "OUTPUT_DIR": str(out),
        "MAX_STEPS": "400",
        "SAVE_STEPS": "1000",
        "PER_DEVICE_TRAIN_BATCH_SIZE": "2",
        "LOGGING_STEPS": "1",
        "MERGE": "false",
    }
    proc = start_train(env, tmp_path)
    wait_for(proc, STEP_LOGGED)  # the first logged step: training is under way
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == ExitCode.TERMINATED, rest[-3000:]
    assert "stopped by SIGTERM at step" in rest
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "checkpoint_complete.json").is_file()
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 0 < stopped_at < 400
    assert not (out / "adapter").exists()  # later stages never see a half-trained adapter

    res = run_train(env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {ckpts[0]} (step {stopped_at})" in res.stderr
    assert json.loads((out / "train_report.json").read_text())["global_step"] == 400
    state = json.loads((out / "checkpoints" / "checkpoint-400" / "trainer_state.json").read_text())
    assert state["global_step"] == 400 and state["log_history"][0]["step"] == 1


def test_sigterm_is_not_taken_for_an_ordinary_error_by_except_exception():
    # The handler raises wherever the main thread is, e.g. inside the tokenizer's `except Exception` around a
    # chat template; it must still stop the run (it once got swallowed there and training started anyway).
    import os

    from tuneserve import signals
    from tuneserve.exitcodes import Terminated

    previous = signal.getsignal(signal.SIGTERM)
    signals.install()
    try:
        with pytest.raises(Terminated):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Exception:  # noqa: BLE001 - the point of the test
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_before_training_exits_143_without_checkpoint(tmp_path, chatml_base):
    # 30,000 rows take many seconds to tokenize: the signal lands in the preflight, before training.
    big = write_jsonl(tmp_path / "big.jsonl", qa_messages() * 3750)
    out = tmp_path / "out"
    proc = start_train({"BASE_MODEL": str(chatml_base), "DATASET": str(big), "OUTPUT_DIR": str(out)}, tmp_path)
    wait_for(proc, "30000 training rows")
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == ExitCode.TERMINATED, rest[-2000:]
    assert "stopped by SIGTERM before training started" in rest
    assert not (out / "checkpoints").exists()


def test_corrupted_newest_checkpoint_is_skipped(tmp_path, chatml_base, qa_dataset):
    out = tmp_path / "out"
    env = {
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(qa_dataset),
        "OUTPUT_DIR": str(out),
        "MAX_STEPS": "6",
        "SAVE_STEPS": "3",
        "SAVE_TOTAL_LIMIT": "3",
        "PER_DEVICE_TRAIN_BATCH_SIZE": "2",
        "MERGE": "false",
    }
    assert run_train({**env, "MAX_STEPS": "6"}, cwd=tmp_path).returncode == 0
    # Simulate a run killed while writing checkpoint-6 (truncated weights) and one killed before the
    # marker of a checkpoint-9 was written; the finished adapter is gone so training must run again.
    import shutil

    shutil.rmtree(out / "adapter")
    weights = out / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(out / "checkpoints" / "checkpoint-3", out / "checkpoints" / "checkpoint-9")
    (out / "checkpoints" / "checkpoint-9" / "checkpoint_complete.json").unlink()

    res = run_train(env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping checkpoint-9: not marked complete" in res.stderr
    assert "skipping checkpoint-6: adapter_model.safetensors is truncated or corrupt" in res.stderr
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-3'} (step 3)" in res.stderr
    assert json.loads((out / "train_report.json").read_text())["global_step"] == 6
    assert not (out / "checkpoints" / "checkpoint-9").exists()


# ------------------------------------------------------------------------------------------- secrets
def test_hf_token_appears_in_no_output_and_no_file(tmp_path, chatml_base, qa_dataset):
    secret = "hf_TESTSECRETdoNotLeak987654321"
    out = tmp_path / "out"
    # The whole job (train, merge, verify, card) on the pairs it learns, so every artifact is written.
    env = {
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(qa_dataset),
        "OUTPUT_DIR": str(out),
        "HF_TOKEN": secret,
        "LOG_LEVEL": "debug",
        **LEARN_ENV,
        "SAVE_STEPS": "30",
    }
    runs = [
        run_train(env, cwd=tmp_path),
        run_train(env, "--print-config", cwd=tmp_path),
        run_train(env, "--check", cwd=tmp_path),
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    for r in runs:
        assert secret not in r.stdout and secret not in r.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"training_args.bin", "README.md", "verify.json", "config.json"} <= {p.name for p in files}
    for p in files:
        assert secret.encode() not in p.read_bytes(), p


def test_token_file_is_used_and_never_written(tmp_path, chatml_base, qa_dataset):
    secret = "hf_FILESECRETvalue123456"
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    out = tmp_path / "out"
    res = run_train(
        {
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(out),
            "HF_TOKEN_FILE": str(token_file),
            "MAX_STEPS": "1",
            "MERGE": "false",
        },
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert secret not in res.stdout + res.stderr
    assert all(secret.encode() not in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert json.loads((out / "config.json").read_text())["HF_TOKEN_FILE"] == str(token_file)


def test_token_file_reaches_huggingface_hub_through_the_environment(tmp_path, monkeypatch, chatml_base, qa_dataset):
    from tuneserve.config import load_train_config
    from tuneserve.pipeline import use_token

    token_file = tmp_path / "token"
    token_file.write_text("hf_fromfile\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    use_token(
        load_train_config(
            {"BASE_MODEL": str(chatml_base), "DATASET": str(qa_dataset), "HF_TOKEN_FILE": str(token_file)}
        )
    )
    from huggingface_hub import get_token

    assert os.environ["HF_TOKEN"] == "hf_fromfile" and get_token() == "hf_fromfile"


@pytest.mark.slow
def test_a_run_interrupted_twice_trains_the_rows_and_weights_of_an_uninterrupted_one(tmp_path, chatml_base, qa_dataset):
    from safetensors.torch import load_file

    # 8 rows, 2 a micro-batch, 3 micro-batches a step: 2 steps an epoch (the second takes the epoch's last
    # micro-batch alone, as accumulation does not divide the epoch), 12 steps in all.
    env = {
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(qa_dataset),
        "NUM_TRAIN_EPOCHS": "6",
        "MAX_SEQ_LENGTH": "48",
        "PER_DEVICE_TRAIN_BATCH_SIZE": "2",
        "GRADIENT_ACCUMULATION_STEPS": "3",
        "SAVE_STEPS": "1000",
        "LOGGING_STEPS": "1",
        "MERGE": "false",
        "SEED": "7",
        "LORA_DROPOUT": "0.1",
        "REPORT_TO": "tensorboard",
    }
    straight = tmp_path / "straight"
    assert run_train({**env, "OUTPUT_DIR": str(straight)}, cwd=tmp_path).returncode == 0
    out = tmp_path / "interrupted"
    stops, logs = [], []
    for losses_before_stop in (1, 3):  # the second stop lands further on than the first
        proc = start_train({**env, "OUTPUT_DIR": str(out)}, tmp_path)
        for _ in range(losses_before_stop):
            logs.append(wait_for(proc, STEP_LOGGED))
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=300)[0]
        logs.append(rest)
        assert proc.returncode == ExitCode.TERMINATED, rest[-3000:]
        stops.append(max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")))
    assert 0 < stops[0] < stops[1] < 12, stops
    res = run_train({**env, "OUTPUT_DIR": str(out)}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    logs.append(res.stderr)

    # What a container's log shows (stderr is not a terminal): a progress line per logged step, step/total and ETA,
    # in the tool's log format; no carriage-return bars, no raw dicts.
    log = "".join(logs)
    assert "\r" not in log and "{'loss'" not in log
    lines = re.findall(
        r"^\d\d:\d\d:\d\d INFO tuneserve\.trainlog: step (\d+)/12 \(\d+%\) \| epoch [\d.]+ \| (.*)$", log, re.M
    )
    assert {int(step) for step, _ in lines} == set(range(1, 13))
    for _step, rest in lines:
        assert re.fullmatch(
            r"loss [\d.]+ \| lr \S+ \| grad norm \S+ \| [\d,]+ tokens/s \| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d",
            rest,
        )
    assert lines[-1][1].endswith("eta 0:00:00")
    # metrics.jsonl: each logged step once, across two interrupts, with the figures of the uninterrupted run's
    # (the same weights, below); and TensorBoard's event files under OUTPUT_DIR hold the same losses.
    entries = [MetricsFile(d / "metrics.jsonl").entries() for d in (straight, out)]
    steps = [[e["step"] for e in es if e["kind"] == "train"] for es in entries]
    assert steps[0] == steps[1] == list(range(1, 13))
    assert [e["kind"] for e in entries[1]] == ["train"] * 12 + ["summary"]
    for a, b in zip(*(es[:12] for es in entries)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2) and a["epoch"] == b["epoch"]  # bf16 on the CPU
    for d, es in zip((straight, out), entries):
        scalars = tensorboard_scalars(d / "tensorboard")
        losses = {step: loss for step, loss in scalars["train/loss"]}  # a resumed segment's file repeats no step
        assert sorted(losses) == list(range(1, 13))
        assert all(losses[e["step"]] == pytest.approx(e["loss"], rel=1e-6) for e in es if e["kind"] == "train")

    reports = [json.loads((d / "train_report.json").read_text()) for d in (straight, out)]
    for report, segments in zip(reports, ([1], [3])):
        assert report["ledger_check"] == {
            "verified": True,
            "epochs": 6,
            "segments": segments,
            "epochs_not_once_each": [],
        }
    ledgers = [report["processes"][0]["ledger"] for report in reports]
    assert [(s["from_step"], s["to_step"]) for s in ledgers[1]["segments"]] == [
        (0, stops[0]),
        (stops[0], stops[1]),
        (stops[1], 12),
    ]
    # The same micro-batches in the same order: resuming replays the sampler, skipping what was trained.
    flat = [[b for s in ledger["segments"] for b in s["batches"]] for ledger in ledgers]
    assert flat[0] == flat[1] and len(flat[0]) == 24 and all(len(batch) == 2 for batch in flat[0])
    # And the same weights, within 1e-2 absolute on LoRA weights of magnitude ~0.1 (measured: 2e-3; bf16
    # compute on the CPU, dropout's random state restored from each checkpoint).
    weights = [load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, out)]
    assert weights[0].keys() == weights[1].keys()
    worst = max(float((weights[0][k].float() - weights[1][k].float()).abs().max()) for k in weights[0])
    assert worst <= 1e-2, worst


def test_evaluations_during_training_are_logged_and_change_nothing_that_is_learned(tmp_path, chatml_base, qa_dataset):
    """Held-out rows are evaluated every tenth of the run by default. The random state is restored after each, so
    every step's loss and the final weights are exactly those of the same run without evaluations."""
    from safetensors.torch import load_file

    env = {
        "BASE_MODEL": str(chatml_base),
        "DATASET": str(qa_dataset),
        "EVAL_SIZE": "2",
        "MAX_STEPS": "6",
        "PER_DEVICE_TRAIN_BATCH_SIZE": "2",
        "LOGGING_STEPS": "1",
        "SAVE_STEPS": "1000",
        "LORA_DROPOUT": "0.1",  # dropout draws from the generator each evaluation's data loader draws from
        "MERGE": "false",
    }
    runs = {}
    for name, extra in (("evaluated", {}), ("plain", {"SFT_EVAL_STRATEGY": "no"})):
        out = tmp_path / name
        res = run_train({**env, **extra, "OUTPUT_DIR": str(out)}, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = (out, MetricsFile(out / "metrics.jsonl").entries(), res.stderr)
    (out, entries, log), (plain, plain_entries, _) = runs["evaluated"], runs["plain"]
    evals = [e for e in entries if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [1, 2, 3, 4, 5, 6] and all(e["eval_loss"] > 0 for e in evals)
    assert len(re.findall(r"tuneserve\.trainlog: eval at step \d/6: loss [\d.]+", log)) == 6
    assert not [e for e in plain_entries if e["kind"] == "eval"]
    losses = [[e["loss"] for e in es if e["kind"] == "train"] for es in (entries, plain_entries)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    weights = [load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, plain)]
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[1])
    report = json.loads((out / "train_report.json").read_text())
    assert report["ledger_check"]["verified"] is True  # evaluation batches are not training rows


def test_the_ledger_check_catches_a_row_skipped_or_trained_twice_in_an_epoch():
    from tuneserve.train import epoch_check

    def ledger(*segments):
        return {"segments": [{"from_step": 0, "to_step": 0, "batches": b} for b in segments]}

    rows = [0, 1, 2, 3]
    good = ledger([[0, 1], [2, 3]], [[3, 1], [0, 2]])  # two epochs over two segments, in any order
    assert epoch_check([good], rows, [2]) == {
        "verified": True,
        "epochs": 2,
        "segments": [2],
        "epochs_not_once_each": [],
    }
    assert epoch_check([ledger([[0, 1], [2, 3]], [[3, 3], [0, 2]])], rows, [2])["epochs_not_once_each"] == [1]
    assert epoch_check([ledger([[0, 1], [2, 2]])], rows, [2])["verified"] is False
    assert epoch_check([ledger([[0, 1], [2, 3]], [[1]])], rows, [2])["verified"] is True  # cut short, no repeat
    assert epoch_check([ledger([[0, 1], [2, 3]], [[1, 1]])], rows, [2])["verified"] is False
    # Two processes: each takes its own half of every epoch.
    assert epoch_check([ledger([[0, 1]]), ledger([[2, 3]])], rows, [1, 1])["verified"] is True
    assert epoch_check([ledger([[0, 1]]), ledger([[0, 1]])], rows, [1, 1])["verified"] is False
    # Three processes, 8 rows, 2 micro-batches of 2 each: dealt round-robin, the last ones completed with the rows
    # the epoch started with (accelerate's even batches). Other repeats are still caught.
    rows8 = list(range(8))
    dealt = [ledger([[6, 3], [4, 5]]), ledger([[0, 7], [6, 3]]), ledger([[2, 1], [0, 7]])]
    assert epoch_check(dealt, rows8, [2, 2, 2]) | {"segments": None} == {
        "verified": True,
        "epochs": 1,
        "segments": None,
        "epochs_not_once_each": [],
        "padding_repeats": 4,
    }
    twice = [ledger([[6, 3], [4, 5]]), ledger([[0, 7], [2, 1]]), ledger([[2, 1], [0, 7]])]
    assert epoch_check(twice, rows8, [2, 2, 2])["verified"] is False
    assert epoch_check([ledger([[0, 1], [2, 3], [0, 1]])], rows, [3])["verified"] is False  # one process: no padding
    unknown = {"segments": [{"from_step": 0, "to_step": 4, "batches": None}]}
    assert epoch_check([unknown], rows, [2])["verified"] is None  # not checked: it neither passes nor blocks


# ------------------------------------------------------------------------------------------- what a batch means
# Under which the tiny model learns the 8 pairs exactly with a batch of 2 (4 optimizer steps an epoch): the learning
# rate LEARN_ENV uses with all 8 pairs in one step is too high for so small a batch.
SMALL_BATCH_ENV = {**LEARN_ENV, "LEARNING_RATE": "2e-3", "NUM_TRAIN_EPOCHS": "25", "MERGE": "false"}


def ledger_batches(out: Path) -> list[list[int]]:
    report = json.loads((out / "train_report.json").read_text())
    return [b for p in report["processes"] for seg in p["ledger"]["segments"] for b in seg["batches"]]


def test_packing_changes_how_a_batch_is_laid_out_never_the_steps_the_rows_or_what_is_learned(
    tmp_path, chatml_base, qa_dataset
):
    """BATCH_SIZE=2 over 8 rows, 25 epochs: with PACKING=false (rows padded), PACKING=true (rows flattened into one
    sequence) and the default, the run takes the same 100 optimizer steps, each the same rows in the same order, and
    every run answers all 8 questions exactly. (Packing rows into new sequences, as TRL's packer does, made the
    batch count packed sequences: 25 steps, and a model that had not learned the pairs.)"""
    env = {
        k: v
        for k, v in SMALL_BATCH_ENV.items()
        if k not in ("PER_DEVICE_TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS")
    }
    runs = {}
    for packing in ("false", "true", None):
        out = tmp_path / f"out-{packing or 'default'}"
        layout = {"PACKING": packing} if packing else {}
        res = run_train(
            {
                "BASE_MODEL": str(chatml_base),
                "DATASET": str(qa_dataset),
                "OUTPUT_DIR": str(out),
                "BATCH_SIZE": "2",
                **env,
                **layout,
            },
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert "batch 2 sequence(s) per optimizer step = 2 per micro-batch x 1 accumulation step(s)" in res.stderr
        report = json.loads((out / "train_report.json").read_text())
        assert report["batch"]["padding_free"] is (packing == "true")  # auto pads on the CPU
        runs[packing] = (report["global_step"], ledger_batches(out))
        assert report["batch"]["steps_per_epoch"] == len(QA) // 2
        answers = greedy_answers(chatml_base, out / "adapter", [q for q, _ in QA])
        assert answers == [f"{a}<|im_end|>" for _, a in QA], (packing, answers)
    assert {steps for steps, _ in runs.values()} == {25 * len(QA) // 2}
    batches = [b for _, b in runs.values()]
    assert batches[0] == batches[1] == batches[2] and all(len(b) == 2 for b in batches[0])


@pytest.mark.parametrize(
    "name, value, logged, split",
    [
        ("BATCH_SIZE", "8", "BATCH_SIZE as set", (8, 8, 1)),
        ("PER_DEVICE_TRAIN_BATCH_SIZE", "3", "PER_DEVICE_TRAIN_BATCH_SIZE as set, no accumulation", (3, 3, 1)),
        ("GRADIENT_ACCUMULATION_STEPS", "4", "GRADIENT_ACCUMULATION_STEPS as set", (4, 1, 4)),
    ],
)
def test_any_one_batch_variable_alone_trains_and_the_log_says_what_the_batch_became(
    tmp_path, chatml_base, qa_dataset, name, value, logged, split
):
    out = tmp_path / "out"
    res = run_train(
        {
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(out),
            "MAX_STEPS": "2",
            "MERGE": "false",
            name: value,
        },
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    batch, micro, accum = split
    assert (
        f"batch {batch} sequence(s) per optimizer step = {micro} per micro-batch x {accum} accumulation step(s) x 1 "
        f"process(es) ({logged}" in res.stderr
    )
    report = json.loads((out / "train_report.json").read_text())
    assert report["global_step"] == 2
    assert (report["batch"]["batch_size"], report["batch"]["per_device_train_batch_size"]) == (batch, micro)
    # Each optimizer step took `batch` rows: `accum` micro-batches of `micro` (wrapping into the next epoch).
    assert [len(b) for b in ledger_batches(out)] == [micro] * (2 * accum)
