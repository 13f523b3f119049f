"""Exit codes of the pipeline: the contract a Kubernetes Job's podFailurePolicy acts on.

Documented in the README (generated table) and imported, never retyped, by the tests and manifests'
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
    RETRYABLE = 75  # EX_TEMPFAIL: rerun the same command (same OUTPUT_DIR) to continue
    TERMINATED = 143  # 128 + SIGTERM: a checkpoint was saved; rerun to resume


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "Success: every enabled stage finished.",
    ExitCode.UNEXPECTED: "Unexpected error (a bug or an environment failure); the traceback is printed.",
    ExitCode.CONFIG: "Configuration error: every problem is listed at once (variable, value, what is allowed). "
    "Retrying will not help.",
    ExitCode.DATA: "Dataset error: missing file or columns, wrong types, empty, too many rows longer than "
    "MAX_SEQ_LENGTH, rows without tokens to learn from. Retrying will not help.",
    ExitCode.VERIFY: "The merged model failed verification; nothing was published.",
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


class Terminated(BaseException):
    """SIGTERM. A BaseException, like KeyboardInterrupt: raised by the signal handler wherever the main thread
    happens to be, it must not be taken for an ordinary error by an `except Exception` there (ours, around
    a chat template that rejects a row, or a library's)."""

    exit_code = ExitCode.TERMINATED

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
