"""The GPU check: everything this project needs to learn from a GPU, in one prepared command of about 8 minutes.

    python -m benchmarks.gpu_check wheels [--out build/gpu-wheels]   # here (make gpu-wheels): what to carry there
    bash benchmarks/gpu-check.sh [--smoke]                            # there: the one command (no make needed)
    python -m benchmarks.gpu_check run [--smoke] [--out DIR] [--budget S] [--work DIR]   # what the script runs

The GPU machine this is built for (docs/development.md) has no network, carries at most 64 MiB with the repository
and gives back at most 8 files from $OUT; its `python3` is itself a virtual environment (/opt/torch/.venv, Python
3.12) holding torch (CUDA 13), transformers, peft, accelerate, numpy and pyarrow. A venv made from it does not see
those packages, so nothing makes one: benchmarks/gpu-check.sh installs the carried wheels with `pip install --target`
into a folder under /tmp and puts it first on PYTHONPATH (ahead of the machine's own site-packages, so the carried
pins win), installs this project there from a copy of its sources, and runs the driver with that python3.

`wheels` downloads, for CPython 3.12 on x86-64 Linux, the pinned version (requirements/constraints.txt, as
installed in .venv-train) of every distribution the training stack needs except torch and what torch itself pins
(triton, the nvidia-* libraries): transformers, peft, accelerate, huggingface_hub, tokenizers, trl, bitsandbytes
(trimmed to its CPU and CUDA 13 libraries), datasets and the rest, so that only torch and triton differ from the
image. A few large binary packages the machine has (MACHINE_KEEPS: numpy, pyarrow, pandas, matplotlib's) are not
carried, to stay under the carry limit; the env stage lists every pin the machine's run differs from.

Each stage runs in its own process group under a deadline cut from one total budget (--budget, 480 s on a GPU):
a stage that cannot get its minimum in what is left is skipped, and a stage past its deadline is killed with
every process it started (the trainings holding the GPU). Work (models of several GB) goes under --work, in /tmp;
OUT receives gpu.json (rewritten after every stage, so a machine that goes away still leaves the stages before
it), gpu-logs.txt (each stage's last lines) and the bench stage's train.json: three files.
  env      versions (and the pins they differ from), the GPU, native bfloat16, a bitsandbytes NF4 round trip on the
           device, the C compiler Triton needs
  kernels  TRL's fused LM head (the loss: a Triton kernel on CUDA) against a float32 reference, forward and
           backward; packed rows against each row alone (sdpa, the model in the compute dtype); the NF4 replay of
           MERGE_BASE=dequantized on the CPU against the device
  train    `python -m entrypoints.train` on a tiny model: it must learn (the loss falls by a nat), verify must pass
           and training must have run on the device in the dtype the device computes natively
  train-1b `python -m entrypoints.train` on a random model of Gemma 3 1B's shapes (GPU only): 30 steps of 4-bit
           QLoRA on the device in bfloat16 with finite losses that fall (a random model cannot be asked to learn
           the task in a lease; the tiny model's stage asks that)
  bench    the training benchmark (benchmarks/train.py: Gemma 3 1B shapes on a GPU): ours against the guide; it
           gets what is left of the budget
Exit 0 when every stage that ran passed and none was skipped for time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "GPU_CHECK_RESULT "
# What the machine's torch brings (the image's differ only in these): torch and every distribution torch requires.
TORCH = ("torch",)
# Large binary packages the machine has and the carry limit cannot take as well (the env stage reports their
# versions against the pins): numpy 2.x, pyarrow (datasets), pandas (datasets), matplotlib's stack (model cards).
MACHINE_KEEPS = ("numpy", "pyarrow", "pandas", "matplotlib", "fonttools", "pillow", "kiwisolver", "contourpy", "hf-xet")
# The build backend this project installs with (requirements/build.txt), although torch also requires it.
BUILD = ("setuptools",)
WHEEL_PLATFORM = (
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_27_x86_64",
    "--platform",
    "manylinux_2_24_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
)
BNB_KEEP = ("libbitsandbytes_cpu", "libbitsandbytes_cuda13")  # the machine's torch is built for CUDA 13
CARRY_LIMIT = 64 * 2**20
# (name, deadline cap in seconds, minimum to start, GPU only), in order. The caps and minimums budget the GPU
# machine's time; the CPU smoke (--smoke, in `make test` on 2 shared cores) runs the same work several times slower,
# so both are SMOKE_SLACK times as long there.
SMOKE_SLACK = 6
STAGES = (
    ("env", 90, 30, False),
    ("kernels", 120, 45, False),
    ("train", 150, 60, False),
    ("train-1b", 150, 90, True),
    ("bench", 300, 120, False),
)
BUDGET = 480  # seconds for every stage together: 8 minutes of a 10-minute command, the wheels' install included
SMOKE_BUDGET = 3600
WORK = Path("/tmp/tuneserve-gpu-check/work")  # not under $OUT: only 8 files come back from there
LOG_TAIL = 6000  # characters of each stage's log in OUT/gpu-logs.txt


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


def train_requirements() -> tuple[str, ...]:
    """The top-level pins of requirements/train.txt (what Dockerfile.train installs)."""
    names = []
    for line in (REPO / "requirements" / "train.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            names.append(line.split("==", 1)[0].strip())
    return tuple(names)


def carried() -> list[str]:
    """The distributions the GPU machine gets from the carried wheels: the training stack's pinned closure, less
    torch's own and MACHINE_KEEPS, plus the build backend."""
    from packaging.utils import canonicalize_name

    keep = {canonicalize_name(n) for n in MACHINE_KEEPS}
    need = requirement_closure(train_requirements()) - requirement_closure(TORCH) - keep
    return sorted(need | {canonicalize_name(n) for n in BUILD})


