"""The training image's job, stage by stage: preflight -> train -> merge -> verify + evaluate -> publish.

Reads top to bottom as the list of stages (alignment-handbook's `scripts/sft.py` shape). Each stage
writes under OUTPUT_DIR (layout.py) and a rerun skips what is done: trained -> merge; merged and
verified -> publish only. So a failed publish is retried by rerunning, without retraining or re-merging.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from tuneserve import data, rundir, signals
from tuneserve.exitcodes import ExitCode, VerifyError
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


def publish_targets(cfg: Settings) -> list[str]:
    repos = [cfg.hub_model_id] if cfg.hub_model_id and cfg.merge else []
    if cfg.push_adapter:
        repos.append(adapter_repo(cfg))
    return repos


def adapter_repo(cfg: Settings) -> str:
    return cfg.hub_adapter_model_id or f"{cfg.hub_model_id}-adapter"


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def merged_id(layout: Layout) -> str:
    return hashlib.sha256((layout.merged / "merge_info.json").read_bytes()).hexdigest()[:16]


def run(cfg: Settings, check_only: bool = False) -> int:
    from tuneserve import launch, publish, train

    signals.install()
    use_token(cfg)
    layout = Layout.of(cfg.output_dir)
    repos = publish_targets(cfg)
    # More than one process: this one starts them (one per GPU) and waits; they train and exit.
    starts_group = not check_only and launch.needed(cfg)
    finisher = launch.runs_final_stages(cfg)  # the one process that merges, verifies and publishes

    banner("preflight")
    if repos and finisher:
        publish.preflight(repos, cfg.publish_retries, cfg.publish_backoff_seconds)
    if finisher:  # the one process that owns OUTPUT_DIR's shared files; nothing is written before this
        rundir.claim(cfg, layout, write=not check_only)
    if not check_only and train.adapter_done(layout):
        log.info("training already done: %s holds the adapter; skipping the training stage", layout.adapter)
    elif starts_group:
        code = launch.launch(cfg)
        signals.install()  # the launcher leaves its own SIGTERM handler in place
        if code != ExitCode.OK:
            return code
    else:
        from tuneserve import tokenizer
        from tuneserve.model import resolve_placement

        main = launch.is_main()  # with several processes, rank 0 alone writes the shared files
        placement = resolve_placement(cfg)
        shaped = data.load_and_shape(cfg)
        tok_info = tokenizer.prepare_tokenizer(cfg, needs_template=shaped.is_chat)
        prepared = data.tokenize(cfg, tok_info, shaped, None if check_only or not main else layout.data)
        if check_only:
            log.info("preflight passed: %s", prepared.stats)
            return 0
        if main:
            layout.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(layout.config, cfg.masked())
        mode = "QLoRA" if cfg.load_in_4bit else "LoRA"
        banner(f"train: {mode} SFT on {placement.device} ({placement.dtype_name})")
        train.train(cfg, layout, tok_info, prepared, placement)
    if not finisher:
        who = f"rank {launch.rank()}" if launch.in_worker() else f"node {cfg.node_rank}"
        log.info("%s: nothing else to do here; %s merges, verifies and publishes", who,
                 "the launcher on node 0" if launch.in_worker() else "node 0")
        return 0

    if cfg.merge:
        merge_stage(cfg, layout)
        verify_stage(cfg, layout)
    if repos:
        banner("publish")
        if cfg.hub_model_id and cfg.merge:
            write_card(cfg, layout)
            publish.publish_folder(layout.merged, cfg.hub_model_id, cfg.hub_revision, cfg.hub_private,
                                   f"Fine-tune of {cfg.base_model} (tuneserve)", cfg.publish_retries,
                                   cfg.publish_backoff_seconds, layout.publish_state, "model")
        if cfg.push_adapter:
            write_adapter_card(cfg, layout)
            publish.publish_folder(layout.adapter, adapter_repo(cfg), cfg.hub_revision, cfg.hub_private,
                                   f"LoRA adapter for {cfg.base_model} (tuneserve)", cfg.publish_retries,
                                   cfg.publish_backoff_seconds, layout.publish_state, "adapter")
    banner("done")
    return 0


def merge_stage(cfg: Settings, layout: Layout) -> None:
    from tuneserve import merge

    info = _read(layout.merged / "merge_info.json")
    if merge.merged_done(layout.merged) and info and info.get("merge_base") == cfg.merge_base:
        log.info("merge already done: %s (MERGE_BASE=%s); skipping", layout.merged, cfg.merge_base)
        return
    banner(f"merge: adapter into the {cfg.merge_base} base weights, shard by shard")
    merge.merge(cfg.base_model, cfg.base_model_revision, layout.adapter, layout.merged, cfg.merge_base)


def verify_stage(cfg: Settings, layout: Layout) -> None:
    from tuneserve import evaluate, merge, verify

    previous = _read(layout.verify_report)
    current = merged_id(layout)
    if previous and previous.get("passed") and previous.get("merged_id") == current:
        log.info("verification already passed for this merged folder; skipping")
        return
    banner("verify: load the merged folder, generate, compare with the adapter model")
    alternative = None
    if cfg.verify_compare_merge_bases:
        other = "dequantized" if cfg.merge_base == "original" else "original"
        alternative = layout.root / f".merged-{other}"
        merge.merge(cfg.base_model, cfg.base_model_revision, layout.adapter, alternative, other)
    try:
        report = verify.verify(layout.merged, layout.adapter, layout.data, cfg.base_model, cfg.base_model_revision,
                               cfg.merge_base, cfg.verify_samples, cfg.verify_max_new_tokens,
                               cfg.verify_max_prob_diff, alternative)
    finally:
        if alternative is not None:
            shutil.rmtree(alternative, ignore_errors=True)
    report["merged_id"] = current
    problems = verify.failures(report)
    if problems:
        write_json_atomic(layout.verify_report, report)
        raise VerifyError("verification failed, nothing will be published:\n  - " + "\n  - ".join(problems) +
                          f"\nDetails: {layout.verify_report}")
    log.info("verification passed: %s", {k: v for k, v in report["checks"]["fidelity"].items()})
    banner("evaluate: held-out rows on the merged model")
    evaluation = evaluate.evaluate(layout.merged, layout.data, cfg.eval_max_samples, cfg.eval_max_new_tokens,
                                   cfg.eval_sql_execution, cfg.eval_sql_context_field)
    if evaluation is not None:
        write_json_atomic(layout.eval_report, evaluation)
        report["eval"] = {k: v for k, v in evaluation.items() if k != "answers"}
    write_json_atomic(layout.verify_report, report)
    write_card(cfg, layout)


def write_card(cfg: Settings, layout: Layout) -> None:
    """The model card in the merged folder, naming where the model will be served from."""
    from tuneserve import card

    report = _read(layout.verify_report) or {}
    config = _read(layout.config) or cfg.masked()  # the configuration training ran with
    model_ref = cfg.hub_model_id or str(layout.merged)
    text = card.render(config, _read(layout.train_report), report, report.get("eval"),
                       _read(layout.merged / "merge_info.json") or {}, model_ref)
    path = layout.merged / "README.md"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def write_adapter_card(cfg: Settings, layout: Layout) -> None:
    base = cfg.base_model
    text = (f"---\nlibrary_name: peft\nbase_model: {base}\ntags: [tuneserve, lora]\n---\n# {adapter_repo(cfg)}\n\n"
            f"LoRA adapter for `{base}` trained by tuneserve"
            + (f"; the merged model is `{cfg.hub_model_id}`." if cfg.hub_model_id and cfg.merge else ".") + "\n")
    (layout.adapter / "README.md").write_text(text)
