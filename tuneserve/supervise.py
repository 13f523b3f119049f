"""The serving container's first process: starts vLLM's server and makes sure it ends when told to.

Written by hand because no init for containers does this part (tini and dumb-init forward signals and reap, and
vLLM cannot be stopped cleanly while it starts):
- **Start-up.** vLLM's start-up (engine processes, weights, compilation, graph capture) does not end cleanly on
  SIGTERM: its handler raises KeyboardInterrupt into whatever runs, which can hang, or be swallowed so that the
  server comes up anyway. Until the gate reports the drain in place (one line on a pipe, `TUNESERVE_READY_FD`), a
  SIGTERM or SIGINT ends the whole process group: SIGTERM, then SIGKILL after STARTUP_GRACE seconds.
- **Serving.** SIGTERM and SIGINT go to vLLM's server, which drains (tuneserve.gate); a second SIGTERM is passed
  on too and ends the drain at once. Whatever clients do, the process group is killed DRAIN_SECONDS + EXIT_MARGIN
  seconds after the first signal.
- **Always.** Orphaned processes are reaped (this may be PID 1), scratch folders the entrypoint made are removed,
  and the exit code is the server's, or 128 + the signal when it had to be killed (143 for SIGTERM).

Imports nothing heavy: it holds only its own memory while vLLM serves.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import subprocess
import sys
import time

from tuneserve.gate import READY_FD_ENV

STARTUP_GRACE = 5.0  # seconds vLLM's processes get to end on SIGTERM during start-up before SIGKILL
EXIT_MARGIN = 10.0  # seconds past DRAIN_SECONDS before the process group is killed


def say(message: str) -> None:
    print(f"tuneserve.supervise: {message}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the server's process, before its exec: SIGKILL when the supervisor dies (killed itself, it cannot pass
    anything on), so that no server outlives it. Linux's prctl(PR_SET_PDEATHSIG); nothing elsewhere. libc is
    loaded before the fork (nothing is imported in the child)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "prctl") else None


_LIBC = _libc()


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def supervise(
    command: list[str],
    drain_seconds: float,
    scratch: list[str],
    exit_margin: float = EXIT_MARGIN,
    startup_grace: float = STARTUP_GRACE,
) -> int:
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    # The entrypoint blocked them across its exec: one that arrived meanwhile is delivered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    ready_r, ready_w = os.pipe()
    child = subprocess.Popen(
        command,
        env={**os.environ, READY_FD_ENV: str(ready_w)},
        pass_fds=(ready_w,),
        start_new_session=True,  # its own process group, so that it can be ended whole
        preexec_fn=_die_with_parent,
    )
    os.close(ready_w)
    ready, first_signal, kill_at, killed = False, None, None, False
    code, listening = None, True
    try:
        while code is None:
            try:
                readable, _, _ = select.select([ready_r] if listening else [], [], [], 0.2)
            except InterruptedError:
                readable = []
            if readable:
                listening = False  # one line, or the end of the pipe: nothing more will come
                ready = bool(os.read(ready_r, 64))
            while received:
                sig = received.pop(0)
                if not ready:
                    if first_signal is None:
                        say(f"{signal.Signals(sig).name} during start-up: stopping the server's processes")
                        kill_group(child.pid, signal.SIGTERM)
                        kill_at = time.monotonic() + startup_grace
                    first_signal = first_signal or sig
                    continue
                if first_signal is None:
                    first_signal = sig
                    kill_at = time.monotonic() + drain_seconds + exit_margin
                try:
                    os.kill(child.pid, sig)
                except ProcessLookupError:
                    pass
            if kill_at is not None and time.monotonic() > kill_at and not killed:
                say(f"the server did not exit in time after {signal.Signals(first_signal).name}: killing it")
                kill_group(child.pid, signal.SIGKILL)
                killed = True
            code = child.poll()
            reap_orphans(child.pid)
    finally:
        os.close(ready_r)
        kill_group(child.pid, signal.SIGKILL)  # whatever the server left behind in its group
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)
    if first_signal is not None and (killed or not ready):
        return 128 + first_signal
    return code if code >= 0 else 128 - code


def reap_orphans(server_pid: int) -> None:
    """Collects exited processes other than the server (Popen waits for that one): as PID 1 of a container, every
    process orphaned inside it becomes ours."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == server_pid:
            return
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneserve.supervise")
    parser.add_argument("--drain-seconds", type=float, required=True)
    parser.add_argument("--scratch", action="append", default=[], help="a folder to remove at exit")
    parser.add_argument("--exit-margin", type=float, default=EXIT_MARGIN, help=argparse.SUPPRESS)  # tests
    parser.add_argument("--startup-grace", type=float, default=STARTUP_GRACE, help=argparse.SUPPRESS)  # tests
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    return supervise(command, args.drain_seconds, args.scratch, args.exit_margin, args.startup_grace)


if __name__ == "__main__":
    sys.exit(main())
