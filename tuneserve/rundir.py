"""OUTPUT_DIR's ownership, its lock, and the run's fingerprint.

OUTPUT_DIR/run.json, written when a run first uses the directory, marks it as this tool's and records what
determines the trained weights (the fingerprint) and the Hub commits the run is pinned to. Before any stage:
- an OUTPUT_DIR this process cannot write: exit 2, naming the folder, the user and the fix;
- a non-empty OUTPUT_DIR without run.json is not ours: exit 2, naming what is there; nothing is written;
- another run holds the folder (runlock.py): exit 2, naming it;
- a rerun compares fingerprints: the same -> resume or skip what is done; only settings that cannot change the
  weights differ (publishing, verification and evaluation, logging, where the processes meet) -> go on;
  anything else -> while nothing was trained (no complete checkpoint, no adapter) the folder is claimed again
  with the new settings, the changes logged; after that exit 2 listing each change (old -> new), unless
  RESTART=true, which removes this tool's own artifacts (Layout.artifacts, nothing else) and starts over.

The fingerprint holds inputs by what they are, not where they are: a local BASE_MODEL, TOKENIZER, CHAT_TEMPLATE,
TOOLS file or dataset by a sha256 of its files (`Digests`), a Hub one by its resolved commit, DTYPE and DEVICE by
the dtype and device class they resolved to, and the versions of the libraries that train.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tuneserve import checkpoints, runlock
from tuneserve.config import TRAIN_SCHEMA
from tuneserve.exitcodes import ConfigError
from tuneserve.layout import Layout, read_json, sha256_file, visible_files, write_json_atomic
from tuneserve.refs import looks_local
from tuneserve.settings import Settings, shorten

log = logging.getLogger(__name__)

# What a freshly formatted volume holds, and what a run writes before run.json (its lock) or beside it.
IGNORED = {"lost+found", runlock.LOCK_FILE, Layout.DIGESTS}
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
    "WANDB_API_KEY",
    "WANDB_API_KEY_FILE",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_PASSWORD_FILE",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_TOKEN_FILE",
    "MERGE",
    "MERGE_BASE",
    "VERIFY_SAMPLES",
    "VERIFY_MAX_NEW_TOKENS",
    "VERIFY_MAX_PROB_DIFF",
    "VERIFY_COMPARE_MERGE_BASES",
    "QUANTIZE",
    "MEMORY_CHECK",
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
}
# Inputs that stand in the fingerprint as what they are (see `inputs`), not as the variable's value.
AS_CONTENT = {
    "BASE_MODEL",
    "BASE_MODEL_REVISION",
    "TOKENIZER",
    "TOKENIZER_REVISION",
    "CHAT_TEMPLATE",
    "TOOLS",
    "DATASET",
    "DATASET_REVISION",
    "DTYPE",
}
# Pass-through SFTConfig fields of the same kind, by prefix of the field name.
NOT_WEIGHTS_SFT = (
    "logging_",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "save_safetensors",
    "save_on_each_node",
    "eval_",
    "report_to",
    "run_name",
    "push_to_hub",
    "hub_",
    "disable_tqdm",
    "dataloader_num_workers",
    "per_device_eval_batch_size",
)


# The libraries whose versions the fingerprint records (see `changes` for which changes refuse).
PACKAGES = ("tuneserve", "torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")
# Hub inputs: variable -> (its revision variable, repository type).
HUB_INPUTS = {
    "BASE_MODEL": ("BASE_MODEL_REVISION", "model"),
    "TOKENIZER": ("TOKENIZER_REVISION", "model"),
    "DATASET": ("DATASET_REVISION", "dataset"),
}
LABELS = {"BASE_MODEL": "base model", "TOKENIZER": "tokenizer", "DATASET": "dataset content"}
UNRESOLVED = "unresolved"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
HASH_NOTICE_BYTES = 256 << 20  # hashing more than this (not remembered from an earlier run) is logged


class Digests:
    """sha256 of local files, remembered in OUTPUT_DIR/.tuneserve-digests.json by path, size, modification time,
    change time and inode, so a 20 GB base is read again only when one of those changed, not on every start. Any
    write to a file moves its change time, which no tool can set back, so a file changed in place is never taken
    for the one hashed before. A file at a new path is hashed again (its digest then equals the old one)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known: dict[str, dict] = read_json(path) or {}
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    @staticmethod
    def _stamp(f: Path) -> list[int]:
        st = f.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def _known(self, f: Path) -> str | None:
        entry = self.known.get(str(f.absolute()))
        return entry["sha256"] if entry and entry.get("stamp") == self._stamp(f) else None

    def file(self, f: Path) -> str:
        if (digest := self._known(f)) is not None:
            return digest
        stamp, digest = self._stamp(f), sha256_file(f)
        self.known[str(f.absolute())] = {"stamp": stamp, "sha256": digest}
        self.changed = True
        return digest

    def of(self, path: Path, what: str) -> str:
        """'sha256:...' of a file's bytes, or of a folder's files (relative names and bytes; hidden ones aside)."""
        path = path.expanduser()
        if path.is_file():
            return "sha256:" + self.file(path)
        files = visible_files(path)
        new = sum(f.stat().st_size for f in files if self._known(f) is None)
        if new > HASH_NOTICE_BYTES:
            log.info("hashing %s %s (%.1f GB not hashed before; remembered for later runs)", what, path, new / 1e9)
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(path)}\0{self.file(f)}\n".encode())
        return "sha256:" + h.hexdigest()

    def save(self) -> None:
        if self.changed:
            write_json_atomic(self.path, self.known)
            self.changed = False


