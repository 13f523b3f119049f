"""The gate's request lifecycle in process (tuneserve/gate.py), driven as the server drives it: each request in a task
of its own, the drain started by the SIGTERM handler. The same behaviours against real vLLM are in test_serve.py;
these pin the edges a real server makes hard to time: a body still arriving when the drain ends, a stream cut by the
drain, a client that leaves while the drain cuts its request."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from tuneserve.gate import GATE_ENV, Gate, gate_settings

KEY = "sk-test-gate-0123456789abcdef"
BODY = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True}).encode()


@pytest.fixture
def make_gate(monkeypatch):
    def make(app, *, read_timeout=30.0, drain_seconds=30.0):
        monkeypatch.setenv(
            GATE_ENV,
            gate_settings(
                auth=True,
                max_request_bytes=1 << 20,
                max_tokenize_bytes=1 << 20,
                max_choices=8,
                max_request_output_tokens=8192,
                max_output_tokens=2048,
                drain_seconds=drain_seconds,
                live_timeout=20,
                live_cache_seconds=10,
                read_timeout=read_timeout,
            ),
        )
        monkeypatch.setenv("VLLM_API_KEY", KEY)
        return Gate(app)

    return make


def fake_server():
    """What the gate reads of vLLM's uvicorn server (app.state.server) to stop it."""
    server = SimpleNamespace(should_exit=False, force_exit=False, server_state=SimpleNamespace(connections=set()))
    return SimpleNamespace(state=SimpleNamespace(server=server))


def scope(app):
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {KEY}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        "app": app,
    }


class Client:
    """One connection: the body arrives in `parts` (None: the client stops sending), then it waits for a
    disconnect that never comes; `sent` collects what the server sends."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.sent: list[dict] = []
        self.answered = asyncio.Event()

    async def receive(self):
        if self.parts:
            part = self.parts.pop(0)
            if part is not None:
                return {"type": "http.request", "body": part, "more_body": bool(self.parts)}
        await asyncio.Event().wait()

    async def send(self, message):
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.answered.set()

    @property
    def status(self):
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def streaming_app(scope, receive, send, *, seen: list | None = None):
    """A vLLM route's shape: reads the body, then streams events until cancelled."""
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    try:
        while True:
            await send({"type": "http.response.body", "body": b'data: {"x": 1}\n\n', "more_body": True})
            await asyncio.sleep(0.01)
    except asyncio.CancelledError:
        if seen is not None:
            seen.append("cancelled")  # vLLM aborts the request in the engine here
        raise


