"""Serve a model with vLLM's OpenAI-compatible API, configured by environment variables alone.

    python -m entrypoints.serve [--help | --print-config | --check]

This is the exact command the serving image runs. It validates the configuration and then execs the
supervisor (tuneserve.supervise), which runs vLLM's server and stops it when told to. Variables, defaults and
exit codes: --help.
"""

import os
import signal

from tuneserve import cli
from tuneserve.serve import SERVE_SCHEMA


def main(argv: list[str] | None = None) -> int:
    from tuneserve.serve import run  # noqa: PLC0415

    # Stopped while it checks the configuration (as PID 1 a signal without a handler would be ignored): nothing
    # to clean up yet. From the exec on, the supervisor handles them.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: os._exit(128 + signum))

    return cli.run(
        SERVE_SCHEMA,
        run,
        argv,
        prog="python -m entrypoints.serve",
        description=__doc__.split("\n")[0],
        check_help="check the configuration, the API key, the model folder and any LoRA adapters, log "
        "the vLLM command it would run (key kept out of it) and exit without starting vLLM",
    )


if __name__ == "__main__":
    raise SystemExit(main())
