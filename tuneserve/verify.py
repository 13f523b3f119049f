"""Stage: verify the merged folder before anything is published.

The merged folder is loaded the way a user loads it (AutoTokenizer + the model class its config names,
its own generation_config), and for a few held-out prompts rendered with its chat template:
- the logits are finite;
- greedy generation ends with one of generation_config's stop ids before VERIFY_MAX_NEW_TOKENS (chat and
  prompt/completion data; a plain-text model has no end to reach);
- the next-token distributions of the merged model and of the adapter model (the base loaded as in
  training, 4-bit when it was, plus the adapter) agree: the largest difference of any token's probability
  is at most VERIFY_MAX_PROB_DIFF.

A merged model larger than one device is loaded as accelerate loads big models (memory.load_kwargs): over the
node's GPUs, then host memory, then read from its own files layer by layer; the same logits, more slowly.

The tolerance's default depends on what was merged. MERGE_BASE=dequantized (or plain LoRA) computes
with the weights the adapter model computes with, so only bfloat16 rounding separates them: 0.05.
MERGE_BASE=original adds the adapter to the 16-bit weights the 4-bit ones approximate, so the NF4
quantization error (about 5-10% of each weight's magnitude) separates them as well: 0.25.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneserve.data import Example, ids_of, read_jsonl
from tuneserve.exitcodes import VerifyError
from tuneserve.layout import EVAL_ROWS, MERGE_BASES, OFFLOAD, TRAIN_ROWS, TRAINING_META
from tuneserve.memory import input_device, load_kwargs, release
from tuneserve.tokenizer import eos_ids, render

log = logging.getLogger(__name__)

TOLERANCE_SAME_WEIGHTS = 0.05
TOLERANCE_ORIGINAL_OVER_NF4 = 0.25


@dataclass
class Prompt:
    row: int
    messages: list[dict] | None  # chat prompt (without the answer)
    text: str | None  # plain prompt
    reference: str
    tools: list[dict] | None = None  # the function schemas the chat prompt offers
    tool_calls: list[dict] | None = None  # the reference turn's calls ({"name", "arguments"}), scored structurally

    def encode(self, tok) -> list[int]:
        if self.messages is not None:  # as serving encodes a chat request (data.ids_of)
            return ids_of(tok, render(tok, self.messages, add_generation_prompt=True, tools=self.tools))
        return tok(self.text)["input_ids"]


def to_prompt(ex: Example) -> Prompt:
    if ex.kind == "chat":
        turns = ex.trained_turns or [i for i, m in enumerate(ex.messages) if m["role"] == "assistant"]
        last = turns[-1] if turns else len(ex.messages) - 1
        calls = ex.messages[last].get("tool_calls")
        reference_calls = [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls or []
        ]
        return Prompt(ex.row, ex.messages[:last], None, ex.messages[last]["content"], ex.tools, reference_calls or None)
    if ex.kind == "pc":
        return Prompt(ex.row, None, ex.prompt, ex.completion)
    half = len(ex.text) // 2
    return Prompt(ex.row, None, ex.text[:half], ex.text[half:])


def held_out_examples(data_dir: Path) -> tuple[list[Example], str]:
    for name in (EVAL_ROWS, TRAIN_ROWS):
        if (data_dir / name).is_file():
            return read_jsonl(data_dir / name), name.split(".")[0]
    raise VerifyError(f"no prepared rows in {data_dir}: cannot pick prompts to verify with")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_merged(folder: Path):
    """The merged model as a user loads it; on one device when it fits there, else spread over the node's GPUs,
    host memory and the folder's own files (memory.load_kwargs): verify and evaluate fit where training fit."""
    from transformers import AutoTokenizer
    from trl.trainer.utils import create_model_from_path

    tok = AutoTokenizer.from_pretrained(folder)
    placement, where = load_kwargs(folder, device(), offload_folder=offload_folder(folder))
    log.info("loading %s %s", folder.name, where)
    model = create_model_from_path(str(folder), dtype="auto", **placement)
    return tok, model.eval()


def offload_folder(folder: Path) -> Path:
    """Where accelerate writes the weights it offloads and cannot read from the checkpoint itself (none for a
    safetensors checkpoint loaded as is); the pipeline removes it after verify and evaluate."""
    return folder.parent / OFFLOAD


def load_adapter_model(base_model: str, revision: str | None, adapter_dir: Path, meta: dict):
    """The model as training computed it: base (4-bit when trained so) + adapter."""
    import torch
    from transformers import BitsAndBytesConfig

    from tuneserve.model import attach_adapter, load_base

    dtype = getattr(torch, meta.get("dtype", "bfloat16"))
    kwargs: dict[str, Any] = dict(dtype=dtype, device_map={"": device()})
    quant = meta.get("quantization")
    if meta.get("load_in_4bit") and quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant["quant_type"],
            bnb_4bit_use_double_quant=quant["double_quant"],
            bnb_4bit_compute_dtype=dtype,
        )
    return attach_adapter(load_base(base_model, revision, **kwargs), adapter_dir).eval()


