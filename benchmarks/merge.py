"""Benchmark 1, merge: `tuneserve.merge.merge` (streamed, tensor by tensor) vs PEFT's `merge_and_unload` +
`save_pretrained`, as Google's Gemma QLoRA guide merges.

    .venv-train/bin/python -m benchmarks.merge [--smoke]

The base is built here from Gemma 3 1B's published shapes (random bfloat16 weights, saved in several
shards), with a LoRA adapter of the guide's rank on every linear layer (r=16, alpha=16) whose B matrices
are random, so the merge changes every adapted weight. Each merge runs in its own fresh process, which
measures its peak resident memory (VmHWM) and wall time; both processes import the same libraries first.
The two merged folders are then compared tensor by tensor (max |difference| and bfloat16 ulps) and by the
logits they give on a few prompts.

Targets: peak memory at most 0.3x PEFT's, time at most 1.0x, outputs equal within bf16 rounding
(at most one bfloat16 ulp on any weight).

The guide's merge code, for transformers 4.x (`torch_dtype` unset means float32 there):
    model = AutoModelForCausalLM.from_pretrained(model_id, low_cpu_mem_usage=True)
    peft_model = PeftModel.from_pretrained(model, args.output_dir)
    merged_model = peft_model.merge_and_unload()
    merged_model.save_pretrained("merged_model", safe_serialization=True, max_shard_size="2GB")
    processor = AutoTokenizer.from_pretrained(args.output_dir); processor.save_pretrained("merged_model")
With the pinned transformers 5 the same call loads the checkpoint's bfloat16 (dtype "auto" is the default)
and `safe_serialization` is gone; that is the peer measured against. The float32 reload the guide does on
transformers 4.x (its "over 30 GB of CPU memory") is measured too, for information.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from benchmarks import common

TITLE = "Merge: streamed merge vs PEFT merge_and_unload + save_pretrained"

# google/gemma-3-1b-pt config.json (Gemma3ForCausalLM): 1.0 B parameters, tied embeddings.
GEMMA3_1B = dict(
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    vocab_size=262144,
    max_position_embeddings=32768,
    sliding_window=512,
    query_pre_attn_scalar=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    vocab_size=4096,
    max_position_embeddings=1024,
    sliding_window=64,
    query_pre_attn_scalar=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
LORA = dict(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
ULP_TOLERANCE = 1  # "equal within bf16 rounding": both round the same float32 sum, at most one ulp apart


# ------------------------------------------------------------------------------------------- inputs
def build_inputs(work: Path, shapes: dict, shard_size: str) -> tuple[Path, Path, dict]:
    """The base (random weights, sharded) and a random-B LoRA adapter, reused while the shapes are the same."""
    key = hashlib.sha256(json.dumps([shapes, shard_size, LORA], sort_keys=True).encode()).hexdigest()[:12]
    base, adapter, info_file = work / "base", work / "adapter", work / "inputs.json"
    if info_file.is_file() and json.loads(info_file.read_text()).get("key") == key:
        return base, adapter, json.loads(info_file.read_text())
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    info = common.run_child(
        "benchmarks.merge",
        {"kind": "build", "base": str(base), "adapter": str(adapter), "shapes": shapes, "shard_size": shard_size},
        log=work / "logs" / "build.log",
    )
    info["key"] = key
    info_file.write_text(json.dumps(info, indent=2))
    return base, adapter, info


def _build(spec: dict) -> dict:
    import torch
    from transformers import Gemma3ForCausalLM
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

    from devtools import textsql
    from devtools.tiny import build_tokenizer, save_random_adapter

    base, adapter = Path(spec["base"]), Path(spec["adapter"])
    tok = build_tokenizer(textsql.corpus(), template="gemma", vocab_size=1500)
    config = Gemma3TextConfig(
        **spec["shapes"],
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base, max_shard_size=spec["shard_size"])
    tok.save_pretrained(base)
    peft_model = save_random_adapter(model, tok, adapter, "<end_of_turn>", {"base_model": str(base)}, **LORA)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return {
        "parameters": params,
        "lora_parameters": lora_params,
        "largest_tensor_bytes": largest,
        "base_bytes": common.dir_size(base),
        "shards": len(list(base.glob("*.safetensors"))),
        "build_seconds": round(time.perf_counter() - start, 1),
    }


# ------------------------------------------------------------------------------------------- the merges
def _merge(spec: dict) -> dict:
    """One merge in this (fresh) process: peak RSS over the whole process and wall time of the merge."""
    import gc

    import peft  # noqa: F401 - both sides start from the same imports, so the baselines match
    import torch
    import transformers  # noqa: F401

    gc.collect()
    baseline = common.status_bytes("VmRSS")
    base, adapter, out = spec["base"], Path(spec["adapter"]), Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if spec["method"] == "ours":
        from tuneserve.merge import merge

        merge(base, None, adapter, out)
    else:  # the guide's code (see the module docstring); "peft-fp32" is its transformers 4.x float32 reload
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"dtype": torch.float32} if spec["method"] == "peft-fp32" else {}
        model = AutoModelForCausalLM.from_pretrained(base, low_cpu_mem_usage=True, **kwargs)
        peft_model = PeftModel.from_pretrained(model, str(adapter))
        merged_model = peft_model.merge_and_unload()
        merged_model.save_pretrained(out, max_shard_size="2GB")
        processor = AutoTokenizer.from_pretrained(adapter)
        processor.save_pretrained(out)
    seconds = time.perf_counter() - start
    return {
        "method": spec["method"],
        "seconds": round(seconds, 2),
        "peak_rss_bytes": common.status_bytes("VmHWM"),
        "baseline_rss_bytes": baseline,
        "output_bytes": common.dir_size(out),
    }


# ------------------------------------------------------------------------------------------- comparison
def _tensors(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: f for k in s.keys()})
    return out


def _ulps(a, b):
    """Distance in bfloat16 ulps (steps of the ordered bit patterns; exact for values of the same sign)."""
    import torch

    def ordered(x):
        i = x.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a) - ordered(b)).abs()


def _compare(spec: dict) -> dict:
    import torch
    from safetensors import safe_open

    ours, peft_dir, base = Path(spec["ours"]), Path(spec["peft"]), Path(spec["base"])
    a, b, c = _tensors(ours), _tensors(peft_dir), _tensors(base)
    common_names = sorted(set(a) & set(b))
    max_abs = max_ulp = differing = elements = changed_vs_base = 0
    for name in common_names:
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.shape != y.shape or x.dtype != y.dtype:
            raise SystemExit(f"{name}: {x.dtype} {tuple(x.shape)} (ours) vs {y.dtype} {tuple(y.shape)} (PEFT)")
        elements += x.numel()
        if name in c:
            with safe_open(str(c[name]), "pt") as fc:
                changed_vs_base += int(not torch.equal(fc.get_tensor(name), x))
        if torch.equal(x, y):
            continue
        diff = (x.float() - y.float()).abs()
        max_abs = max(max_abs, diff.max().item())
        if x.dtype == torch.bfloat16:
            max_ulp = max(max_ulp, _ulps(x, y).max().item())
        differing += int((diff > 0).sum())
        del x, y, diff
    # Logits of both merged models on the same prompts (random token ids of the tokenizer's range).
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    prompts = torch.randint(4, 800, (spec.get("prompts", 3), spec.get("prompt_len", 16)))
    logits = []
    for folder in (ours, peft_dir):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        with torch.no_grad():
            logits.append(model(prompts).logits.float())
        del model
    return {
        "tensors_compared": len(common_names),
        "only_in_ours": sorted(set(a) - set(b)),
        "only_in_peft": sorted(set(b) - set(a)),
        "max_abs_weight_diff": max_abs,
        "max_weight_ulps": max_ulp,
        "differing_elements": differing,
        "elements": elements,
        "tensors_changed_vs_base": changed_vs_base,
        "max_abs_logit_diff": (logits[0] - logits[1]).abs().max().item(),
        "logit_scale": logits[1].abs().max().item(),
    }


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("merge", __doc__, argv)
    if common.answered_as_child(args, {"build": _build, "merge": _merge, "compare": _compare}):
        return 0
    started = time.monotonic()
    work = args.work_dir
    shapes, shard_size = (TINY, "200KB") if args.smoke else (GEMMA3_1B, "1GB")
    print(
        f"merge: building the base ({'tiny' if args.smoke else 'Gemma 3 1B shapes'}) and adapter in {work}", flush=True
    )
    base, adapter, info = build_inputs(work, shapes, shard_size)
    methods = ["ours", "peft"] + ([] if args.smoke else ["peft-fp32"])
    runs = {}
    for method in methods:
        print(f"merge: {method} ...", flush=True)
        runs[method] = common.run_child(
            "benchmarks.merge",
            {
                "kind": "merge",
                "method": method,
                "base": str(base),
                "adapter": str(adapter),
                "out": str(work / f"merged-{method}"),
            },
            log=work / "logs" / f"{method}.log",
        )
    print("merge: comparing the merged folders ...", flush=True)
    cmp = common.run_child(
        "benchmarks.merge",
        {"kind": "compare", "ours": str(work / "merged-ours"), "peft": str(work / "merged-peft"), "base": str(base)},
        log=work / "logs" / "compare.log",
    )
    for method in methods:
        if method != "peft":  # the scratch outputs are large; keep only what a rerun compares
            shutil.rmtree(work / f"merged-{method}", ignore_errors=True)
    shutil.rmtree(work / "merged-peft", ignore_errors=True)

    ours, peft = runs["ours"], runs["peft"]
    labels = {
        "ours": "tuneserve.merge (streamed)",
        "peft": "guide: PEFT merge_and_unload + save_pretrained (bf16)",
        "peft-fp32": "guide on transformers 4.x: float32 reload (information)",
    }
    rows = [
        {
            "variant": labels[m],
            "method": m,
            "seconds": r["seconds"],
            "peak_rss_gib": round(r["peak_rss_bytes"] / 2**30, 3),
            "growth_gib": round((r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / 2**30, 3),
            "baseline_rss_gib": round(r["baseline_rss_bytes"] / 2**30, 3),
            "output_gib": round(r["output_bytes"] / 2**30, 3),
        }
        for m, r in runs.items()
    ]
    growth = lambda r: r["peak_rss_bytes"] - r["baseline_rss_bytes"]  # noqa: E731
    figures = [
        common.figure(
            "peak_rss_ratio",
            "peak RSS, ours / PEFT",
            round(ours["peak_rss_bytes"] / peft["peak_rss_bytes"], 3),
            "x",
            at_most=0.3,
        ),
        common.figure(
            "time_ratio", "wall time, ours / PEFT", round(ours["seconds"] / peft["seconds"], 3), "x", at_most=1.0
        ),
        common.figure(
            "max_weight_ulps",
            "largest weight difference, ours vs PEFT",
            cmp["max_weight_ulps"],
            "bf16 ulp",
            at_most=ULP_TOLERANCE,
        ),
        common.figure(
            "max_abs_weight_diff", "largest |weight difference|, ours vs PEFT", cmp["max_abs_weight_diff"], ""
        ),
        common.figure(
            "max_abs_logit_diff",
            "largest |logit difference| on 3 prompts, ours vs PEFT",
            round(cmp["max_abs_logit_diff"], 6),
            "",
            note=f"largest |logit| {cmp['logit_scale']:.3g}",
        ),
        common.figure(
            "growth_ratio",
            "peak RSS above the post-import baseline, ours / PEFT",
            round(growth(ours) / max(growth(peft), 1), 3),
            "x",
        ),
    ]
    setup = {
        "architecture": "Gemma3ForCausalLM" + (" (tiny)" if args.smoke else " (google/gemma-3-1b-pt shapes)"),
        "shapes": shapes,
        "dtype": "bfloat16",
        "parameters": info["parameters"],
        "shards": info["shards"],
        "base_gib": round(info["base_bytes"] / 2**30, 3),
        "largest_tensor_mib": round(info["largest_tensor_bytes"] / 2**20, 1),
        "adapter": {**LORA, "init_lora_weights": False, "parameters": info["lora_parameters"]},
        "comparison": {
            k: cmp[k]
            for k in (
                "tensors_compared",
                "only_in_ours",
                "only_in_peft",
                "differing_elements",
                "elements",
                "tensors_changed_vs_base",
            )
        },
        "runs": "one merge per method, each in a fresh process, one after the other",
    }
    notes = [
        "Peak RSS is the process's VmHWM, imports included (both processes import torch, transformers "
        "and peft before the clock starts); the growth figure subtracts the RSS measured after the imports.",
        "PEFT's save_pretrained drops lm_head.weight of a tied-embedding model; ours keeps the base "
        "checkpoint's layout, so tensors are compared on the names both folders hold.",
    ]
    common.write_result(args, title=TITLE, started=started, setup=setup, rows=rows, figures=figures, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
