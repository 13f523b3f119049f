"""What every benchmark shares: the command line, the result file, the machine description, peak-memory
probes and child processes.

A result file (`<results dir>/<name>.json`) holds the machine, the command that reproduces it, the setup,
one row per variant measured, and the figures with their targets; `met` is true only when every targeted
figure meets its target (null when none could be measured here). Things that need hardware this machine
lacks are listed under `not_run` with the reason, never left out silently.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "build" / "bench"
SMOKE = WORK / "smoke"
SERVE_PYTHON = Path(os.environ.get("SERVE_PYTHON", REPO / ".venv-serve" / "bin" / "python"))
ORDER = ("merge", "data", "train", "serve", "gate", "startup", "images", "memory")
PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "tokenizers")


# ------------------------------------------------------------------------------------------- command line
def parse_args(name: str, doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.split("\n\n")[0])
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes: checks that the benchmark runs end to end (its figures mean nothing)",
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help=f"where {name}.json goes (default: benchmarks/results; with --smoke: build/bench/smoke/results)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"scratch space: models, outputs (default: build/bench[/smoke]/{name})",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = p.parse_args(argv)
    args.name = name
    args.results_dir = (args.results_dir or (SMOKE / "results" if args.smoke else RESULTS)).resolve()
    args.work_dir = (args.work_dir or ((SMOKE if args.smoke else WORK) / name)).resolve()
    return args


def command(args: argparse.Namespace) -> str:
    """The command that reproduces a result, from the repository root."""
    return f".venv-train/bin/python -m benchmarks.{args.name}" + (" --smoke" if args.smoke else "")


def need_serve_python() -> None:
    """The serving benchmarks run vLLM in .venv-serve: stop with the way to get it when it is missing."""
    if not SERVE_PYTHON.is_file():
        raise SystemExit(f"{SERVE_PYTHON} is missing: run `make setup` (it builds .venv-serve)")


# ------------------------------------------------------------------------------------------- figures
def figure(
    key: str,
    label: str,
    value: float | None,
    unit: str,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """One reported figure. With a bound it has a target and `met`; `value` None means not measured."""
    target = f"<= {at_most:g}" if at_most is not None else f">= {at_least:g}" if at_least is not None else None
    met = None
    if value is not None and target is not None:
        met = bool(value <= at_most) if at_most is not None else bool(value >= at_least)
    out = {"key": key, "label": label, "value": value, "unit": unit, "target": target, "met": met}
    if note:
        out["note"] = note
    return out


def not_run(what: str, reason: str) -> dict[str, str]:
    return {"what": what, "reason": reason}


# ------------------------------------------------------------------------------------------- machine
def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _cpu_flags() -> list[str]:
    """The instruction sets that decide how fast a CPU runs these models (bfloat16 and int8 matrix units)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def machine() -> dict[str, Any]:
    total = _meminfo_total()
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(total / 2**30, 1) if total else None,
        "gpu": gpu_name(),
        # Other work on a shared machine shows here (1, 5, 15 min averages when the result was written).
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
    }


def machine_text(m: dict[str, Any]) -> str:
    gpu = m.get("gpu") or "no GPU"
    flags = m.get("cpu_flags")
    bf16 = (
        ""
        if flags is None
        else (" (native bfloat16)" if "avx512_bf16" in flags or "amx_bf16" in flags else " (no native bfloat16)")
    )
    return f"{m['cpu']}{bf16}, {m['cores']} cores, {m['memory_gib']} GiB RAM, {gpu}"


