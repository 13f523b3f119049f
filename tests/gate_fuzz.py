"""Run by tests/test_serve.py with the serving environment's Python: random request bodies, each counted by the
gate and read by vLLM's own request models and length rules (prompts x n x max_tokens). Prints one JSON line: how
many bodies vLLM accepted, and every accepted body whose count by the gate differs from vLLM's."""

from __future__ import annotations

import json
import random
import sys

from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
from vllm.exceptions import VLLMValidationError

from tuneserve.gate import generation_counts, parse_body

MAX_OUTPUT = 64  # the server's MAX_OUTPUT_TOKENS (vLLM: --override-generation-config max_new_tokens)
LENGTHS = ("max_tokens", "max_completion_tokens")


def spelling(rng: random.Random):
    """A value as a client may write a count: numbers, numbers as strings, floats, booleans, junk."""
    k = rng.choice([0, 1, 2, 3, 5, 8, 16, 17, 100, 2000, -1])
    return rng.choice(
        [k, float(k), str(k), f" {k} ", f"{k}.0", True, False, None, "many", [k], {"n": k}, 1e3, k + 0.5, "0x10"]
    )


def body_text(rng: random.Random) -> tuple[str, str, dict]:
    chat = rng.random() < 0.5
    fields: dict = {"model": "m"}
    if chat:
        fields["messages"] = [{"role": "user", "content": "hi"}]
    else:
        fields["prompt"] = rng.choice(["hi", ["a", "b"], ["a"] * 5, [[1, 2], [3]], [1, 2, 3]])
    for name in ("n", *LENGTHS):
        if rng.random() < 0.6:
            fields[name] = spelling(rng)
    text = json.dumps(fields)
    if rng.random() < 0.3:  # a duplicate key: JSON readers keep the last, the gate must too
        name = rng.choice(["n", "max_tokens"])
        text = "{" + json.dumps(name) + ": " + json.dumps(spelling(rng)) + ", " + text[1:]
    return ("chat" if chat else "completion"), text, fields


def vllm_total(kind: str, obj: dict) -> int | None:
    """Tokens vLLM may generate for the body (prompts x n x max_tokens), or None when vLLM rejects it."""
    try:
        req = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(obj)
        asked = req.max_tokens
        if kind == "chat" and req.max_completion_tokens is not None:
            asked = req.max_completion_tokens
        max_tokens = get_max_tokens(10**6, asked, 1, {"max_tokens": MAX_OUTPUT}, MAX_OUTPUT)
        params = req.to_sampling_params(max_tokens, {"max_tokens": MAX_OUTPUT})
    except (ValidationError, VLLMValidationError, ValueError, TypeError):
        return None
    prompt = obj.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
    return prompts * (params.n or 1) * params.max_tokens


def main(count: int, seed: int) -> None:
    rng = random.Random(seed)
    accepted, wrong = 0, []
    for _ in range(count):
        kind, text, _ = body_text(rng)
        raw = rng.choice([text.encode(), b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16"), text.encode("utf-32")])
        obj = json.loads(raw)  # what FastAPI hands vLLM's request models
        total = vllm_total(kind, obj)
        if total is None:
            continue
        accepted += 1
        prompts, choices, per_choice = generation_counts(parse_body(raw), MAX_OUTPUT)
        counted = prompts * choices * per_choice
        if counted != total:
            wrong.append({"body": text, "gate": counted, "vllm": total})
    print(json.dumps({"accepted": accepted, "wrong": wrong[:20]}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
