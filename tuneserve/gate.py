"""The serving gate: an ASGI middleware that vLLM loads through its own `--middleware` hook (the entrypoint
adds `--middleware tuneserve.gate.Gate` last, so it is the outermost layer around every route).

- Deny by default: with a key configured, every HTTP and WebSocket route needs `Authorization: Bearer KEY`
  except the probes (/health, /ping, /live) and /metrics (Prometheus scrapes without a key; the
  NetworkPolicy decides who may reach it). A route a later vLLM adds is covered without being listed.
  vLLM's own key check guards only paths under /v1, /v2, /inference and /cohere.
- Limits, checked before any work starts: request body bytes (413), tokenize/detokenize body bytes (413),
  choices per request (`n`, `best_of`) and total output tokens per request (prompts x choices x
  max_tokens, each capped by MAX_OUTPUT_TOKENS) (400). Each error names its variable.
- Bodies: read within REQUEST_READ_TIMEOUT (408 after), parsed as vLLM parses them; a body that is not a JSON
  object is refused (400) unless it is a form (the audio routes), so nothing reaches vLLM uncounted. Headers that
  never complete are cut off after REQUEST_READ_TIMEOUT too (uvicorn has no header timeout).
- Drain: SIGTERM makes /health answer 503 at once (readiness fails), new requests get 503, requests in
  flight get DRAIN_SECONDS to finish; whatever is still open then is cancelled (vLLM aborts it in the
  engine), a stream gets an error event and is closed, and the HTTP server is told to exit without waiting
  for connections a client holds open. A second SIGTERM ends the drain at once. The supervisor
  (tuneserve.supervise) kills the process if all that has not ended it within DRAIN_SECONDS + its margin.
- /live proves forward progress: the engine counts as alive when it took a step recently (each step vLLM's
  engine reports to its stat loggers: tuneserve.progress), else when a 1-token greedy generation gets its
  token or the engine steps, within LIVE_TIMEOUT. A backlog of legal work keeps the engine stepping, so it
  never fails /live; a frozen engine takes no step and does (vLLM's /health says 200 either way).
- Nothing a client sends makes the server log a traceback: an exception from the app is one warning line.
- Counted on vLLM's /metrics (GateMetrics): `tuneserve_gate_refused_total{reason, param}`, each request the gate
  answers itself with an error, by the code it answers with: `invalid_api_key` (401; a WebSocket handshake without
  the key too), `request_too_large` (413), `request_timeout` (408), `invalid_body` (400), `limit_exceeded` (400,
  `param` `n`, `best_of` or `max_tokens`; "" for every other reason), `draining` (503: a new request during the
  drain, or a body still arriving when it ends; /health and /ping's 503 are not counted).
  `tuneserve_gate_drains_total`: drains started (first SIGTERMs).
  `tuneserve_gate_drain_cancelled_total`: requests the end of the drain cancelled (the "still open" of its log
  line). `tuneserve_gate_live_total{result}`: /live answers, `pass` (200) or `fail` (503, `engine_stalled`).
  Not counted: `internal_error` (500, an exception in vLLM), a WebSocket handshake to a probe or /metrics, and
  connections the header watchdog closes (no request, no answer).

The entrypoint hands over the settings in TUNESERVE_GATE (JSON) and the key in VLLM_API_KEY; a missing
setting stops the server at start (fail closed). Errors use the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

GATE_ENV = "TUNESERVE_GATE"
PROBES = frozenset({"/health", "/ping", "/live"})
PUBLIC = PROBES | {"/metrics"}
# The paths of vLLM's tokenizer endpoints end with these (/tokenize, /detokenize).
TOKENIZE_SUFFIXES = ("/tokenize", "/detokenize")
LIVE_TOKEN_ID = 0  # any id is a valid prompt for a 1-token generation
READY_FD_ENV = "TUNESERVE_READY_FD"  # the supervisor's pipe: written once the gate has SIGTERM
FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")  # the audio routes read forms
COMPLETION_MAX_TOKENS = 16  # vLLM's completions max_tokens when a request leaves it out or null (fuzz-tested)
EXIT_GRACE = 2.0  # after the drain: seconds open connections get to close before they are cut

# A child of vLLM's logger, so these lines go where vLLM's go (vLLM configures "vllm" and stops propagation).
log = logging.getLogger("vllm.tuneserve.gate")


def gate_settings(
    *,
    auth: bool,
    max_request_bytes: int,
    max_tokenize_bytes: int,
    max_choices: int,
    max_request_output_tokens: int,
    max_output_tokens: int,
    drain_seconds: float,
    live_timeout: float,
    live_cache_seconds: float,
    read_timeout: float,
) -> str:
    """The TUNESERVE_GATE value the entrypoint passes (every field is required by Gate)."""
    return json.dumps({k: v for k, v in locals().items()}, sort_keys=True)


def error_body(status: int, message: str, code: str, param: str | None = None) -> bytes:
    kind = {
        401: "invalid_request_error",
        413: "invalid_request_error",
        400: "invalid_request_error",
        408: "invalid_request_error",
        503: "service_unavailable",
    }.get(status, "server_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


# vLLM's request models read counts with pydantic's lax integer: 9.0, "2000", " 7 " and true are numbers too.
_LAX_INT = TypeAdapter(int)


def _count(value: Any, default: int = 1) -> int:
    """The count vLLM reads from `value`, so that no spelling of a number slips past the limits; `default` when
    absent, below 1, or not a number (vLLM rejects such a request itself)."""
    if value is None:
        return default
    if type(value) is int:  # what almost every client sends: no need for the validator
        return value if value > 0 else default
    try:
        count = _LAX_INT.validate_python(value)
    except ValidationError:
        return default
    return count if count > 0 else default


def parse_body(body: bytes) -> Any:
    """A request body as vLLM's routes read it (json.loads of the bytes: UTF-8 with or without a BOM, UTF-16 and
    UTF-32 alike), or None when it is not JSON (vLLM answers that itself)."""
    try:
        return json.loads(body)
    except ValueError:
        return None


def generation_counts(body: dict, max_output_tokens: int) -> tuple[int, int, int]:
    """(prompts, choices, tokens per choice) a JSON request body may generate, as vLLM reads it.

    Choices are `n` and `best_of` (and beam width, which is `n`). Tokens per choice are read as each route that
    accepts the body's shape reads them, and the largest reading counts: a chat request (`messages`) asks for
    max_completion_tokens, else max_tokens; a completions request (`prompt`) for max_tokens, 16 when absent or
    null (vLLM's default; it ignores max_completion_tokens); a responses request (`input`) for max_output_tokens.
    What a route leaves open is MAX_OUTPUT_TOKENS, the server-wide cap vLLM applies to every answer. A completions
    `prompt` list or a batch of conversations (`messages` as a list of lists) multiplies by its length. So the
    count is never below what vLLM may generate, and equal to it for a body of one shape (tests/gate_fuzz.py)."""
    if isinstance(body.get("sampling_params"), dict):  # vLLM's token-in/token-out route nests them
        body = {**body, **body["sampling_params"]}
    choices = max(_count(body.get("n")), _count(body.get("best_of")))

    def asked(*names: str, absent: int = max_output_tokens) -> int:
        value = next((body[k] for k in names if body.get(k) is not None), None)
        return absent if value is None else _count(value, max_output_tokens)

    readings = []
    if "messages" in body:
        readings.append(asked("max_completion_tokens", "max_tokens"))
    if "prompt" in body:
        readings.append(asked("max_tokens", absent=COMPLETION_MAX_TOKENS))
    if "input" in body:
        readings.append(asked("max_output_tokens"))
    if not readings:  # another route: whichever length it reads
        named = [k for k in ("max_tokens", "max_completion_tokens", "max_output_tokens") if body.get(k) is not None]
        readings = [asked(k) for k in named] or [max_output_tokens]
    per_choice = min(max(readings), max_output_tokens)
    prompts = 1
    for key, item in (("prompt", (str, list)), ("messages", list)):  # a list of prompts; a batch of conversations
        value = body.get(key)
        if isinstance(value, list) and value and isinstance(value[0], item):
            prompts = max(prompts, len(value))
    return prompts, choices, per_choice


def check_generation_limits(
    body: Any, *, max_choices: int, max_request_output_tokens: int, max_output_tokens: int
) -> tuple[str, str] | None:
    """(message, param) when a JSON request body asks for more than the limits allow, else None.
    Values of the wrong type are left for vLLM to reject."""
    if not isinstance(body, dict):
        return None
    prompts, choices, per_choice = generation_counts(body, max_output_tokens)
    if choices > max_choices:
        param = "n" if _count(body.get("n")) >= _count(body.get("best_of")) else "best_of"
        return (f"{param}={choices} is more than this server allows per request (MAX_CHOICES={max_choices})", param)
    total = prompts * choices * per_choice
    if total > max_request_output_tokens:
        what = f"{prompts} prompts x " if prompts > 1 else ""
        message = (
            f"this request may generate {total} tokens ({what}{choices} choices x {per_choice} tokens), "
            f"more than this server allows per request (MAX_REQUEST_OUTPUT_TOKENS={max_request_output_tokens}"
            "); ask for fewer choices or a smaller max_tokens"
        )
        return message, "max_tokens"
    return None


class StepClock:
    """When vLLM's engine last reported a step (tuneserve.progress, a stat logger vLLM loads as a plugin, calls
    `stepped` from its output handler; nothing here imports vLLM)."""

    def __init__(self) -> None:
        self.last = float("-inf")
        self.steps = 0

    def stepped(self) -> None:
        self.last = time.monotonic()
        self.steps += 1


ENGINE_STEPS = StepClock()


def _drop_query(record: logging.LogRecord) -> bool:
    """uvicorn's access log line without the query string (a client may put a key or a prompt there)."""
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
        record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
    return True


