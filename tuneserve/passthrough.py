"""Field tables for the pass-through prefixes (SFT_*, LORA_*, BNB_*).

The configuration is validated before torch is imported (so `--help` and config errors return in
well under a second), but the field names of TRL's SFTConfig, PEFT's LoraConfig and transformers'
BitsAndBytesConfig live in modules that import torch. So their names and value kinds are frozen
into `passthrough_fields.json`, generated from the pinned versions with

    python -m tuneserve.passthrough

and a test (tests/test_config.py) fails when the file no longer matches the installed libraries.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

FIELDS_FILE = Path(__file__).with_name("passthrough_fields.json")

# Value kinds a field accepts, tried in this order when converting an environment string.
KIND_ORDER = ("none", "bool", "int", "float", "json", "str")


def kinds_of(annotation: str) -> list[str]:
    """Map a type annotation (as text) to the value kinds an environment string may convert to."""
    text = annotation.replace("typing.", "")
    kinds: set[str] = set()
    if "None" in text or "Optional" in text:
        kinds.add("none")
    # Strip container parameters: list[str] is a JSON value, not a str.
    container = r"\b(list|dict|tuple|List|Dict|Tuple)\[[^\[\]]*\]"
    outer = text
    while outer != (outer := re.sub(container, "json", outer)):
        pass
    if re.search(r"\b(list|dict|tuple|List|Dict)\b", text):
        kinds.add("json")
    if re.search(r"\bbool\b", outer) or "Literal[False]" in text:
        kinds.add("bool")
    if re.search(r"\bint\b", outer):
        kinds.add("int")
    if re.search(r"\bfloat\b", outer):
        kinds.add("float")
    if (
        re.search(r"\bstr\b", outer)
        or "Literal[" in text
        or "Strategy" in outer
        or "Names" in outer
        or "SchedulerType" in outer
        or "TaskType" in outer
        or "PeftType" in outer
    ):
        kinds.add("str")
    if not kinds - {"none"}:
        # Config objects (LoftQConfig, EvaConfig, ...) are given as JSON dicts.
        kinds.add("json")
    return [k for k in KIND_ORDER if k in kinds]


def generate() -> dict[str, dict[str, list[str]]]:
    """Read the installed libraries (imports torch). Used to regenerate the JSON and by the test."""
    import dataclasses
    import inspect

    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    def from_dataclass(cls) -> dict[str, list[str]]:
        return {f.name: kinds_of(str(f.type)) for f in dataclasses.fields(cls) if f.init}

    bnb: dict[str, list[str]] = {}
    for name, p in inspect.signature(BitsAndBytesConfig.__init__).parameters.items():
        if name in ("self", "kwargs"):
            continue
        d = p.default
        if isinstance(d, bool):
            kinds = ["bool"]
        elif isinstance(d, float):
            kinds = ["float"]
        elif d is None:
            kinds = ["none", "json", "str"]
        else:
            kinds = ["str"]
        bnb[name] = kinds
    return {"sft": from_dataclass(SFTConfig), "lora": from_dataclass(LoraConfig), "bnb": bnb}


@lru_cache(maxsize=1)
def load() -> dict[str, dict[str, list[str]]]:
    return json.loads(FIELDS_FILE.read_text())


if __name__ == "__main__":
    FIELDS_FILE.write_text(json.dumps(generate(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIELDS_FILE}")
