"""Serve a model with vLLM's OpenAI-compatible API, configured by environment variables alone.

    python -m entrypoints.serve [--help | --print-config | --check]

This is the exact command the serving image runs. It validates the configuration and then execs vLLM's
server in this process, so signals reach vLLM. Variables, defaults and exit codes: --help.
"""

from tuneserve import cli
from tuneserve.serve import SERVE_SCHEMA


def main(argv: list[str] | None = None) -> int:
    from tuneserve.serve import run  # noqa: PLC0415

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
