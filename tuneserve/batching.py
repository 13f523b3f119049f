"""How a training step is batched: how many training sequences make one optimizer step (the batch), how they are
split into micro-batches and accumulation steps over the processes, how a micro-batch is laid out (PACKING), whether
activations must be recomputed (gradient checkpointing), and the check, on a model, that rows flattened into one
sequence never see each other.

The batch always counts training sequences (one per row, or one per assistant turn where the template needs it):
an epoch has the same optimizer steps, and each step the same sequences, whatever PACKING, the micro-batch or the
number of processes. PACKING only decides the layout of a micro-batch: its rows flattened into one padding-free
sequence (TRL's padding-free collator; each row keeps its own position ids) or padded side by side. The
loss is the sum over the step's trained tokens divided by their count (TRL's `num_items_in_batch`), so how the
step is split changes nothing but speed and memory. docs/training.md says why this design over packing bins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tuneserve.config import PACKED_ATTENTION
from tuneserve.exitcodes import ConfigError
from tuneserve.settings import Settings

log = logging.getLogger(__name__)

# The batch when neither BATCH_SIZE, PER_DEVICE_TRAIN_BATCH_SIZE nor GRADIENT_ACCUMULATION_STEPS is set: the guide's
# 1 x 4, rounded up to a multiple of the processes so that each takes an equal share.
DEFAULT_BATCH = 4
# Tokens of one micro-batch at most (rows x the longest row). On a GPU, a few hundred tokens a forward leave it waiting
# on kernel launches; this many keep it busy at the sizes this tool trains (the GPU check measures it). On the CPU,
# the guide's one 512-token sequence a forward: on the training benchmark's model (rows of ~190 tokens, 40 steps of 4
# rows, two runs each), 2 padded rows a forward ran 3,860-4,010 tokens/s at a peak RSS of 0.72 GiB, 4 rows 4,050-4,650
# tokens/s at 0.80 GiB, above the guide's; one row at a time was slower still (docs/training.md).
GPU_MICRO_BATCH_TOKENS = 4096
CPU_MICRO_BATCH_TOKENS = 512


@dataclass(frozen=True)
class Plan:
    batch: int  # training sequences per optimizer step, all processes together
    micro: int  # sequences per forward pass in each process
    accum: int  # forward passes per optimizer step in each process
    world: int  # processes
    why: str
    padding_free: bool = False  # a micro-batch's rows flattened into one sequence (PACKING), else padded
    layout: str = ""

    def describe(self) -> str:
        return (
            f"batch {self.batch} sequence(s) per optimizer step = {self.micro} per micro-batch x {self.accum} "
            f"accumulation step(s) x {self.world} process(es) ({self.why}); {self.layout}"
        )


def _given(cfg: Settings, name: str) -> bool:
    return cfg.sources.get(name, "default") != "default" and cfg.get(name) is not None


def _auto_micro(share: int, device: str, row_tokens: int) -> tuple[int, str]:
    """The largest divisor of a process's share whose rows fit the device's micro-batch token budget (at least 1)."""
    budget = GPU_MICRO_BATCH_TOKENS if device == "cuda" else CPU_MICRO_BATCH_TOKENS
    fits = max(1, budget // max(1, row_tokens))
    micro = max(d for d in range(1, share + 1) if share % d == 0 and d <= fits)
    return micro, f"micro-batch up to {budget} tokens on the {device.upper()}, rows up to {row_tokens} tokens"


def layout(cfg: Settings, device: str, micro: int) -> tuple[bool, str]:
    """Whether a micro-batch's rows are flattened padding-free (PACKING), and why, for the log."""
    if micro == 1:
        return False, "one row per micro-batch: nothing to pad or flatten"
    if cfg.packing is True:
        return True, "rows of a micro-batch flattened padding-free (PACKING=true)"
    if cfg.packing is False:
        return False, "rows of a micro-batch padded (PACKING=false)"
    if device != "cuda":
        return False, "rows of a micro-batch padded (PACKING=auto on the CPU)"
    if cfg.attn_implementation and cfg.attn_implementation not in PACKED_ATTENTION:
        return False, f"rows of a micro-batch padded (PACKING=auto: {cfg.attn_implementation} would let them mix)"
    return True, "rows of a micro-batch flattened padding-free (PACKING=auto on a GPU)"


def plan(cfg: Settings, world: int, device: str, row_tokens: int | None = None) -> Plan:
    """The batch and its split over `world` processes on `device`, for rows of at most `row_tokens` tokens (default
    MAX_SEQ_LENGTH), and the layout of a micro-batch. Values the user set win; a default adapts to them and to the
    processes. Only values the user set that contradict each other (or that `world` processes cannot share equally)
    exit 2."""
    import dataclasses

    split = _split(cfg, world, device, row_tokens or cfg.max_seq_length)
    flat, why = layout(cfg, device, split.micro)
    return dataclasses.replace(split, padding_free=flat, layout=why)


