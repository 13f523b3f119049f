"""Stage: QLoRA supervised fine-tuning with TRL's SFTTrainer, resumable and SIGTERM-safe.

Checkpoints go to OUTPUT_DIR/checkpoints every SAVE_STEPS; each is marked complete once fully written.
A rerun resumes from the newest complete one. On SIGTERM the current step finishes, a checkpoint is
saved and `Terminated` (exit 143) is raised, so later stages never see a half-trained adapter. The final
adapter is written to a temporary folder and renamed to OUTPUT_DIR/adapter: its presence means training
is done, and a rerun skips this stage.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import shutil
from pathlib import Path

from tuneserve import batching, checkpoints, launch, signals, trainlog
from tuneserve.exitcodes import ConfigError, Terminated
from tuneserve.layout import TRAINING_META, Layout, readable_as_umask_allows, replace_folder, scratch, write_json_atomic
from tuneserve.model import Placement
from tuneserve.settings import Settings

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EVAL_STEPS_RATIO = 0.1  # with held-out rows: evaluate every tenth of the run (SFT_EVAL_STEPS / SFT_EVAL_STRATEGY)


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
    return {
        "modules": sorted(layers),
        "quant_type": qs.quant_type,
        "blocksize": qs.blocksize,
        "double_quant": bool(qs.nested),
        "dtype": str(qs.dtype).removeprefix("torch."),
        # bitsandbytes' CUDA and CPU kernels need not round alike: the replay runs where training quantized.
        "device": qs.absmax.device.type,
    }


def keep_training_kernels(model) -> None:
    """bitsandbytes (0.50) repacks a 4-bit weight for its CPU inference kernel the first time the layer runs in eval
    mode without gradients, and never back: every training step after an evaluation then takes the inference kernel
    and fails ("a view of a leaf Variable that requires grad is being used in an in-place operation"). The switch
    bitsandbytes keeps on each layer turns that off; evaluations during training run the training kernel."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def evaluate_aside(trainer, recorder: RowRecorder | None) -> None:
    """Evaluations during training leave training as it would be without them. Each data loader pass draws a seed
    from torch's generator (even without workers), which would shift every later dropout mask: the random states are
    restored after each evaluation. And evaluation batches pass through the training collator (transformers has one
    for both), so the ledger is told to skip them. transformers has no callback before an evaluation starts, so the
    trainer's evaluate is wrapped."""
    import random

    import numpy as np
    import torch

    evaluate = trainer.evaluate

    def evaluate_unrecorded(*args, **kwargs):
        states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        if recorder is not None:
            recorder.evaluating = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            if recorder is not None:
                recorder.evaluating = False
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    trainer.evaluate = evaluate_unrecorded


