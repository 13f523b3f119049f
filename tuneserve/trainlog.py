"""What training tells the people watching it: one progress line per logging step in the tool's log format,
the same figures appended to OUTPUT_DIR/metrics.jsonl, the experiment trackers the image has, and the loss
curves the model cards carry.

- Progress: `step 12/40 (30%) | epoch 1.20 | loss 1.2345 | lr 1.50e-04 | grad norm 0.957 | 1,234 tokens/s |
  elapsed 0:01:02 | eta 0:02:30`, logged by rank 0. transformers' own log printer (raw dicts) is removed and its
  tqdm bar runs only when stderr is a terminal, so `docker logs` / `kubectl logs` hold lines, not carriage returns.
- metrics.jsonl: one JSON object per logging step (`kind` "train"), per evaluation ("eval") and at the end
  ("summary"), written by rank 0 alone. A resumed run first drops the entries after the checkpoint it resumes
  from (they are logged again), so the file holds each step once however often the run was interrupted.
- Trackers: REPORT_TO names transformers' integrations; one that is unknown or not installed here is a
  configuration error (exit 2) before anything is loaded. TensorBoard (tensorboardX, which writes the same event
  files without TensorBoard's server) writes under OUTPUT_DIR/tensorboard.
- Curves: a PNG of the train and eval loss against the step, drawn with matplotlib from metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

from tuneserve.exitcodes import ConfigError

log = logging.getLogger(__name__)

CURVES_PNG = "training_curves.png"  # beside each model card (merged/, quantized/, adapter/)
# REPORT_TO values with the Python module each needs, for the error that names what to install. "none" and
# "all" are transformers' own words; every other value must be one of its integrations and importable here.
EVAL_SHOWN = ("eval_loss", "eval_mean_token_accuracy")  # the eval line's figures (metrics.jsonl has all)
TRACKER_MODULES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}


# --------------------------------------------------------------------------------------------- trackers
def trackers(report_to: list[str] | None) -> list[str]:
    """The integrations REPORT_TO asks for ("all": every one installed), or ConfigError naming what is available."""
    asked = [v.strip() for v in (report_to or []) if v.strip()]
    if asked in ([], ["none"]):  # the default: no import of transformers' integrations (seconds) to say so
        return []
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    available = get_available_reporting_integrations()
    if asked == ["all"]:
        return available
    problems = []
    for name in asked:
        if name in ("none", "all"):
            problems.append(f"{name!r} cannot be combined with other trackers")
        elif name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
            problems.append(f"{name!r} is not a tracker transformers knows ({known})")
        elif name not in available:
            module = TRACKER_MODULES.get(name, name)
            problems.append(
                f"{name!r} is not installed in this image (its Python package {module!r} is missing; build an image "
                "FROM this one that pip-installs it)"
            )
    if problems:
        raise ConfigError(
            f"REPORT_TO={','.join(asked)}: {'; '.join(problems)}. Available here: {', '.join(['none', *available])}"
        )
    return asked


def use_trackers(cfg, layout) -> None:
    """Point the trackers at OUTPUT_DIR (TensorBoard) unless the user chose a place."""
    if "tensorboard" in trackers(cfg.report_to):
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(layout.tensorboard))


# --------------------------------------------------------------------------------------------- metrics.jsonl
class MetricsFile:
    """OUTPUT_DIR/metrics.jsonl: appended a line at a time (flushed, so a killed run keeps what it logged)."""

    def __init__(self, path: Path):
        self.path = path

    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: the step is logged again on resume
                continue
        return out

    def keep_until(self, step: int) -> None:
        """Drop what was logged after `step` (a resume starts from its checkpoint and logs those steps again)."""
        kept = [e for e in self.entries() if e.get("step", 0) <= step and e.get("kind") != "summary"]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        os.replace(tmp, self.path)

    def append(self, entry: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()


# --------------------------------------------------------------------------------------------- progress
def clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def progress_callback(metrics_path: Path):
    """A TrainerCallback that logs a progress line per logging step and writes metrics.jsonl (rank 0)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.file = MetricsFile(metrics_path)
            self.started = self.last_time = time.monotonic()
            self.first_step = self.last_tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = self.last_time = time.monotonic()
            self.first_step, self.last_tokens = state.global_step, 0  # TRL counts num_tokens from 0 each start
            if state.is_world_process_zero:
                metrics_path.parent.mkdir(parents=True, exist_ok=True)
                self.file.keep_until(state.global_step)
            return control

        def eta(self, state, now: float) -> float | None:
            done = state.global_step - self.first_step
            if done <= 0 or not state.max_steps:
                return None
            return (now - self.started) / done * (state.max_steps - state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return control
            now = time.monotonic()
            base = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": time.time()}
            figures = {k: v for k, v in logs.items() if _number(v) is not None}
            if any(k.startswith("eval_") for k in logs):
                self.file.append({"kind": "eval", **base, **figures})
                shown = ", ".join(f"{k[5:].replace('_', ' ')} {figures[k]:.4g}" for k in EVAL_SHOWN if k in figures)
                log.info("eval at step %d/%d: %s", state.global_step, state.max_steps, shown)
                return control
            if "train_runtime" in logs or "loss" not in logs:
                self.file.append({"kind": "summary", **base, **figures})
                return control
            tokens = _number(logs.get("num_tokens"))
            rate = None
            if tokens is not None and now > self.last_time and tokens >= self.last_tokens:
                rate = (tokens - self.last_tokens) / (now - self.last_time)
                self.last_tokens = tokens
            self.last_time = now
            elapsed, eta = now - self.started, self.eta(state, now)
            entry = {
                "kind": "train",
                **base,
                "loss": _number(logs.get("loss")),
                "learning_rate": _number(logs.get("learning_rate")),
                "grad_norm": _number(logs.get("grad_norm")),
                "tokens": tokens,
                "tokens_per_second": None if rate is None else round(rate, 1),
                "elapsed_seconds": round(elapsed, 2),
                "eta_seconds": None if eta is None else round(eta, 2),
            }
            entry.update({k: v for k, v in figures.items() if k not in entry})
            self.file.append(entry)
            total = state.max_steps or 0
            parts = [
                f"step {state.global_step}/{total}" + (f" ({100 * state.global_step / total:.0f}%)" if total else ""),
                f"epoch {state.epoch or 0:.2f}",
                f"loss {entry['loss']:.4f}" if entry["loss"] is not None else "loss ?",
            ]
            if entry["learning_rate"] is not None:
                parts.append(f"lr {entry['learning_rate']:.2e}")
            if entry["grad_norm"] is not None:
                parts.append(f"grad norm {entry['grad_norm']:.3g}")
            if rate is not None:
                parts.append(f"{rate:,.0f} tokens/s")
            parts += [f"elapsed {clock(elapsed)}", f"eta {clock(eta)}"]
            log.info("%s", " | ".join(parts))
            return control

    return Progress()


def quiet_console(trainer) -> None:
    """transformers prints each log as a raw dict (PrinterCallback, or its tqdm bar's write): the progress
    lines replace both. The bar itself stays where a person watches a terminal (disable_tqdm, set in train.py)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def bars_wanted() -> bool:
    """Whether progress bars (tqdm, carriage returns) suit stderr: only on a terminal."""
    return sys.stderr.isatty()


def quiet_library_bars() -> None:
    """Off a terminal, the bars of datasets, huggingface_hub and transformers' loaders are noise in a log."""
    if bars_wanted():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


# --------------------------------------------------------------------------------------------- curves
def plot_curves(entries: list[dict], path: Path) -> bool:
    """Draw the train and eval loss against the step into `path` (PNG). False when there is nothing to draw.
    The PNG's bytes depend on the figures only (no timestamp), so an unchanged run rewrites nothing."""

    def series(kind: str, key: str) -> list[tuple[int, float]]:
        return [(e["step"], e[key]) for e in entries if e.get("kind") == kind and _number(e.get(key)) is not None]

    train, evals = series("train", "loss"), series("eval", "eval_loss")
    if not train and not evals:
        return False
    os.environ.setdefault("MPLCONFIGDIR", str(_matplotlib_dir()))
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="#d62728", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    if path.is_file() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        os.replace(tmp, path)
    return True


def write_curves(layout, folder: Path) -> bool:
    """The curves PNG beside `folder`'s card, from metrics.jsonl. Where matplotlib is missing (the serving image
    writes the cards after its engine evaluation) the merged folder's copy is used. Whether the folder has one."""
    png = folder / CURVES_PNG
    try:
        drawn = plot_curves(MetricsFile(layout.metrics).entries(), png)
    except ImportError:
        drawn = False
    if not drawn and folder != layout.merged and (layout.merged / CURVES_PNG).is_file():
        shutil.copyfile(layout.merged / CURVES_PNG, png)
    return png.is_file()


def _matplotlib_dir() -> Path:
    """matplotlib's font cache wants a writable config folder; the image's HOME may be read-only."""
    import tempfile

    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "matplotlib"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"tuneserve-matplotlib-{os.getuid()}"