def wheels(out: Path, from_installed: bool = False) -> dict:
    """The wheels of `carried()` at the versions installed here (the pins): downloaded for CPython 3.12 on x86-64
    Linux, or (from_installed: the CPU test of the machine's layout, offline) repacked from this environment."""
    from importlib.metadata import version

    need = carried()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    if from_installed:
        for name in need:
            repack_installed(name, out)
    else:
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
    if not report["fits"] and not from_installed:
        raise SystemExit("the wheels do not fit the carry limit")
    return report


def repack_installed(name: str, out: Path) -> Path:
    """A wheel of an installed distribution (its RECORD's files, byte code left out; stored, not compressed): what
    the CPU test carries to its emulated machine, which has no index and this machine's Python."""
    import base64
    import hashlib
    from importlib.metadata import distribution

    dist = distribution(name)
    root = Path(dist.locate_file(""))
    files = [
        f
        for f in dist.files or []
        if not str(f).startswith("..") and "__pycache__" not in f.parts and f.suffix != ".pyc"
    ]
    record = next(f for f in files if f.name == "RECORD" and f.parent.name.endswith(".dist-info"))
    stem = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}"
    wheel = out / f"{stem}-py3-none-any.whl"
    lines = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        for f in files:
            path = root / f
            if f == record or not path.is_file():
                continue
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            z.writestr(str(f), data)
            lines.append(f"{f},sha256={digest},{len(data)}")
        z.writestr(str(record), "\n".join([*lines, f"{record},,"]) + "\n")
    return wheel


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
        "versions": {
            p: version(p) for p in ("torch", "triton", "transformers", "peft", "trl", "bitsandbytes") if _installed(p)
        },
        "pins": pin_differences(),
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
    assert not out["pins"]["unexpected"], f"carried pins not in effect: {out['pins']['unexpected']}"
    return out


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return bool(version(name))
    except PackageNotFoundError:
        return False


def pinned_versions() -> dict[str, str]:
    """name -> version of requirements/constraints.txt and requirements/train.txt (the image's exact set)."""
    from packaging.utils import canonicalize_name

    pins = {}
    for f in ("constraints.txt", "train.txt"):
        for line in (REPO / "requirements" / f).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, ver = (x.strip() for x in line.split("==", 1))
                pins[canonicalize_name(name)] = ver
    return pins


