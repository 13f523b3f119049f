"""`make gpu-check`: everything this project needs to learn from a GPU, in one prepared command of about 8 minutes.

    python -m benchmarks.gpu_check wheels [--out build/gpu-wheels]   # here: what the GPU machine lacks
    python -m benchmarks.gpu_check run [--smoke] [--out DIR]         # there (--smoke: the same stages on the CPU)

The GPU machine this is built for has Python 3.12, torch, transformers, peft, accelerate and pyarrow, but not
trl, bitsandbytes, datasets or python-dotenv, no Hub, and carries at most 64 MiB with the repository: `wheels`
downloads those packages and their dependencies that the machine lacks (bitsandbytes trimmed to its CPU and CUDA
13 libraries), and `make gpu-check` installs them into a virtual environment over the machine's packages.

Each stage runs in its own child process under a deadline, and the report (OUT/gpu.json) is rewritten after every
stage, so a stage that hangs or a machine that goes away still leaves the stages before it:
  env      versions, the GPU, native bfloat16, a bitsandbytes NF4 round trip on the device, the C compiler Triton
           needs
  kernels  TRL's fused LM head (the loss: a Triton kernel on CUDA) against a float32 reference, forward and
           backward; packed rows against each row alone (sdpa, the model in the compute dtype); the NF4 replay of
           MERGE_BASE=dequantized on the CPU against the device
  train    `python -m entrypoints.train` on a tiny model: it must learn (the loss falls by a nat), verify must pass
           and training must have run on the device in the dtype the device computes natively
  bench    the training benchmark (benchmarks/train.py: Gemma 3 1B shapes on a GPU): ours against the guide
  train-1b `python -m entrypoints.train` on a model of Gemma 3 1B's shapes (GPU only)
Exit 0 when every stage passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "GPU_CHECK_RESULT "
# On the GPU machine: what it must install (the rest of the training stack is there already).
MISSING = ("trl", "bitsandbytes", "datasets", "python-dotenv")
PRESENT = ("torch", "transformers", "peft", "accelerate", "pyarrow")
WHEEL_PLATFORM = (
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_24_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
)
BNB_KEEP = ("libbitsandbytes_cpu", "libbitsandbytes_cuda13")  # the machine's torch is built for CUDA 13
CARRY_LIMIT = 64 * 2**20
# (name, deadline in seconds, GPU only). The deadlines budget the GPU machine's time; the CPU smoke (--smoke, in
# `make test` on 2 shared cores) runs the same work several times slower, so it gets SMOKE_SLACK times as long.
SMOKE_SLACK = 2
STAGES = (
    ("env", 120, False),
    ("kernels", 180, False),
    ("train", 300, False),
    ("bench", 420, False),
    ("train-1b", 300, True),
)


# ------------------------------------------------------------------------------------------------ the wheels
def requirement_closure(names: tuple[str, ...]) -> set[str]:
    """The distributions `names` need, themselves included, as installed in this environment (the pinned set)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen.add(name)
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def wheels(out: Path) -> dict:
    """Download, for CPython 3.12 on x86-64 Linux, the pinned versions of what the GPU machine lacks."""
    from importlib.metadata import version

    need = sorted(requirement_closure(MISSING) - requirement_closure(PRESENT))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={version(name)}" for name in need]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            *WHEEL_PLATFORM,
            "-d",
            str(out),
            *pins,
        ],
        check=True,
    )
    for wheel in out.glob("bitsandbytes-*.whl"):
        trim_bitsandbytes(wheel)
    files = sorted(out.glob("*.whl"))
    total = sum(f.stat().st_size for f in files)
    report = {
        "wheels": {f.name: f.stat().st_size for f in files},
        "bytes": total,
        "limit": CARRY_LIMIT,
        "fits": total <= CARRY_LIMIT,
    }
    (out / "wheels.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(files)} wheels, {total / 2**20:.1f} MiB (carry limit {CARRY_LIMIT / 2**20:.0f} MiB) in {out}")
    if not report["fits"]:
        raise SystemExit("the wheels do not fit the carry limit")
    return report


