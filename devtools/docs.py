"""Regenerates the README's generated sections from the schemas and exit codes (`make readme`).

Sections sit between `<!-- BEGIN name -->` and `<!-- END name -->` markers; tests check they are current.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tuneserve.config import TRAIN_SCHEMA
from tuneserve.exitcodes import EXIT_CODE_HELP, ExitCode
from tuneserve.serve import SERVE_SCHEMA

README = Path(__file__).resolve().parents[1] / "README.md"


def exit_codes_table() -> str:
    rows = ["| Code | Meaning |", "|---|---|"]
    rows += [f"| {int(c)} | {EXIT_CODE_HELP[c]} |" for c in ExitCode]
    return "\n".join(rows)


def sections() -> dict[str, str]:
    return {"train-variables": TRAIN_SCHEMA.markdown_table(), "serve-variables": SERVE_SCHEMA.markdown_table(),
            "exit-codes": exit_codes_table()}


def render(text: str) -> str:
    for name, body in sections().items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md lacks the markers of section {name!r}")
        text = pattern.sub(lambda m, body=body: f"{m.group(1)}{body}\n{m.group(2)}", text)
    return text


def main() -> int:
    text = README.read_text()
    new = render(text)
    if "--check" in sys.argv:
        if new != text:
            print("README.md is out of date: run `make readme`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