def hub_commit(ref: str, revision: str | None, kind: str, pinned: dict | None) -> str | None:
    """The commit of a Hub repository at `revision`: the one pinned in run.json for the same request, else asked of
    the Hub. None (a warning) when the Hub cannot say: offline, gated without a token, a transient failure."""
    if pinned and pinned.get("ref") == ref and pinned.get("revision") == revision and pinned.get("commit"):
        return pinned["commit"]
    if revision and _COMMIT.match(revision):
        return revision
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        info = api.model_info(ref, revision=revision) if kind == "model" else api.dataset_info(ref, revision=revision)
        return info.sha
    except Exception as exc:  # noqa: BLE001 - offline, gated, or gone: loading it next fails clearly if it must
        log.warning(
            "cannot resolve the commit of Hub %s %r%s (%s); it is not pinned, and a change upstream would not be "
            "noticed by a rerun",
            kind,
            ref,
            f" at {revision!r}" if revision else "",
            type(exc).__name__,
        )
        return None


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def fingerprint(
    cfg: Settings, placement=None, digests: Digests | None = None, pins: dict | None = None
) -> tuple[dict[str, Any], dict[str, dict]]:
    """(the fingerprint, the Hub commits it resolved: variable -> {ref, revision, commit}). `placement`: where
    training runs (model.Placement), recorded as the device class and dtype DEVICE and DTYPE resolved to."""
    from tuneserve.config import NAMED_TEMPLATES

    digests = digests or Digests(Path(os.devnull))
    values = cfg.masked()
    out: dict[str, Any] = {
        name: value
        for name, value in values.items()
        if name in TRAIN_SCHEMA.by_name and name not in NOT_WEIGHTS and name not in AS_CONTENT
    }
    for table, fields in cfg.extras.items():
        for name, value in fields.items():
            if not (table == "sft" and name.startswith(NOT_WEIGHTS_SFT)):
                out[f"{table}.{name}"] = value
    resolved: dict[str, dict] = {}
    for var, label in LABELS.items():
        ref = cfg.get(var)
        if ref is None:
            out[label] = None
        elif looks_local(ref):
            out[label] = digests.of(Path(ref), var)
        else:
            rev_var, kind = HUB_INPUTS[var]
            commit = hub_commit(ref, cfg.get(rev_var), kind, (pins or {}).get(var))
            out[label] = f"hub:{ref}@{commit or UNRESOLVED}"
            if commit:
                resolved[var] = {"ref": ref, "revision": cfg.get(rev_var), "commit": commit}
    ct = cfg.chat_template
    if ct is None or ct in NAMED_TEMPLATES:
        out["chat template"] = ct and f"named:{ct}"  # a named template's text comes with tuneserve's version
    elif "{" in ct:
        out["chat template"] = "sha256:" + hashlib.sha256(ct.encode()).hexdigest()
    else:
        out["chat template"] = digests.of(Path(ct), "CHAT_TEMPLATE")
    out["tools"] = digests.of(Path(cfg.tools), "TOOLS") if cfg.tools else None
    out["compute"] = f"{placement.device}/{placement.dtype_name}" if placement else f"DTYPE={cfg.dtype}"
    out["versions"] = versions()
    return json.loads(json.dumps(out, default=str)), resolved  # as it reads back from run.json


