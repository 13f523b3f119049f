"""Stage: fold the LoRA adapter into the base weights and write a folder vLLM and transformers serve as is.

Memory-bounded: the base checkpoint is processed one safetensors shard at a time and one tensor at a
time within it, so peak memory is about one shard plus the adapter, whatever the model's size.
PEFT's `merge_and_unload` needs the whole model in memory (the Gemma guide asks for 30 GB+ of RAM for
this), which is why the arithmetic is done here by hand; it replicates PEFT's exactly: for a LoRA
target W (checkpoint dtype), W' = cast(float32(W) + (float32(B) @ float32(A)) * scaling), the float32
path PEFT takes when the adapter is loaded onto the base (adapter weights autocast to float32).
modules_to_save replace their tensors; PEFT trainable tokens overwrite their rows; resized vocabularies
are grown. Anything this path does not cover (DoRA, LoRA on embeddings, lora_bias, Conv1D layouts, or
checkpoint names that do not match the adapter's module names) falls back to PEFT's own merge, with a
warning that memory is then not bounded.

MERGE_BASE chooses what the adapter is added to:
- original: the base's own 16-bit weights (default; the best weights available),
- dequantized: the NF4-dequantized weights the adapter was trained against, replaying the 4-bit round
  trip (bitsandbytes quantize_4bit/dequantize_4bit with the training run's settings), so the merged
  model computes what the adapter model computed in training.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneserve.exitcodes import ConfigError
from tuneserve.layout import MERGE_INFO, TRAINING_META, replace_folder, scratch
from tuneserve.tokenizer import stop_ids

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
UNSUPPORTED_KEYS = ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B", "lora_B.bias")


@dataclass
class AdapterParts:
    """An adapter's tensors, keyed by the base checkpoint tensor they change."""

    config: dict
    lora: dict[str, tuple[Any, Any, float]] = field(default_factory=dict)  # weight name -> (A, B, scaling)
    replace: dict[str, Any] = field(default_factory=dict)  # weight name -> full tensor (modules_to_save)
    rows: dict[str, tuple[list[int], Any]] = field(default_factory=dict)  # weight name -> (indices, values)
    unsupported: list[str] = field(default_factory=list)


def _scaling(config: dict, module: str) -> float:
    from peft.utils.other import get_pattern_key

    r, alpha = config["r"], config["lora_alpha"]
    if config.get("rank_pattern"):
        key = get_pattern_key(config["rank_pattern"].keys(), module)
        r = config["rank_pattern"].get(key, r)
    if config.get("alpha_pattern"):
        key = get_pattern_key(config["alpha_pattern"].keys(), module)
        alpha = config["alpha_pattern"].get(key, alpha)
    return alpha / (r**0.5) if config.get("use_rslora") else alpha / r


def read_adapter(adapter_dir: Path) -> AdapterParts:
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    parts = AdapterParts(config)
    if (
        config.get("use_dora")
        or config.get("fan_in_fan_out")
        or config.get("lora_bias")
        or config.get("target_parameters")
    ):
        parts.unsupported.append("DoRA / fan_in_fan_out / lora_bias / target_parameters")
    modules_to_save = set(config.get("modules_to_save") or [])
    tti = config.get("trainable_token_indices")
    for key, t in tensors.items():
        if any(u in key for u in UNSUPPORTED_KEYS):
            parts.unsupported.append(key)
            continue
        if not key.startswith(PREFIX):
            parts.unsupported.append(key)
            continue
        name = key[len(PREFIX) :]
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            b = tensors.get(f"{PREFIX}{module}.lora_B.weight")
            parts.lora[f"{module}.weight"] = (t, b, _scaling(config, module))
        elif name.endswith(".lora_B.weight"):
            continue
        elif name.endswith(".modules_to_save.weight"):
            parts.replace[name.replace(".modules_to_save.weight", ".weight")] = t
        elif name.endswith(".original_module.weight"):
            continue
        elif name.endswith(".token_adapter.base_layer.weight"):
            # PEFT saves the whole embedding when it was resized in training (save_embedding_layers): the base
            # rows plus the new ones, which the trainable-token values below then overwrite.
            parts.replace[name.replace(".token_adapter.base_layer.weight", ".weight")] = t
        elif name.endswith(".token_adapter.trainable_tokens_delta"):
            module = name[: -len(".token_adapter.trainable_tokens_delta")]
            short = module.split(".")[-1]
            if isinstance(tti, dict):
                indices = tti.get(short) or tti.get(module)
            else:
                indices = tti
            if indices is None:
                parts.unsupported.append(key)
                continue
            parts.rows[f"{module}.weight"] = (list(indices), t)
        elif name.endswith(".weight") and name.rsplit(".", 2)[-2] in modules_to_save:
            parts.replace.setdefault(name, t)  # modules_to_save saved under the plain name
        else:
            parts.unsupported.append(key)
    return parts


