"""Stage: QLoRA supervised fine-tuning with TRL's SFTTrainer, resumable and SIGTERM-safe.

Checkpoints go to OUTPUT_DIR/checkpoints every SAVE_STEPS; each is marked complete once fully written.
A rerun resumes from the newest complete one. On SIGTERM the current step finishes, a checkpoint is
saved and `Terminated` (exit 143) is raised, so later stages never see a half-trained adapter. The final
adapter is written to a temporary folder and renamed to OUTPUT_DIR/adapter: its presence means training
is done, and a rerun skips this stage.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from tuneserve import checkpoints, signals
from tuneserve.exitcodes import ConfigError, Terminated
from tuneserve.layout import Layout, write_json_atomic
from tuneserve.model import Placement
from tuneserve.settings import Settings

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_done(layout: Layout) -> bool:
    return all((layout.adapter / f).is_file() for f in ADAPTER_FILES)


def describe_quantization(model) -> dict | None:
    """The 4-bit layers of the loaded base and their quantization settings (None when not quantized)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if not layers:
        return None
    qs = next(iter(layers.values())).weight.quant_state
    return {"modules": sorted(layers), "quant_type": qs.quant_type, "blocksize": qs.blocksize,
            "double_quant": bool(qs.nested), "dtype": str(qs.dtype).removeprefix("torch.")}


def build_sft_config(cfg: Settings, layout: Layout, placement: Placement, has_eval: bool):
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(layout.checkpoints),
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        gradient_checkpointing=cfg.gradient_checkpointing,
        neftune_noise_alpha=cfg.neftune_noise_alpha,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to,
        use_cpu=placement.device == "cpu",
        bf16=placement.dtype_name == "bfloat16",
        fp16=placement.dtype_name == "float16",
        # Rows arrive tokenized with their labels (data.py); TRL keeps them as they are.
        completion_only_loss=False,
        assistant_only_loss=False,
        push_to_hub=False,
        hub_token=None,
    )
    if placement.device == "cpu":
        kwargs["dataloader_pin_memory"] = False
    kwargs.update(cfg.extras.get("sft", {}))
    if not has_eval:
        kwargs.setdefault("eval_strategy", "no")
    try:
        return SFTConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training configuration rejected by trl.SFTConfig: {exc}") from None


def _callbacks():
    from transformers import TrainerCallback

    class MarkCompleteAndStopOnSignal(TrainerCallback):
        """Marks each checkpoint complete once written; on SIGTERM saves one more and stops."""

        def on_step_end(self, args, state, control, **kwargs):
            if signals.requested():
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    checkpoints.mark_complete(ckpt, state.global_step)
            return control

    return [MarkCompleteAndStopOnSignal()]


def train(cfg: Settings, layout: Layout, tok_info, prepared, placement: Placement) -> Path:
    """Train (or resume) and write OUTPUT_DIR/adapter. Returns the adapter folder."""
    from trl import SFTTrainer

    from tuneserve.model import get_peft_config, load_model

    resume = checkpoints.newest_complete(layout.checkpoints) if cfg.resume else None
    if resume is None and cfg.resume is False and checkpoints.checkpoints(layout.checkpoints):
        log.info("RESUME=false: starting over; existing checkpoints in %s will be replaced", layout.checkpoints)
        shutil.rmtree(layout.checkpoints)
    model = load_model(cfg, tok_info, placement)
    quantization = describe_quantization(model)
    peft_config = get_peft_config(cfg, tok_info.added_token_ids, model)
    args = build_sft_config(cfg, layout, placement, prepared.eval is not None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                         processing_class=tok_info.tokenizer, peft_config=peft_config, callbacks=_callbacks())
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    if resume is not None:
        import json

        step = json.loads((resume / "trainer_state.json").read_text()).get("global_step")
        log.info("resuming from %s (step %s)", resume, step)
    else:
        log.info("starting training from scratch (no complete checkpoint in %s)", layout.checkpoints)
    with signals.deferred():
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if signals.requested():
        raise Terminated(f"stopped by SIGTERM at step {trainer.state.global_step}; checkpoint saved in "
                         f"{layout.checkpoints}. Rerun with the same OUTPUT_DIR to resume.")
    tmp = layout.root / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # adapter weights + config, and the tokenizer (processing_class)
    (tmp / "README.md").unlink(missing_ok=True)  # TRL's generic card; the real one comes with publishing
    write_json_atomic(tmp / "training_meta.json", {
        "base_model": cfg.base_model, "base_model_revision": cfg.base_model_revision,
        "end_of_turn": tok_info.end_of_turn, "added_tokens": tok_info.added_tokens,
        "template_source": tok_info.template_source, "dtype": placement.dtype_name,
        "load_in_4bit": cfg.load_in_4bit, "global_step": trainer.state.global_step,
        # What MERGE_BASE=dequantized replays: which weights were 4-bit and how they were quantized.
        "quantization": quantization,
    })
    if layout.adapter.exists():
        shutil.rmtree(layout.adapter)
    os.replace(tmp, layout.adapter)
    metrics = dict(result.metrics)
    write_json_atomic(layout.train_report, {
        "metrics": metrics, "global_step": trainer.state.global_step, "data": prepared.stats,
        "log_history": trainer.state.log_history, "resumed_from": str(resume) if resume else None,
    })
    log.info("training done at step %d; adapter in %s", trainer.state.global_step, layout.adapter)
    return layout.adapter