def _release(version: str | None) -> tuple | None:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release[:2] if version else None
    except InvalidVersion:
        return (version,)


def changes(old: dict[str, Any], new: dict[str, Any], resuming: bool) -> tuple[list[str], list[str]]:
    """(changes that refuse the rerun, differences that go on, each old -> new).

    A Hub input whose commit could not be resolved on one side is not a change. Library versions refuse only a
    resume from a checkpoint (`resuming`), and only when a major or minor version moved: the optimizer state, the
    data order and the kernels the run started with must carry on; a patch release goes on. Once training is
    done (or before it wrote a checkpoint) version changes are listed and go on: merge and verify check the
    result with the libraries at hand."""
    refuse, notes = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "versions" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    line = f"versions.{name}: {a.get(name)} -> {b.get(name)}"
                    moved = _release(a.get(name)) != _release(b.get(name))
                    (refuse if resuming and moved else notes).append(line)
        elif _hub_unresolved(a, b):
            notes.append(f"{key}: {a} -> {b} (an unresolved commit is not taken for a change)")
        else:
            refuse.append(f"{key}: {shorten(a)} -> {shorten(b)}")
    return refuse, notes


def _hub_unresolved(a: Any, b: Any) -> bool:
    if not (isinstance(a, str) and isinstance(b, str) and a.startswith("hub:") and b.startswith("hub:")):
        return False
    (ra, ca), (rb, cb) = a.rsplit("@", 1), b.rsplit("@", 1)
    return ra == rb and UNRESOLVED in (ca, cb)


def writable_problem(root: Path) -> str | None:
    """Why this process cannot write OUTPUT_DIR (or create it), or None."""
    import stat

    p = root
    while not p.exists() and p != p.parent:
        p = p.parent
    if os.access(p, os.W_OK | os.X_OK):
        return None
    uid, gid, st = os.getuid(), os.getgid(), p.stat()
    readonly = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    where = (
        f"{p} is on a read-only filesystem"
        if readonly
        else (f"{p} belongs to {st.st_uid}:{st.st_gid} with mode {stat.filemode(st.st_mode)}")
    )
    return (
        f"OUTPUT_DIR={str(root)!r} cannot be written by this process (user id {uid}, group id {gid}): {where}. "
        f"Let user {uid} write it: for `docker run -v`, `sudo chown -R {uid}:{gid}` the host folder before the "
        f"run; on Kubernetes, set the pod's securityContext.fsGroup: {gid}; mount it read-write; or point "
        "OUTPUT_DIR at a folder this user can write"
    )


def trained_something(layout: Layout) -> bool:
    """Whether OUTPUT_DIR holds training to protect: a complete checkpoint, the adapter, or a merged model."""
    if layout.adapter.exists() or layout.merged.exists():
        return True
    return any(checkpoints.problem(c) is None for _step, c in checkpoints.checkpoints(layout.checkpoints))


