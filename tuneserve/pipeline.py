"""The training image's job, stage by stage: config -> data -> tokenizer -> model -> train.

Reads top to bottom as the list of stages (alignment-handbook's `scripts/sft.py` shape). Each stage
writes under OUTPUT_DIR (layout.py) and a rerun skips what is already done.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tuneserve import data, signals
from tuneserve.layout import Layout, write_json_atomic
from tuneserve.settings import Settings

log = logging.getLogger(__name__)


def banner(text: str) -> None:
    log.info("==== %s ====", text)


def use_token(cfg: Settings) -> None:
    """Hand HF_TOKEN_FILE's token to huggingface_hub through the process environment (never argv)."""
    if cfg.hf_token_file and not cfg.hf_token:
        token = Path(cfg.hf_token_file).read_text().strip()
        if token:
            os.environ["HF_TOKEN"] = token


def run(cfg: Settings, check_only: bool = False) -> int:
    from tuneserve import tokenizer, train
    from tuneserve.model import resolve_placement

    signals.install()
    use_token(cfg)
    layout = Layout.of(cfg.output_dir)
    if not check_only and train.adapter_done(layout):
        log.info("training already done: %s holds the adapter; skipping the training stage", layout.adapter)
        return 0

    banner("preflight: data, tokenizer, chat template")
    placement = resolve_placement(cfg)
    shaped = data.load_and_shape(cfg)
    tok_info = tokenizer.prepare_tokenizer(cfg, needs_template=shaped.is_chat)
    prepared = data.tokenize(cfg, tok_info, shaped, None if check_only else layout.data)
    if check_only:
        log.info("preflight passed: %s", prepared.stats)
        return 0

    layout.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.config, cfg.masked())

    banner(f"train: QLoRA SFT on {placement.device} ({placement.dtype_name})" if cfg.load_in_4bit
           else f"train: LoRA SFT on {placement.device} ({placement.dtype_name})")
    train.train(cfg, layout, tok_info, prepared, placement)
    banner("done")
    return 0