# --------------------------------------------------------------------------------------------- base files
def base_files(base_model: str, revision: str | None) -> Path:
    """The base checkpoint folder: a local directory, or its Hub snapshot (the cache training filled)."""
    p = Path(base_model).expanduser()
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            base_model, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
        )
    )


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name of a safetensors checkpoint; empty when the folder has none."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def checkpoint_names(base_dir: Path, keys: list[str]) -> dict[str, str | None]:
    """Checkpoint tensor name -> the model's parameter name, renamed the way transformers renames keys when it
    loads the checkpoint (e.g. Gemma 3's `language_model.model.*` -> `model.language_model.*`). None marks a
    key transformers converts rather than renames (fused or split tensors): the sharded merge cannot map it."""
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    config = AutoConfig.from_pretrained(base_dir)
    arch = getattr(transformers, (config.architectures or [""])[0], None)
    if arch is None:
        return {k: k for k in keys}
    with torch.device("meta"):
        model = arch(config)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    out: dict[str, str | None] = {}
    for key in keys:
        new, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        out[key] = None if converted is not None else new
    return out


# --------------------------------------------------------------------------------------------- arithmetic
def lora_merge(w, a, b, scaling: float):
    """PEFT's merge of one LoRA target, in the float32 path PEFT takes for an adapter autocast to float32."""
    import torch

    delta = (b.to(torch.float32) @ a.to(torch.float32)) * scaling
    return (w.to(torch.float32) + delta).to(w.dtype)


def nf4_roundtrip(w, quant: dict):
    """The weight the 4-bit model computed with: quantize (as transformers/bitsandbytes did when the base was
    loaded for training) and dequantize."""
    import bitsandbytes.functional as F
    import torch

    dtype = getattr(torch, quant.get("dtype", "bfloat16"))
    device = replay_device(quant)
    q, state = F.quantize_4bit(
        w.to(device=device, dtype=dtype),
        blocksize=quant["blocksize"],
        compress_statistics=quant["double_quant"],
        quant_type=quant["quant_type"],
    )
    return F.dequantize_4bit(q, state).to(device="cpu", dtype=w.dtype)


def replay_device(quant: dict) -> str:
    """Where the NF4 round trip runs: on the device training quantized on (bitsandbytes' CUDA kernels use fast
    math, its CPU kernels do not; the two need not give the same bits). Exit 2 rather than replay elsewhere."""
    import torch

    device = quant.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "MERGE_BASE=dequantized: the base was quantized on a GPU in training and no GPU is visible "
            "here; the replay must run where training ran (its CPU kernels can round differently). "
            "Merge on a GPU node, or use MERGE_BASE=original"
        )
    return device


def _grow_rows(t, rows: int):
    import torch

    if t.shape[0] >= rows:
        return t
    pad = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad], dim=0)


# --------------------------------------------------------------------------------------------- the merge
@dataclass
class MergeResult:
    folder: Path
    method: str  # "sharded" | "peft"
    merge_base: str
    seconds: float
    tensors_merged: int
    shards: int


def _quantized_names(meta: dict) -> set[str]:
    quant = meta.get("quantization") or {}
    return {f"{m}.weight" for m in quant.get("modules", [])}


def plan_problems(parts: AdapterParts, names: dict[str, str | None]) -> list[str]:
    """Why the sharded path cannot merge this adapter (empty: it can). `names`: checkpoint -> model names."""
    problems = [f"unsupported adapter tensor {k}" for k in parts.unsupported]
    model_names = {v for v in names.values() if v is not None}
    for name in list(parts.lora) + list(parts.replace) + list(parts.rows):
        if name not in model_names and not (name.startswith("lm_head") and name in parts.replace):
            problems.append(f"{name} is not a tensor of the base checkpoint")
    return problems


