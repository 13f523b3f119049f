"""Waiting for a local OpenAI-compatible server (vLLM) to answer GET /health, and stopping it: used by the
demo, the benchmarks and the tests that start servers, each of which starts and watches its server its own
way."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    url: str,
    check_alive: Callable[[], None],
    timeout: float,
    interval: float = 1.0,
    progress: Callable[[float], None] | None = None,
) -> float:
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


def stop_server(proc: subprocess.Popen, grace: float = 60) -> int:
    """SIGTERM, as `docker stop` and the kubelet send it; SIGKILL if the server is still up after `grace`
    seconds. Returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
