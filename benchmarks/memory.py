"""Benchmark 8, big models: the whole job (train, merge, verify, evaluate, quantize) under a memory limit smaller
than the model's 16-bit weights, each stage's peak as a ratio to that size, beside loading the 16-bit model whole.

    .venv-train/bin/python -m benchmarks.memory [--smoke]

The base is a Llama-shaped model of random bfloat16 weights (hidden 4096, 12 layers, 1.6 B parameters, 3.2 GB at
16 bits; --smoke: a tiny one), saved in 200 MB shards. The training entrypoint runs in a memory cgroup of its own
(devtools/cgroup.py: the mechanism of `docker run --memory` and a pod's limit) of 2.5 GiB, on plain-text rows (a
random model has no end of turn to learn, so verify's stop check does not apply), QUANTIZE=int8. Its stages record
their peaks in OUTPUT_DIR/memory.json: anonymous memory, what the kernel cannot reclaim (the checkpoint files a
stage maps are reclaimed under the limit and not counted).

What a user would otherwise do with the merged model: load it whole (`from_pretrained` on the CPU), as verify and
evaluate did before. Both that and verify's own loader run in a fresh process under the same limit, the merged
files first evicted from the page cache, and answer one prompt (next-token logits, 4 greedy tokens): peak, time,
and whether the answers are the same.

Targets: the limit is below the 16-bit size; merge and quantize peak below half of it; verify (whose peak is its
adapter model, the training model loaded again on a heap the earlier stages fragmented) within 1.5x of training's
peak; both loaders give the same answer. On a GPU (not run here) the whole-model load copies the 16-bit weights
into GPU memory and cannot hold a model larger than it.

Root and the memory controller are needed for the limit (as on the CI machine). `tests/test_bigmodel.py` runs the
same function in `make test`; this module's smoke is not part of `make bench-smoke` (that test covers it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from devtools.cgroup import MemoryLimit
from tuneserve.memory import weights_bytes

TITLE = "Big models: every stage under a memory limit smaller than the 16-bit model"
GiB = 1 << 30
SIZES = {
    "full": {"hidden_size": 4096, "num_layers": 12, "limit": int(2.5 * GiB)},
    "smoke": {"hidden_size": 256, "num_layers": 2, "limit": int(1.5 * GiB)},
}
STAGES = ("train", "merge", "verify", "quantize")
HALF = 0.5
# Verify's peak is its adapter model: the training model loaded again (4-bit quantization on load), on a heap the
# stages before have fragmented. On a GPU, training's activations and optimizer state dwarf it.
VERIFY_OVER_TRAIN = 1.5


def build_base(work: Path, hidden_size: int, num_layers: int) -> Path:
    """The base model (reused while its shapes are the same)."""
    from devtools.tiny import build_tiny_model
    from tests.helpers import CORPUS

    base, stamp = work / "base", work / "base.json"
    key = {"hidden_size": hidden_size, "num_layers": num_layers}
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return base
    shutil.rmtree(base, ignore_errors=True)
    build_tiny_model(base, CORPUS, template=None, max_shard_size="200MB", **key)
    stamp.write_text(json.dumps(key))
    return base


def limited_pipeline(work: Path, *, hidden_size: int, num_layers: int, limit: int, timeout: float = 3000) -> dict:
    """Build the base and run the training entrypoint on it under `limit` bytes; what it did and measured."""
    from tests.helpers import CORPUS

    work.mkdir(parents=True, exist_ok=True)
    base = build_base(work, hidden_size, num_layers)
    rows = work / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[:12]))
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = common.clean_env(
        BASE_MODEL=str(base),
        DATASET=str(rows),
        OUTPUT_DIR=str(out),
        EVAL_SIZE="2",
        MAX_STEPS="2",
        PER_DEVICE_TRAIN_BATCH_SIZE="2",
        GRADIENT_ACCUMULATION_STEPS="1",
        LOGGING_STEPS="1",
        SAVE_STEPS="1000",
        VERIFY_SAMPLES="1",
        VERIFY_MAX_NEW_TOKENS="4",
        EVAL_MAX_SAMPLES="2",
        EVAL_MAX_NEW_TOKENS="4",
        QUANTIZE="int8",
    )
    started = time.monotonic()
    with MemoryLimit(limit) as cgroup:
        res = subprocess.run(
            [sys.executable, "-m", "entrypoints.train"],
            env=common.dev_env(env),
            cwd=work,
            preexec_fn=cgroup.enter,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        oom_kills = cgroup.oom_kills
    (work / "pipeline.log").write_text(res.stdout + res.stderr)
    report = json.loads((out / "memory.json").read_text()) if (out / "memory.json").is_file() else {}
    return {
        "returncode": res.returncode,
        "log": res.stderr,
        "out": str(out),
        "merged": str(out / "merged"),
        "limit": limit,
        "oom_kills": oom_kills,
        "seconds": round(time.monotonic() - started, 1),
        "model_bytes_16bit": weights_bytes(base),
        "plan": report.get("plan"),
        "peaks": report.get("peaks") or {},
    }


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (posix_fadvise, these files only): the next read comes from disk
    and is charged to the reader's cgroup, as on a machine that has not just written them."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _answer(spec: dict) -> dict:
    """In a fresh process under the limit: load the merged model verify's way or whole (`from_pretrained` on the
    CPU, as a user would), then the next-token logits of a prompt and 4 greedy tokens; times and the peak."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneserve import memory, verify

    merged = Path(spec["merged"])
    evict(merged)
    peaks = memory.Peaks()
    with peaks.measure(spec["way"]):
        start = time.perf_counter()
        if spec["way"] == "ours":
            tok, model = verify.load_merged(merged)
        else:
            tok = AutoTokenizer.from_pretrained(merged)
            model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto", device_map={"": "cpu"}).eval()
        loaded = time.perf_counter()
        ids = tok("What is the capital of France?")["input_ids"]
        logits = verify.next_token_logits(model, [ids])
        tokens = verify.generate(model, tok, ids, 4)
        done = time.perf_counter()
    return {
        "peak_bytes": peaks.stages[spec["way"]]["anon"],
        "load_seconds": round(loaded - start, 2),
        "answer_seconds": round(done - loaded, 2),
        "logits": [round(float(v), 4) for v in logits[0, :8]],
        "tokens": tokens,
        "placement": sorted(set(getattr(model, "hf_device_map", {"": "cpu"}).values())),
    }


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("memory", __doc__, argv)
    if common.answered_as_child(args, {"answer": _answer}):
        return 0
    started = time.monotonic()
    size = SIZES["smoke" if args.smoke else "full"]
    print(f"memory: the pipeline under a {size['limit'] / GiB:.2f} GiB limit in {args.work_dir}", flush=True)
    run = limited_pipeline(args.work_dir, **size)
    if run["returncode"] != 0:
        print(run["log"][-4000:], file=sys.stderr)
        raise SystemExit(
            f"memory: the pipeline exited {run['returncode']} under the limit (oom kills: {run['oom_kills']})"
        )
    answers = {}
    for way in ("ours", "whole"):
        print(f"memory: the merged model loaded {way} under the same limit, one prompt answered ...", flush=True)
        with MemoryLimit(run["limit"]) as cgroup:
            answers[way] = common.run_child(
                "benchmarks.memory",
                {"kind": "answer", "way": way, "merged": run["merged"]},
                log=args.work_dir / f"answer-{way}.log",
                preexec_fn=cgroup.enter,
            )
    ours, whole = answers["ours"], answers["whole"]
    size16 = run["model_bytes_16bit"]
    peaks = run["peaks"]
    rows = [
        {
            "stage": name,
            "peak_gib": round(peaks[name]["anon"] / GiB, 3),
            "ratio_to_16bit": round(peaks[name]["anon"] / size16, 3),
        }
        for name in STAGES
    ]
    labels = {"ours": "verify's loader (spread, rest read from disk)", "whole": "from_pretrained whole (mapped)"}
    for way, a in answers.items():
        rows.append(
            {
                "stage": f"load + 1 prompt, 4 tokens: {labels[way]}",
                "peak_gib": round(a["peak_bytes"] / GiB, 3),
                "ratio_to_16bit": round(a["peak_bytes"] / size16, 3),
                "load_seconds": a["load_seconds"],
                "answer_seconds": a["answer_seconds"],
                "placement": "+".join(a["placement"]),
            }
        )
    ratio = {name: round(peaks[name]["anon"] / size16, 3) for name in STAGES}
    figures = [
        common.figure("limit_ratio", "memory limit / 16-bit model", round(run["limit"] / size16, 3), "x", at_most=1.0),
        *(
            common.figure(f"{name}_ratio", f"{name} peak / 16-bit model", ratio[name], "x", at_most=HALF)
            for name in ("merge", "quantize")
        ),
        common.figure(
            "verify_over_train",
            "verify peak / train peak (verify fits where training fit)",
            round(peaks["verify"]["anon"] / peaks["train"]["anon"], 3),
            "x",
            at_most=VERIFY_OVER_TRAIN,
        ),
        common.figure("verify_ratio", "verify peak / 16-bit model", ratio["verify"], "x"),
        common.figure("train_ratio", "train peak / 16-bit model", ratio["train"], "x"),
        common.figure(
            "answer_time_ratio",
            "load + answer time under the limit, verify's loader / whole model",
            round(
                (ours["load_seconds"] + ours["answer_seconds"]) / (whole["load_seconds"] + whole["answer_seconds"]), 3
            ),
            "x",
        ),
        common.figure(
            "same_answer",
            "same logits and tokens both ways",
            float(ours["logits"] == whole["logits"] and ours["tokens"] == whole["tokens"]),
            "",
            at_least=1.0,
        ),
    ]
    not_run_rows = [
        common.not_run(
            "the same on a GPU",
            "no GPU here: on a GPU the whole-model load must copy the 16-bit weights into GPU memory and fails for a "
            "model larger than it; verify's loader spreads it over the GPUs, host memory and disk",
        )
    ]
    common.write_result(
        args,
        title=TITLE,
        started=started,
        setup={
            "model": f"Llama-shaped, hidden {size['hidden_size']}, {size['num_layers']} layers, bfloat16, 200 MB "
            "shards",
            "model_bytes_16bit": size16,
            "memory_limit_bytes": run["limit"],
            "pipeline_seconds": run["seconds"],
            "verify_placement": (run["plan"] or {}).get("verify_placement"),
            "peaks": "anonymous memory of the process (resident less mapped files), sampled every 20 ms",
        },
        rows=rows,
        figures=figures,
        not_run_rows=not_run_rows,
        notes=[
            "Peaks include the process's own libraries (torch, transformers, TRL: about 0.4 GiB), the same for any "
            "model size: the ratios fall for larger models.",
            "On the CPU, transformers maps a checkpoint it loads in its own dtype: the whole model is file pages the "
            "kernel evicts and reads again under the limit, so the whole-model load survives it, reading at random "
            "as pages fault; verify's loader reads the layers it did not place in memory in order at each forward.",
            "Both loads start with the merged files evicted from the page cache (posix_fadvise).",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
