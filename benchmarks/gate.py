"""Benchmark 5, the serving gate's own cost, in process: an ASGI app that reads a request body and streams N server-sent
events, called directly and through `tuneserve.gate.Gate`, in the serving environment (.venv-serve).

    .venv-train/bin/python -m benchmarks.gate [--smoke]

Each round times REQUESTS requests per chunk count (1, 64 and 512 chunks) for both callers, the two
alternating (ABBA), one request at a time; then CONCURRENCY requests at once. The body is a completions request
with a prompt of about 128 tokens and the key in its Authorization header, and each chunk an event the size of
vLLM's streamed completion chunk. The gate's cost per request is the extra time at one chunk; its cost per chunk
is the slope of the extra time over the chunk counts (least squares over the three). Medians over rounds.

The app does no work beyond sending, so these are the gate's costs on this CPU; the serving benchmark
(benchmarks/serve.py) weighs them against what vLLM's API process spends per request and per streamed token.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

from benchmarks import common

TITLE = "Serving gate, in process: cost per request and per streamed chunk"
FULL = {"rounds": 7, "requests": 400, "chunks": (1, 64, 512), "concurrency": 32}
SMOKE = {"rounds": 1, "requests": 20, "chunks": (1, 8, 32), "concurrency": 4}
KEY = "sk-bench-gate-micro-0123456789"
# A streamed /v1/completions chunk of vLLM's, about this size (id, created, model, one choice with its text).
CHUNK = (
    b'data: {"id":"cmpl-8f14e45fceea167a5a36dedd4bea2543","object":"text_completion","created":1765000000,'
    b'"model":"bench","choices":[{"index":0,"text":" SELECT","logprobs":null,"finish_reason":null,'
    b'"stop_reason":null}],"usage":null}\n\n'
)


def _body() -> bytes:
    prompt = " ".join(f"word{i}" for i in range(128))
    return json.dumps({"model": "bench", "prompt": prompt, "max_tokens": 64, "stream": True}).encode()


async def _streaming_app(scope, receive, send) -> None:
    """A stand-in for a vLLM route: reads the whole body, then streams scope['chunks'] events and [DONE]."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
        }
    )
    for _ in range(scope["chunks"]):
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _scope(chunks: int, body: bytes) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"authorization", f"Bearer {KEY}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"user-agent", b"bench"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "chunks": chunks,
    }


async def _one(target, chunks: int, body: bytes) -> None:
    sent = 0
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected

    async def send(message):
        nonlocal sent
        sent += 1

    await target(_scope(chunks, body), receive, send)
    if sent != chunks + 2:
        raise RuntimeError(f"expected {chunks + 2} messages, got {sent}: the gate refused or cut the request")


