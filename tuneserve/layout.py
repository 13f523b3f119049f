"""The one output tree. Every stage reads and writes only here, so any stage can be rerun from it.

    OUTPUT_DIR/
      run.json             marks the directory as a tuneserve run; the fingerprint of its settings (rundir.py)
      .tuneserve.lock      held by the one run using the directory (runlock.py)
      config.json          resolved configuration, secrets masked
      data/                shaped rows the model was trained and will be evaluated on (jsonl)
      checkpoints/         trainer checkpoints (checkpoint-<step>/, each marked complete when fully written)
      adapter/             final LoRA adapter + tokenizer (written atomically: present means training is done)
      train_report.json    training metrics and data statistics
      memory.json          preflight's memory plan and each stage's measured peak (memory.py)
      metrics.jsonl        one line per logging step, evaluation and run end (trainlog.py)
      tensorboard/         TensorBoard event files (REPORT_TO=tensorboard)
      merged/              the merged model, servable as is (weights, config, tokenizer, template, stop ids, card)
      verify.json          verification checks, fidelity figures, sample generations, evaluation summary
      eval.json            every held-out answer with its scores
      publish.json         what was published where (makes publishing idempotent)
      quantized/           QUANTIZE's copy of merged/ (compressed-tensors), its gate verdict once evaluated
      engine_eval.json     the held-out rows answered by vLLM: merged vs quantized, and vs the evaluate stage

Folders are written beside their place under a scratch name (`scratch`) and renamed into it when complete.
The file names inside the folders that this tool defines (not the Hugging Face formats') are here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tuneserve.exitcodes import ConfigError

TRAIN_ROWS = "train.jsonl"  # data/: the shaped training rows
EVAL_ROWS = "eval.jsonl"  # data/: the held-out rows
TRAINING_META = "training_meta.json"  # adapter/: what training decided (template, end of turn, quantization)
MERGE_INFO = "merge_info.json"  # merged/: how the merge was made, the stop ids
QUANTIZE_INFO = "quantize_info.json"  # quantized/: the scheme and the merged folder it was made from
ENGINE_GATE = "engine_gate.json"  # quantized/: the engine evaluation's verdict (serving refuses it without one)
MERGE_BASES = ("original", "dequantized")
OFFLOAD = ".offload"  # beside merged/: what accelerate offloads of a model too large to load (memory.load_kwargs)


def merged_id(merged: Path) -> str:
    """Which merged folder this is: the hash of its merge record (verify.json and quantized/ refer to it)."""
    import hashlib

    return hashlib.sha256((merged / MERGE_INFO).read_bytes()).hexdigest()[:16]


def scratch(folder: Path) -> Path:
    """Where `folder` is written before one rename puts it in place (present means complete)."""
    return folder.with_name(f".{folder.name}.tmp")


@dataclass(frozen=True)
class Layout:
    root: Path
    DIGESTS = ".tuneserve-digests.json"  # rundir.Digests: local inputs' sha256, by path, size and times

    @classmethod
    def of(cls, output_dir: str | os.PathLike) -> Layout:
        return cls(Path(output_dir).expanduser().resolve())

    @property
    def run_record(self) -> Path:
        return self.root / "run.json"

    @property
    def digests(self) -> Path:
        return self.root / self.DIGESTS

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def train_report(self) -> Path:
        return self.root / "train_report.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def memory_report(self) -> Path:
        return self.root / "memory.json"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def verify_report(self) -> Path:
        return self.root / "verify.json"

    @property
    def eval_report(self) -> Path:
        return self.root / "eval.json"

    @property
    def publish_state(self) -> Path:
        return self.root / "publish.json"

    @property
    def quantized(self) -> Path:
        return self.root / "quantized"

    @property
    def engine_eval_report(self) -> Path:
        return self.root / "engine_eval.json"

    def merged_with(self, merge_base: str) -> Path:
        """A second merged folder, on the other merge base, that verify compares with (then removes)."""
        return self.root / f".merged-{merge_base}"

    def artifacts(self) -> list[Path]:
        """What this tool writes directly under the root, scratch folders included; not the run record."""
        folders = [self.adapter, self.merged, self.quantized, *(self.merged_with(b) for b in MERGE_BASES)]
        return [
            self.config,
            self.data,
            self.checkpoints,
            self.train_report,
            self.metrics,
            self.tensorboard,
            self.memory_report,
            self.root / OFFLOAD,
            self.verify_report,
            self.eval_report,
            self.publish_state,
            self.engine_eval_report,
            *folders,
            *(scratch(f) for f in folders),
        ]


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    """A JSON file this tool wrote, or None when it is not there (yet)."""
    return json.loads(path.read_text()) if path.is_file() else None


def read_json_or_none(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a folder from elsewhere, a damaged file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def visible_files(folder: Path) -> list[Path]:
    """Every file under a folder, sorted, hidden ones (any part of the path starting with a dot) aside."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


@contextmanager
def written_atomically(path: Path) -> Iterator[IO[str]]:
    """A text file to write `path` through: written beside it, renamed into place once complete; a failed write
    (a full disk, say) leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    with written_atomically(path) as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


# What a model or adapter folder of this tool holds, whichever way it was written (sharded or not, any tokenizer).
MODEL_FILES = (
    "*.safetensors",
    "*.json",
    "*.jinja",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "README.md",
    "training_curves.png",  # trainlog.CURVES_PNG, beside the card
)


def replace_folder(new: Path, old: Path) -> None:
    """Put the finished folder `new` where `old` (this tool's merged/ or adapter/) was, in one rename. A file in
    `old` that this tool would not have written there is the user's: ConfigError naming it, nothing replaced."""
    if old.exists():
        foreign = sorted(
            str(p.relative_to(old))
            for p in old.rglob("*")
            if p.is_file()
            and not (new / p.relative_to(old)).exists()
            and not any(p.match(pattern) for pattern in MODEL_FILES)
        )
        if foreign:
            shutil.rmtree(new, ignore_errors=True)
            raise ConfigError(
                f"{old} holds files tuneserve did not write ({', '.join(foreign[:5])}"
                f"{' ...' if len(foreign) > 5 else ''}); it would be replaced by a new {old.name}/. "
                "Move them out of OUTPUT_DIR and rerun"
            )
        shutil.rmtree(old)
    os.replace(new, old)


def readable_as_umask_allows(folder: Path) -> None:
    """Give the files in `folder` the permissions the process umask allows (0644 under the usual 022).

    safetensors (0.8) writes its files 0600 whatever the umask, so an adapter or model written by the
    training user could not be read by a serving container running as another user on the same volume.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)