def next_token_logits(model, prompts_ids: list[list[int]]):
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts_ids:
            t = torch.tensor([ids], device=input_device(model))
            out.append(model(input_ids=t).logits[0, -1].float().cpu())
    return torch.stack(out)


def stop_ids(model) -> list[int]:
    return eos_ids(model.generation_config.eos_token_id)


def generate(model, tok, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        t = torch.tensor([ids], device=input_device(model))
        out = model.generate(
            input_ids=t,
            attention_mask=torch.ones_like(t),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


def compare(a, b) -> dict[str, float]:
    pa, pb = a.softmax(-1), b.softmax(-1)
    return {
        "max_prob_diff": round(float((pa - pb).abs().max()), 6),
        "max_logit_diff": round(float((a - b).abs().max()), 6),
        "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
    }


def verify(
    merged: Path,
    adapter_dir: Path,
    data_dir: Path,
    *,
    base_model: str,
    revision: str | None,
    merge_base: str,
    samples: int,
    max_new_tokens: int,
    tolerance: float | None,
    alternative: Path | None = None,
) -> dict[str, Any]:
    """Run the checks on `merged` and return the report (`passed`, each check, the samples); it raises nothing
    when a check fails: `failures(report)` says what failed, and the pipeline writes the report and exits 4.
    `alternative`, a folder merged on the other merge base, is measured against the adapter model too."""
    import torch

    meta = json.loads((adapter_dir / TRAINING_META).read_text())
    examples, split = held_out_examples(data_dir)
    prompts = [to_prompt(ex) for ex in examples[:samples]]
    if tolerance is None:
        same = merge_base == "dequantized" or not meta.get("load_in_4bit")
        tolerance = TOLERANCE_SAME_WEIGHTS if same else TOLERANCE_ORIGINAL_OVER_NF4
    needs_stop = examples[0].kind in ("chat", "pc")

    tok, model = load_merged(merged)
    ids = [p.encode(tok) for p in prompts]
    merged_logits = next_token_logits(model, ids)
    finite = bool(torch.isfinite(merged_logits).all())
    stops = stop_ids(model)
    sample_reports = []
    for p, pids in zip(prompts, ids):
        gen = generate(model, tok, pids, max_new_tokens) if finite else []
        stopped = bool(gen) and gen[-1] in stops
        sample_reports.append(
            {
                "row": p.row,
                "prompt": p.messages if p.messages is not None else p.text,
                "reference": p.reference,
                "generation": tok.decode(gen, skip_special_tokens=True),
                "generated_tokens": len(gen),
                "stopped": stopped,
            }
        )
    del model
    release()

    fidelity: dict[str, Any] = {}
    adapter_model = load_adapter_model(base_model, revision, adapter_dir, meta)
    adapter_logits = next_token_logits(adapter_model, ids)
    del adapter_model
    release()
    fidelity[merge_base] = compare(merged_logits, adapter_logits) if finite else {"max_prob_diff": float("nan")}
    if alternative is not None:
        _, alt_model = load_merged(alternative)
        other = next(b for b in MERGE_BASES if b != merge_base)
        fidelity[other] = compare(next_token_logits(alt_model, ids), adapter_logits)
        del alt_model
        release()

    diff = fidelity[merge_base]["max_prob_diff"]
    checks = {
        "finite_logits": {"passed": finite},
        "stops": {
            "passed": (not needs_stop) or all(s["stopped"] for s in sample_reports),
            "required": needs_stop,
            "stop_token_ids": stops,
            "max_new_tokens": max_new_tokens,
            "stopped": sum(s["stopped"] for s in sample_reports),
            "of": len(sample_reports),
        },
        "fidelity": {
            "passed": finite and diff <= tolerance,
            "max_prob_diff": diff,
            "tolerance": tolerance,
            "merge_base": merge_base,
        },
    }
    report = {
        "passed": all(c["passed"] for c in checks.values()),
        "checks": checks,
        "fidelity": fidelity,
        "prompts_from": split,
        "samples": sample_reports,
    }
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """What failed in a report of `verify`, one sentence each (empty when it passed)."""
    out = []
    c = report["checks"]
    if not c["finite_logits"]["passed"]:
        out.append("the merged model's logits are not finite (NaN/inf weights: a broken adapter or overflow)")
    if not c["stops"]["passed"]:
        out.append(
            f"{c['stops']['of'] - c['stops']['stopped']} of {c['stops']['of']} generations did not end "
            f"with a stop id {c['stops']['stop_token_ids']} within {c['stops']['max_new_tokens']} tokens"
        )
    if not c["fidelity"]["passed"]:
        out.append(
            f"merged and adapter model disagree: max next-token probability difference "
            f"{c['fidelity']['max_prob_diff']} > tolerance {c['fidelity']['tolerance']}"
        )
    return out
