"""The serving gate: an ASGI middleware that vLLM loads through its own `--middleware` hook (the entrypoint
adds `--middleware tuneserve.gate.Gate` last, so it is the outermost layer around every route).

- Deny by default: with a key configured, every HTTP and WebSocket route needs `Authorization: Bearer KEY`
  except the probes (/health, /ping, /live) and /metrics (Prometheus scrapes without a key; the
  NetworkPolicy decides who may reach it). A route a later vLLM adds is covered without being listed.
  vLLM's own key check guards only paths under /v1, /v2, /inference and /cohere.
- Limits, checked before any work starts: request body bytes (413), tokenize/detokenize body bytes (413),
  choices per request (`n`, `best_of`) and total output tokens per request (prompts x choices x
  max_tokens, each capped by MAX_OUTPUT_TOKENS) (400). Each error names its variable.
- Drain: SIGTERM makes /health answer 503 at once (readiness fails), new requests get 503, requests in
  flight get DRAIN_SECONDS to finish; whatever is still open then is cancelled (vLLM aborts it in the
  engine), a stream gets an error event and is closed, and the HTTP server is told to exit.
- /live proves forward progress: a 1-token greedy generation through the engine with a deadline, cached
  for a few seconds (vLLM's /health says 200 while a stalled engine generates nothing).

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
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

GATE_ENV = "TUNESERVE_GATE"
PROBES = frozenset({"/health", "/ping", "/live"})
PUBLIC = PROBES | {"/metrics"}
# The paths of vLLM's tokenizer endpoints end with these (/tokenize, /detokenize).
TOKENIZE_SUFFIXES = ("/tokenize", "/detokenize")
LIVE_TOKEN_ID = 0  # any id is a valid prompt for a 1-token generation

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
) -> str:
    """The TUNESERVE_GATE value the entrypoint passes (every field is required by Gate)."""
    return json.dumps({k: v for k, v in locals().items()}, sort_keys=True)


def error_body(status: int, message: str, code: str, param: str | None = None) -> bytes:
    kind = {
        401: "invalid_request_error",
        413: "invalid_request_error",
        400: "invalid_request_error",
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


def check_generation_limits(
    body: Any, *, max_choices: int, max_request_output_tokens: int, max_output_tokens: int
) -> tuple[str, str] | None:
    """(message, param) when a JSON request body asks for more than the limits allow, else None.

    Choices are `n` and `best_of` (and beam width, which is `n`); output tokens per choice are the request's
    max_tokens / max_completion_tokens / max_output_tokens, at most MAX_OUTPUT_TOKENS (the server-wide cap
    vLLM applies), MAX_OUTPUT_TOKENS when absent; a completions `prompt` list or a batch of conversations
    (`messages` as a list of lists) multiplies by its length.
    Values of the wrong type are left for vLLM to reject."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("sampling_params"), dict):  # vLLM's token-in/token-out route nests them
        body = {**body, **body["sampling_params"]}
    choices = max(_count(body.get("n")), _count(body.get("best_of")))
    if choices > max_choices:
        param = "n" if _count(body.get("n")) >= _count(body.get("best_of")) else "best_of"
        return (f"{param}={choices} is more than this server allows per request (MAX_CHOICES={max_choices})", param)
    asked = next(
        (body[k] for k in ("max_tokens", "max_completion_tokens", "max_output_tokens") if body.get(k) is not None), None
    )
    per_choice = min(_count(asked, max_output_tokens), max_output_tokens)
    prompts = 1
    for key, item in (("prompt", (str, list)), ("messages", list)):  # a list of prompts; a batch of conversations
        value = body.get(key)
        if isinstance(value, list) and value and isinstance(value[0], item):
            prompts = len(value)
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
        self.fastapi_app = None
        self.signal_installed = False
        self.live_ok_at = float("-inf")
        self.live_task: asyncio.Task | None = None

    # ------------------------------------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if not self.signal_installed:  # at the lifespan startup, after vLLM set its own handlers
            self._install_sigterm(scope)
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        public = path in PUBLIC or path.startswith("/metrics/")
        if not public and not self._authorized(scope):
            if kind == "websocket":  # closing before accept answers the handshake with 403
                return await send({"type": "websocket.close", "code": 1008})
            return await self._respond(
                send,
                401,
                "Missing or invalid API key: send it as 'Authorization: Bearer <key>'",
                "invalid_api_key",
                extra=[(b"www-authenticate", b"Bearer")],
            )
        if kind == "websocket":
            return await self.app(scope, receive, send)
        if path == "/live":
            return await self._live(send)
        if self.draining:
            if path == "/metrics" or path.startswith("/metrics/"):
                return await self.app(scope, receive, send)
            return await self._respond(
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
            await self._respond(send, 413, too_large, "request_too_large", extra=[(b"connection", b"close")])
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # chunked bodies declare no length: counted as they arrive
                await self._respond(send, 413, too_large, "request_too_large", extra=[(b"connection", b"close")])
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if not tokenize:
            problem = check_generation_limits(
                parse_body(body),
                max_choices=self.cfg["max_choices"],
                max_request_output_tokens=self.cfg["max_request_output_tokens"],
                max_output_tokens=self.cfg["max_output_tokens"],
            )
            if problem is not None:
                await self._respond(send, 400, problem[0], "limit_exceeded", param=problem[1])
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

        self.flights.add(flight)
        self.idle.clear()
        flight.task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        try:
            await flight.task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not flight.cut or (current is not None and current.cancelling()):
                raise  # the server cancelled us (client gone): not ours to answer
            await self._end_cut(flight, send)
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

    def _install_sigterm(self, scope) -> None:
        """Takes over SIGTERM from vLLM's server loop (asyncio keeps one handler per signal; vLLM's aborts or
        waits without ending open streams). SIGINT keeps vLLM's immediate shutdown."""
        self.signal_installed = True  # tried: once is enough
        self.fastapi_app = scope.get("app")
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._on_sigterm)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread: leave vLLM's
            log.warning("cannot handle SIGTERM in this process: no drain")

    def _on_sigterm(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info(
            "SIGTERM: draining %d request(s) for up to %gs; /health answers 503, new requests 503",
            len(self.flights),
            self.cfg["drain_seconds"],
        )
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self.idle.wait(), timeout=self.cfg["drain_seconds"])
            log.info("drain: every request finished")
        except TimeoutError:
            open_flights = [f for f in self.flights if f.task is not None and not f.task.done()]
            log.warning(
                "drain: %d request(s) still open after %gs: ending them", len(open_flights), self.cfg["drain_seconds"]
            )
            for f in open_flights:
                f.cut = True
                f.task.cancel()
            try:
                await asyncio.wait_for(self.idle.wait(), timeout=5)
            except TimeoutError:
                log.warning("drain: %d request(s) did not end; exiting anyway", len(self.flights))
        server = getattr(getattr(self.fastapi_app, "state", None), "server", None)
        if server is None:  # not served by vLLM's launcher: the default action
            signal.raise_signal(signal.SIGINT)
            return
        server.should_exit = True  # uvicorn's documented way to stop; vLLM then shuts the engine down

    # ------------------------------------------------------------------------------------------ liveness
    async def _live(self, send) -> None:
        now = time.monotonic()
        if self.draining or now - self.live_ok_at < self.cfg["live_cache_seconds"]:
            return await self._ok(send, "cached" if not self.draining else "draining")
        if self.live_task is None or self.live_task.done():  # concurrent probes share one generation
            self.live_task = asyncio.ensure_future(self._generate_one())
        problem = await asyncio.shield(self.live_task)
        if problem is None:
            return await self._ok(send, "generated")
        log.warning("liveness: %s", problem)
        return await self._respond(send, 503, problem, "engine_stalled")

    async def _ok(self, send, how: str) -> None:
        await self._send_json(send, 200, json.dumps({"status": "ok", "check": how}).encode())

    async def _generate_one(self) -> str | None:
        """None when the engine generated one token within the deadline, else what went wrong."""
        from vllm import SamplingParams  # in vLLM's process; imported late so the limits import without vLLM

        engine = getattr(getattr(self.fastapi_app, "state", None), "engine_client", None)
        if engine is None:
            return "no engine"
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