def pin_differences() -> dict:
    """The image's pins this run differs from. Expected: torch's own (the machine's torch, triton, nvidia-*) and
    MACHINE_KEEPS; anything else means the carried wheels are not what Python imports."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.utils import canonicalize_name

    pins = pinned_versions()
    allowed = requirement_closure(TORCH) | {canonicalize_name(n) for n in (*TORCH, *MACHINE_KEEPS, "triton")}
    differs = {}
    for name in sorted(requirement_closure(train_requirements())):
        if name not in pins:
            continue
        try:
            here = version(name)
        except PackageNotFoundError:
            here = None
        if here != pins[name]:
            differs[name] = {"pinned": pins[name], "here": here}
    unexpected = [n for n in differs if n not in allowed and not n.startswith(("nvidia-", "cuda-"))]
    return {"differs": differs, "unexpected": unexpected}


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


def _train_run(
    work: Path, base: Path, data: Path, env: dict, timeout: float, ok_exits: tuple[int, ...] = (0,)
) -> tuple[dict, str]:
    out = work / "output"
    from benchmarks import common

    full = common.clean_env(BASE_MODEL=str(base), DATASET=str(data), OUTPUT_DIR=str(out), LOGGING_STEPS="5", **env)
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "entrypoints.train"], env=full, cwd=work, capture_output=True, text=True, timeout=timeout
    )
    (work / "train.log").write_text(res.stdout + res.stderr)
    assert res.returncode in ok_exits, f"entrypoints.train exited {res.returncode}: {res.stderr[-3000:]}"
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
        "losses": losses,
        "train_runtime": report["metrics"].get("train_runtime"),
    }
    verify = out / "verify.json"
    result["exit"] = res.returncode
    if verify.is_file():
        checks = json.loads(verify.read_text())
        result["verify_passed"] = checks["passed"]
        result["verify_checks"] = {k: bool(v.get("passed")) for k, v in checks.get("checks", {}).items()}
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
        timeout=child_timeout(),
    )
    from tuneserve.model import native_bf16

    result.pop("losses")
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
        timeout=child_timeout(),
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
            "MAX_STEPS": "30",
            "LEARNING_RATE": "1e-3",
            "VERIFY_MAX_NEW_TOKENS": "16",
        },
        timeout=child_timeout(),
        ok_exits=(0, 4),  # 4: verify found that a random model does not stop, which this stage does not ask
    )
    # What a random model's 30 steps can show: 4-bit QLoRA at these shapes runs on the GPU in bfloat16, its losses
    # are finite and fall. Whether it learned to stop is the tiny model's stage's question, not this one's.
    losses = result.pop("losses")
    assert result["quantized_on"] == "cuda" and result["dtype"] == "bfloat16", result
    assert losses and all(math.isfinite(x) for x in losses), f"non-finite losses: {losses}"
    quarter = max(1, len(losses) // 4)
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    result.update(losses=losses, first_quarter_mean=round(first, 4), last_quarter_mean=round(last, 4))
    assert last < first, f"the loss did not fall: {losses}"
    # The merge on the GPU: the merged model's logits are finite and agree with the adapter's.
    checks = result.get("verify_checks") or {}
    assert checks.get("finite_logits") and checks.get("fidelity"), f"verify: {checks}"
    return result


STAGE_FUNCTIONS = {
    "env": stage_env,
    "kernels": stage_kernels,
    "train": stage_train,
    "train-1b": stage_train_1b,
    "bench": stage_bench,
}


# ------------------------------------------------------------------------------------------------ the driver
_DEADLINE: float | None = None  # this stage process's deadline (monotonic), from the driver


def child_timeout(margin: float = 10) -> float:
    """What a stage's own child process may take: the stage's time left, less a margin to report in."""
    if _DEADLINE is None:
        return 3600
    return max(1.0, _DEADLINE - time.monotonic() - margin)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's whole process group (the trainings it started, holding the GPU), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:  # the leader went; its children may not have
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue


def run_stage(name: str, work: Path, deadline: float, smoke: bool) -> tuple[dict, str]:
    """One stage in a process group of its own: (its answer, its log)."""
    argv = [
        sys.executable,
        "-m",
        "benchmarks.gpu_check",
        "stage",
        name,
        "--work",
        str(work),
        "--seconds",
        f"{deadline}",
    ]
    log_path = work / "stage.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            argv + (["--smoke"] if smoke else []),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,  # its own process group: a timeout ends everything it started
        )
        try:
            proc.wait(timeout=deadline)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)
    text = log_path.read_text(errors="replace")
    if timed_out:
        return {"ok": False, "error": f"did not finish within {deadline} s (its process group was killed)"}, text
    tagged = [ln for ln in text.splitlines() if ln.startswith(RESULT_TAG)]
    if tagged:
        return json.loads(tagged[-1][len(RESULT_TAG) :]), text
    return {"ok": False, "error": f"exited {proc.returncode}: {text[-2000:]}"}, text


def run(
    out: Path,
    smoke: bool,
    only: list[str] | None = None,
    budget: float | None = None,
    work_root: Path = WORK,
) -> int:
    """Every stage in its own process group, under a deadline cut from one budget; the report is rewritten after each.
    OUT gets gpu.json, gpu-logs.txt and the bench stage's train.json; the work stays in work_root."""
    import torch

    from benchmarks import common

    gpu = torch.cuda.is_available()
    slack = SMOKE_SLACK if smoke else 1
    budget = budget if budget is not None else (SMOKE_BUDGET if smoke else BUDGET)
    started = time.monotonic()
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "smoke": smoke,
        "budget_s": budget,
        "python": sys.executable,
        "machine": common.machine(),
        "stages": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work_root, ignore_errors=True)
    logs: list[str] = []
    status = 0
    for name, cap, minimum, gpu_only in STAGES:
        if only and name not in only:
            continue
        left = budget - (time.monotonic() - started)
        deadline = round(min(cap * slack, left), 3)
        entry: dict = {"stage": name, "deadline_s": deadline}
        if gpu_only and not gpu:
            entry.update(status="not run", why="needs a GPU")
        elif deadline < minimum * slack:
            entry.update(
                status="skipped", why=f"needs at least {minimum * slack} s, {max(0, round(left))} s of the budget left"
            )
            status = 1
        else:
            work = work_root / name
            work.mkdir(parents=True, exist_ok=True)
            print(f"gpu-check: {name} (deadline {deadline} s) ...", flush=True)
            t0 = time.monotonic()
            answer, text = run_stage(name, work, deadline, smoke)
            entry.update(
                status="passed" if answer["ok"] else "failed",
                seconds=round(time.monotonic() - t0, 1),
                **({"result": answer["result"]} if answer["ok"] else {"error": answer["error"]}),
            )
            status = status or (0 if answer["ok"] else 1)
            logs.append(
                f"===== {name}: {entry['status']} in {entry['seconds']} s, last lines =====\n{text[-LOG_TAIL:]}"
            )
            print(f"gpu-check: {name} {entry['status']} in {entry['seconds']} s", flush=True)
        report["stages"].append(entry)
        report["seconds"] = round(time.monotonic() - started, 1)
        (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out / "gpu-logs.txt").write_text("\n".join(logs) + "\n")
    bench = work_root / "bench" / "results" / "train.json"
    if bench.is_file():
        shutil.copyfile(bench, out / "train.json")
    return status


