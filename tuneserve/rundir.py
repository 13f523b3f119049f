"""OUTPUT_DIR's ownership and the run's fingerprint.

OUTPUT_DIR/run.json, written when a run first uses the directory, marks it as this tool's and records what
determines the trained weights (the fingerprint). Before any stage:
- a non-empty OUTPUT_DIR without run.json is not ours: exit 2, naming what is there; nothing is written;
- a rerun compares fingerprints: the same -> resume or skip what is done; only settings that cannot change the
  weights differ (publishing, verification and evaluation, logging, where the processes meet) -> go on;
  anything else -> exit 2 listing each change (old -> new), unless RESTART=true, which removes this tool's
  own artifacts (Layout.artifacts, nothing else) and starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tuneserve.config import TRAIN_SCHEMA
from tuneserve.exitcodes import ConfigError
from tuneserve.layout import Layout, write_json_atomic
from tuneserve.refs import DATA_FILE_SUFFIXES, looks_local
from tuneserve.settings import Settings, shorten

log = logging.getLogger(__name__)

IGNORED = {"lost+found"}  # what a freshly formatted volume holds
# Settings that cannot change the trained weights. Every other variable and every pass-through field is in the
# fingerprint (deny by default), so a setting added later counts until someone decides otherwise here.
NOT_WEIGHTS = {
    "HF_TOKEN",
    "HF_TOKEN_FILE",
    "ATTN_IMPLEMENTATION",
    "DEVICE",
    "GRADIENT_CHECKPOINTING",
    "MAX_OVERLONG_FRACTION",
    "LOGGING_STEPS",
    "SAVE_STEPS",
    "SAVE_TOTAL_LIMIT",
    "REPORT_TO",
    "MERGE",
    "MERGE_BASE",
    "VERIFY_SAMPLES",
    "VERIFY_MAX_NEW_TOKENS",
    "VERIFY_MAX_PROB_DIFF",
    "VERIFY_COMPARE_MERGE_BASES",
    "QUANTIZE",
    "EVAL_MAX_SAMPLES",
    "EVAL_MAX_NEW_TOKENS",
    "EVAL_SQL_EXECUTION",
    "EVAL_SQL_CONTEXT_FIELD",
    "HUB_MODEL_ID",
    "HUB_PRIVATE",
    "HUB_REVISION",
    "PUSH_ADAPTER",
    "HUB_ADAPTER_MODEL_ID",
    "PUBLISH_RETRIES",
    "PUBLISH_BACKOFF_SECONDS",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "DISTRIBUTED_STRATEGY",
    "OUTPUT_DIR",
    "RESUME",
    "RESTART",
    "LOG_LEVEL",
    "ENV_FILE",
    "DATASET",  # stands in the fingerprint as its content ("dataset content"): a moved file is the same data
}
# Pass-through SFTConfig fields of the same kind, by prefix of the field name.
NOT_WEIGHTS_SFT = (
    "logging_",
    "save_",
    "eval_",
    "report_to",
    "run_name",
    "push_to_hub",
    "hub_",
    "disable_tqdm",
    "dataloader_num_workers",
    "per_device_eval_batch_size",
)


def dataset_digest(ref: str) -> str:
    """sha256 over a local dataset's files (names and bytes), or the Hub dataset's resolved commit."""
    if looks_local(ref):
        path = Path(ref).expanduser()
        files = (
            sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_FILE_SUFFIXES))
            if path.is_dir()
            else [path]
        )
        h = hashlib.sha256()
        for f in files:
            if path.is_dir():  # in a folder the file names are the split names
                h.update(str(f.relative_to(path)).encode() + b"\0")
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        return "sha256:" + h.hexdigest()
    try:
        from huggingface_hub import HfApi

        return f"hub:{ref}@{HfApi().dataset_info(ref).sha}"
    except Exception as exc:  # noqa: BLE001 - offline, gated, or gone: the data is read next and fails clearly
        log.warning(
            "cannot resolve the commit of Hub dataset %r (%s): a changed dataset will not be noticed on a rerun",
            ref,
            type(exc).__name__,
        )
        return f"hub:{ref}@unresolved"


def fingerprint(cfg: Settings) -> dict[str, Any]:
    values = cfg.masked()
    out = {name: value for name, value in values.items() if name in TRAIN_SCHEMA.by_name and name not in NOT_WEIGHTS}
    for table, fields in cfg.extras.items():
        for name, value in fields.items():
            if not (table == "sft" and name.startswith(NOT_WEIGHTS_SFT)):
                out[f"{table}.{name}"] = value
    out["dataset content"] = dataset_digest(cfg.dataset) if cfg.dataset else None
    return json.loads(json.dumps(out, default=str))  # as it reads back from run.json


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [
        f"{key}: {shorten(old.get(key))} -> {shorten(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def claim(cfg: Settings, layout: Layout, write: bool = True) -> None:
    """Checks OUTPUT_DIR before any stage (see the module docstring); `write` False only checks."""
    root = layout.root
    record_path = layout.run_record
    entries = sorted(p.name for p in root.iterdir() if p.name not in IGNORED) if root.is_dir() else []
    current = fingerprint(cfg)
    if not record_path.is_file():
        if entries:
            listed = ", ".join(entries[:10]) + (f" and {len(entries) - 10} more" if len(entries) > 10 else "")
            raise ConfigError(
                f"OUTPUT_DIR={str(root)!r} is not empty and is not a tuneserve run (no "
                f"{record_path.name}): it holds {listed}. Point OUTPUT_DIR at an empty or new "
                "directory; nothing was written there"
            )
        if write:
            _record(record_path, current)
        return
    try:
        recorded = json.loads(record_path.read_text())["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{record_path} is not readable as a tuneserve run record; use a new OUTPUT_DIR") from None
    differ = changes(recorded, current)
    if not differ:
        return
    listed = "\n  ".join(differ)
    if not cfg.restart:
        raise ConfigError(
            f"OUTPUT_DIR={str(root)!r} holds a run made with other settings, and its results would be "
            f"passed off as this run's:\n  {listed}\nUse a new OUTPUT_DIR, or set RESTART=true to remove "
            f"this run's own files ({', '.join(p.name for p in layout.artifacts()[:7])}, ...) and start "
            "over"
        )
    if write:
        log.warning("RESTART=true and the settings changed:\n  %s\nremoving this run's own files in %s", listed, root)
        for path in (*layout.artifacts(), record_path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        _record(record_path, current)


def _record(path: Path, fp: dict[str, Any]) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("tuneserve")
    except PackageNotFoundError:
        ours = None
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(path, {"tool": "tuneserve", "version": ours, "created": created, "fingerprint": fp})