# ------------------------------------------------------------------------------------------- result file
def write_result(
    args: argparse.Namespace,
    *,
    title: str,
    started: float,
    setup: dict,
    rows: list[dict],
    figures: list[dict],
    not_run_rows: list[dict] | None = None,
    notes: list[str] | None = None,
) -> Path:
    targeted = [f for f in figures if f["target"] is not None and f["met"] is not None]
    payload = {
        "name": args.name,
        "title": title,
        "smoke": bool(args.smoke),
        "command": command(args),
        "machine": machine(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "setup": setup,
        "rows": rows,
        "figures": figures,
        "not_run": not_run_rows or [],
        "notes": notes or [],
        "met": all(f["met"] for f in targeted) if targeted else None,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{args.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"{args.name}: wrote {path}", flush=True)
    for f in figures:
        verdict = "" if f["met"] is None else ("  [met]" if f["met"] else "  [NOT met]")
        target = f" (target {f['target']})" if f["target"] else ""
        print(f"  {f['label']}: {fmt(f['value'])} {f['unit']}{target}{verdict}", flush=True)
    for n in not_run_rows or []:
        print(f"  not run: {n['what']} ({n['reason']})", flush=True)
    return path


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


# ------------------------------------------------------------------------------------------- memory probes
def status_bytes(key: str) -> int:
    """VmRSS / VmHWM (peak resident set) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS, so the next peak read covers only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


# ------------------------------------------------------------------------------------------- child processes
RESULT_TAG = "BENCH_RESULT "


def answered_as_child(args: argparse.Namespace, measurements: dict[str, Callable[[dict], dict]]) -> bool:
    """In a process started by `run_child`: take the one measurement its spec's `kind` names, print the result
    for the parent and return True (the benchmark's main then exits). False in the benchmark's own process."""
    if not args.child:
        return False
    spec = json.loads(args.child)
    print(RESULT_TAG + json.dumps(measurements[spec["kind"]](spec), default=str), flush=True)
    return True


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal, offline environment for measured processes. tuneserve and the entrypoints come from the
    environment's installed package (make setup installs it); `dev_env` adds the checkout for benchmarks' modules.
    The cache locations are passed on, so the caller decides where datasets' and vLLM's caches go."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "SERVE_PYTHON", "XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(device_env())
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1",
    )
    # One GPU: a process that sees several is refused (training) or would measure only one of them anyway.
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
    env.update(extra)
    return env


# What a GPU machine's processes need from the environment they were started in: where CUDA's and the driver's
# libraries are, the compilers Triton builds its launcher with, Triton's and NVIDIA's settings, and PYTHONPATH (the GPU
# check installs the carried wheels into a folder on it: benchmarks/gpu-check.sh). Unset on a developer's machine.
DEVICE_VARS = ("LD_LIBRARY_PATH", "LIBRARY_PATH", "CPATH", "CUDA_HOME", "CUDA_PATH", "CC", "CXX", "PYTHONPATH")
DEVICE_PREFIXES = ("TRITON_", "NVIDIA_", "CUDA_", "NCCL_", "PYTORCH_CUDA_")


def device_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in DEVICE_VARS or k.startswith(DEVICE_PREFIXES)}


def dev_env(env: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`env` (default: clean_env) for a process that runs a module of benchmarks/ outside the checkout: benchmarks/
    is not part of the distribution, so the checkout goes on PYTHONPATH, ahead of what was there."""
    env = {**(env or clean_env()), **extra}
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)}


def run_child(
    module: str,
    spec: dict,
    *,
    timeout: float = 3600,
    python: str | Path = sys.executable,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> dict:
    """Run `python -m <module> --child <spec>` in a fresh process (its own peak memory, nothing cached)
    and return the payload it reports (`preexec_fn`: run in the child before it starts, e.g. to enter a memory
    cgroup). Its output goes to `log` when given. It runs in a scratch directory,
    so a developer's ./.env cannot reach a configuration under test."""
    import tempfile

    argv = [str(python), "-m", module, "--child", json.dumps(spec)]
    with tempfile.TemporaryDirectory(prefix="bench-cwd-") as cwd:
        res = subprocess.run(
            argv, env=dev_env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn
        )
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{module} child {spec.get('kind')} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG) :])


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
