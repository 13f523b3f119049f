"""Well-known chat templates (CHAT_TEMPLATE=chatml|llama3|gemma) and the special tokens they need.

Written for this tool rather than copied from a model repository: each is the minimal template of its
family (no tool calls), prefix-preserving so assistant-only loss masks can be computed by rendering.
"""

from __future__ import annotations

import re
from pathlib import Path

_HERE = Path(__file__).parent

NAMED_TEMPLATE_TOKENS: dict[str, list[str]] = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
}
END_OF_TURN: dict[str, str] = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}

# Literal tokens a custom template may need: <|name|> (ChatML, Llama 3, Phi) and <start_of_turn>-style tags.
_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>|<(?:start|end)_of_[a-z]+>")


def named_template(name: str) -> str:
    return (_HERE / f"{name}.jinja").read_text()


def template_tokens(template: str) -> list[str]:
    """Special-token literals written in a template, in order of first appearance."""
    seen: list[str] = []
    for tok in _TOKEN_RE.findall(template):
        if tok not in seen:
            seen.append(tok)
    return seen
