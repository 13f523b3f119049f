"""Answer a training run's held-out rows with vLLM and gate its quantized model (environment variables only).

    python -m entrypoints.evaluate [--help | --print-config | --check]

Runs in the serving image (it has vLLM; the training image does not), on the OUTPUT_DIR a training run left:
merged/ and, with QUANTIZE, quantized/ are each loaded into vLLM and answer data/eval.jsonl; the figures, the
differences from the transformers evaluation and the quantized model's verdict go to OUTPUT_DIR/engine_eval.json
and both model cards. Exit 4 when the quantized model falls outside QUANTIZE_MAX_DROP. Variables and exit
codes: --help.
"""

from tuneserve import cli
from tuneserve.engine_eval import EVAL_SCHEMA


def main(argv: list[str] | None = None) -> int:
    from tuneserve.engine_eval import run  # noqa: PLC0415 - keeps --help free of heavy imports

    return cli.run(
        EVAL_SCHEMA,
        run,
        argv,
        prog="python -m entrypoints.evaluate",
        description=__doc__.split("\n")[0],
        check_help="check the configuration, OUTPUT_DIR's merged (and quantized) folder and held-out rows, and "
        "the Hub token when publishing, then exit without starting vLLM",
    )


if __name__ == "__main__":
    raise SystemExit(main())
