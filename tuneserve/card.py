"""The model card (README.md) written into the merged folder and published with it: what was trained on
what, the resolved configuration without secrets, the training, verification and evaluation figures, and
the exact commands that serve the model."""

from __future__ import annotations

import json
from typing import Any

from tuneserve.refs import hub_id

SERVE_IMAGE = "tuneserve-serve"


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    return "\n".join(lines)


def render(
    config: dict[str, Any],
    train_report: dict[str, Any] | None,
    verify: dict[str, Any] | None,
    evaluation: dict[str, Any] | None,
    merge_info: dict[str, Any],
    model_ref: str,
) -> str:
    """`config` must already be masked (Settings.masked())."""
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
        f"merged into the base ({merge_info.get('merge_base')} weights) by tuneserve.",
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
                    ("SQL executes", evaluation.get("sql_executes")),
                    ("SQL execution match", evaluation.get("sql_execution_match")),
                ]
            ),
            "",
        ]
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


def render_adapter(base_model: str, repo: str, merged_repo: str | None) -> str:
    """The adapter's card (PUSH_ADAPTER): what it adapts, and the merged model published beside it."""
    front = (
        ["---", "library_name: peft"]
        + ([f"base_model: {base_model}"] if hub_id(base_model) else [])
        + ["tags: [tuneserve, lora]", "---"]
    )
    merged = f"; the merged model is `{merged_repo}`." if merged_repo else "."
    return "\n".join(front + [f"# {repo}", "", f"LoRA adapter for `{base_model}` trained by tuneserve{merged}"]) + "\n"