# The gate's refusals: (reason, param) pairs, each counted from 0 on /metrics before the first happens (a rate or an
# alert over a series that does not exist yet sees nothing).
REFUSALS = (
    ("invalid_api_key", ""),
    ("request_too_large", ""),
    ("request_timeout", ""),
    ("invalid_body", ""),
    ("limit_exceeded", "n"),
    ("limit_exceeded", "best_of"),
    ("limit_exceeded", "max_tokens"),
    ("draining", ""),
)


class GateMetrics:
    """The gate's counters, one set per process: kept here (`counts`, what the in-process tests read) and, where
    prometheus_client is installed (always in vLLM's processes: vLLM depends on it), as Prometheus counters.

    How they reach vLLM's /metrics, prometheus_client's ASGI app over vLLM's `get_prometheus_registry()`:
    - One API server (tuneserve's entrypoint always runs one) without PROMETHEUS_MULTIPROC_DIR: the process's default
      registry, where these counters register like vLLM's own.
    - Several API servers (`vllm serve --api-server-count N`; vLLM's launcher then sets PROMETHEUS_MULTIPROC_DIR), or
      the variable set by hand: a registry of its own with a MultiProcessCollector, which reads the files every process
      writes under PROMETHEUS_MULTIPROC_DIR and adds up each series over them. So whichever API server the kernel
      hands a scrape (they share the listening socket), it answers with the sum over all of them. A counter writes
      such a file only if its value class is prometheus_client's mmap'ed one, and prometheus_client picks the class
      once per process, when `prometheus_client.values` is first imported, by whether PROMETHEUS_MULTIPROC_DIR is set
      then. vLLM's launcher sets it before it starts the API servers, which are spawned (not forked): each imports
      prometheus_client afresh, with vLLM and long before the gate, with the variable in its environment.
    The counters are created with the first Gate (vLLM building its app in the API server process), not at import:
    tuneserve.serve imports this module in a process that serves nothing, and .venv-train has no prometheus_client. A
    value class picked before the variable was set would leave them off /metrics: that is logged. Counters only: summed
    over processes, and kept in the files after a process ends (while the directory lives).
    """

    def __init__(self) -> None:
        self.counts: Counter[str | tuple[str, ...]] = Counter()
        try:
            import prometheus_client
        except ImportError:  # outside vLLM's environment (the in-process tests, benchmarks): counted here only
            self._refused = self._drains = self._cancelled = self._live = None
            return
        from prometheus_client import values

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and values.ValueClass is values.MutexValue:
            log.warning(
                "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set: the gate's counters "
                "are missing from /metrics"
            )
        self._refused = prometheus_client.Counter(
            "tuneserve_gate_refused",
            "Requests the serving gate refused, by the error code it answered with (reason) and the parameter over "
            "its limit (param: n, best_of, max_tokens; empty for other reasons)",
            ["reason", "param"],
        )
        self._drains = prometheus_client.Counter("tuneserve_gate_drains", "Drains the serving gate started (SIGTERM)")
        self._cancelled = prometheus_client.Counter(
            "tuneserve_gate_drain_cancelled", "Requests cancelled because the drain ended while they were open"
        )
        self._live = prometheus_client.Counter(
            "tuneserve_gate_live", "/live answers by result: pass (200) or fail (503)", ["result"]
        )
        for reason, param in REFUSALS:  # every series from 0
            self._refused.labels(reason, param)
        for result in ("pass", "fail"):
            self._live.labels(result)

    def refused(self, reason: str, param: str | None) -> None:
        self.counts["refused", reason, param or ""] += 1
        if self._refused is not None:
            self._refused.labels(reason, param or "").inc()

    def drain_started(self) -> None:
        self.counts["drains"] += 1
        if self._drains is not None:
            self._drains.inc()

    def drain_cancelled(self, requests: int) -> None:
        self.counts["drain_cancelled"] += requests
        if self._cancelled is not None and requests:
            self._cancelled.inc(requests)

    def live(self, passed: bool) -> None:
        result = "pass" if passed else "fail"
        self.counts["live", result] += 1
        if self._live is not None:
            self._live.labels(result).inc()


