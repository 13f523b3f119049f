"""The model card (README.md) written into the merged folder and published with it: what was trained on
what, the resolved configuration without secrets, the training, verification and evaluation figures, and
the exact commands that serve the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneserve import trainlog
from tuneserve.layout import MERGE_INFO, QUANTIZE_INFO, read_json
from tuneserve.refs import hub_id

SERVE_IMAGE = "tuneserve-serve"
CURVES_LINE = f"![Training and evaluation loss against the optimizer step]({trainlog.CURVES_PNG})"


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    return "\n".join(lines)


def write(layout, folder: Path, model_ref: str) -> None:
    """The card of `folder` (OUTPUT_DIR/merged or /quantized) from what the run recorded under OUTPUT_DIR,
    naming where the model will be served from. Unchanged files are not rewritten."""

    verify = read_json(layout.verify_report) or {}
    curves = trainlog.write_curves(layout, folder)
    text = render(
        read_json(layout.config) or {},
        read_json(layout.train_report),
        verify,
        verify.get("eval"),
        read_json(layout.merged / MERGE_INFO) or {},
        model_ref,
        engine=read_json(layout.engine_eval_report),
        quantized=read_json(folder / QUANTIZE_INFO),
        curves=curves,
    )
    path = folder / "README.md"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def render(
    config: dict[str, Any],
    train_report: dict[str, Any] | None,
    verify: dict[str, Any] | None,
    evaluation: dict[str, Any] | None,
    merge_info: dict[str, Any],
    model_ref: str,
    *,
    engine: dict[str, Any] | None = None,
    quantized: dict[str, Any] | None = None,
    curves: bool = False,
) -> str:
    """`config` must already be masked (Settings.masked()). `engine`: the engine evaluation's report;
    `quantized`: the quantization record, for the card of the quantized folder; `curves`: the folder holds the
    loss curves' PNG (trainlog.CURVES_PNG)."""
    base = config.get("BASE_MODEL")
    dataset = config.get("DATASET")
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [tuneserve, qlora, sft]"]
    if hub_id(base):
        front.append(f"base_model: {base}")
    if hub_id(dataset):
        front.append(f"datasets: [{dataset}]")
    front.append("---")
    metrics = (train_report or {}).get("metrics", {})
    data = (train_report or {}).get("data", {})
    lines = front + [
        f"# {model_ref}",
        "",
        f"{'QLoRA' if config.get('LOAD_IN_4BIT') else 'LoRA'} supervised fine-tune of `{base}` on `{dataset}`, "
        f"merged into the base ({merge_info.get('merge_base')} weights) by tuneserve"
        + (
            f", then quantized to {quantized['scheme']} ({quantized['preset']}, compressed-tensors "
            f"{quantized['format']}: {quantized['source_bytes'] / 1e6:.1f} MB -> {quantized['bytes'] / 1e6:.1f} MB)."
            if quantized
            else "."
        ),
        "",
        "## Serve it",
        "",
        "```bash",
        f"docker run --gpus all -p 8000:8000 -e MODEL_ID={model_ref} -e HF_TOKEN {SERVE_IMAGE}",
        f"vllm serve {model_ref}",
        "```",
        "",
        f"Generation stops at token ids {merge_info.get('stop_token_ids')} (the assistant end-of-turn token "
        f"`{merge_info.get('end_of_turn')}` included); the chat template is in `tokenizer_config.json` and "
        "`chat_template.jinja`.",
        "",
        "## Training",
        "",
        _table(
            [
                ("train rows", data.get("train_rows")),
                ("tokens trained on", data.get("trained_tokens")),
                ("steps", (train_report or {}).get("global_step")),
                ("train loss", metrics.get("train_loss")),
                ("runtime (s)", metrics.get("train_runtime")),
            ]
        ),
        "",
    ]
    if curves:
        lines += [CURVES_LINE, ""]
    if verify:
        fid = verify.get("fidelity", {})
        lines += [
            "## Verification",
            "",
            f"Passed: **{verify.get('passed')}**.",
            "",
            _table(
                [
                    (
                        f"max next-token probability difference vs the adapter model ({k} weights)",
                        v.get("max_prob_diff"),
                    )
                    for k, v in fid.items()
                ]
                + [
                    (
                        "generations ending with a stop id",
                        f"{verify['checks']['stops']['stopped']}/{verify['checks']['stops']['of']}",
                    )
                ]
            ),
            "",
        ]
    if evaluation:
        lines += [
            "## Evaluation (held-out rows)",
            "",
            _table(
                [
                    ("rows", evaluation.get("rows")),
                    ("eval loss", evaluation.get("eval_loss")),
                    ("exact match", evaluation.get("exact_match")),
                    ("stop rate", evaluation.get("stop_rate")),
                    ("SQL executes", evaluation.get("sql_executes")),
                    ("SQL execution match", evaluation.get("sql_execution_match")),
                ]
            ),
            "",
        ]
    if engine:
        lines += engine_section(engine, evaluation)
    lines += [
        "## Configuration",
        "",
        "Resolved at training time (secrets masked):",
        "",
        "```json",
        json.dumps(config, indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def render_adapter(base_model: str, repo: str, merged_repo: str | None, curves: bool = False) -> str:
    """The adapter's card (PUSH_ADAPTER): what it adapts, the merged model published beside it, and the loss
    curves when the folder holds them."""
    front = (
        ["---", "library_name: peft"]
        + ([f"base_model: {base_model}"] if hub_id(base_model) else [])
        + ["tags: [tuneserve, lora]", "---"]
    )
    merged = f"; the merged model is `{merged_repo}`." if merged_repo else "."
    body = [f"# {repo}", "", f"LoRA adapter for `{base_model}` trained by tuneserve{merged}"]
    return "\n".join(front + body + (["", CURVES_LINE] if curves else [])) + "\n"


def engine_section(engine: dict[str, Any], evaluation: dict[str, Any] | None) -> list[str]:
    """The engine evaluation's table: each model as vLLM serves it, and the evaluate stage's figures."""

    def cell(value: Any) -> str:
        return "" if value is None else str(value)

    models = engine.get("models", {})
    rows = [
        "## Measured in vLLM (held-out rows)",
        "",
        f"{engine.get('rows')} held-out rows answered by vLLM (greedy, the model's chat template) and scored like "
        "the evaluation above.",
        "",
        "| model | exact match | SQL execution match | stop rate | weights (MB) | generated tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        rows.append(
            f"| {name} (vLLM) | {cell(m.get('exact_match'))} | {cell(m.get('sql_execution_match'))} | "
            f"{cell(m.get('stop_rate'))} | {m['weights_bytes'] / 1e6:.1f} | {cell(m.get('tokens_per_second'))} |"
        )
    if evaluation:
        rows.append(
            f"| merged (transformers, evaluate stage) | {cell(evaluation.get('exact_match'))} | "
            f"{cell(evaluation.get('sql_execution_match'))} | {cell(evaluation.get('stop_rate'))} | | |"
        )
    rows.append("")
    verdict = engine.get("gate")
    if verdict:
        rows += [
            f"Quantized ({verdict.get('scheme')}) against merged, both in vLLM: drops {verdict.get('drops')}, budget "
            f"{verdict.get('budget')} (QUANTIZE_MAX_DROP): **{'passed' if verdict.get('passed') else 'failed'}**.",
            "",
        ]
    differing = (engine.get("parity") or {}).get("differing_rows") or []
    rows += [f"Engine parity: {len(differing)} held-out row(s) answered differently by vLLM than by transformers.", ""]
    return rows
