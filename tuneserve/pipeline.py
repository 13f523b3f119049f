"""The training image's job, stage by stage: preflight -> train -> merge -> verify + evaluate -> quantize -> publish.

Reads top to bottom as the list of stages (alignment-handbook's `scripts/sft.py` shape). Each stage
writes under OUTPUT_DIR (layout.py) and a rerun skips what is done: trained -> merge; merged and
verified -> publish only. So a failed publish is retried by rerunning, without retraining or re-merging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from tuneserve import data, memory, rundir, signals, trainlog
from tuneserve.config import TRACKER_SECRETS
from tuneserve.exitcodes import ConfigError, ExitCode, VerifyError
from tuneserve.layout import MERGE_BASES, MERGE_INFO, Layout, merged_id, read_json, write_json_atomic
from tuneserve.settings import Settings

log = logging.getLogger(__name__)


# What verify and evaluate are run with: a change reruns them on an unchanged merged folder.
CHECK_SETTINGS = (
    "VERIFY_SAMPLES",
    "VERIFY_MAX_NEW_TOKENS",
    "VERIFY_MAX_PROB_DIFF",
    "VERIFY_COMPARE_MERGE_BASES",
    "EVAL_MAX_SAMPLES",
    "EVAL_MAX_NEW_TOKENS",
    "EVAL_SQL_EXECUTION",
    "EVAL_SQL_CONTEXT_FIELD",
)


def banner(text: str) -> None:
    log.info("==== %s ====", text)


# Secrets the libraries read from the environment; each may come from NAME_FILE (a mounted Kubernetes Secret).
ENV_SECRETS = ("HF_TOKEN", *TRACKER_SECRETS)


def use_token(cfg: Settings) -> None:
    """Hand the *_FILE secrets (the Hub token, tracker credentials) to huggingface_hub and the trackers through
    the process environment (never argv)."""
    for name in ENV_SECRETS:
        value = cfg.secret(name)
        if value and cfg.get(name) is None:
            os.environ[name] = value


def publish_targets(cfg: Settings) -> list[str]:
    repos = [cfg.hub_model_id] if cfg.hub_model_id and cfg.merge else []
    if cfg.push_adapter:
        repos.append(adapter_repo(cfg))
    return repos


def adapter_repo(cfg: Settings) -> str:
    return cfg.hub_adapter_model_id or f"{cfg.hub_model_id}-adapter"


def run(cfg: Settings, check_only: bool = False) -> int:
    from tuneserve import launch
    from tuneserve.model import resolve_placement

    signals.install()
    use_token(cfg)
    layout = Layout.of(cfg.output_dir)
    trainlog.use_trackers(cfg, layout)  # an unknown or missing tracker: exit 2 before anything is loaded
    placement = resolve_placement(cfg)  # the fingerprint records the device class and dtype
    preflight_stage(cfg, layout, placement, write=not check_only)
    if check_only:
        from tuneserve import train

        tok_info, prepared = prepare(cfg, data_dir=None)
        train.check(cfg, layout, tok_info, prepared, placement)
        log.info("preflight passed: %s", prepared.stats)
        return ExitCode.OK
    peaks = memory.Peaks()
    # A launcher's own memory is not training's: its processes each hold their own (their logs say so).
    with contextlib.nullcontext() if launch.needed(cfg) else peaks.measure("train"):
        code = train_stage(cfg, layout, placement)
    memory.release()  # the trained model's memory, for the stages after
    if code != ExitCode.OK:
        return code
    if not launch.runs_final_stages(cfg):  # the one process that merges, verifies and publishes
        who = f"rank {launch.rank()}" if launch.in_worker() else f"node {cfg.node_rank}"
        log.info(
            "%s: nothing else to do here; %s merges, verifies and publishes",
            who,
            "the launcher on node 0" if launch.in_worker() else "node 0",
        )
        return ExitCode.OK
    record_peaks(layout, peaks)
    ledger_gate(layout)
    if cfg.merge:
        for name, stage in (("merge", merge_stage), ("verify", verify_stage), ("quantize", quantize_stage)):
            with peaks.measure(name):
                stage(cfg, layout)
            memory.release()
            record_peaks(layout, peaks)
    publish_stage(cfg, layout)
    banner("done")
    return ExitCode.OK


def preflight_stage(cfg: Settings, layout: Layout, placement, *, write: bool) -> None:
    """Before anything is loaded: the Hub token may write to every target, and OUTPUT_DIR is this run's, locked
    and pinned (both checked by the process that owns OUTPUT_DIR's shared files; nothing is written before this).
    The other processes of a multi-GPU run load the commits the claim pinned (Settings.pin)."""
    from tuneserve import launch, publish

    banner("preflight")
    if not launch.runs_final_stages(cfg):
        rundir.follow(cfg, layout)
        return
    repos = publish_targets(cfg)
    if repos:
        publish.preflight(repos, attempts=cfg.publish_retries, backoff=cfg.publish_backoff_seconds)
    rundir.claim(cfg, layout, placement, write=write)
    plan = memory_plan(cfg, layout, placement)  # after the claim: the config of the commit it pinned
    if write and plan is not None:
        write_json_atomic(layout.memory_report, {**(read_json(layout.memory_report) or {}), "plan": plan.as_dict()})


def memory_plan(cfg: Settings, layout: Layout, placement) -> memory.Plan | None:
    """Each stage still to run against this machine's memory: exit 2 when one cannot fit (MEMORY_CHECK)."""
    from tuneserve import train

    plan = memory.preflight(cfg, placement, train=not train.adapter_done(layout), merge=cfg.merge)
    problems = plan.problems() if plan is not None else []
    if problems and cfg.memory_check:
        fix = (
            "give the run more memory (the pod's memory limit, docker run --memory) or GPUs, choose a smaller "
            "BASE_MODEL, or set MEMORY_CHECK=false to try anyway"
        )
        raise ConfigError([f"{p}: {fix}" for p in problems])
    for problem in problems:
        log.warning("memory plan (MEMORY_CHECK=false): %s", problem)
    return plan


def record_peaks(layout: Layout, peaks: memory.Peaks) -> None:
    """memory.json: the plan preflight made and each stage's measured peak. A stage a rerun skipped (done before)
    keeps the peak of the run that did it."""
    report = read_json(layout.memory_report) or {}
    recorded = report.setdefault("peaks", {})
    for name, peak in peaks.stages.items():
        recorded.setdefault(name, peak)
    write_json_atomic(layout.memory_report, report)


def prepare(cfg: Settings, *, data_dir: Path | None):
    """The dataset shaped and tokenized (written to `data_dir` unless None), the tokenizer: what `--check` checks
    of the data. Returns (tokenizer info, prepared rows)."""
    from tuneserve import tokenizer

    shaped = data.load_and_shape(cfg)
    tok_info = tokenizer.prepare_tokenizer(cfg, needs_template=shaped.is_chat)
    return tok_info, data.tokenize(cfg, tok_info, shaped, data_dir)


def train_stage(cfg: Settings, layout: Layout, placement) -> int:
    """Train in this process, or start one process per GPU and wait for them. Skipped when the adapter exists."""
    from tuneserve import launch, train

    if train.adapter_done(layout):
        log.info("training already done: %s holds the adapter; skipping the training stage", layout.adapter)
        return ExitCode.OK
    if launch.needed(cfg):
        code = launch.launch(cfg)
        signals.install()  # the launcher leaves its own SIGTERM handler in place
        return code
    main = launch.is_main()  # with several processes, rank 0 alone writes the shared files
    tok_info, prepared = prepare(cfg, data_dir=layout.data if main else None)
    if main:
        layout.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(layout.config, cfg.masked())
    banner(f"train: {'QLoRA' if cfg.load_in_4bit else 'LoRA'} SFT on {placement.device} ({placement.dtype_name})")
    train.train(cfg, layout, tok_info, prepared, placement)
    return ExitCode.OK


def ledger_gate(layout: Layout) -> None:
    """Nothing is merged or published from a run whose ledger shows rows trained other than once per epoch (a
    resume that skipped or repeated data): exit 4 with the ledger's report. Checked on every run, reruns too."""
    report = read_json(layout.train_report) or {}
    ledger = report.get("ledger_check") or {}
    if ledger.get("verified") is False:
        raise VerifyError(
            "the training ledger does not show every row trained once per epoch; nothing will be merged or "
            f"published. Ledger check: {json.dumps(ledger)}. Details: {layout.train_report}. Train again: a new "
            "OUTPUT_DIR, or remove adapter/ and checkpoints/ from this one"
        )


def merge_stage(cfg: Settings, layout: Layout) -> None:
    from tuneserve import merge

    info = read_json(layout.merged / MERGE_INFO)
    if merge.merged_done(layout.merged) and info and info.get("merge_base") == cfg.merge_base:
        log.info("merge already done: %s (MERGE_BASE=%s); skipping", layout.merged, cfg.merge_base)
        return
    banner(f"merge: adapter into the {cfg.merge_base} base weights, shard by shard")
    merge.merge(cfg.base_model, cfg.base_model_revision, layout.adapter, layout.merged, merge_base=cfg.merge_base)


def verify_stage(cfg: Settings, layout: Layout) -> None:
    from tuneserve import evaluate, merge, verify

    previous = read_json(layout.verify_report)
    current = merged_id(layout.merged)
    settings = {name: cfg.get(name) for name in CHECK_SETTINGS}
    if previous and previous.get("passed") and previous.get("merged_id") == current:
        before = previous.get("settings") or {}
        changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v]
        if not changed:
            log.info("verification already passed for this merged folder with these settings; skipping")
            return
        log.info("verification passed before with other settings (%s): verifying again", "; ".join(changed))
    banner("verify: load the merged folder, generate, compare with the adapter model")
    alternative = None
    if cfg.verify_compare_merge_bases:
        other = next(b for b in MERGE_BASES if b != cfg.merge_base)
        alternative = layout.merged_with(other)
        merge.merge(cfg.base_model, cfg.base_model_revision, layout.adapter, alternative, merge_base=other)
    try:
        report = verify.verify(
            layout.merged,
            layout.adapter,
            layout.data,
            base_model=cfg.base_model,
            revision=cfg.base_model_revision,
            merge_base=cfg.merge_base,
            samples=cfg.verify_samples,
            max_new_tokens=cfg.verify_max_new_tokens,
            tolerance=cfg.verify_max_prob_diff,
            alternative=alternative,
        )
    finally:
        if alternative is not None:
            shutil.rmtree(alternative, ignore_errors=True)
        shutil.rmtree(verify.offload_folder(layout.merged), ignore_errors=True)
    report["merged_id"] = current
    report["settings"] = settings
    problems = verify.failures(report)
    if problems:
        write_json_atomic(layout.verify_report, report)
        raise VerifyError(
            "verification failed, nothing will be published:\n  - "
            + "\n  - ".join(problems)
            + f"\nDetails: {layout.verify_report}"
        )
    log.info("verification passed: %s", {k: v for k, v in report["checks"]["fidelity"].items()})
    banner("evaluate: held-out rows on the merged model")
    try:
        evaluation = evaluate.evaluate(
            layout.merged,
            layout.data,
            max_samples=cfg.eval_max_samples,
            max_new_tokens=cfg.eval_max_new_tokens,
            sql_execution=cfg.eval_sql_execution,
            sql_context_field=cfg.eval_sql_context_field,
        )
    finally:
        shutil.rmtree(verify.offload_folder(layout.merged), ignore_errors=True)
    if evaluation is not None:
        write_json_atomic(layout.eval_report, evaluation)
        report["eval"] = {k: v for k, v in evaluation.items() if k != "answers"}
    write_json_atomic(layout.verify_report, report)
    write_card(cfg, layout)


