"""Run state, piece by piece (fast): the lock's rule for a holder, the lock between processes, which fingerprint
differences refuse a rerun, the digest cache, what counts as a complete checkpoint in each layout the trainer
writes, and how many micro-batches a step takes. End to end through the entrypoint: test_rundir.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneserve import checkpoints, runlock
from tuneserve.exitcodes import ConfigError
from tuneserve.rundir import Digests, changes

HOST = socket.gethostname()


# ------------------------------------------------------------------------------------------- the lock
def holder(age: float, host: str = HOST, pid: int = 1, released: bool = False) -> runlock.Holder:
    return runlock.Holder(host=host, pid=pid, since="2026-01-01T00:00:00Z", heartbeat=1000.0 - age, released=released)


@pytest.mark.parametrize("locked", [True, False])
def test_a_holder_that_released_or_went_stale_is_taken_over_wherever_it_ran(locked):
    for host in (HOST, "other-node"):
        assert runlock.verdict(None, locked=locked, now=1000.0, host=HOST) == "take"
        assert runlock.verdict(holder(5, host, released=True), locked=locked, now=1000.0, host=HOST) == "take"
        assert runlock.verdict(holder(runlock.STALE_SECONDS, host), locked=locked, now=1000.0, host=HOST) == "take"


def test_a_fresh_holder_is_told_apart_by_host_and_by_whether_the_filesystem_locks():
    dead = _dead_pid()
    # This host, the record lock granted: the kernel dropped the holder's lock, so it ended.
    assert runlock.verdict(holder(1, pid=os.getppid()), locked=True, now=1000.0, host=HOST) == "take"
    # This host, no record locks on the filesystem: the process table says.
    assert runlock.verdict(holder(1, pid=os.getppid()), locked=False, now=1000.0, host=HOST) == "refuse"
    assert runlock.verdict(holder(1, pid=dead), locked=False, now=1000.0, host=HOST) == "take"
    # Another host's fresh heartbeat: locks may not reach across hosts, so its heartbeat is watched.
    for locked in (True, False):
        assert runlock.verdict(holder(1, "other-node"), locked=locked, now=1000.0, host=HOST) == "watch"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


HOLD = """
import sys, time
from pathlib import Path
from tuneserve import runlock
runlock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    holder_proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder_proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as refused:
            runlock.acquire(tmp_path)
        assert f"in use by another run (host {HOST}, process {holder_proc.pid}, running since" in str(refused.value)
        assert runlock.holder_of(tmp_path).pid == holder_proc.pid  # what --check reports, without taking it
        holder_proc.send_signal(signal.SIGKILL)  # no release written: the kernel drops the lock alone
        holder_proc.wait()
        assert runlock.read_holder(tmp_path / runlock.LOCK_FILE).released is False
        held = runlock.acquire(tmp_path)
        try:
            assert held.holder.pid == os.getpid() and runlock.holder_of(tmp_path) is None  # our own lock
            record = runlock.read_holder(tmp_path / runlock.LOCK_FILE)
            assert (record.host, record.pid, record.released) == (HOST, os.getpid(), False)
        finally:
            held.release()
            runlock._held = None
        assert runlock.read_holder(tmp_path / runlock.LOCK_FILE).released is True
    finally:
        holder_proc.kill()