def merge_sharded(
    base_dir: Path,
    adapter_dir: Path,
    out: Path,
    merge_base: str,
    meta: dict,
    parts: AdapterParts,
    wmap: dict[str, str],
    names: dict[str, str | None],
) -> tuple[int, int, dict]:
    """Write the merged shards into `out`, one tensor at a time (stream.py). Returns (tensors changed, shards
    written, config changes)."""
    import torch

    from tuneserve import stream

    quantized = _quantized_names(meta) if merge_base == "dequantized" else set()
    if merge_base == "dequantized" and not quantized:
        raise ConfigError(
            "MERGE_BASE=dequantized but the adapter was not trained on a 4-bit base "
            "(LOAD_IN_4BIT=false); use MERGE_BASE=original"
        )
    quant = meta.get("quantization") or {}
    # Vocabulary size after training (added tokens grow embeddings and the output layer).
    vocab = 0
    for name, t in parts.replace.items():
        if "embed_tokens" in name or name.startswith("lm_head"):
            vocab = max(vocab, t.shape[0])
    for idx, _ in parts.rows.values():
        vocab = max(vocab, max(idx) + 1)
    model_names = {v for v in names.values() if v is not None}
    extra = {n: t for n, t in parts.replace.items() if n not in model_names}  # e.g. lm_head of a tied base
    shards = sorted(set(wmap.values()))
    new_map: dict[str, str] = {}
    changed = 0
    for i, shard in enumerate(shards):
        entries, metadata, _ = stream.read_header(base_dir / shard)
        layout = []
        for e in entries:
            shape, m = e.shape, names.get(e.name) or e.name
            if m in parts.replace:
                shape = tuple(parts.replace[m].shape)
            elif m in parts.rows:
                shape = (max(shape[0], max(parts.rows[m][0]) + 1), *shape[1:])
            if vocab and len(shape) == 2 and shape[0] < vocab and ("embed_tokens" in m or "lm_head" in m):
                raise ConfigError(
                    f"{e.name} has {shape[0]} rows but the trained vocabulary has {vocab}; the "
                    "adapter does not hold the added rows"
                )
            layout.append((e.name, e.dtype, shape))
        last = i == len(shards) - 1
        extra_code = entries[0].dtype if entries else "BF16"
        if last:
            layout += [(n, extra_code, tuple(t.shape)) for n, t in extra.items()]
        writer = stream.Writer(out / shard, layout, {**metadata, "format": "pt"})
        try:
            for e, stored in stream.iter_stored(base_dir / shard):
                m = names.get(e.name) or e.name  # adapter and training metadata use the model's names
                new_map[e.name] = shard
                if not (m in quantized or m in parts.replace or m in parts.lora or m in parts.rows):
                    writer.copy(e.name, stored)  # unchanged (embeddings, norms, ...): copied, never held whole
                    continue
                t = stored.load()
                if m in quantized:
                    t = nf4_roundtrip(t, quant)
                if m in parts.replace:
                    t = parts.replace[m].to(t.dtype)
                    changed += 1
                elif m in parts.lora:
                    a, b, scaling = parts.lora[m]
                    t = lora_merge(t, a, b, scaling)
                    changed += 1
                if m in parts.rows:
                    idx, values = parts.rows[m]
                    t = _grow_rows(t, max(idx) + 1)
                    t = t.index_copy(0, torch.tensor(idx), values.to(t.dtype))
                    changed += 1
                writer.write(e.name, t)
                del t
            if last:
                dtype = getattr(torch, stream.DTYPES[extra_code])
                for name, t in extra.items():
                    writer.write(name, t.to(dtype))
                    new_map[name] = shard
                    changed += 1
        except BaseException:
            writer.f.close()
            raise
        writer.close()
        log.info("merged shard %d/%d (%s)", i + 1, len(shards), shard)
    if (base_dir / WEIGHTS_INDEX).is_file() or len(shards) > 1:
        index = json.loads((base_dir / WEIGHTS_INDEX).read_text()) if (base_dir / WEIGHTS_INDEX).is_file() else {}
        total = sum((out / s).stat().st_size for s in shards)
        index = {"metadata": {**index.get("metadata", {}), "total_size": total}, "weight_map": new_map}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    changes: dict[str, Any] = {}
    if vocab:
        changes["vocab_size"] = vocab
    if extra:
        changes["tie_word_embeddings"] = False
    return changed, len(shards), changes


