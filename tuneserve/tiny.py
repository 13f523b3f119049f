"""Tiny real models for tests and the offline demo (no Hub is reachable here).

`build_tiny_model` trains a byte-level BPE tokenizer on the given texts with the `tokenizers` library
and saves a randomly initialised transformers model of a real architecture (Qwen2 by default) next to
it, in bfloat16 safetensors, exactly as a Hub checkout would look. head_dim is 64 because vLLM's CPU
attention kernel rejects smaller heads.
"""

from __future__ import annotations

from pathlib import Path

from tuneserve.templates import NAMED_TEMPLATE_TOKENS, named_template

EOS = "<|endoftext|>"


def build_tokenizer(texts: list[str], template: str | None = "chatml", vocab_size: int = 600,
                    eos: str = EOS, extra_special: list[str] | None = None):
    """A fast BPE tokenizer. `template` None gives a base ('-pt') tokenizer with no chat tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [eos]
    if template is not None:
        special += [t for t in NAMED_TEMPLATE_TOKENS[template] if t not in special]
    special += [t for t in (extra_special or []) if t not in special]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=eos)
    if template is not None:
        tok.chat_template = named_template(template)
    return tok


def build_tiny_model(out_dir: str | Path, texts: list[str], template: str | None = "chatml",
                     arch: str = "qwen2", hidden_size: int = 128, num_layers: int = 2,
                     tie_word_embeddings: bool = False, seed: int = 0, vocab_size: int = 600,
                     dtype: str = "bfloat16", max_shard_size: str | None = None) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(texts, template=template, vocab_size=vocab_size)
    head_dim = 64
    config = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_dim, num_key_value_heads=1,
        head_dim=head_dim, max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tok.save_pretrained(out)
    return out