def test_a_holder_on_another_host_is_refused_while_its_heartbeat_moves_and_taken_over_once_it_stops(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(runlock, "STALE_SECONDS", 1.5)
    monkeypatch.setattr(runlock, "HEARTBEAT_SECONDS", 0.4)
    path = tmp_path / runlock.LOCK_FILE

    def write(beat: float) -> None:
        path.write_text(json.dumps({**holder(0, "other-node").__dict__, "heartbeat": beat}))

    write(time.time())
    beating = subprocess.Popen(  # the other node's run: a heartbeat every 0.2 s
        [
            sys.executable,
            "-c",
            "import json, sys, time\n"
            "while True:\n"
            "    d = json.load(open(sys.argv[1])); d['heartbeat'] = time.time()\n"
            "    open(sys.argv[1], 'w').write(json.dumps(d)); time.sleep(0.2)",
            str(path),
        ]
    )
    try:
        with pytest.raises(ConfigError, match="in use by another run \\(host other-node"):
            runlock.acquire(tmp_path)
    finally:
        beating.kill()
        beating.wait()
    write(time.time())  # a last heartbeat, then none: the node is gone
    held = runlock.acquire(tmp_path)
    try:
        assert held.holder.host == HOST
    finally:
        held.release()
        runlock._held = None


# ------------------------------------------------------------------------------------------- the fingerprint
def test_an_unresolved_hub_commit_is_never_a_change_and_a_resolved_other_commit_is():
    a, b = "hub:org/model@" + "a" * 40, "hub:org/model@" + "b" * 40
    for old, new in ((a, "hub:org/model@unresolved"), ("hub:org/model@unresolved", a)):
        refuse, notes = changes({"base model": old}, {"base model": new}, resuming=True)
        assert refuse == [] and len(notes) == 1
    assert changes({"base model": a}, {"base model": b}, resuming=False)[0] == [f"base model: '{a}' -> '{b}'"]
    other = "hub:org/other@unresolved"
    assert changes({"base model": a}, {"base model": other}, resuming=False)[0]  # another repository


@pytest.mark.parametrize(
    ("old", "new", "refuses_a_resume"),
    [
        ("2.9.1", "2.9.4", False),  # a patch release
        ("2.9.1", "2.10.0", True),
        ("2.9.1", "3.0.0", True),
        ("0.50.2", None, True),  # uninstalled
        ("1.0.0+cpu", "1.0.0+cu130", False),  # another build of the same release
    ],
)
def test_library_versions_refuse_only_a_resume_and_only_when_a_major_or_minor_version_moved(old, new, refuses_a_resume):
    for package in ("torch", "bitsandbytes", "tuneserve"):
        before, after = {"versions": {package: old}}, {"versions": {package: new}}
        line = f"versions.{package}: {old} -> {new}"
        assert changes(before, after, resuming=True) == (([line], []) if refuses_a_resume else ([], [line]))
        assert changes(before, after, resuming=False) == ([], [line])  # nothing to resume: listed, goes on


def test_digests_are_remembered_until_a_file_changes_in_any_way_and_count_content_not_place(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"\x00" * 1000)
    (folder / "sub" / "b.json").write_text('{"x": 1}')
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("ignored")
    cache = tmp_path / "digests.json"
    first = Digests(cache)
    digest = first.of(folder, "BASE_MODEL")
    first.save()
    again = Digests(cache)
    assert again.of(folder, "BASE_MODEL") == digest and again.changed is False  # read from the cache, not hashed
    # The same size and modification time, other bytes (the change time moves and no tool can set it back).
    st = (folder / "a.bin").stat()
    (folder / "a.bin").write_bytes(b"\x01" + b"\x00" * 999)
    os.utime(folder / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = Digests(cache).of(folder, "BASE_MODEL")
    assert changed != digest
    (folder / "a.bin").write_bytes(b"\x00" * 1000)
    (folder / ".cache" / "lock").write_text("hidden files do not count")
    assert Digests(cache).of(folder, "BASE_MODEL") == digest
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    assert Digests(cache).of(moved, "BASE_MODEL") == digest  # a folder moved is the same model
    (moved / "sub" / "b.json").rename(moved / "sub" / "c.json")
    assert Digests(cache).of(moved, "BASE_MODEL") != digest  # a file renamed inside is not


# ------------------------------------------------------------------------------------------- checkpoints
def _trainer_files(ckpt: Path, step: int) -> None:
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ckpt / "scheduler.pt").write_bytes(b"s" * 10)
    (ckpt / "rng_state_0.pth").write_bytes(b"r" * 10)


def _adapter(ckpt: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, 4)}, str(ckpt / "adapter_model.safetensors"))


def _dcp(folder: Path, key: str) -> None:
    """A sharded state dict written as accelerate's save_fsdp_optimizer / save_fsdp_model write it under FSDP."""
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({key: {"state": {"0": {"exp_avg": torch.zeros(8)}}}}, storage_writer=dcp.FileSystemWriter(str(folder)))


