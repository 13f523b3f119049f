"""Stage: tokenizer and chat template.

Loads the tokenizer (TOKENIZER or BASE_MODEL), installs CHAT_TEMPLATE when given, adds the special
tokens the template writes but the vocabulary lacks (a base "-pt" model: the case TRL's
`setup_chat_format` / `clone_chat_template` handle), and finds the token that ends an assistant turn,
which must be trained and must stop generation after the merge.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tuneserve.exitcodes import ConfigError
from tuneserve.settings import Settings
from tuneserve.templates import NAMED_TEMPLATE_TOKENS, named_template, template_tokens

log = logging.getLogger(__name__)

PROBE = [
    {"role": "system", "content": "SYSTEM"},
    {"role": "user", "content": "QUESTION"},
    {"role": "assistant", "content": "ANSWER"},
]


@dataclass
class TokenizerInfo:
    tokenizer: object
    added_tokens: list[str] = field(default_factory=list)
    end_of_turn: str | None = None  # the token closing an assistant turn (None: no chat template)
    template_source: str = "tokenizer"

    @property
    def added_token_ids(self) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(self.added_tokens)


def load_tokenizer(cfg: Settings):
    from transformers import AutoTokenizer

    ref = cfg.tokenizer or cfg.base_model
    revision = cfg.base_model_revision if cfg.tokenizer is None else cfg.tokenizer_revision
    try:
        return AutoTokenizer.from_pretrained(ref, revision=revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        var = "TOKENIZER" if cfg.tokenizer else "BASE_MODEL"
        raise ConfigError(f"{var}={ref!r}: cannot load a tokenizer from it ({str(exc).splitlines()[0]})") from None


def resolve_template(cfg: Settings, tok) -> tuple[str | None, str, list[str]]:
    """(template text, source, tokens the template needs)."""
    ct = cfg.chat_template
    if ct is None:
        text = tok.chat_template if isinstance(tok.chat_template, str) else None
        return text, "tokenizer", template_tokens(text or "")
    if ct in NAMED_TEMPLATE_TOKENS:
        return named_template(ct), f"named:{ct}", list(NAMED_TEMPLATE_TOKENS[ct])
    if "{" in ct:
        return ct, "text", template_tokens(ct)
    return Path(ct).read_text(), f"file:{ct}", template_tokens(Path(ct).read_text())


def render(tok, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    """A conversation as text through the tokenizer's chat template (with the function schemas, when given, as
    vLLM passes a request's `tools`)."""
    return tok.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def eos_ids(value) -> list[int]:
    """A generation config's `eos_token_id` (None, one id, or a list) as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def stop_ids(eos, tok, end_of_turn: str | None) -> list[int]:
    """What generation must stop on: the generation config's eos ids, then the tokenizer's eos token and the
    token that ends an assistant turn where they are missing."""
    ids = eos_ids(eos)
    for token in (tok.eos_token, end_of_turn):
        tid = None if token is None else tok.convert_tokens_to_ids(token)
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


def find_end_of_turn(tok) -> str:
    """The special token that closes an assistant turn, found by rendering a probe conversation.

    It is the first special token after the assistant's content in what the template renders for the assistant
    turn beyond the text it shares with the generation prompt (a generation prompt may open more than the
    rendered turn shows, e.g. a thinking channel). Raises ConfigError when the content cannot be found there or
    the turn is not closed by a special token: a model trained with it would never learn to stop.
    """
    special = set(tok.all_special_tokens) | {a.content for a in tok.added_tokens_decoder.values() if a.special}
    messages = PROBE
    try:
        prefix = render(tok, messages[:2], add_generation_prompt=True)
        full = render(tok, messages)
    except Exception as exc:  # jinja errors: a template that rejects a system turn, say
        try:
            messages = PROBE[1:]
            prefix = render(tok, messages[:1], add_generation_prompt=True)
            full = render(tok, messages)
        except Exception:
            raise ConfigError(f"chat template cannot render a user/assistant conversation: {exc}") from None
    turn = full[len(os.path.commonprefix([prefix, full])) :]
    if "ANSWER" not in turn:
        raise ConfigError(
            "chat template: the assistant's answer cannot be located in what it renders for the assistant turn "
            f"after the generation prompt ({turn!r}; prompt {prefix!r}). Set CHAT_TEMPLATE (e.g. chatml)."
        )
    after = turn[turn.find("ANSWER") + len("ANSWER") :]
    ids = tok(after, add_special_tokens=False)["input_ids"]
    for token in tok.convert_ids_to_tokens(ids):
        if token in special:
            return token
    raise ConfigError(
        f"chat template does not close the assistant turn with a special token (the assistant part renders as "
        f"{turn!r}), so the model could never learn to stop. Use a template whose assistant turn ends with a "
        "token such as <|im_end|> or the eos token, e.g. CHAT_TEMPLATE=chatml."
    )


def prepare_tokenizer(cfg: Settings, needs_template: bool) -> TokenizerInfo:
    tok = load_tokenizer(cfg)
    if tok.pad_token is None:
        # The loss labels are built explicitly (data.py), so pad == eos does not mask eos out of the loss.
        tok.pad_token = tok.eos_token
    template, source, needed = resolve_template(cfg, tok)
    if template is not None:
        tok.chat_template = template
    if not needs_template:
        return TokenizerInfo(tok, template_source=source)
    if template is None:
        raise ConfigError(
            f"the dataset is conversational but the tokenizer of {cfg.tokenizer or cfg.base_model!r} has no chat "
            "template; set CHAT_TEMPLATE (a well-known name such as chatml, a .jinja file, or the template text)"
        )
    vocab = tok.get_vocab()
    missing = [t for t in needed if t not in vocab]
    if missing:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        log.info(
            "chat template needs %s, which the tokenizer lacks: added them as special tokens (the "
            "embeddings are resized and the new rows trained with the adapter)",
            ", ".join(missing),
        )
    eot = find_end_of_turn(tok)
    log.info("chat template: %s; assistant turns end with %r (eos is %r)", source, eot, tok.eos_token)
    return TokenizerInfo(tok, added_tokens=missing, end_of_turn=eot, template_source=source)
