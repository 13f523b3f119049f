"""Waiting for a local OpenAI-compatible server (vLLM) to answer GET /health: used by the demo, the
benchmarks and the tests that start servers, each of which starts and watches its server its own way."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, check_alive: Callable[[], None], timeout: float, interval: float = 1.0,
                 progress: Callable[[float], None] | None = None) -> float:
    """Poll `url`/health until it answers 200; returns the seconds waited. `check_alive` raises when the
    server is gone (it runs before every poll); TimeoutError after `timeout` seconds."""
    start = time.monotonic()
    while True:
        check_alive()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        elapsed = time.monotonic() - start
        if elapsed >= timeout:
            raise TimeoutError(f"{url}/health did not answer 200 within {timeout:g}s")
        if progress is not None:
            progress(elapsed)
        time.sleep(interval)