LAYOUTS = {
    "one process or DDP": lambda c: ((c / "optimizer.pt").write_bytes(b"o" * 100), _adapter(c)),
    "FSDP, full state dict": lambda c: (
        (c / "optimizer.bin").write_bytes(b"o" * 100),
        (c / "pytorch_model_fsdp.bin").write_bytes(b"m" * 100),
        _adapter(c),
    ),
    "FSDP, sharded state dict": lambda c: (
        _dcp(c / "optimizer_0", "optimizer"),
        _dcp(c / "pytorch_model_fsdp_0", "model"),
    ),
    "SFT_SAVE_ONLY_MODEL": _adapter,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_checkpoint_is_complete_by_what_the_trainer_wrote_in_each_layout(tmp_path, layout):
    folder = tmp_path / "checkpoints"
    for step in (2, 4):
        ckpt = folder / f"checkpoint-{step}"
        _trainer_files(ckpt, step)
        LAYOUTS[layout](ckpt)
        checkpoints.mark_complete(ckpt, step)
    assert checkpoints.newest_complete(folder, remove_incomplete=False) == folder / "checkpoint-4"
    # Whatever the layout, a file the mark lists that is gone or cut short makes the checkpoint incomplete.
    listed = json.loads((folder / "checkpoint-4" / checkpoints.COMPLETE_MARKER).read_text())["files"]
    biggest = max(listed, key=listed.get)
    victim = folder / "checkpoint-4" / biggest
    victim.write_bytes(victim.read_bytes()[: listed[biggest] // 2])
    why = checkpoints.problem(folder / "checkpoint-4")
    assert why in (
        f"{biggest} has {listed[biggest] // 2} bytes, {listed[biggest]} were written",
        f"{biggest} is truncated or corrupt",  # a safetensors file is checked against its own header first
    )
    assert checkpoints.newest_complete(folder) == folder / "checkpoint-2"
    assert not (folder / "checkpoint-4").exists()  # the incomplete one is removed
    gone = folder / "checkpoint-2" / sorted(listed)[0]
    gone.unlink() if gone.is_file() else None
    assert checkpoints.problem(folder / "checkpoint-2") == f"{sorted(listed)[0]} is missing"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_mark_without_a_file_list_takes_what_is_there_in_any_layout_and_json_is_read_not_measured(tmp_path, layout):
    ckpt = tmp_path / "checkpoint-5"
    _trainer_files(ckpt, 5)
    LAYOUTS[layout](ckpt)
    (ckpt / checkpoints.COMPLETE_MARKER).write_text(json.dumps({"step": 5}))  # an earlier version's mark
    assert checkpoints.problem(ckpt) is None
    (ckpt / "scheduler.pt").write_bytes(b"")  # a state file of the trainer's left empty
    assert checkpoints.problem(ckpt) == "scheduler.pt has 0 bytes, more were written"
    # With the list: a JSON file of the checkpoint edited (the ledger, say) is still whole; one cut short is not.
    (ckpt / "scheduler.pt").write_bytes(b"s" * 10)
    (ckpt / "ledger-rank0.json").write_text(json.dumps({"segments": []}))
    checkpoints.mark_complete(ckpt, 5)
    (ckpt / "ledger-rank0.json").write_text(json.dumps({"segments": [{"from_step": 0}]}))
    assert checkpoints.problem(ckpt) is None
    (ckpt / "ledger-rank0.json").write_text('{"segments": [')
    assert checkpoints.problem(ckpt) == "ledger-rank0.json is not readable JSON"


def test_an_unmarked_checkpoint_is_incomplete_whatever_it_holds(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    _trainer_files(ckpt, 3)
    LAYOUTS["one process or DDP"](ckpt)
    assert checkpoints.problem(ckpt) == "not marked complete (the save was interrupted)"


# ------------------------------------------------------------------------------------------- the ledger's cut
@pytest.mark.parametrize(("per_epoch", "accumulation"), [(8, 3), (8, 2), (5, 4), (7, 1), (3, 5)])
def test_the_micro_batches_of_a_step_follow_the_training_loop_when_accumulation_does_not_divide_the_epoch(
    per_epoch, accumulation
):
    from tuneserve.train import RowRecorder

    # transformers' loop: each epoch's steps take `accumulation` micro-batches, its last step what is left.
    steps = -(-per_epoch // accumulation)
    taken, total = [0], 0
    for _epoch in range(3):
        for s in range(steps):
            total += accumulation if s < steps - 1 else per_epoch - accumulation * (steps - 1)
            taken.append(total)
    recorder = RowRecorder([], accumulation)
    recorder.per_epoch = per_epoch
    assert [recorder.micro_batches(step) for step in range(len(taken))] == taken


# ------------------------------------------------------------------------------------------- a full disk
def test_a_failed_write_names_the_full_disk_whether_or_not_the_error_says_which(small_disk, tmp_path, monkeypatch):
    import errno

    from tuneserve.exitcodes import DataError, disk_full_message

    disk, resize = small_disk
    monkeypatch.setenv("HF_DATASETS_CACHE", str(disk / "datasets"))
    with pytest.raises(OSError) as full, (disk / "filler").open("wb") as f:  # fill it, as a cache writer would
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    assert full.value.errno == errno.ENOSPC
    out = str(tmp_path / "out")  # OUTPUT_DIR has room: the full disk is the cache's
    for cause in (OSError(errno.ENOSPC, "No space left on device"), OSError("Arrow: No space left on device")):
        try:
            try:
                raise cause
            except OSError:
                raise DataError("DATASET='rows.jsonl': cannot be loaded") from None  # as data.py wraps it
        except DataError as exc:
            message = disk_full_message(exc, out)
        assert message.startswith(f"no space left on the disk of {disk / 'datasets'} (0.0 MB free of 0.6 MB)")
    assert disk_full_message(DataError("DATASET='rows.jsonl' split 'train' is empty"), out) is None
    (disk / "filler").unlink()
    resize(128 << 10)  # the volume enlarged: no folder the run writes is nearly full
    assert disk_full_message(OSError("Arrow: No space left on device"), out) is None