def claim(cfg: Settings, layout: Layout, placement=None, write: bool = True) -> None:
    """Checks OUTPUT_DIR before any stage and pins the Hub commits (see the module docstring); `write` False only
    checks (--check): no lock is taken, nothing is written."""
    root = layout.root
    if problem := writable_problem(root):
        raise ConfigError(problem)
    record_path = layout.run_record
    entries = sorted(p.name for p in root.iterdir() if p.name not in IGNORED) if root.is_dir() else []
    if not record_path.is_file() and entries:
        listed = ", ".join(entries[:10]) + (f" and {len(entries) - 10} more" if len(entries) > 10 else "")
        raise ConfigError(
            f"OUTPUT_DIR={str(root)!r} is not empty and is not a tuneserve run (no "
            f"{record_path.name}): it holds {listed}. Point OUTPUT_DIR at an empty or new "
            "directory; nothing was written there"
        )
    if write:
        root.mkdir(parents=True, exist_ok=True)
        runlock.acquire(root)
    elif holder := runlock.holder_of(root):
        log.warning("OUTPUT_DIR is in use by a run now (%s): another run is refused until it ends", holder.describe())
    record = None
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            recorded = record["fingerprint"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{record_path} is not readable as a tuneserve run record; use a new OUTPUT_DIR"
            ) from None
    digests = Digests(layout.digests)
    pins = dict((record or {}).get("pins") or {})
    current, resolved = fingerprint(cfg, placement, digests, pins)
    if record is None:
        if write:
            _record(record_path, current, resolved)
    else:
        resuming = not layout.adapter.exists() and trained_something(layout)
        refuse, notes = changes(recorded, current, resuming)
        for note in notes:
            log.warning("differs from the run's record and goes on: %s", note)
        if refuse:
            _changed(cfg, layout, refuse, write)
            if write:
                _record(record_path, current, resolved)
        elif write and any(pins.get(var) != pin for var, pin in resolved.items()):
            _record(record_path, _keep_resolved(recorded, current), {**pins, **resolved}, created=record.get("created"))
        pins.update(resolved)
    if write:
        digests.save()
    _apply(cfg, pins)


def _changed(cfg: Settings, layout: Layout, refuse: list[str], write: bool) -> None:
    """A rerun whose fingerprint changed: claimed again while nothing was trained, refused (or RESTART) after."""
    listed = "\n  ".join(refuse)
    root = layout.root
    if not trained_something(layout):
        if write:
            log.warning(
                "OUTPUT_DIR=%s holds an earlier attempt that trained nothing (no checkpoint, no adapter); its "
                "settings differ, and the folder is claimed again with these:\n  %s",
                root,
                listed,
            )
            _remove_artifacts(layout)
        return
    if not cfg.restart:
        raise ConfigError(
            f"OUTPUT_DIR={str(root)!r} holds a run made with other settings, and its results would be "
            f"passed off as this run's:\n  {listed}\nUse a new OUTPUT_DIR, or set RESTART=true to remove "
            f"this run's own files ({', '.join(p.name for p in layout.artifacts()[:7])}, ...) and start "
            "over"
        )
    if write:
        log.warning("RESTART=true and the settings changed:\n  %s\nremoving this run's own files in %s", listed, root)
        _remove_artifacts(layout)


def _remove_artifacts(layout: Layout) -> None:
    for path in (*layout.artifacts(), layout.run_record):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _keep_resolved(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The record with the Hub commits resolved now where it had none (nothing else moves)."""
    out = dict(recorded)
    for key, value in current.items():
        if isinstance(out.get(key), str) and out[key].endswith("@" + UNRESOLVED) and _hub_unresolved(out[key], value):
            out[key] = value
    return out


def _apply(cfg: Settings, pins: dict[str, dict]) -> None:
    """Every later stage, and the processes this one starts, load the pinned commits."""
    for var, pin in pins.items():
        rev_var = HUB_INPUTS[var][0]
        if cfg.get(var) != pin.get("ref") or cfg.get(rev_var) not in (pin.get("revision"), pin.get("commit")):
            continue  # a pin of another repository or request (a RESTART that changed it)
        if cfg.get(rev_var) != pin["commit"]:
            log.info(
                "%s=%s is pinned to commit %s (run.json): every stage and retry uses it", var, pin["ref"], pin["commit"]
            )
            cfg.pin(rev_var, pin["commit"], "run.json pin")


def follow(cfg: Settings, layout: Layout) -> None:
    """A process that does not claim OUTPUT_DIR (another node of a multi-node run) loads the commits the claiming
    one pinned, when its run.json is there to read (a shared volume)."""
    try:
        record = read_json(layout.run_record) or {}
    except (OSError, ValueError):
        return
    _apply(cfg, record.get("pins") or {})


def _record(path: Path, fp: dict[str, Any], pins: dict[str, dict], created: str | None = None) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("tuneserve")
    except PackageNotFoundError:
        ours = None
    created = created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(path, {"tool": "tuneserve", "version": ours, "created": created, "fingerprint": fp, "pins": pins})
