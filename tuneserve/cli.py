"""Shared command-line shell of the entrypoints: --help generated from the schema, --print-config,
--check, logging, and the mapping from errors to documented exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable

from tuneserve.exitcodes import EXIT_CODE_HELP, ExitCode, PipelineError, Terminated, disk_full_message
from tuneserve.settings import MASK, Schema, Settings

log = logging.getLogger("tuneserve")


class RedactSecrets(logging.Filter):
    """Replaces secret values in every log record, whatever library logged them."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            if any(s in msg for s in self.secrets):
                for s in self.secrets:
                    msg = msg.replace(s, MASK)
                record.msg, record.args = msg, None
        return True


def setup_logging(level: str = "info", secrets: list[str] | None = None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactSecrets(secrets or []))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("tuneserve").setLevel(level.upper())


def exit_codes_text() -> str:
    return "\n".join(f"  {int(c):>3}  {EXIT_CODE_HELP[c]}" for c in ExitCode)


def run(
    schema: Schema,
    stages: Callable[[Settings, bool], int | None],
    argv: list[str] | None,
    prog: str,
    description: str,
    check_help: str,
) -> int:
    """The entrypoint's command line. `check_help` says what this entrypoint's --check checks (stages(cfg, True))."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Configuration (environment variables or a .env file):\n{schema.help_text()}\n\n"
        f"Exit codes:\n{exit_codes_text()}",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration (secrets masked) and exit"
    )
    parser.add_argument("--check", action="store_true", help=check_help)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = None
    try:
        cfg = schema.load()
        setup_logging(getattr(cfg, "log_level", "info") or "info", cfg.secrets())
        if args.print_config:
            print(json.dumps(cfg.masked(), indent=2, default=str))
            return ExitCode.OK
        return int(stages(cfg, args.check) or ExitCode.OK)
    except (PipelineError, Terminated) as exc:
        # A full disk found while loading (a model download, the dataset cache) surfaces as the loader's error.
        full = disk_full_message(exc, getattr(cfg, "output_dir", None) if cfg is not None else None)
        if full is not None and not isinstance(exc, Terminated):
            log.error("%s", full)
            return int(ExitCode.DISK_FULL)
        log.error("%s", exc.message)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - unexpected: show the traceback, exit 1 (never 0)
        full = disk_full_message(exc, getattr(cfg, "output_dir", None) if cfg is not None else None)
        if full is not None:
            log.error("%s", full)
            return int(ExitCode.DISK_FULL)
        log.error("unexpected error:\n%s", traceback.format_exc())
        return int(ExitCode.UNEXPECTED)
