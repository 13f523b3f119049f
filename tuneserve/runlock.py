"""One run per OUTPUT_DIR at a time: OUTPUT_DIR/.tuneserve.lock.

Two runs on one folder (two Jobs, `docker run` twice) would delete each other's checkpoints mid-write and swap
adapters, so the run that claims the folder holds a lock until its process ends; a second run is refused at once
(exit 2) with the holder's host, process id and start time.

How a dead holder is recognised:
- The lock is a POSIX record lock (fcntl.lockf) on the file. The kernel drops it when its process ends, however
  it ends (an error, SIGKILL, the OOM killer); on NFSv4, CephFS, EFS and Azure Files the server drops the lock of
  a client that stopped renewing its lease (a lost node) after the lease time (about 90 s on NFSv4). A run that
  gets the lock takes over at once when the last holder was on this host.
- Some network volumes take record locks per node only (NFS mounted with `nolock`, FUSE buckets) or not at all.
  So the holder also writes a heartbeat into the file every HEARTBEAT_SECONDS. A run that gets the lock while the
  file shows another host's heartbeat younger than STALE_SECONDS watches it: a heartbeat that moves is a live
  holder (refused), one that stops is a dead one (taken over once it is STALE_SECONDS old). A holder that ends
  normally marks the file released, so a retry on another node does not wait.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tuneserve.exitcodes import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".tuneserve.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0  # four missed heartbeats
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass
class Holder:
    host: str
    pid: int
    since: str
    heartbeat: float
    released: bool = False

    def describe(self) -> str:
        age = max(0.0, time.time() - self.heartbeat)
        return f"host {self.host}, process {self.pid}, running since {self.since} (last heartbeat {age:.0f} s ago)"


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in the lock file (None: no file, empty, or not ours). Not for the process holding the
    lock: closing any descriptor of the file drops a POSIX lock (it reads through its own, `_read`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _read(fd: int) -> Holder | None:
    for attempt in range(3):  # the holder rewrites the file in place: a read may catch it half written
        try:
            raw = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
            return None if raw is None else Holder(**raw)
        except (ValueError, TypeError):
            if attempt < 2:
                time.sleep(0.1)
    return None


def verdict(holder: Holder | None, *, locked: bool, now: float, host: str) -> str:
    """What a run that tried the lock does about the recorded holder: "take", "refuse" or "watch".

    `locked`: the record lock was granted (False: the filesystem has no record locks). Pure, so the rule is
    tested as it is written."""
    if holder is None or holder.released or now - holder.heartbeat >= STALE_SECONDS:
        return "take"
    if holder.host == host:
        if locked:
            return "take"  # the kernel dropped the holder's lock: it ended
        return "refuse" if holder.pid != os.getpid() and _alive(holder.pid) else "take"
    return "watch"  # another host's fresh heartbeat, and locks that may not reach across hosts


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The held lock: its file, the heartbeat thread, and the release at exit."""

    def __init__(self, path: Path, fd: int, locked: bool):
        self.path, self.fd, self.locked = path, fd, locked
        self.holder = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            heartbeat=time.time(),
        )
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._beat, name="tuneserve-lock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _write(self) -> None:
        # In place, never by rename: the record lock belongs to this file's inode.
        data = json.dumps(self.holder.__dict__).encode()
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, data)
        os.fsync(self.fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.holder.heartbeat = time.time()
            try:
                self._write()
            except OSError as exc:  # a full disk or a lost volume: the run itself will report it
                log.debug("lock heartbeat not written: %s", exc)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.holder.released = True
            self._write()
            if self.locked:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        except OSError:
            pass


_held: RunLock | None = None


def acquire(root: Path) -> RunLock:
    """Lock OUTPUT_DIR for this process (until it ends), or ConfigError naming the holder."""
    global _held
    if _held is not None and _held.path.parent == root:
        return _held
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise ConfigError(_refusal(root, read_holder(path))) from None
        if exc.errno not in _NO_LOCKS:
            os.close(fd)
            raise
        locked = False
        log.warning("the filesystem of %s takes no file locks: only the lock's heartbeat keeps runs apart", root)
    holder = _read(fd)
    decision = verdict(holder, locked=locked, now=time.time(), host=socket.gethostname())
    if decision == "watch":
        decision = _watch(fd, path, holder)
    if decision == "refuse":
        if locked:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise ConfigError(_refusal(root, holder))
    if holder is not None and not holder.released:
        log.warning(
            "taking over the lock of %s from a run that ended without releasing it (%s)", root, holder.describe()
        )
    _held = RunLock(path, fd, locked)
    return _held


def _watch(fd: int, path: Path, holder: Holder) -> str:
    """Another host's fresh heartbeat: refuse when it moves, take over when it goes stale."""
    log.warning(
        "%s was held from another host (%s); waiting up to %.0f s for its heartbeat to show whether it still runs",
        path,
        holder.describe(),
        STALE_SECONDS - (time.time() - holder.heartbeat),
    )
    while time.time() - holder.heartbeat < STALE_SECONDS:
        time.sleep(min(5.0, HEARTBEAT_SECONDS / 4))
        now = _read(fd)
        if now is None or now.released:
            return "take"
        if now.heartbeat != holder.heartbeat:
            return "refuse"
    return "take"


def _refusal(root: Path, holder: Holder | None) -> str:
    who = holder.describe() if holder else "a process that has not yet written its name"
    return (
        f"OUTPUT_DIR={str(root)!r} is in use by another run ({who}). One run per OUTPUT_DIR at a time: wait "
        "for it to finish, stop it, or use another OUTPUT_DIR. A run that died releases the lock by itself"
    )


def holder_of(root: Path) -> Holder | None:
    """For --check: who holds OUTPUT_DIR now, if anyone (without taking the lock)."""
    path = root / LOCK_FILE
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return read_holder(path) if exc.errno in (errno.EACCES, errno.EAGAIN) else None
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