def _split(cfg: Settings, world: int, device: str, row_tokens: int) -> Plan:
    micro = cfg.per_device_train_batch_size if _given(cfg, "PER_DEVICE_TRAIN_BATCH_SIZE") else None
    accum = cfg.gradient_accumulation_steps if _given(cfg, "GRADIENT_ACCUMULATION_STEPS") else None
    batch = cfg.batch_size if _given(cfg, "BATCH_SIZE") else None
    procs = f"{world} training process(es)"
    if micro and accum:
        if batch is not None and micro * accum * world != batch:
            raise ConfigError(
                f"BATCH_SIZE={batch} but PER_DEVICE_TRAIN_BATCH_SIZE={micro} x GRADIENT_ACCUMULATION_STEPS={accum} x "
                f"{procs} = {micro * accum * world}; set BATCH_SIZE alone (the split follows) or make them agree"
            )
        return Plan(
            micro * accum * world,
            micro,
            accum,
            world,
            "PER_DEVICE_TRAIN_BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS as set",
        )
    if batch is not None:
        if batch % world:
            lower = batch - batch % world or batch - batch % world + world
            upper = lower + world
            raise ConfigError(
                f"BATCH_SIZE={batch} cannot be shared equally by {procs} (NPROC_PER_NODE x NNODES); use a multiple "
                f"of {world} such as {lower} or {upper}, or leave BATCH_SIZE unset (the default adapts)"
            )
        share = batch // world
        if micro is not None or accum is not None:
            name, value = ("PER_DEVICE_TRAIN_BATCH_SIZE", micro) if micro else ("GRADIENT_ACCUMULATION_STEPS", accum)
            if share % value:
                divisors = [d for d in range(1, share + 1) if share % d == 0]
                raise ConfigError(
                    f"BATCH_SIZE={batch} over {procs} is {share} sequence(s) each, which {name}={value} does not "
                    f"divide; use one of {divisors} for {name}, or leave it unset (it follows BATCH_SIZE)"
                )
            micro, accum = (micro, share // micro) if micro else (share // accum, accum)
            return Plan(batch, micro, accum, world, f"BATCH_SIZE and {name} as set")
        micro, how = _auto_micro(share, device, row_tokens)
        return Plan(batch, micro, share // micro, world, f"BATCH_SIZE as set; {how}")
    if micro is not None:
        return Plan(micro * world, micro, 1, world, "PER_DEVICE_TRAIN_BATCH_SIZE as set, no accumulation, as in TRL")
    if accum is not None:
        micro = max(1, -(-DEFAULT_BATCH // (accum * world)))
        return Plan(
            micro * accum * world,
            micro,
            accum,
            world,
            f"GRADIENT_ACCUMULATION_STEPS as set; micro-batch {micro}, the least that makes a batch of at least "
            f"the default {DEFAULT_BATCH}",
        )
    batch = world * -(-DEFAULT_BATCH // world)
    micro, how = _auto_micro(batch // world, device, row_tokens)
    why = f"BATCH_SIZE default {DEFAULT_BATCH}" + (
        f", rounded up to {batch} so that {procs} take equal shares" if batch != DEFAULT_BATCH else ""
    )
    return Plan(batch, micro, batch // world // micro, world, f"{why}; {how}")


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
    """Refuse (exit 2) a model on which rows flattened into one sequence attend to each other.

    A row is flattened after a first one, then after another of the same length with other tokens, through TRL's
    own padding-free collator (what training with PACKING feeds the model); where rows are kept apart, the second
    one's logits cannot depend on the first's tokens. Returns the largest difference found."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (9, 9, 7))
    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
    device = model.get_input_embeddings().weight.device

    def second_logits(before: list[int]):
        batch = collator([{"input_ids": before}, {"input_ids": second}])
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
            f"PACKING=true: on this model with attention {attn!r}, rows flattened together attend to each other "
            f"(a row's logits change by {diff:.3g} with the row packed before it); use "
            "ATTN_IMPLEMENTATION=sdpa or flash_attention_2, or PACKING=false"
        )
    log.info(
        "packing check: rows flattened together stay apart with attention %r (largest difference %.2g)", attn, diff
    )
    return diff


def probe_model(cfg: Settings, config):
    """For --check: a small random model of BASE_MODEL's architecture (`config`, its AutoConfig), on which
    `check_packing` runs before any weight is downloaded or loaded: its text config with the same attention code
    (ATTN_IMPLEMENTATION, each attention kind of `layer_types` kept) and small widths. None, with a warning, where
    an architecture cannot be shrunk this way (training runs the check on the loaded model either way)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    try:
        text = copy.deepcopy(config.get_text_config())
        kinds = list(dict.fromkeys(getattr(text, "layer_types", None) or [])) or None
        small = dict(
            num_hidden_layers=len(kinds) if kinds else 2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=256,
        )
        if kinds:
            small["layer_types"] = kinds
        if getattr(text, "head_dim", None) is not None:
            small["head_dim"] = 32
        for name, value in small.items():
            setattr(text, name, value)
        if cfg.attn_implementation:
            text._attn_implementation = cfg.attn_implementation
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(text, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any architecture this generic shrink does not fit
        log.warning(
            "--check: the packing check on a small copy of %s could not run (%s); training runs it on the loaded "
            "model before the first step",
            cfg.base_model,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return None
    model.config.use_cache = False
    return model
