"""Wait until a verdict file says `"passed": true`, or with --exists until a file is there: the init containers
of the pods that take over from a Job on a shared volume.

    python3 -m tuneserve.wait /output/verify.json                  # what verification passed (merged/)
    python3 -m tuneserve.wait /output/quantized/engine_gate.json   # what the engine evaluation passed
    python3 -m tuneserve.wait --exists /output/quantized/quantize_info.json   # what training wrote last

A model folder appears before its checks end, and stays when they fail (exit 4): serving it as soon as it
exists would serve what failed. A failed verdict keeps the pod waiting (and says so every 30 s), since a
rerun of the Job may still pass; the server itself refuses a quantized folder without a passing verdict.
"""

from __future__ import annotations

import json
import os
import sys
import time


def verdict(path: str) -> bool | None:
    """True or False as the file says; None while it is missing or half-written."""
    try:
        with open(path) as f:
            return json.load(f).get("passed")
    except (OSError, ValueError, AttributeError):
        return None


def main(argv: list[str]) -> int:
    exists = argv[:1] == ["--exists"]
    (path,) = argv[1:] if exists else argv
    while not (passed := os.path.isfile(path) if exists else verdict(path)):
        state = "says the checks failed (the Job exits 4)" if passed is False and not exists else "is not there yet"
        print(f"waiting for the Job: {path} {state}", flush=True)
        time.sleep(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