def trim_bitsandbytes(wheel: Path) -> None:
    """bitsandbytes ships one native library per CUDA version (about 41 MiB); keep the CPU one and CUDA 13's. The
    wheel's RECORD loses the removed files' lines, so pip installs it as a whole wheel of fewer files."""
    trimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {
            i.filename
            for i in src.infolist()
            if Path(i.filename).name.startswith("libbitsandbytes_") and not Path(i.filename).name.startswith(BNB_KEEP)
        }
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(
                    line + "\n" for line in data.decode().splitlines() if line.split(",", 1)[0] not in dropped
                ).encode()
            dst.writestr(info, data)
    trimmed.replace(wheel)


# ------------------------------------------------------------------------------------------------ the stages
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def stage_env(work: Path, smoke: bool) -> dict:
    from importlib.metadata import version

    import bitsandbytes.functional as F
    import torch

    from tuneserve.model import compiler_problem, native_bf16

    device = _device()
    out = {
        "versions": {p: version(p) for p in (*PRESENT, *MISSING)},
        "python": sys.version.split()[0],
        "device": device,
        "cuda": torch.version.cuda,
    }
    out["native_bf16"] = native_bf16(device)[0]
    if device == "cuda":
        out.update(
            gpu=torch.cuda.get_device_name(),
            capability=list(torch.cuda.get_device_capability()),
            memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )
    torch.manual_seed(0)
    w = torch.randn(1024, 1024, dtype=torch.bfloat16, device=device)
    q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    back = F.dequantize_4bit(q, state)
    rel = ((back.float() - w.float()).norm() / w.float().norm()).item()
    out["bnb_nf4_round_trip"] = {"device": str(q.device), "relative_error": round(rel, 4)}
    assert q.device.type == device and rel < 0.15, f"NF4 round trip on {device}: relative error {rel}"
    out["compiler"] = compiler_problem() or "gcc/clang and Python headers found"
    assert device != "cuda" or compiler_problem() is None, compiler_problem()
    return out


def stage_kernels(work: Path, smoke: bool) -> dict:
    import torch
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    device = _device()
    dtype = torch.bfloat16
    out: dict = {}
    # TRL's fused LM head against float32 log_softmax, forward and gradients.
    torch.manual_seed(0)
    n, h, v = (64, 64, 1000) if smoke else (2048, 1152, 262144)  # Gemma 3 1B's hidden size and vocabulary
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device=device, dtype=dtype) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    fused = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 4096)[0]
    fused.sum().backward()
    g_fused = hidden.grad.float().clone(), weight.grad.float().clone()
    hidden.grad = weight.grad = None
    ref = torch.log_softmax(hidden.float() @ weight.float().T, dim=-1).gather(1, targets[:, None])[:, 0]
    ref.sum().backward()
    diffs = {
        "log_probs": (fused.float() - ref).abs().max().item(),
        "grad_hidden": (g_fused[0] - hidden.grad.float()).abs().max().item() / hidden.grad.float().abs().max().item(),
        "grad_weight": (g_fused[1] - weight.grad.float()).abs().max().item() / weight.grad.float().abs().max().item(),
    }
    out["fused_lm_head"] = {
        "shape": [n, h, v],
        "dtype": "bfloat16",
        "triton": device == "cuda",
        **{k: float(f"{d:.3g}") for k, d in diffs.items()},
    }
    assert diffs["log_probs"] < 0.05 and diffs["grad_hidden"] < 0.02 and diffs["grad_weight"] < 0.02, diffs
    # Packed rows against each row alone, through the product's own check (sdpa, the compute dtype).
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneserve import batching

    config = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        attn_implementation="sdpa",
        use_cache=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    out["packing_sdpa"] = {"largest_difference": batching.check_packing(model, 0), "dtype": "bfloat16"}
    # NF4 replay: the CPU kernels against the device's on the same weight.
    from tuneserve.merge import nf4_roundtrip

    w = torch.randn(2048, 2048, dtype=torch.bfloat16)
    quant = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "dtype": "bfloat16"}
    on_cpu, on_device = nf4_roundtrip(w, {**quant, "device": "cpu"}), nf4_roundtrip(w, {**quant, "device": device})
    differ = (on_cpu != on_device).sum().item()
    out["nf4_replay_cpu_vs_device"] = {
        "device": device,
        "elements": w.numel(),
        "differing": differ,
        "max_difference": (on_cpu.float() - on_device.float()).abs().max().item(),
    }
    return out


