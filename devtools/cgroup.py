"""A real memory limit for the processes a test or benchmark starts: a memory cgroup of their own, the mechanism
behind `docker run --memory` and a pod's memory limit. Past the limit the kernel reclaims what it can (page cache,
the checkpoint files a process maps) and then kills the process (exit -9), as it would in the container.

    with MemoryLimit(2 << 30) as limit:
        subprocess.run(cmd, preexec_fn=limit.enter)
        limit.oom_kills  # processes the kernel killed for memory

Needs root and the memory controller (cgroup v1's, or v2's at the root); raises with the reason otherwise.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class MemoryLimit:
    def __init__(self, limit: int, root: Path = ROOT) -> None:
        self.limit = limit
        name = f"tuneserve-{uuid.uuid4().hex[:8]}"
        if (root / "cgroup.controllers").is_file():  # v2: a child of the root, which may enable controllers
            if "memory" not in (root / "cgroup.controllers").read_text().split():
                raise RuntimeError(f"cgroup v2 at {root} has no memory controller")
            self.v2, self.folder = True, root / name
        else:
            self.v2, self.folder = False, root / "memory" / name

    def __enter__(self) -> MemoryLimit:
        try:
            if self.v2:
                control = self.folder.parent / "cgroup.subtree_control"
                if "memory" not in control.read_text().split():
                    control.write_text("+memory")
            self.folder.mkdir()
            (self.folder / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(self.limit))
            if self.v2:
                (self.folder / "memory.swap.max").write_text("0")
        except OSError as exc:
            raise RuntimeError(
                f"cannot set a memory limit with a cgroup at {self.folder} ({exc}): needs root and the memory "
                "controller, as on the CI machine"
            ) from exc
        return self

    def enter(self) -> None:
        """Put the calling process in the cgroup: a subprocess's preexec_fn, so the child and all it starts are
        limited from their first instruction."""
        (self.folder / "cgroup.procs").write_text(str(os.getpid()))

    @property
    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        for line in (self.folder / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def __exit__(self, *exc) -> None:
        import signal
        import time

        procs = self.folder / "cgroup.procs"
        for _ in range(50):
            pids = [int(p) for p in procs.read_text().split()] if procs.is_file() else []
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        try:
            self.folder.rmdir()
        except OSError:
            pass
