"""How a training step is batched: the micro-batch and accumulation that make BATCH_SIZE, whether activations must
be recomputed (gradient checkpointing), and the check, on the loaded model, that packed rows never see each other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tuneserve.exitcodes import ConfigError
from tuneserve.settings import Settings

log = logging.getLogger(__name__)

# On a GPU, micro-batches of a few hundred tokens leave it waiting on kernel launches; this many tokens per forward
# pass keep it busy at the sizes this tool trains (the benchmark's GPU rows measure it).
GPU_MICRO_BATCH_TOKENS = 4096


def plan(cfg: Settings, world: int, device: str) -> tuple[int, int]:
    """(micro-batch, gradient accumulation steps) per process, so that micro x accumulation x processes is
    BATCH_SIZE. Settings the user gave win; a combination that cannot make BATCH_SIZE exits 2."""
    micro, accum, batch = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.batch_size
    batch_given = cfg.sources.get("BATCH_SIZE", "default") != "default"
    if micro and accum:
        if batch_given and micro * accum * world != batch:
            raise ConfigError(
                f"BATCH_SIZE={batch} but PER_DEVICE_TRAIN_BATCH_SIZE={micro} x "
                f"GRADIENT_ACCUMULATION_STEPS={accum} x {world} process(es) = {micro * accum * world}; "
                "set BATCH_SIZE alone (the split follows) or make them agree"
            )
        why = "PER_DEVICE_TRAIN_BATCH_SIZE and GRADIENT_ACCUMULATION_STEPS as set"
    else:
        if batch % world:
            raise ConfigError(
                f"BATCH_SIZE={batch} does not divide among {world} training processes; use a multiple of {world}"
            )
        share = batch // world
        if micro is None and accum:
            micro = share // accum
        elif micro is None:
            fits = GPU_MICRO_BATCH_TOKENS // cfg.max_seq_length if device == "cuda" else 1
            micro = max(d for d in range(1, share + 1) if share % d == 0 and (d <= fits or d == 1))
        accum = accum or share // micro
        if micro < 1 or micro * accum != share:
            raise ConfigError(
                f"BATCH_SIZE={batch} over {world} process(es) is {share} sequence(s) each, which "
                f"PER_DEVICE_TRAIN_BATCH_SIZE={cfg.per_device_train_batch_size} x "
                f"GRADIENT_ACCUMULATION_STEPS={cfg.gradient_accumulation_steps} cannot make; set "
                "one of them to a divisor of it, or neither"
            )
        why = f"BATCH_SIZE={batch}" + (
            ""
            if cfg.per_device_train_batch_size or cfg.gradient_accumulation_steps
            else f"; micro-batch on the {device.upper()}: "
            + (f"up to {GPU_MICRO_BATCH_TOKENS} tokens" if device == "cuda" else "1")
        )
    log.info(
        "batch: %d sequence(s) per micro-batch x %d accumulation step(s) x %d process(es) (%s)",
        micro,
        accum,
        world,
        why,
    )
    return micro, accum


def activation_bytes(model, tokens: int, dtype_bytes: int) -> int:
    """An estimate of what one micro-batch's forward keeps for the backward pass without checkpointing, per decoder
    layer and token: the inputs of the norms, attention projections, LoRA branches (dropout copies), the residual
    stream (about 16 x hidden) and the MLP's gate, up and product (about 6 x intermediate)."""
    text = model.config.get_text_config()
    hidden = text.hidden_size
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    return tokens * text.num_hidden_layers * (16 * hidden + 6 * intermediate) * dtype_bytes


def free_memory(device: str, cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """Bytes free for activations now (the model loaded): the GPU's free memory, or the RAM available to this
    process (MemAvailable, bounded by the cgroup's memory limit)."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return free, "free GPU memory"
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    free = int(meminfo["MemAvailable"].split()[0]) * 1024
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free, "available RAM"


def checkpointing(cfg: Settings, model, micro: int, device: str, dtype_bytes: int) -> bool:
    """GRADIENT_CHECKPOINTING: as set, or for auto, on when the estimated activations of a micro-batch of
    MAX_SEQ_LENGTH sequences exceed half the memory free with the model loaded (recomputing costs about a third
    more compute, so it is spent only where memory needs it)."""
    if cfg.gradient_checkpointing != "auto":
        log.info("gradient checkpointing %s (GRADIENT_CHECKPOINTING)", "on" if cfg.gradient_checkpointing else "off")
        return bool(cfg.gradient_checkpointing)
    need = activation_bytes(model, micro * cfg.max_seq_length, dtype_bytes)
    free, what = free_memory(device)
    on = need > free / 2
    log.info(
        "gradient checkpointing %s (GRADIENT_CHECKPOINTING=auto: a micro-batch's activations, about %.2f GiB, "
        "are %s half the %.1f GiB of %s)",
        "on" if on else "off",
        need / 2**30,
        "more than" if on else "within",
        free / 2**30,
        what,
    )
    return on


def check_packing(model, pad_token_id: int) -> float:
    """Refuse (exit 2) a model on which rows packed into one sequence attend to each other.

    Two sequences are packed after a first one of the same length with other tokens, through TRL's own
    padding-free collator (what training feeds the model); where rows are kept apart, the second one's logits
    cannot depend on the first's tokens. Returns the largest difference found."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (9, 9, 7))
    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
    device = model.get_input_embeddings().weight.device

    def second_logits(before: list[int]):
        batch = collator([{"input_ids": before + second, "seq_lengths": [len(before), len(second)]}])
        batch.pop("labels")
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        # In training mode, as training runs it (bitsandbytes repacks 4-bit weights for inference on the CPU in
        # eval mode, which training cannot use afterwards); the same seed gives both calls the same dropout.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(0)
            return model(**batch, use_cache=False).logits[0, len(before) :].float()

    model.train()
    a, b = second_logits(first), second_logits(other)
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    attn = model.config.get_text_config()._attn_implementation
    if not diff <= 1e-3 * max(1.0, scale):
        raise ConfigError(
            f"PACKING=true: on this model with attention {attn!r}, packed rows attend to each other "
            f"(a row's logits change by {diff:.3g} with the row packed before it); use "
            "ATTN_IMPLEMENTATION=sdpa or flash_attention_2, or PACKING=false"
        )
    log.info("packing check: rows packed together stay apart with attention %r (largest difference %.2g)", attn, diff)
    return diff