def merge_with_peft(base_ref: str, revision: str | None, adapter_dir: Path, out: Path, dtype_name: str) -> None:
    """Fallback: PEFT's merge_and_unload on the whole model (memory is not bounded)."""
    import torch

    from tuneserve.model import attach_adapter, load_base

    log.warning("merging with PEFT's merge_and_unload: the whole model is loaded into memory")
    model = load_base(base_ref, revision, dtype=getattr(torch, dtype_name), device_map=None)
    attach_adapter(model, adapter_dir).merge_and_unload().save_pretrained(str(out))


def _config_dtype(config: dict) -> str:
    dtype = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16"


def write_config(base_dir: Path, out: Path, changes: dict) -> dict:
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    dtype = _config_dtype(config)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    targets = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    for key, value in changes.items():
        for c in targets:
            if key in c or c is config:
                c[key] = value
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


# --------------------------------------------------------------------------------------------- servable folder
def make_servable(out: Path, base_dir: Path, adapter_dir: Path, meta: dict) -> dict:
    """Tokenizer files, the chat template in both places servers read it, and stop ids in
    generation_config.json that include the assistant end-of-turn token. Returns what was set."""
    from transformers import AutoTokenizer, GenerationConfig

    for name in TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, out / name)
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    if template:
        # vLLM and TGI versions differ in where they look (vllm#17977, TGI#3247): write both.
        tc["chat_template"] = template
        (out / "chat_template.jinja").write_text(template)
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

    if (base_dir / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(base_dir)
    else:
        gen = GenerationConfig.from_model_config(json.loads((out / "config.json").read_text()))
    eos = stop_ids(gen.eos_token_id, tok, meta.get("end_of_turn"))
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(out)
    return {"eos_token_id": eos, "end_of_turn": meta.get("end_of_turn"), "chat_template": bool(template)}


def merge(
    base_model: str,
    revision: str | None,
    adapter_dir: Path,
    out: Path,
    *,
    merge_base: str = "original",
    force_peft: bool = False,
) -> MergeResult:
    """Merge into a temporary folder, then rename it to `out` (present means complete)."""
    start = time.perf_counter()
    meta = json.loads((adapter_dir / TRAINING_META).read_text())
    base_dir = base_files(base_model, revision)
    tmp = scratch(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        parts = read_adapter(adapter_dir)
        wmap = weight_map(base_dir)
        names = checkpoint_names(base_dir, list(wmap)) if wmap else {}
        problems = ["forced"] if force_peft else plan_problems(parts, names) if wmap else ["no safetensors checkpoint"]
        if not problems:
            changed, shards, changes = merge_sharded(base_dir, adapter_dir, tmp, merge_base, meta, parts, wmap, names)
            write_config(base_dir, tmp, changes)
            method = "sharded"
        else:
            if merge_base == "dequantized":
                raise ConfigError(
                    f"MERGE_BASE=dequantized needs the sharded merge, which cannot handle this adapter: "
                    f"{'; '.join(problems[:3])}"
                )
            log.warning("sharded merge not possible (%s)", "; ".join(problems[:3]))
            merge_with_peft(base_model, revision, adapter_dir, tmp, meta.get("dtype", "bfloat16"))
            config = json.loads((tmp / "config.json").read_text())
            config.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            changed, shards, method = len(parts.lora), len(list(tmp.glob("*.safetensors"))), "peft"
        servable = make_servable(tmp, base_dir, adapter_dir, meta)
        result = MergeResult(out, method, merge_base, round(time.perf_counter() - start, 3), changed, shards)
        # merge_id names this merge's output: a verification applies to it alone (a re-merge, even of the same
        # adapter in the same time, is verified again).
        (tmp / MERGE_INFO).write_text(
            json.dumps(
                {
                    "merge_id": uuid.uuid4().hex,
                    "method": method,
                    "merge_base": merge_base,
                    "tensors_merged": changed,
                    "shards": shards,
                    "seconds": result.seconds,
                    "base_model": base_model,
                    "base_model_revision": revision,
                    "stop_token_ids": servable["eos_token_id"],
                    "end_of_turn": servable["end_of_turn"],
                    # How the template renders some trained tool calls: serving picks its tool-call parser from them.
                    "tool_call_samples": meta.get("tool_call_samples") or [],
                },
                indent=2,
            )
            + "\n"
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed merge (a full disk, say) leaves nothing
        raise
    replace_folder(tmp, out)
    log.info("merged %d tensors over %d shard(s) into %s (%s, MERGE_BASE=%s)", changed, shards, out, method, merge_base)
    return result


def merged_done(out: Path) -> bool:
    return (out / MERGE_INFO).is_file() and (out / "config.json").is_file()
