"""Tiny real models for tests and the offline demo (no Hub is reachable here).

`build_tiny_model` trains a byte-level BPE tokenizer on the given texts with the `tokenizers` library
and saves a randomly initialised transformers model of a real architecture (Qwen2 by default) next to
it, in bfloat16 safetensors, exactly as a Hub checkout would look. head_dim is 64 because vLLM's CPU
attention kernel rejects smaller heads.
"""

from __future__ import annotations

from pathlib import Path

from tuneserve.layout import readable_as_umask_allows
from tuneserve.templates import NAMED_TEMPLATE_TOKENS, named_template

EOS = "<|endoftext|>"
# The pre-tokenizer splits of Qwen2 and Llama 3 (their tokenizer.json): unlike GPT-2's, a run of newlines is one
# piece ("\n\n" after a prompt's last "\n" merges into one token), and punctuation takes the newlines after it.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRETOKENIZER_PATTERNS = {"qwen2": _WORDS + r"|\p{N}|" + _REST, "llama3": _WORDS + r"|\p{N}{1,3}|" + _REST}


def build_tokenizer(
    texts: list[str],
    template: str | None = "chatml",
    vocab_size: int = 600,
    eos: str = EOS,
    extra_special: list[str] | None = None,
    bos: str | None = None,
    pretokenizer: str = "gpt2",
):
    """A fast BPE tokenizer. `template` None gives a base ('-pt') tokenizer with no chat tokens. `pretokenizer`:
    gpt2 (byte-level's own split), or qwen2 / llama3 (their split, which merges runs of newlines)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [eos] + ([bos] if bos else [])
    if template is not None:
        special += [t for t in NAMED_TEMPLATE_TOKENS[template] if t not in special]
    special += [t for t in (extra_special or []) if t not in special]
    bpe = Tokenizer(models.BPE())
    if pretokenizer == "gpt2":
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZER_PATTERNS[pretokenizer]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=eos, bos_token=bos)
    if template is not None:
        tok.chat_template = named_template(template)
    return tok


def build_tiny_model(
    out_dir: str | Path,
    texts: list[str],
    template: str | None = "chatml",
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    vocab_size: int = 600,
    dtype: str = "bfloat16",
    max_shard_size: str | None = None,
    chat_template: str | None = None,
    extra_special: list[str] | None = None,
    bos: str | None = None,
    pretokenizer: str = "gpt2",
    max_position_embeddings: int = 1024,
) -> Path:
    """`chat_template` (text) replaces the named template's text; `extra_special` adds special tokens it uses;
    `bos`, `pretokenizer`: see build_tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(
        texts, template=template, vocab_size=vocab_size, extra_special=extra_special, bos=bos, pretokenizer=pretokenizer
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    head_dim = 64
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tok.save_pretrained(out)
    readable_as_umask_allows(out)  # a model folder other users (a container's) can read, as downloaded ones are
    return out


def save_random_adapter(model, tokenizer, out_dir: str | Path, end_of_turn: str, meta: dict | None = None, **lora):
    """Wrap `model` in an all-linear LoRA adapter whose A and B are both random (PEFT's default B is zero,
    so merging it would change nothing) and save it as training does: the adapter, the tokenizer and
    training_meta.json. `lora` goes to LoraConfig. Returns the PEFT model."""
    import json

    from peft import LoraConfig, get_peft_model

    out = Path(out_dir)
    peft_model = get_peft_model(model, LoraConfig(**{"target_modules": "all-linear", **lora}, init_lora_weights=False))
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training_meta.json").write_text(
        json.dumps({"end_of_turn": end_of_turn, "dtype": "bfloat16", **(meta or {})})
    )
    return peft_model


def pretrain(
    model_dir: str | Path,
    texts: list[str],
    epochs: int = 2,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 50,
) -> None:
    """Full-parameter causal-LM training of a tiny model on plain text, so the demo's base "knows" its
    domain's language before it is fine-tuned, as a real pretrained base would. Saved back in bfloat16."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    texts = [t + tok.eos_token for t in texts]
    steps = 0
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(texts)
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            if steps % log_every == 0:
                print(f"  pretraining: epoch {epoch + 1}/{epochs}, step {steps}, loss {loss.item():.3f}", flush=True)
    model.to(torch.bfloat16).save_pretrained(model_dir)
    readable_as_umask_allows(model_dir)


def build_tiny_multimodal(out_dir: str | Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny Gemma 3 image-text-to-text model (Gemma3ForConditionalGeneration: SigLIP tower + text model),
    the class the Gemma guide uses for Gemma 3 4B and larger, to check text-only fine-tuning of such bases."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    out = Path(out_dir)
    image_tokens = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tok = build_tokenizer(texts, template="gemma", extra_special=image_tokens)
    text = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        sliding_window=64,
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    ids = tok.convert_tokens_to_ids(image_tokens)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids[0],
        eoi_token_index=ids[1],
        image_token_index=ids[2],
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    Gemma3ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out
