"""The flags of vLLM's OpenAI server, frozen for validating VLLM_ARG_* without importing vLLM (14 s).

Regenerate in the serving environment with `python -m tuneserve.vllm_flags` (make lock); a test in
that environment fails when `vllm_flags.json` no longer matches the pinned vLLM.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

FLAGS_FILE = Path(__file__).with_name("vllm_flags.json")


def generate() -> dict[str, dict]:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    flags: dict[str, dict] = {}
    for action in parser._actions:  # argparse keeps no public list of actions
        for option in action.option_strings:
            if not option.startswith("--"):
                continue
            kind = type(action).__name__
            if kind in ("_StoreTrueAction", "_StoreFalseAction", "BooleanOptionalAction") or action.nargs == 0:
                value = "bool"
            elif action.nargs in ("+", "*"):
                value = "list"
            else:
                value = {"int": "int", "float": "float"}.get(getattr(action.type, "__name__", ""), "str")
            entry = {"kind": value, "negatable": kind == "BooleanOptionalAction"}
            if action.choices is not None:
                entry["choices"] = sorted(str(c) for c in action.choices)
            flags[option] = entry
    return dict(sorted(flags.items()))


@lru_cache(maxsize=1)
def load() -> dict[str, dict]:
    return json.loads(FLAGS_FILE.read_text())


if __name__ == "__main__":
    FLAGS_FILE.write_text(json.dumps(generate(), indent=1) + "\n")
    print(f"wrote {FLAGS_FILE}")
