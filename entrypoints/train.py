"""Fine-tune a base model with QLoRA, configured by environment variables alone.

    python -m entrypoints.train [--help | --print-config | --check]

This is the exact command the training image runs. Variables, defaults and exit codes: --help.
"""

from tuneserve import cli
from tuneserve.config import TRAIN_SCHEMA


def main(argv: list[str] | None = None) -> int:
    from tuneserve import trainlog  # noqa: PLC0415
    from tuneserve.pipeline import run  # noqa: PLC0415 - keeps --help free of heavy imports

    trainlog.quiet_library_bars()  # before any Hugging Face library is imported: they read it once
    return cli.run(
        TRAIN_SCHEMA,
        run,
        argv,
        prog="python -m entrypoints.train",
        description=__doc__.split("\n")[0],
        check_help="run the preflight only (configuration, publish targets' Hub access, OUTPUT_DIR, "
        "dataset, tokenizer, chat template, loss mask, the batch for the processes that will start, the "
        "trainer's, quantization and LoRA settings, the model's config, the packing check) and exit; trains "
        "nothing, writes nothing",
    )


if __name__ == "__main__":
    code = main()
    from tuneserve import launch  # noqa: PLC0415

    if launch.in_worker():
        launch.end_worker(code)  # skips the interpreter's teardown of torch's process group (see there)
    raise SystemExit(code)