def write_card(cfg: Settings, layout: Layout) -> None:
    """The model card in the merged folder, naming where the model will be served from."""
    from tuneserve import card

    card.write(layout, layout.merged, cfg.hub_model_id or str(layout.merged))


def quantize_stage(cfg: Settings, layout: Layout) -> None:
    """QUANTIZE: OUTPUT_DIR/quantized from the verified merged folder. Its gate is the engine evaluation's."""
    from tuneserve import quantize

    if cfg.quantize == "none":
        return
    if quantize.quantized_done(layout.quantized, layout.merged, cfg.quantize):
        log.info("quantization already done: %s (QUANTIZE=%s); skipping", layout.quantized, cfg.quantize)
        return
    banner(f"quantize: the merged model to {cfg.quantize} (compressed-tensors)")
    quantize.quantize(layout.merged, layout.quantized, scheme=cfg.quantize)
    log.info(
        "next: python -m entrypoints.evaluate (serving image, OUTPUT_DIR=%s) measures merged/ and quantized/ in vLLM; "
        "quantized/ is published and served only if it stays within QUANTIZE_MAX_DROP",
        layout.root,
    )


def publish_stage(cfg: Settings, layout: Layout) -> None:
    """The merged folder (with its card) and, with PUSH_ADAPTER, the adapter, each in one commit."""
    from tuneserve import card, publish

    if not publish_targets(cfg):
        return
    banner("publish")
    options = {
        "revision": cfg.hub_revision,
        "private": cfg.hub_private,
        "attempts": cfg.publish_retries,
        "backoff": cfg.publish_backoff_seconds,
        "state_file": layout.publish_state,
    }
    if cfg.hub_model_id and cfg.merge:
        write_card(cfg, layout)
        publish.publish_folder(
            layout.merged,
            cfg.hub_model_id,
            message=f"Fine-tune of {cfg.base_model} (tuneserve)",
            kind="model",
            **options,
        )
    if cfg.push_adapter:
        merged_repo = cfg.hub_model_id if cfg.hub_model_id and cfg.merge else None
        curves = trainlog.write_curves(layout, layout.adapter)
        readme = card.render_adapter(cfg.base_model, adapter_repo(cfg), merged_repo, curves=curves)
        (layout.adapter / "README.md").write_text(readme)
        publish.publish_folder(
            layout.adapter,
            adapter_repo(cfg),
            message=f"LoRA adapter for {cfg.base_model} (tuneserve)",
            kind="adapter",
            **options,
        )
