"""Finding the checkpoint to resume from.

transformers writes a checkpoint file by file into `checkpoint-<step>/`; a process killed mid-save (the
grace period ran out, the node died) leaves a folder that looks like a checkpoint but is not one. A
checkpoint counts as complete only when the trainer callback has marked it (`COMPLETE_MARKER`, written
after every process wrote its part) and its files pass structural checks (trainer_state.json parses,
each safetensors file is as long as its header says).

What a checkpoint holds depends on how the run trains: one process or DDP write `optimizer.pt`; FSDP writes
the optimizer through accelerate as `optimizer.bin` (full state dict) or `optimizer_0/` (sharded, one file per
process) and may write the weights as `pytorch_model_fsdp_0/`; `SFT_SAVE_ONLY_MODEL=true` writes no optimizer
at all. So the mark lists every file the trainer wrote, with its size, and a checkpoint is complete when each is
there at that size: whatever the strategy, without a rule per layout.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def safetensors_ok(path: Path) -> bool:
    """The file is exactly as long as its header declares (a truncated write fails this)."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, struct.error, KeyError, TypeError):
        return False


def inventory(ckpt: Path) -> dict[str, int]:
    """Every file under `ckpt` (relative path -> size), the mark aside."""
    return {
        str(p.relative_to(ckpt)): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name not in (COMPLETE_MARKER, f".{COMPLETE_MARKER}.tmp")
    }


def problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when it is complete."""
    try:
        mark = json.loads((ckpt / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return "not marked complete (the save was interrupted)"
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or unreadable"
    files = mark.get("files") if isinstance(mark, dict) else None
    if files is None:  # marked by an earlier version, without the list: what is there of the trainer's must be whole
        files = {name: None for name in inventory(ckpt) if name.split("/")[0].startswith(TRAINER_STATE_FILES)}
    for t in ckpt.glob("*.safetensors"):
        if not safetensors_ok(t):
            return f"{t.name} is truncated or corrupt"
    for name, size in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if name.endswith(".json"):  # read whole, not measured: a JSON file cut short does not parse
            try:
                json.loads(p.read_text())
            except (OSError, ValueError):
                return f"{name} is not readable JSON"
        elif p.stat().st_size != size and (size is not None or p.stat().st_size == 0):
            return f"{name} has {p.stat().st_size} bytes, {size if size is not None else 'more'} were written"
    if not any(_is_weights(name) for name in files) and not list(ckpt.glob("*.safetensors")):
        return "no weights (*.safetensors, pytorch_model_fsdp*)"
    return None


# What the trainer writes of its own state into a checkpoint, under any strategy (top-level name prefixes).
TRAINER_STATE_FILES = ("optimizer", "scheduler", "pytorch_model", "rng_state", "adapter_model", "model")


def _is_weights(name: str) -> bool:
    return name.endswith(".safetensors") or name.startswith("pytorch_model")


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found, reverse=True)


def newest_complete(folder: Path, remove_incomplete: bool = True) -> Path | None:
    """The newest complete checkpoint. Incomplete ones newer than it are removed (they hold nothing that
    can be used, and the trainer would later write the same step's folder over their stale files)."""
    for _step, ckpt in checkpoints(folder):
        why = problem(ckpt)
        if why is None:
            return ckpt
        log.warning("skipping %s: %s", ckpt.name, why)
        if remove_incomplete:
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def mark_complete(ckpt: Path, step: int) -> None:
    """Mark `ckpt` complete, listing what is in it (called once every process has written its part)."""
    import os

    marker = ckpt / COMPLETE_MARKER
    tmp = ckpt / f".{COMPLETE_MARKER}.tmp"
    with tmp.open("w") as f:
        json.dump({"step": step, "files": inventory(ckpt)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)