def build_sft_config(cfg: Settings, layout: Layout, placement: Placement, has_eval: bool, plan: batching.Plan):
    from trl import SFTConfig

    # PACKING flattens each micro-batch's rows into one padding-free sequence (batching.py); TRL's own packing, which
    # bins rows into new sequences and so changes what a batch counts, is never used. Rows arrive within
    # MAX_SEQ_LENGTH (data.py drops longer ones), and TRL refuses a max_length with padding-free batches.
    kwargs = dict(
        output_dir=str(layout.checkpoints),
        max_length=None if plan.padding_free else cfg.max_seq_length,
        packing=False,
        padding_free=plan.padding_free,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=plan.micro,
        gradient_accumulation_steps=plan.accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        gradient_checkpointing=cfg.gradient_checkpointing is True,  # auto: decided once the model is loaded
        neftune_noise_alpha=cfg.neftune_noise_alpha,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to,
        disable_tqdm=not trainlog.bars_wanted(),  # trainlog's lines are the log; a bar only on a terminal
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
    if launch.world_size() > 1:
        # LoRA trains a few matrices of a frozen model: every parameter with a gradient is used each step,
        # so DDP's search for unused ones is pure overhead; non-reentrant checkpointing is the variant that
        # works under DDP and FSDP.
        kwargs["ddp_find_unused_parameters"] = False
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if cfg.distributed_strategy == "fsdp":
        kwargs.update(fsdp_options())
    if has_eval:
        # The held-out rows' loss ten times a run (a ratio of the total steps): the eval points of metrics.jsonl and of
        # the cards' curves. evaluate_aside keeps them from changing what is learned.
        kwargs.update(eval_strategy="steps", eval_steps=EVAL_STEPS_RATIO)
    kwargs.update(cfg.extras.get("sft", {}))
    if not has_eval:
        kwargs.setdefault("eval_strategy", "no")
    try:
        return SFTConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training configuration rejected by trl.SFTConfig: {exc}") from None


def batch_and_args(cfg: Settings, layout: Layout, placement: Placement, prepared, world: int):
    """The batch plan for `world` processes (logged) and the trainer's arguments built on it: what training uses and
    what --check checks, made the same way."""
    plan = batching.plan(cfg, world, placement.device, prepared.stats["max_row_tokens"])
    log.info("%s", plan.describe())
    return plan, build_sft_config(cfg, layout, placement, prepared.eval is not None, plan)


def check(cfg: Settings, layout: Layout, tok_info, prepared, placement: Placement) -> batching.Plan:
    """--check's part of this stage: every configuration error training can raise before its first step, found
    without loading a weight: the batch plan for the processes that will start, the trainer's arguments, the model's
    config, the quantization and LoRA configurations, and (PACKING with flattened micro-batches) the packing check
    on a small copy of the architecture."""
    from tuneserve.model import get_peft_config, get_quantization_config, model_config

    plan, args = batch_and_args(cfg, layout, placement, prepared, launch.planned_world(cfg))
    config = model_config(cfg)
    get_quantization_config(cfg, placement)
    get_peft_config(cfg, tok_info.added_token_ids)
    if args.padding_free and (probe := batching.probe_model(cfg, config)) is not None:
        batching.check_packing(probe, tok_info.tokenizer.pad_token_id or 0)
    return plan


def fsdp_options() -> dict:
    """FSDP2 (fully_shard), named explicitly: transformers' default today, the FSDP1 options (use_orig_params,
    sync_module_states, backward_prefetch) are ignored under it. Whole decoder layers are sharded, parameters
    resharded after each forward. Each process loads the whole model on its own GPU first (accelerate's
    load-on-rank-0 path skips 4-bit weights), then fully_shard splits it, the 4-bit weights included (stored in
    the compute dtype, model.py): training memory is shared, loading memory is not."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            "cpu_ram_efficient_loading": False,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        },
    }


def _stop_requested(device) -> bool:
    """Whether any process got SIGTERM. With several processes they must agree, or one would stop at this
    step while the others wait for it in the next gradient all-reduce."""
    if launch.world_size() == 1:
        return signals.requested()
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if signals.requested() else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _barrier() -> None:
    if launch.world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def _callbacks(recorder: RowRecorder | None):
    from transformers import TrainerCallback

    class MarkCompleteAndStopOnSignal(TrainerCallback):
        """Marks each checkpoint complete once written; on SIGTERM saves one more and stops."""

        stopped_by_signal = False

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            if recorder is not None and train_dataloader is not None:
                recorder.per_epoch = len(train_dataloader)
            return control

        def on_step_end(self, args, state, control, **kwargs):
            if _stop_requested(args.device):
                self.stopped_by_signal = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if recorder is not None and ckpt.is_dir():
                recorder.save(ckpt, state.global_step)  # each process its own ledger, up to this step
            _barrier()  # every process has written its part (e.g. its RNG state) before the mark
            if state.is_world_process_zero and ckpt.is_dir():
                checkpoints.mark_complete(ckpt, state.global_step)
            return control

    return MarkCompleteAndStopOnSignal()


class RowRecorder:
    """Wraps the data collator and keeps this process's ledger: the training rows of every micro-batch, in order.

    The proof, in train_report.json, that each process got its own shard of the data (a multi-GPU run that silently
    gives every process the same rows trains no faster and sees the data several times), and that a run interrupted
    any number of times trained each row once per epoch, as an uninterrupted run does. Rows are the indexes of the
    training sequences, found by a digest of their token ids (identical sequences share the first index). A segment
    is one process's life between resumes; each checkpoint stores the ledger up to its step (LEDGER_FILE), and the
    segment after it starts from there. The data loader may collate a batch ahead of the step that trains it, so a
    segment's batches are cut at the step it reached."""

    def __init__(self, rows, accumulation: int):
        self.collator, self.accumulation = None, accumulation  # the trainer's collator, wrapped once it exists
        self.per_epoch = 0  # micro-batches this process takes per epoch, set when training begins
        self.index: dict[str, int] = {}
        self.rows: list[int] = []  # each training row's index, identical sequences sharing the first
        for i, ids in enumerate(rows):
            self.rows.append(self.index.setdefault(self.digest(ids), i))
        self.earlier: list[dict] = []  # segments before this process's, from the checkpoint it resumed
        self.from_step = 0
        self.batches: list[list[int]] = []
        self.evaluating = False

    @staticmethod
    def digest(ids) -> str:
        import hashlib

        return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]

    def __call__(self, examples):
        if self.evaluating:
            return self.collator(examples)
        rows = []
        for ex in examples:  # one training row each, however the collator lays them out
            rows.append(self.index.get(self.digest(ex["input_ids"]), -1))
        self.batches.append(rows)
        return self.collator(examples)

    def resume(self, checkpoint: Path | None, step: int) -> None:
        self.from_step = step
        ledger = checkpoint / LEDGER_FILE.format(rank=launch.rank()) if checkpoint is not None else None
        if ledger is not None and ledger.is_file():
            self.earlier = json.loads(ledger.read_text())["segments"]
        elif step:
            self.earlier = [{"from_step": 0, "to_step": step, "batches": None}]  # a checkpoint without a ledger

    def micro_batches(self, step: int) -> int:
        """How many micro-batches this process has trained when the optimizer reaches `step`. Every step takes
        `accumulation` of them, except each epoch's last, which takes what is left of the epoch (transformers'
        training loop, and its resume, which skips (step % steps per epoch) x accumulation of them)."""
        if not self.per_epoch:
            return step * self.accumulation
        steps = -(-self.per_epoch // self.accumulation)
        return (step // steps) * self.per_epoch + (step % steps) * self.accumulation

    def ledger(self, step: int) -> dict:
        trained = self.batches[: self.micro_batches(step) - self.micro_batches(self.from_step)]
        return {"segments": [*self.earlier, {"from_step": self.from_step, "to_step": step, "batches": trained}]}

    def save(self, checkpoint: Path, step: int) -> None:
        write_json_atomic(checkpoint / LEDGER_FILE.format(rank=launch.rank()), self.ledger(step))


LEDGER_FILE = "ledger-rank{rank}.json"


def epoch_check(ledgers: list[dict], rows: list[int], batches_per_epoch: list[int]) -> dict:
    """Whether the processes' ledgers (micro-batches in order over their segments) train every row exactly once
    in each epoch, all processes together. `rows` holds every training row's index (identical sequences share
    one), `batches_per_epoch` each process's count. A last epoch cut short (MAX_STEPS) may lack rows, never
    repeat one.

    With several processes, accelerate deals an epoch's micro-batches round-robin (process 0 the first, process 1
    the second, ...) and, so that every process takes the same number of full ones, completes the last with rows
    from the start of the epoch (`even_batches`): those repeats, and only those, are allowed, and counted."""
    from collections import Counter

    if any(seg["batches"] is None for ledger in ledgers for seg in ledger["segments"]):
        return {"verified": None, "why": "a segment resumed from a checkpoint without a ledger: not checked"}
    batches = [[b for seg in ledger["segments"] for b in seg["batches"]] for ledger in ledgers]
    epochs = max(-(-len(bs) // n) for bs, n in zip(batches, batches_per_epoch))
    expected, bad, repeats = Counter(rows), [], 0
    for e in range(epochs):
        chunks = [bs[e * n : (e + 1) * n] for bs, n in zip(batches, batches_per_epoch)]
        dealt = [r for i in range(max(map(len, chunks))) for chunk in chunks if i < len(chunk) for r in chunk[i]]
        complete = all(len(c) == n for c, n in zip(chunks, batches_per_epoch))
        if complete:
            first, extra = dealt[: len(rows)], dealt[len(rows) :]
            padded = not extra or (len(ledgers) > 1 and extra == dealt[: len(extra)])
            ok = Counter(first) == expected and padded
            repeats += len(extra) if ok else 0
        else:
            ok = not (Counter(dealt) - expected)
        if not ok:
            bad.append(e)
    out = {
        "verified": not bad,
        "epochs": epochs,
        "segments": [len(ledger["segments"]) for ledger in ledgers],
        "epochs_not_once_each": bad,
    }
    if repeats:
        out["padding_repeats"] = repeats
    if any(-1 in b for bs in batches for b in bs):  # a sequence that is not one of the prepared rows
        out.update(verified=False, why="batches hold sequences that are not whole training rows")
    return out


def _trainable_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _per_process_report(trainer, recorder: RowRecorder | None, sharded: bool) -> list[dict]:
    """Each process's rows and trained weights, gathered on every process (rank order). With FSDP each
    process holds a different shard of the weights, so there is no whole-weights digest to compare."""
    ledger = recorder.ledger(trainer.state.global_step) if recorder else None
    record = {
        "rank": launch.rank(),
        "world_size": launch.world_size(),
        "rows_seen": sum(len(b) for seg in ledger["segments"] for b in seg["batches"] or []) if ledger else None,
        "ledger": ledger,
        "trainable_sha256": None if sharded else _trainable_digest(trainer.model),
    }
    if launch.world_size() == 1:
        return [record]
    import torch.distributed as dist

    gathered: list = [None] * launch.world_size()
    dist.all_gather_object(gathered, record)
    return gathered


def _resume_point(cfg: Settings, layout: Layout) -> Path | None:
    """The checkpoint to resume from. Rank 0 cleans up (incomplete checkpoints, RESUME=false), then every
    other process reads the same answer from the cleaned folder."""
    resume = None
    if launch.is_main():
        resume = checkpoints.newest_complete(layout.checkpoints) if cfg.resume else None
        if resume is None and cfg.resume is False and checkpoints.checkpoints(layout.checkpoints):
            log.info("RESUME=false: starting over; existing checkpoints in %s will be replaced", layout.checkpoints)
            for _step, ckpt in checkpoints.checkpoints(layout.checkpoints):  # ours only, not the folder
                shutil.rmtree(ckpt)
    _barrier()
    if not launch.is_main() and cfg.resume:
        resume = checkpoints.newest_complete(layout.checkpoints, remove_incomplete=False)
    return resume


def _init_process_group(placement: Placement) -> None:
    """Join the process group before the first collective (the checkpoint choice): accelerate's shared
    state, which the trainer then reuses (gloo on the CPU, NCCL on GPUs)."""
    if launch.world_size() > 1:
        from accelerate import PartialState

        state = PartialState(cpu=placement.device == "cpu")
        log.info(
            "process %d of %d (local %d, %s backend)",
            state.process_index,
            state.num_processes,
            state.local_process_index,
            state.backend,
        )


def train(cfg: Settings, layout: Layout, tok_info, prepared, placement: Placement) -> Path:
    """Train (or resume) and write OUTPUT_DIR/adapter. Returns the adapter folder; the model is freed."""
    adapter = _train(cfg, layout, tok_info, prepared, placement)
    # TRL's and accelerate's wrapped forwards hold the trained model in reference cycles: without a collection it
    # stays in memory (on the GPU: 1-1.6 GB at 1B, ~16 GB at 27B) while verify loads the merged model beside it.
    gc.collect()
    if placement.device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return adapter


def release_freed_memory() -> None:
    """Hand the memory that loading and data preparation freed back to the operating system before the training
    loop, or the resident size carries it through the whole run: Arrow's pool (datasets) and glibc's arenas keep
    freed blocks (measured on the training benchmark: about 20 MB of 540). glibc's own malloc_trim, through
    ctypes: no library exposes it; elsewhere it is skipped."""
    import pyarrow

    gc.collect()
    pyarrow.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _train(cfg: Settings, layout: Layout, tok_info, prepared, placement: Placement) -> Path:
    from trl import SFTTrainer

    from tuneserve.model import get_peft_config, load_model

    _init_process_group(placement)
    resume = _resume_point(cfg, layout)
    # The training arguments first: with FSDP they tell from_pretrained to load on rank 0 only.
    plan, args = batch_and_args(cfg, layout, placement, prepared, launch.world_size())
    model = load_model(cfg, tok_info, placement)
    args.gradient_checkpointing = batching.checkpointing(
        cfg, model, args.per_device_train_batch_size, placement.device, placement.dtype.itemsize
    )
    if args.padding_free and cfg.distributed_strategy != "fsdp":  # FSDP: the weights are not in place until wrapped
        batching.check_packing(model, tok_info.tokenizer.pad_token_id)
    quantization = describe_quantization(model)
    keep_training_kernels(model)
    peft_config = get_peft_config(cfg, tok_info.added_token_ids, model)
    # Collator copies in data loader worker processes would keep their ledgers to themselves.
    recorder = (
        RowRecorder(prepared.train["input_ids"], args.gradient_accumulation_steps)
        if args.dataloader_num_workers == 0
        else None
    )
    callback = _callbacks(recorder)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tok_info.tokenizer,
        peft_config=peft_config,
        callbacks=[callback, trainlog.progress_callback(layout.metrics)],
    )
    trainlog.quiet_console(trainer)
    if recorder:
        recorder.collator, trainer.data_collator = trainer.data_collator, recorder
    evaluate_aside(trainer, recorder)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    step = json.loads((resume / "trainer_state.json").read_text()).get("global_step") if resume else 0
    if resume is not None:
        log.info("resuming from %s (step %s)", resume, step)
    else:
        log.info("starting training from scratch (no complete checkpoint in %s)", layout.checkpoints)
    if recorder:
        recorder.resume(resume, step)
    release_freed_memory()
    try:
        with signals.deferred():
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception:
        if launch.is_main():  # a checkpoint cut short (a full disk, say) is removed now, not on the rerun
            checkpoints.newest_complete(layout.checkpoints)
        raise
    if callback.stopped_by_signal:  # the same answer in every process (the callback all-reduces it)
        raise Terminated(
            f"stopped by SIGTERM at step {trainer.state.global_step}; checkpoint saved in "
            f"{layout.checkpoints}. Rerun with the same OUTPUT_DIR to resume."
        )
    processes = _per_process_report(trainer, recorder, sharded=cfg.distributed_strategy == "fsdp")
    per_process = len(trainer.get_train_dataloader())  # micro-batches one process takes per epoch
    steps_per_epoch = -(-per_process // args.gradient_accumulation_steps)
    ledger = None
    if recorder:
        ledger = epoch_check([p["ledger"] for p in processes], recorder.rows, [per_process] * len(processes))
        log.info(
            "ledger: %d epoch(s) over %s segment(s) per process; every row once per epoch: %s%s",
            ledger.get("epochs", 0),
            ledger.get("segments"),
            ledger["verified"],
            f" (and {n} repeat(s) that complete the processes' last micro-batches)"
            if (n := ledger.get("padding_repeats"))
            else "",
        )
    tmp = scratch(layout.adapter)
    if launch.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    try:
        trainer.save_model(str(tmp))  # every process takes part (FSDP gathers the shards); rank 0 writes
    except Exception:
        if launch.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if launch.is_main():
        _install_adapter(
            tmp,
            layout,
            meta={
                "base_model": cfg.base_model,
                "base_model_revision": cfg.base_model_revision,
                "end_of_turn": tok_info.end_of_turn,
                "tool_call_samples": prepared.tool_call_samples,
                "added_tokens": tok_info.added_tokens,
                "template_source": tok_info.template_source,
                "dtype": placement.dtype_name,
                "load_in_4bit": cfg.load_in_4bit,
                "global_step": trainer.state.global_step,
                # What MERGE_BASE=dequantized replays: which weights were 4-bit and how they were quantized.
                "quantization": quantization,
            },
            report={
                "metrics": dict(result.metrics),
                "global_step": trainer.state.global_step,
                "data": prepared.stats,
                "log_history": trainer.state.log_history,
                "resumed_from": str(resume) if resume else None,
                "batch": {
                    "batch_size": plan.batch,
                    "per_device_train_batch_size": plan.micro,
                    "gradient_accumulation_steps": plan.accum,
                    "processes": plan.world,
                    "padding_free": plan.padding_free,
                    "why": plan.why,
                    "layout": plan.layout,
                    "steps_per_epoch": steps_per_epoch,
                },
                "processes": processes,
                "ledger_check": ledger,
            },
        )
    if signals.requested():  # SIGTERM after the last step: nothing lost, the adapter is complete
        raise Terminated(
            f"stopped by SIGTERM after training finished; the adapter is in {layout.adapter}. "
            "Rerun with the same OUTPUT_DIR to merge, verify and publish."
        )
    return layout.adapter


def _install_adapter(tmp: Path, layout: Layout, meta: dict, report: dict) -> None:
    """Rank 0: the saved adapter gets its metadata and replaces OUTPUT_DIR/adapter in one rename."""
    (tmp / "README.md").unlink(missing_ok=True)  # TRL's generic card; the real one comes with publishing
    write_json_atomic(tmp / TRAINING_META, meta)
    readable_as_umask_allows(tmp)
    replace_folder(tmp, layout.adapter)
    write_json_atomic(layout.train_report, report)
    log.info("training done at step %d; adapter in %s", report["global_step"], layout.adapter)