def stage_main(name: str, work: Path, smoke: bool, seconds: float | None = None) -> int:
    global _DEADLINE
    _DEADLINE = None if seconds is None else time.monotonic() + seconds
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
    w = sub.add_parser("wheels", help="the wheels to carry to the GPU machine")
    w.add_argument("--out", type=Path, default=REPO / "build" / "gpu-wheels")
    w.add_argument(
        "--from-installed", action="store_true", help="repack this environment's distributions (offline; the CPU test)"
    )
    r = sub.add_parser("run", help="run the stages and write OUT/gpu.json")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "build" / "gpu-check"))
    r.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU lane: make test)")
    r.add_argument("--only", nargs="*", help="run only these stages")
    r.add_argument("--budget", type=float, help=f"seconds for every stage together ({BUDGET}; smoke {SMOKE_BUDGET})")
    r.add_argument("--work", type=Path, default=WORK, help="where the stages work (not OUT: only 8 files come back)")
    s = sub.add_parser("stage", help=argparse.SUPPRESS)
    s.add_argument("name", choices=list(STAGE_FUNCTIONS))
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--smoke", action="store_true")
    s.add_argument("--seconds", type=float)
    args = p.parse_args(argv)
    if args.command == "wheels":
        wheels(args.out, from_installed=args.from_installed)
        return 0
    if args.command == "stage":
        return stage_main(args.name, args.work, args.smoke, args.seconds)
    return run(args.out.resolve(), args.smoke, args.only, args.budget, args.work.resolve())


if __name__ == "__main__":
    raise SystemExit(main())