async def _timed(target, chunks: int, requests: int, concurrency: int, body: bytes) -> float:
    """Seconds per request, `requests` of them, `concurrency` at a time."""
    start = time.perf_counter()
    if concurrency == 1:
        for _ in range(requests):
            await _one(target, chunks, body)
    else:
        for _ in range(requests // concurrency):
            await asyncio.gather(*(_one(target, chunks, body) for _ in range(concurrency)))
    return (time.perf_counter() - start) / requests


def _measure(spec: dict) -> dict:
    """Runs in .venv-serve: the gate with the serving stack's own pydantic and Python."""
    from tuneserve.gate import GATE_ENV, Gate, gate_settings

    os.environ[GATE_ENV] = gate_settings(
        auth=True,
        max_request_bytes=1 << 20,
        max_tokenize_bytes=1 << 20,
        max_choices=16,
        max_request_output_tokens=8192,
        max_output_tokens=2048,
        drain_seconds=30,
        live_timeout=20,
        live_cache_seconds=10,
        read_timeout=30,
    )
    os.environ["VLLM_API_KEY"] = KEY
    body = _body()

    async def run() -> dict:
        gate = Gate(_streaming_app)
        targets = {"direct": _streaming_app, "gate": gate}
        await _one(gate, 1, body)  # the first call installs the gate's signal handler
        per_request: dict[str, dict[int, list[float]]] = {k: {c: [] for c in spec["chunks"]} for k in targets}
        concurrent: dict[str, list[float]] = {k: [] for k in targets}
        for rnd in range(spec["rounds"]):
            order = ("direct", "gate") if rnd % 2 == 0 else ("gate", "direct")
            for kind in order:
                for chunks in spec["chunks"]:
                    per_request[kind][chunks].append(await _timed(targets[kind], chunks, spec["requests"], 1, body))
            for kind in order:
                concurrent[kind].append(
                    await _timed(targets[kind], spec["chunks"][1], spec["requests"], spec["concurrency"], body)
                )
        return {"per_request": per_request, "concurrent": concurrent}

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("gate", __doc__, argv)
    if common.answered_as_child(args, {"measure": _measure}):
        return 0
    started = time.monotonic()
    plan = SMOKE if args.smoke else FULL
    common.need_serve_python()
    spec = {"kind": "measure", **plan, "chunks": list(plan["chunks"])}
    print(f"gate: {plan['rounds']} round(s) of {plan['requests']} requests per chunk count ...", flush=True)
    raw = common.run_child(
        "benchmarks.gate", spec, python=common.SERVE_PYTHON, log=args.work_dir / "logs" / "measure.log"
    )
    chunks = plan["chunks"]
    med = {
        kind: {c: statistics.median(raw["per_request"][kind][str(c)]) for c in chunks} for kind in ("direct", "gate")
    }
    extra = {c: med["gate"][c] - med["direct"][c] for c in chunks}
    # Least squares over the chunk counts: extra = per_request + per_chunk * chunks.
    mean_c = statistics.mean(chunks)
    mean_e = statistics.mean(extra.values())
    per_chunk = sum((c - mean_c) * (extra[c] - mean_e) for c in chunks) / sum((c - mean_c) ** 2 for c in chunks)
    per_request = mean_e - per_chunk * mean_c
    concurrent = {kind: statistics.median(raw["concurrent"][kind]) for kind in ("direct", "gate")}
    rows = [
        {
            "chunks": c,
            "direct_us": round(med["direct"][c] * 1e6, 1),
            "gate_us": round(med["gate"][c] * 1e6, 1),
            "extra_us": round(extra[c] * 1e6, 1),
            "gate_rounds_us": [round(x * 1e6, 1) for x in raw["per_request"]["gate"][str(c)]],
            "direct_rounds_us": [round(x * 1e6, 1) for x in raw["per_request"]["direct"][str(c)]],
        }
        for c in chunks
    ]
    figures = [
        common.figure("per_request_us", "gate's cost per request (intercept)", round(per_request * 1e6, 1), "µs"),
        common.figure("per_chunk_us", "gate's cost per streamed chunk (slope)", round(per_chunk * 1e6, 3), "µs"),
        common.figure(
            "concurrent_extra_us",
            f"extra time per request, {plan['concurrency']} at once, {chunks[1]} chunks each",
            round((concurrent["gate"] - concurrent["direct"]) * 1e6, 1),
            "µs",
        ),
    ]
    setup = {
        "app": "an ASGI app that reads the body and streams N server-sent events of "
        f"{len(CHUNK)} bytes (a vLLM completions chunk's size), then [DONE]",
        "body": f"a /v1/completions request of {len(_body())} bytes (a 128-word prompt), key in Authorization",
        "rounds": plan["rounds"],
        "requests_per_measure": plan["requests"],
        "concurrency": plan["concurrency"],
        "python": str(common.SERVE_PYTHON),
    }
    notes = [
        "Both callers run in the same process, alternating (ABBA) within each round; the figures are medians over "
        "rounds. The cost per request covers the key check, reading and parsing the body, the limits and the "
        "tracking of the request for the drain; the cost per chunk is what the gate does on each message it "
        "passes on.",
    ]
    common.write_result(args, title=TITLE, started=started, setup=setup, rows=rows, figures=figures, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
