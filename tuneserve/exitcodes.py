"""Exit codes of the pipeline: the contract a Kubernetes Job's podFailurePolicy acts on.

Documented in the README's exit-code table (generated) and imported, never retyped, by the tests and manifests'
checks.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    UNEXPECTED = 1
    CONFIG = 2
    DATA = 3
    VERIFY = 4
    DISK_FULL = 74  # EX_IOERR: a write found no space; free or enlarge the volume, then rerun
    RETRYABLE = 75  # EX_TEMPFAIL: rerun the same command (same OUTPUT_DIR) to continue
    TERMINATED = 143  # 128 + SIGTERM: a checkpoint was saved; rerun to resume


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "Success: every enabled stage finished.",
    ExitCode.UNEXPECTED: "Unexpected error (a bug or an environment failure); the traceback is printed.",
    ExitCode.CONFIG: "Configuration error: every problem is listed at once (variable, value, what is allowed); "
    "or OUTPUT_DIR is not writable, is not a tuneserve run, holds a run with other settings, or is in use by "
    "another run (named). Retrying will not help.",
    ExitCode.DATA: "Dataset error: missing file or columns, malformed JSON, wrong types, null template columns, "
    "rows the chat template refuses, tools it does not render, empty, too many rows longer than MAX_SEQ_LENGTH, "
    "rows without tokens to learn from; each row named by file and line (or split and row). "
    "Retrying will not help.",
    ExitCode.VERIFY: "The merged model failed verification, or the quantized model the engine evaluation's gate "
    "(QUANTIZE_MAX_DROP); nothing was published.",
    ExitCode.DISK_FULL: "A disk is full: the message names the path being written and the space left. Everything "
    "finished is kept and the failed stage's temporary files are removed; free or enlarge the volume, then rerun "
    "with the same OUTPUT_DIR to continue. Retrying on the same full volume will not help.",
    ExitCode.RETRYABLE: "A transient failure persisted (e.g. the Hub upload). Everything produced is kept; "
    "rerun with the same OUTPUT_DIR to continue without retraining.",
    ExitCode.TERMINATED: "Stopped by SIGTERM (preemption, `docker stop`, pod deletion) after saving a checkpoint; "
    "rerun with the same OUTPUT_DIR to resume.",
}


class PipelineError(Exception):
    """An error with a documented exit code. The message is shown to the user without a traceback."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(PipelineError):
    exit_code = ExitCode.CONFIG

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        n = len(self.problems)
        head = f"found {n} configuration problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class DataError(PipelineError):
    exit_code = ExitCode.DATA


class VerifyError(PipelineError):
    exit_code = ExitCode.VERIFY


class RetryableError(PipelineError):
    exit_code = ExitCode.RETRYABLE


# How torch's C++ writers report a failed write (RuntimeError, no errno): "basic_ios::clear: iostream error",
# "PytorchStreamWriter failed writing file ...: file write failed", "[enforce fail at inline_container.cc:672] .
# unexpected pos 282816 vs 282704" (a short write found when the zip file is closed).
WRITE_FAILURES = (
    "No space left on device",
    "iostream error",
    "failed writing file",
    "file write failed",
    "inline_container.cc",
)
NEARLY_FULL = 64 << 20  # bytes: a failed write with less than this free is taken for a full disk


def disk_full_message(exc: BaseException, output_dir: str | None) -> str | None:
    """The message for a write that found no space, if `exc` (or what caused it) is one; else None.

    An OSError with errno ENOSPC (or EDQUOT, a quota) says so itself, and usually names its file. torch's writers
    raise RuntimeError in their own words (Arrow's an OSError without errno); those count only when the disk of
    a folder the run writes is nearly full too."""
    import errno
    import shutil
    from pathlib import Path

    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__

    def usage(where: str):
        p = Path(where).expanduser().absolute()
        while not p.exists():
            p = p.parent
        return shutil.disk_usage(p)

    full = [e for e in chain if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)]
    path = None
    if full:
        # A write that names no file (the dataset cache's Arrow writer, say): of the folders a run writes, the
        # one on the fullest disk.
        path = full[0].filename or min(written_folders(output_dir), key=lambda f: usage(f).free)

    if path is None:
        # A failed write in the writer's own words (torch's, Arrow's), where a folder the run writes is nearly full.
        if not any(w in str(e) for e in chain for w in WRITE_FAILURES):
            return None
        nearly_full = [f for f in written_folders(output_dir) if usage(f).free < NEARLY_FULL]
        if not nearly_full:
            return None
        path = min(nearly_full, key=lambda f: usage(f).free)
    du = usage(str(path))
    return (
        f"no space left on the disk of {path} ({du.free / 1e6:.1f} MB free of {du.total / 1e6:.1f} MB). "
        "Everything finished is kept and the failed stage's temporary files were removed; free or enlarge the "
        "volume, then rerun with the same OUTPUT_DIR to continue"
    )


def written_folders(output_dir: str | None) -> list[str]:
    """Where a run writes: OUTPUT_DIR, the Hub download cache, the datasets cache, the temporary folder."""
    import os
    import tempfile

    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")
    datasets = os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets")
    return [f for f in (output_dir, hub, datasets, tempfile.gettempdir()) if f]


class Terminated(BaseException):
    """SIGTERM. A BaseException, like KeyboardInterrupt: raised by the signal handler wherever the main thread
    happens to be, it must not be taken for an ordinary error by an `except Exception` there (ours, around
    a chat template that rejects a row, or a library's)."""

    exit_code = ExitCode.TERMINATED

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