_METRICS: GateMetrics | None = None


def gate_metrics() -> GateMetrics:
    """This process's counters, created on first use (see GateMetrics for why not at import)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = GateMetrics()
    return _METRICS


@dataclass(eq=False)
class Flight:
    """One request the gate let through, until its response is complete."""

    task: asyncio.Task | None = None
    started: bool = False  # the response's status line went out
    streaming: bool = False  # ... as text/event-stream
    finished: bool = False  # the last body chunk went out
    cut: bool = False  # the drain ran out and ended it


class Gate:
    def __init__(self, app):
        self.app = app
        raw = os.environ.get(GATE_ENV)
        if raw is None:  # started outside the entrypoint: refuse to serve rather than serve unguarded
            raise RuntimeError(f"{GATE_ENV} is not set: start the server with `python -m entrypoints.serve`")
        cfg = json.loads(raw)
        self.cfg = cfg
        key = os.environ.get("VLLM_API_KEY") or ""
        if cfg["auth"] and not key.strip():
            raise RuntimeError("API key required but VLLM_API_KEY is empty")
        # Compared as SHA-256 digests with hmac.compare_digest: constant time whatever the lengths.
        self.key_digest = hashlib.sha256(key.encode()).digest() if cfg["auth"] else None
        self.flights: set[Flight] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        self.hurry = asyncio.Event()  # a second SIGTERM
        self.closing = asyncio.Event()  # the drain is over: bodies still arriving are not waited for
        self.reading: set[asyncio.Timeout] = set()  # the deadlines of the bodies being read
        self.fastapi_app = None
        self.signal_installed = False
        self.live_ok_at = float("-inf")
        self.live_task: asyncio.Task | None = None
        self.background: set[asyncio.Task] = set()
        self.metrics = gate_metrics()
        logging.getLogger("uvicorn.access").addFilter(_drop_query)

    # ------------------------------------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if not self.signal_installed:  # at the lifespan startup, after vLLM set its own handlers
            self._start(scope)
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        try:
            return await self._gated(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - outermost layer: one line, never a traceback a client can cause
            log.warning("%s %s failed: %s: %s", scope.get("method", kind), scope.get("path"), type(exc).__name__, exc)
            # An answer if none has started; the server refuses it when one has (no per-message bookkeeping on the
            # hot path to know which), and then closes the connection.
            try:
                if kind == "websocket":
                    return await send({"type": "websocket.close", "code": 1011})
                return await self._respond(send, 500, "the server failed this request", "internal_error")
            except (RuntimeError, OSError):
                return None

    async def _gated(self, scope, receive, send):
        kind = scope["type"]
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        public = path in PUBLIC or path.startswith("/metrics/")
        if not public and not self._authorized(scope):
            if kind == "websocket":  # closing before accept answers the handshake with 403
                self.metrics.refused("invalid_api_key", None)
                return await send({"type": "websocket.close", "code": 1008})
            return await self._refuse(
                send,
                401,
                "Missing or invalid API key: send it as 'Authorization: Bearer <key>'",
                "invalid_api_key",
                extra=[(b"www-authenticate", b"Bearer")],
            )
        if kind == "websocket":
            if public:  # probes and metrics speak HTTP only; the apps mounted there fail a handshake
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        if path == "/live":
            return await self._live(send)
        if self.draining:
            if path == "/metrics" or path.startswith("/metrics/"):  # Prometheus scrapes a draining server too
                return await self.app(scope, receive, send)
            # /health and /ping fail readiness here: answered, not counted as refusals
            answer = self._respond if path in PROBES else self._refuse
            return await answer(
                send,
                503,
                "the server is shutting down; retry on another replica",
                "draining",
                extra=[(b"retry-after", b"1"), (b"connection", b"close")],
            )
        if path in PROBES or public:
            return await self.app(scope, receive, send)
        receive = await self._checked_body(scope, receive, send, path)
        if receive is None:
            return None
        return await self._run(scope, receive, send)

    def _authorized(self, scope) -> bool:
        if self.key_digest is None:
            return True
        headers = dict(scope.get("headers") or [])
        # A CORS preflight carries no credentials; vLLM's CORS middleware answers it without reaching a route.
        if scope.get("method") == "OPTIONS" and b"access-control-request-method" in headers:
            return True
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        given = hashlib.sha256(token.strip().encode("latin-1")).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.key_digest)

    @staticmethod
    async def _send_json(send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] = ()) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _respond(
        self,
        send,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        extra: list[tuple[bytes, bytes]] = (),
    ) -> None:
        await self._send_json(send, status, error_body(status, message, code, param), extra)

    async def _refuse(
        self,
        send,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        extra: list[tuple[bytes, bytes]] = (),
    ) -> None:
        """An error the gate answers instead of passing the request on: counted (tuneserve_gate_refused_total), sent."""
        self.metrics.refused(code, param)
        await self._respond(send, status, message, code, param, extra)

    # ------------------------------------------------------------------------------------------ limits
    async def _checked_body(self, scope, receive, send, path: str):
        """Reads the whole body within its limit and checks it; returns a receive that replays it, or None
        when an error was sent."""
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return receive
        tokenize = path.endswith(TOKENIZE_SUFFIXES)
        limit, var = (
            (self.cfg["max_tokenize_bytes"], "MAX_TOKENIZE_BYTES")
            if tokenize
            else (self.cfg["max_request_bytes"], "MAX_REQUEST_BYTES")
        )
        too_large = f"request body larger than this server accepts ({var}={limit} bytes)"
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            await self._refuse(send, 413, too_large, "request_too_large", extra=[(b"connection", b"close")])
            return None
        if self.closing.is_set():
            await self._refuse(send, 503, "the server shut down", "draining", extra=[(b"connection", b"close")])
            return None
        chunks, size, more = [], 0, True
        # One deadline for the whole body. The drain's end moves it to now (`_drain`), so that no body still
        # arriving holds the shutdown: asyncio's own timeout, no task or future per request.
        try:
            async with asyncio.timeout(self.cfg["read_timeout"]) as deadline:
                self.reading.add(deadline)
                try:
                    while more:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return None
                        chunk = message.get("body", b"")
                        size += len(chunk)
                        if size > limit:  # chunked bodies declare no length: counted as they arrive
                            await self._refuse(
                                send, 413, too_large, "request_too_large", extra=[(b"connection", b"close")]
                            )
                            return None
                        chunks.append(chunk)
                        more = message.get("more_body", False)
                finally:
                    self.reading.discard(deadline)
        except TimeoutError:
            if self.closing.is_set():
                await self._refuse(send, 503, "the server shut down", "draining", extra=[(b"connection", b"close")])
            else:
                await self._refuse(
                    send,
                    408,
                    f"the request body did not arrive within REQUEST_READ_TIMEOUT={self.cfg['read_timeout']:g}s",
                    "request_timeout",
                    extra=[(b"connection", b"close")],
                )
            return None
        body = b"".join(chunks)
        parsed = parse_body(body) if body.strip() else {}
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if not isinstance(parsed, dict) and not (parsed is None and content_type in FORM_TYPES):
            # vLLM's routes read JSON whatever the content type says (/invocations among them): a body the gate
            # cannot count must not reach them. Forms (the audio routes) are not JSON to vLLM either.
            what = "not JSON" if parsed is None else f"a JSON {type(parsed).__name__}"
            await self._refuse(send, 400, f"the request body is {what}; send a JSON object", "invalid_body", extra=[])
            return None
        if not tokenize:
            problem = check_generation_limits(
                parsed,
                max_choices=self.cfg["max_choices"],
                max_request_output_tokens=self.cfg["max_request_output_tokens"],
                max_output_tokens=self.cfg["max_output_tokens"],
            )
            if problem is not None:
                await self._refuse(send, 400, problem[0], "limit_exceeded", param=problem[1])
                return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, as the app expects

        return replay

    # ------------------------------------------------------------------------------------------ drain
    async def _run(self, scope, receive, send):
        flight = Flight()

        async def tracked_send(message):
            if flight.cut:
                return  # the drain already ended this response
            if message["type"] == "http.response.start":
                flight.started = True
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                flight.streaming = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                if flight.streaming and message.get("body"):
                    self.live_ok_at = time.monotonic()  # a streamed chunk: the engine is generating
                if not message.get("more_body", False):
                    flight.finished = True
            await send(message)

        # The request runs in the server's own task for it (no task of ours per request); the drain cancels that
        # task, and the cancellation the drain asked for is taken back here.
        flight.task = asyncio.current_task()
        self.flights.add(flight)
        self.idle.clear()
        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if not flight.cut or flight.task is None or flight.task.uncancel() > 0:
                raise  # the server cancelled us (client gone): not ours to answer
            try:  # a client that stopped reading must not hold the cut response open
                await asyncio.wait_for(self._end_cut(flight, send), timeout=1)
            except TimeoutError:
                pass
        finally:
            self.flights.discard(flight)
            if not self.flights:
                self.idle.set()

    async def _end_cut(self, flight: Flight, send) -> None:
        """Ends a response the drain cancelled: 503 before it started, an error event on a stream."""
        message = f"the server shut down before this request finished (DRAIN_SECONDS={self.cfg['drain_seconds']:g})"
        try:
            if not flight.started:
                await self._respond(send, 503, message, "draining", extra=[(b"connection", b"close")])
            elif not flight.finished:
                tail = b""
                if flight.streaming:
                    tail = b"data: " + error_body(503, message, "draining") + b"\n\n"
                await send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:
            pass  # the client is gone already

    def _start(self, scope) -> None:
        """At the lifespan startup: takes over SIGTERM from vLLM's server loop (asyncio keeps one handler per
        signal; vLLM's aborts or waits without ending open streams; SIGINT keeps vLLM's immediate shutdown), tells
        the supervisor the drain is in place, and starts the header watchdog."""
        self.signal_installed = True  # tried: once is enough
        self.fastapi_app = scope.get("app")
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._on_sigterm)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread: leave vLLM's
            log.warning("cannot handle SIGTERM in this process: no drain")
            return
        fd = os.environ.pop(READY_FD_ENV, None)
        if fd is not None:
            try:
                os.write(int(fd), b"ready\n")
                os.close(int(fd))
            except (OSError, ValueError) as exc:
                log.warning("cannot tell the supervisor the server is ready: %s", exc)
        self._spawn(self._header_watchdog())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _server(self):
        """vLLM's uvicorn server (vLLM's launcher keeps it in app.state.server), or None."""
        return getattr(getattr(self.fastapi_app, "state", None), "server", None)

    async def _header_watchdog(self) -> None:
        """Closes connections that have not completed a request's headers within REQUEST_READ_TIMEOUT.

        Written by hand because uvicorn has no header timeout: its keep-alive timer starts only after a response,
        and any byte received stops it, so a client that sends headers slowly (or nothing after connecting) would
        hold its connection, and a worker's slot, for ever. Reads uvicorn's connection set and each protocol's
        current request cycle (the same for its h11 and httptools protocols)."""
        limit = self.cfg["read_timeout"]
        waiting_since: dict[Any, tuple[Any, float]] = {}
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            server = self._server()
            state = getattr(server, "server_state", None)
            if state is None:
                return
            now = time.monotonic()
            seen = {}
            for conn in list(state.connections):
                if not hasattr(conn, "cycle"):  # a WebSocket: not waiting for headers
                    continue
                cycle = conn.cycle
                if cycle is not None and not cycle.response_complete:
                    continue  # a request is under way: the body deadline and the drain bound it
                since = waiting_since.get(conn)
                since = since if since is not None and since[0] is cycle else (cycle, now)
                seen[conn] = since
                if now - since[1] > limit and getattr(conn, "transport", None) is not None:
                    log.info("closing a connection that sent no complete request in %gs (REQUEST_READ_TIMEOUT)", limit)
                    conn.transport.close()
            waiting_since = seen

    def _on_sigterm(self) -> None:
        if self.draining:  # the second SIGTERM: end the drain now
            log.warning("SIGTERM again: ending %d open request(s) now", len(self.flights))
            self.hurry.set()
            return
        self.draining = True
        self.metrics.drain_started()
        log.info(
            "SIGTERM: draining %d request(s) for up to %gs; /health answers 503, new requests 503",
            len(self.flights),
            self.cfg["drain_seconds"],
        )
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        started = time.monotonic()
        idle = asyncio.ensure_future(self.idle.wait())
        hurry = asyncio.ensure_future(self.hurry.wait())
        await asyncio.wait({idle, hurry}, timeout=self.cfg["drain_seconds"], return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        if idle.done():
            log.info("drain: every request finished")
        else:
            idle.cancel()
            open_flights = [f for f in self.flights if f.task is not None and not f.task.done()]
            waited = time.monotonic() - started
            log.warning("drain: %d request(s) still open after %.3gs: ending them", len(open_flights), waited)
            for f in open_flights:
                f.cut = True
                f.task.cancel()
            self.metrics.drain_cancelled(len(open_flights))
            try:
                await asyncio.wait_for(self.idle.wait(), timeout=5)
            except TimeoutError:
                log.warning("drain: %d request(s) did not end; exiting anyway", len(self.flights))
        self.closing.set()  # requests still sending their body are answered 503
        now = asyncio.get_running_loop().time()
        for deadline in list(self.reading):
            deadline.reschedule(now)
        server = self._server()
        if server is None:  # not served by vLLM's launcher: the default action
            signal.raise_signal(signal.SIGINT)
            return
        server.should_exit = True  # uvicorn's documented way to stop; vLLM then shuts the engine down
        # uvicorn then waits for every connection to close: a client that stopped reading a stream, or never
        # finishes its headers, would hold the process for ever. Every request was answered or ended above; after
        # a short grace, the connections still open are cut (uvicorn has no deadline for this; its force_exit
        # would skip the app's own shutdown).
        await asyncio.sleep(EXIT_GRACE)
        left = list(getattr(getattr(server, "server_state", None), "connections", ()))
        if left:
            log.info("drain: cutting %d connection(s) the clients keep open", len(left))
        for conn in left:
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        await asyncio.sleep(EXIT_GRACE)
        if getattr(getattr(server, "server_state", None), "connections", None):
            server.force_exit = True  # the last resort

    # ------------------------------------------------------------------------------------------ liveness
    async def _live(self, send) -> None:
        problem, how = await self._liveness()
        self.metrics.live(problem is None)
        if problem is None:
            return await self._send_json(send, 200, json.dumps({"status": "ok", "check": how}).encode())
        log.warning("liveness: %s", problem)
        return await self._respond(send, 503, problem, "engine_stalled")

    async def _liveness(self) -> tuple[str | None, str]:
        """(None, how the engine proved progress) or (what went wrong, "")."""
        now = time.monotonic()
        if self.draining:
            return None, "draining"
        if now - ENGINE_STEPS.last < self.cfg["live_cache_seconds"]:
            return None, "progress"
        if now - self.live_ok_at < self.cfg["live_cache_seconds"]:
            return None, "cached"
        if self.live_task is None or self.live_task.done():  # concurrent probes share one check
            self.live_task = asyncio.ensure_future(self._check_progress())
        return await asyncio.shield(self.live_task)

    async def _check_progress(self) -> tuple[str | None, str]:
        """(None, how) when the engine generated the probe's token or took a step within LIVE_TIMEOUT, else
        (what went wrong, ""). The probe's request may wait behind a backlog; the engine's steps through that
        backlog are progress too."""
        started = time.monotonic()
        probe = asyncio.ensure_future(self._generate_one())
        while not probe.done():
            await asyncio.wait({probe}, timeout=0.05)
            if ENGINE_STEPS.last > started and not probe.done():
                probe.cancel()  # vLLM aborts the probe's request when its generator is cancelled
                return None, "progress"
        problem = probe.result()
        return problem, "generated" if problem is None else ""

    async def _generate_one(self) -> str | None:
        """None when the engine generated one token within the deadline, else what went wrong."""
        engine = getattr(getattr(self.fastapi_app, "state", None), "engine_client", None)
        if engine is None:
            return "no engine"
        from vllm import SamplingParams  # in vLLM's process; imported late so the limits import without vLLM

        request_id = f"tuneserve-live-{uuid.uuid4().hex}"
        params = SamplingParams(max_tokens=1, temperature=0.0)

        async def one() -> None:
            async for _ in engine.generate({"prompt_token_ids": [LIVE_TOKEN_ID]}, params, request_id):
                pass

        timeout = self.cfg["live_timeout"]
        try:
            await asyncio.wait_for(one(), timeout=timeout)
        except TimeoutError:
            try:  # cancelling the generation aborts it in vLLM already; this makes sure, within bounds
                await asyncio.wait_for(engine.abort(request_id), timeout=2)
            except Exception as exc:  # noqa: BLE001 - a stalled engine may not answer the abort either
                log.debug("liveness: abort of %s: %s", request_id, exc)
            return f"the engine generated no token within {timeout:g}s (LIVE_TIMEOUT)"
        except Exception as exc:  # noqa: BLE001 - any engine failure means not live
            return f"the engine failed a 1-token generation: {type(exc).__name__}: {exc}"
        self.live_ok_at = time.monotonic()
        return None