@pytest.mark.parametrize("parts", [[BODY[:10], None], [None]], ids=["half a body", "no body"])
def test_a_body_that_does_not_arrive_in_time_gets_408(make_gate, parts):
    async def main():
        gate = make_gate(streaming_app, read_timeout=0.3)
        client = Client(parts)
        began = time.monotonic()
        await asyncio.wait_for(gate(scope(fake_server()), client.receive, client.send), timeout=5)
        return client, time.monotonic() - began

    client, took = asyncio.run(main())
    assert client.status == 408 and b"REQUEST_READ_TIMEOUT=0.3s" in client.body and 0.3 <= took < 2


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_a_body_in_several_chunks_reaches_the_app_whole(make_gate, chunks):
    got = []

    async def echo(scope, receive, send):
        message = await receive()
        got.append(message)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        gate = make_gate(echo)
        size = -(-len(BODY) // chunks)
        client = Client([BODY[i : i + size] for i in range(0, len(BODY), size)])
        await asyncio.wait_for(gate(scope(fake_server()), client.receive, client.send), timeout=5)
        return client

    client = asyncio.run(main())
    assert client.status == 200 and got == [{"type": "http.request", "body": BODY, "more_body": False}]


def test_at_the_end_of_the_drain_a_body_still_arriving_gets_503_at_once(make_gate):
    async def main():
        gate = make_gate(streaming_app, read_timeout=60, drain_seconds=0.2)
        slow = Client([BODY[:10], None])
        task = asyncio.ensure_future(gate(scope(fake_server()), slow.receive, slow.send))
        await asyncio.sleep(0.1)
        began = time.monotonic()
        gate._on_sigterm()
        await asyncio.wait_for(task, timeout=10)
        return slow, time.monotonic() - began, task

    slow, took, task = asyncio.run(main())
    # Not a flight (its body never came), so the drain did not wait for it; it was answered when the drain ended,
    # not after REQUEST_READ_TIMEOUT.
    assert slow.status == 503 and b'"code": "draining"' in slow.body
    assert took < 3 and not task.cancelled()


def test_a_stream_the_drain_cuts_ends_with_an_error_event_and_its_task_goes_on(make_gate):
    seen: list[str] = []

    async def main():
        gate = make_gate(lambda s, r, w: streaming_app(s, r, w, seen=seen), drain_seconds=0.3)
        client = Client([BODY])
        task = asyncio.ensure_future(gate(scope(fake_server()), client.receive, client.send))
        await asyncio.sleep(0.1)
        gate._on_sigterm()
        began = time.monotonic()
        await asyncio.wait_for(task, timeout=10)
        return client, task, time.monotonic() - began, gate

    client, task, took, gate = asyncio.run(main())
    assert seen == ["cancelled"]  # the app saw the cancellation (vLLM aborts the request)
    last = client.sent[-1]
    assert last["type"] == "http.response.body" and not last.get("more_body", False)
    assert b'"code": "draining"' in last["body"] and b"DRAIN_SECONDS=0.3" in last["body"]
    # The request's own task took the drain's cancellation back: it ended normally, answered, not cancelled.
    assert not task.cancelled() and task.exception() is None and client.answered.is_set()
    assert task.cancelling() == 0  # nothing later in that task (uvicorn's own timeouts) sees a cancellation pending
    assert 0.2 <= took < 3 and not gate.flights


@pytest.mark.parametrize("also_cut", [False, True], ids=["client gone", "client gone while the drain cuts"])
def test_a_request_the_server_cancels_stays_cancelled(make_gate, also_cut):
    async def main():
        gate = make_gate(streaming_app, drain_seconds=0.2)
        client = Client([BODY])
        task = asyncio.ensure_future(gate(scope(fake_server()), client.receive, client.send))
        await asyncio.sleep(0.1)
        if also_cut:  # the drain cuts it and the server cancels it in the same loop turn
            for flight in gate.flights:
                flight.cut = True
                flight.task.cancel()
        task.cancel()  # what uvicorn does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)
        return client, task, gate

    client, task, gate = asyncio.run(main())
    assert task.cancelled() and not gate.flights
    assert not any(b"draining" in m.get("body", b"") for m in client.sent)  # nobody to answer


def ok_app(scope, receive, send):
    async def reply():
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return reply()


def request(body: bytes = BODY, *, key: str | None = KEY, path: str = "/v1/completions", kind: str = "http"):
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    method = "GET" if path in ("/health", "/live", "/metrics") else "POST"
    return {**scope(fake_server()), "type": kind, "path": path, "method": method, "headers": headers}


def test_the_gate_counts_its_refusals_drains_and_liveness(make_gate, monkeypatch):
    """What tuneserve_gate_*_total on vLLM's /metrics count (here read from the counts the gate keeps in process; the
    same calls feed the Prometheus counters, test_serve.py reads those from a real server)."""
    from collections import Counter

    from tuneserve.gate import ENGINE_STEPS, gate_metrics

    monkeypatch.setattr(ENGINE_STEPS, "last", float("-inf"))  # no engine step yet: /live has to check
    metrics = gate_metrics()
    before = Counter(metrics.counts)

    def body(**fields) -> bytes:
        return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()

    async def main():
        gate = make_gate(ok_app)
        answered = []
        for req, parts in (
            (request(key=None), [BODY]),
            (request(key="wrong-" + KEY), [BODY]),
            (request(key=None, path="/v1/realtime", kind="websocket"), []),
            (request(body(n=9)), [body(n=9)]),
            (request(body(best_of=9)), [body(best_of=9)]),
            (request(body(n=8, max_tokens=2048)), [body(n=8, max_tokens=2048)]),
            (request(b"[1]"), [b"[1]"]),
            (request(b"x" * (2 << 20)), [b"x" * (2 << 20)]),  # over MAX_REQUEST_BYTES by its declared length
            (request(), [BODY]),  # let through: not counted
            (request(path="/metrics", key=None), []),  # not counted either
            (request(path="/live", key=None), []),  # no engine (fake server): fails
        ):
            client = Client(parts)
            await asyncio.wait_for(gate(req, client.receive, client.send), timeout=5)
            answered.append(client.status if req["type"] == "http" else client.sent[0]["code"])
        ENGINE_STEPS.stepped()
        client = Client([])
        await gate(request(path="/live", key=None), client.receive, client.send)
        answered.append(client.status)

        slow = make_gate(ok_app, read_timeout=0.2)
        client = Client([BODY[:10], None])
        await asyncio.wait_for(slow(request(), client.receive, client.send), timeout=5)
        answered.append(client.status)

        # A drain that ends two open streams; meanwhile a new request (refused), the probes (not counted as
        # refusals), /metrics (served).
        draining = make_gate(
            lambda s, r, w: (streaming_app if s["path"] == "/v1/completions" else ok_app)(s, r, w), drain_seconds=0.3
        )
        streams = [Client([BODY]) for _ in range(2)]
        tasks = [asyncio.ensure_future(draining(request(), c.receive, c.send)) for c in streams]
        await asyncio.sleep(0.1)
        draining._on_sigterm()
        for path, key in (("/v1/completions", KEY), ("/health", None), ("/metrics", None), ("/live", None)):
            client = Client([BODY] if key else [])
            await asyncio.wait_for(draining(request(path=path, key=key), client.receive, client.send), timeout=5)
            answered.append(client.status)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        return answered

    answered = asyncio.run(main())
    assert answered == [401, 401, 1008, 400, 400, 400, 400, 413, 200, 200, 503, 200, 408, 503, 503, 200, 200]
    assert Counter(metrics.counts) - before == Counter(
        {
            ("refused", "invalid_api_key", ""): 3,
            ("refused", "limit_exceeded", "n"): 1,
            ("refused", "limit_exceeded", "best_of"): 1,
            ("refused", "limit_exceeded", "max_tokens"): 1,
            ("refused", "invalid_body", ""): 1,
            ("refused", "request_too_large", ""): 1,
            ("refused", "request_timeout", ""): 1,
            ("refused", "draining", ""): 1,
            ("live", "fail"): 1,
            ("live", "pass"): 2,
            "drains": 1,
            "drain_cancelled": 2,
        }
    )


MULTIPROCESS = """
import asyncio, json, multiprocessing, os, sys

def api_server(refusals: int) -> None:  # one of vLLM's API server processes: spawned, the variable inherited
    from tuneserve.gate import Gate

    gate = Gate(None)
    async def send(message):
        pass
    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}
    async def main():
        for _ in range(refusals):
            await gate({"type": "http", "method": "GET", "path": "/v1/models", "headers": []}, receive, send)
        await gate._live(send)  # draining: passes without an engine
    gate.draining = True
    asyncio.run(main())

if __name__ == "__main__":
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]  # what vLLM's launcher does before starting API servers
    context = multiprocessing.get_context("spawn")
    servers = [context.Process(target=api_server, args=(n,)) for n in (2, 3)]
    for p in servers:
        p.start()
    for p in servers:
        p.join()
        assert p.exitcode == 0
    # /metrics with several API servers: a registry of its own that reads every process's files (vLLM's
    # get_prometheus_registry), exposed as prometheus_client's ASGI app does.
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    print(generate_latest(registry).decode())
"""


def test_with_several_api_servers_metrics_serves_the_counts_of_all_of_them(make_gate, tmp_path):
    """vLLM's `--api-server-count N` (tuneserve's entrypoint runs one; `vllm serve` more): each API server process
    counts in its own files under PROMETHEUS_MULTIPROC_DIR, and /metrics adds them up."""
    import os
    import subprocess

    from tests.helpers import REPO, SERVE_PYTHON, clean_env, need_vllm

    need_vllm()
    make_gate(None)  # sets the gate's environment, which the processes inherit
    env = clean_env(**{k: os.environ[k] for k in (GATE_ENV, "VLLM_API_KEY")})
    (tmp_path / "prometheus").mkdir()
    (tmp_path / "servers.py").write_text(MULTIPROCESS)  # a file: spawned processes import their target from it
    out = subprocess.run(
        [str(SERVE_PYTHON), str(tmp_path / "servers.py"), str(tmp_path / "prometheus")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((tmp_path / "prometheus").glob("counter_*.db"))) == 2
    exposed = out.stdout
    assert 'tuneserve_gate_refused_total{param="",reason="invalid_api_key"} 5.0' in exposed, exposed
    assert 'tuneserve_gate_live_total{result="pass"} 2.0' in exposed
    assert 'tuneserve_gate_refused_total{param="n",reason="limit_exceeded"} 0.0' in exposed  # every series from 0
    assert "tuneserve_gate_drains_total 0.0" in exposed
