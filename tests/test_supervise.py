"""The serving supervisor (tuneserve.supervise) with stand-in servers that misbehave as vLLM can: ignoring SIGTERM
while they start, or never ending a drain. Fast; the real server's start-up and drain are in tests/test_serve.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil

# A server that tells the supervisor it is ready (when READY) and then ignores SIGTERM, as a hung start-up or a
# drain held up by a client would; it records every signal it gets.
SERVER = textwrap.dedent(
    """
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda s, f: open(sys.argv[1], "a").write("TERM\\n"))
    if sys.argv[2] == "ready":
        os.write(int(os.environ["TUNESERVE_READY_FD"]), b"ready\\n")
    open(sys.argv[1], "a").write("started\\n")
    time.sleep(600)
    """
)


def supervised(tmp_path, mode: str, *options: str) -> tuple[subprocess.Popen, object]:
    notes = tmp_path / "notes"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneserve.supervise", *options, "--", sys.executable, "-c", SERVER, str(notes), mode]
    )
    deadline = time.monotonic() + 30
    while not (notes.is_file() and "started" in notes.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)  # the readiness line reached the supervisor
    return proc, notes


def server_of(proc: subprocess.Popen) -> psutil.Process:
    (child,) = psutil.Process(proc.pid).children()
    return child


def test_a_start_up_that_ignores_sigterm_is_killed_after_the_grace_and_exits_143(tmp_path):
    proc, notes = supervised(tmp_path, "starting", "--drain-seconds", "30", "--startup-grace", "1")
    server = server_of(proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    assert 0.9 < time.monotonic() - sent < 5  # the grace, not DRAIN_SECONDS
    assert notes.read_text().count("TERM") == 1  # asked first, then killed
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE


def test_a_drain_nothing_ends_is_cut_at_drain_seconds_plus_the_margin(tmp_path):
    proc, notes = supervised(tmp_path, "ready", "--drain-seconds", "1", "--exit-margin", "1")
    server = server_of(proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # the second one is passed on too (the gate ends its drain at once)
    assert proc.wait(timeout=10) == 143
    assert 1.9 < time.monotonic() - sent < 5
    assert notes.read_text().count("TERM") == 2
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE


def test_the_server_does_not_outlive_a_killed_supervisor(tmp_path):
    proc, _ = supervised(tmp_path, "ready", "--drain-seconds", "30")
    server = server_of(proc)
    proc.kill()
    proc.wait()
    server.wait(timeout=5)  # SIGKILL through PR_SET_PDEATHSIG


def test_scratch_folders_go_and_the_exit_code_is_the_servers(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "generation_config.json").write_text("{}")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneserve.supervise",
            "--drain-seconds",
            "1",
            f"--scratch={scratch}",
            "--",
            sys.executable,
            "-c",
            "import sys; sys.exit(3)",
        ],
        timeout=30,
    )
    assert res.returncode == 3 and not scratch.exists()