def _train_run(work: Path, base: Path, data: Path, env: dict, timeout: float) -> tuple[dict, str]:
    out = work / "output"
    from benchmarks import common

    full = common.clean_env(BASE_MODEL=str(base), DATASET=str(data), OUTPUT_DIR=str(out), LOGGING_STEPS="5", **env)
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "entrypoints.train"], env=full, cwd=work, capture_output=True, text=True, timeout=timeout
    )
    (work / "train.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, f"entrypoints.train exited {res.returncode}: {res.stderr[-3000:]}"
    report = json.loads((out / "train_report.json").read_text())
    meta = json.loads((out / "adapter" / "training_meta.json").read_text())
    losses = [e["loss"] for e in report["log_history"] if "loss" in e]
    result = {
        "seconds": round(time.monotonic() - started, 1),
        "dtype": meta["dtype"],
        "quantized_on": (meta.get("quantization") or {}).get("device"),
        "steps": report["global_step"],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_runtime": report["metrics"].get("train_runtime"),
    }
    verify = out / "verify.json"
    if verify.is_file():
        result["verify_passed"] = json.loads(verify.read_text())["passed"]
    return result, res.stderr


def stage_train(work: Path, smoke: bool) -> dict:
    from devtools import textsql
    from devtools.tiny import build_tiny_model

    rows = textsql.generate(8, seed=3)  # few rows, many epochs: a tiny random model learns them, stops included
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = build_tiny_model(
        work / "base", [f"{r['sql_context']} {r['sql_prompt']} {r['sql']}" for r in rows] * 4, vocab_size=2000
    )
    result, _ = _train_run(
        work,
        base,
        data,
        {
            "SYSTEM_PROMPT": textsql.SYSTEM_PROMPT,
            "USER_TEMPLATE": textsql.USER_TEMPLATE,
            "ASSISTANT_FIELD": "sql",
            "NUM_TRAIN_EPOCHS": "60",
            "LEARNING_RATE": "5e-3",
            "LORA_R": "32",
            "LORA_ALPHA": "64",
            "MAX_GRAD_NORM": "1.0",
        },
        timeout=280 * (SMOKE_SLACK if smoke else 1),
    )
    from tuneserve.model import native_bf16

    device = _device()
    assert result["quantized_on"] == device, result
    assert result["last_loss"] < result["first_loss"] - 1.0, f"the loss did not fall by a nat: {result}"
    assert result.get("verify_passed") is True, result
    native = native_bf16(device)[0]
    assert result["dtype"] == ("bfloat16" if native else "float16" if device == "cuda" else "float32"), result
    return result


def stage_bench(work: Path, smoke: bool) -> dict:
    results = work / "results"
    args = [sys.executable, "-m", "benchmarks.train", "--results-dir", str(results), "--work-dir", str(work / "w")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # benchmarks.train from the checkout (cwd), tuneserve installed
    res = subprocess.run(
        args + (["--smoke"] if smoke else []),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=410 * (SMOKE_SLACK if smoke else 1),
    )
    (work / "bench.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((results / "train.json").read_text())
    return {"figures": {f["key"]: f["value"] for f in r["figures"]}, "rows": r["rows"]}


def stage_train_1b(work: Path, smoke: bool) -> dict:
    """A random model of Gemma 3 1B's shapes (no Hub here) through the whole entrypoint."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from benchmarks.merge import GEMMA3_1B
    from devtools import textsql
    from devtools.tiny import build_tokenizer

    rows = textsql.generate(400, seed=4)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_tokenizer(
        [f"{r['sql_context']} {r['sql_prompt']} {r['sql']}" for r in rows], template="gemma", vocab_size=4096
    )
    base = work / "base"
    config = Gemma3TextConfig(
        **GEMMA3_1B, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    tok.save_pretrained(base)
    result, _ = _train_run(
        work,
        base,
        data,
        {
            "SYSTEM_PROMPT": textsql.SYSTEM_PROMPT,
            "USER_TEMPLATE": textsql.USER_TEMPLATE,
            "ASSISTANT_FIELD": "sql",
            "MAX_STEPS": "40",
            "VERIFY_MAX_NEW_TOKENS": "16",
        },
        timeout=290 * (SMOKE_SLACK if smoke else 1),
    )
    assert result["quantized_on"] == "cuda" and result.get("verify_passed") is True, result
    return result


STAGE_FUNCTIONS = {
    "env": stage_env,
    "kernels": stage_kernels,
    "train": stage_train,
    "bench": stage_bench,
    "train-1b": stage_train_1b,
}


# ------------------------------------------------------------------------------------------------ the driver
def run(out: Path, smoke: bool, only: list[str] | None = None) -> int:
    """Every stage in its own process, under its deadline; the report is rewritten after each."""
    import torch

    from benchmarks import common

    gpu = torch.cuda.is_available()
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "smoke": smoke,
        "machine": common.machine(),
        "stages": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name, deadline, gpu_only in STAGES:
        if only and name not in only:
            continue
        deadline *= SMOKE_SLACK if smoke else 1
        entry = {"stage": name, "deadline_s": deadline}
        if gpu_only and not gpu:
            entry.update(status="not run", why="needs a GPU")
        else:
            work = out / "work" / name
            work.mkdir(parents=True, exist_ok=True)
            print(f"gpu-check: {name} (deadline {deadline} s) ...", flush=True)
            started = time.monotonic()
            try:
                res = subprocess.run(
                    [sys.executable, "-m", "benchmarks.gpu_check", "stage", name, "--work", str(work)]
                    + (["--smoke"] if smoke else []),
                    capture_output=True,
                    text=True,
                    timeout=deadline,
                    cwd=REPO,
                )
                (work / "stage.log").write_text(res.stdout + res.stderr)
                tagged = [ln for ln in res.stdout.splitlines() if ln.startswith(RESULT_TAG)]
                answer = (
                    json.loads(tagged[-1][len(RESULT_TAG) :])
                    if tagged
                    else {"ok": False, "error": f"exited {res.returncode}: {res.stderr[-2000:]}"}
                )
            except subprocess.TimeoutExpired:
                answer = {"ok": False, "error": f"did not finish within {deadline} s"}
            entry.update(
                status="passed" if answer["ok"] else "failed",
                seconds=round(time.monotonic() - started, 1),
                **({"result": answer["result"]} if answer["ok"] else {"error": answer["error"]}),
            )
            status = status or (0 if answer["ok"] else 1)
            print(f"gpu-check: {name} {entry['status']} in {entry['seconds']} s", flush=True)
        report["stages"].append(entry)
        (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return status


def stage_main(name: str, work: Path, smoke: bool) -> int:
    try:
        result = STAGE_FUNCTIONS[name](work, smoke)
        print(RESULT_TAG + json.dumps({"ok": True, "result": result}, default=str), flush=True)
    except Exception as exc:  # the driver records what failed and goes on with the next stage
        traceback.print_exc()
        print(RESULT_TAG + json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:3000]}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheels", help="download the wheels the GPU machine lacks")
    w.add_argument("--out", type=Path, default=REPO / "build" / "gpu-wheels")
    r = sub.add_parser("run", help="run the stages and write OUT/gpu.json")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "build" / "gpu-check"))
    r.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU lane: make test)")
    r.add_argument("--only", nargs="*", help="run only these stages")
    s = sub.add_parser("stage", help=argparse.SUPPRESS)
    s.add_argument("name", choices=list(STAGE_FUNCTIONS))
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.command == "wheels":
        wheels(args.out)
        return 0
    if args.command == "stage":
        return stage_main(args.name, args.work, args.smoke)
    return run(args.out.resolve(), args.smoke, args.only)


if __name__ == "__main__":
    raise SystemExit(main())
