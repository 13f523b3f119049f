"""Stage: a quantized copy of the merged folder that vLLM serves natively (QUANTIZE), written to
OUTPUT_DIR/quantized/ in compressed-tensors format, the checkpoint format of vLLM's own quantization tools.

Every scheme offered needs no calibration data: weights are rounded to the nearest value on a per-channel
(int8, fp8) or per-group-of-128 (w4a16) scale taken from their own range, and activations, where they are
quantized at all, are quantized per token while serving. Schemes with static activation scales (which need
calibration prompts) are not offered.

    QUANTIZE  compressed-tensors preset  weights                  activations             vLLM kernels
    int8      W8A8                       int8, per output channel int8, per token (dyn.)  GPU; CPU (oneDNN)
    fp8       FP8_DYNAMIC                fp8 e4m3, per channel    fp8, per token (dyn.)   GPU (Ada/Hopper+)
    w4a16     W4A16                      int4, groups of 128      16-bit                  GPU; CPU with AVX-512

The merged model is never loaded: its safetensors shards are read one at a time, each weight of a quantized
layer is quantized and compressed by compressed-tensors' own functions as it is read, and each shard's quantized
counterpart is written before the next is opened, so host memory holds about one shard (and its compressed
form), not the model (a 70B model is 140 GB in 16 bits). Which tensors are the weights of quantized layers, the
scheme of each and the `quantization_config` of config.json come from the model's skeleton built without weights
(on the meta device) with the scheme applied by compressed-tensors, as if the whole model had been loaded: the
output is the one quantizing the loaded model gives, tensor for tensor (tests/test_quantize.py compares them).

The quantized folder is published (and served from the volume) only after the engine evaluation
(`python -m entrypoints.evaluate`, serving image) has measured it against the merged model in vLLM and found it
within QUANTIZE_MAX_DROP: training cannot run vLLM, so this stage writes the folder and nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tuneserve.layout import QUANTIZE_INFO, merged_id, replace_folder, scratch

log = logging.getLogger(__name__)

# QUANTIZE -> (compressed-tensors preset, checkpoint format)
SCHEMES = {
    "int8": ("W8A8", "int-quantized"),
    "fp8": ("FP8_DYNAMIC", "float-quantized"),
    "w4a16": ("W4A16", "pack-quantized"),
}
# Kept in 16 bits: the output layer (its error goes straight into every logit) and, in multimodal checkpoints,
# the vision tower and projector (not what was fine-tuned; vLLM quantizes them separately or not at all).
IGNORE = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*vision_model.*"]
COPIED = ("*.json", "*.jinja", "*.model", "*.tiktoken", "merges.txt", "vocab.txt")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The quantization parameters this stage sets (from the weight's own range); a scheme that registers others
# (static activation scales, global scales) needs calibration and is not offered.
QPARAMS = ("weight_scale", "weight_zero_point")


def quantized_done(out: Path, merged: Path, scheme: str) -> bool:
    """`out` holds this scheme's quantization of this merged folder."""
    try:
        info = json.loads((out / QUANTIZE_INFO).read_text())
    except (OSError, ValueError):
        return False
    return info.get("scheme") == scheme and info.get("source_id") == merged_id(merged)


def quantize(merged: Path, out: Path, *, scheme: str) -> dict[str, Any]:
    """Quantize the merged folder into `out` (written beside it, renamed into place when complete), one shard at a
    time."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import is_module_quantized

    preset, fmt = SCHEMES[scheme]
    start = time.perf_counter()
    tmp = scratch(out)
    shutil.rmtree(tmp, ignore_errors=True)
    skeleton = model_skeleton(merged)
    plain = skeleton.state_dict()  # the model's own tensors (meta), before the quantization parameters join them
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=IGNORE)
    apply_quantization_config(skeleton, config)  # compressed-tensors' own target and ignore matching
    compressor = ModelCompressor.from_pretrained_model(skeleton, quantization_format=fmt)
    targets = {name: m for name, m in skeleton.named_modules(remove_duplicate=True) if is_module_quantized(m)}
    for module in targets.values():  # what compress_model records on each module (config.json's groups show it)
        module.quantization_scheme.format = CompressionFormat(fmt)
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    try:
        tmp.mkdir(parents=True)
        layers = write_quantized_shards(merged, tmp, skeleton, plain, targets, fmt)
        write_configs(merged, tmp, skeleton)
        compressor.update_config(tmp)
        for pattern in COPIED:  # tokenizer, chat template: as merged
            for f in merged.glob(pattern):
                if not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        info = {
            "scheme": scheme,
            "preset": preset,
            "format": fmt,
            "source_id": merged_id(merged),
            "quantized_layers": layers,
            "ignored": IGNORE,
            "bytes": sum(p.stat().st_size for p in tmp.glob("*.safetensors")),
            "source_bytes": sum(p.stat().st_size for p in merged.glob("*.safetensors")),
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / QUANTIZE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (a full disk, say) leaves nothing behind
        raise
    replace_folder(tmp, out)
    log.info(
        "quantized %d linear layers to %s (%s): %.1f MB -> %.1f MB in %.1fs; %s",
        layers,
        scheme,
        preset,
        info["source_bytes"] / 1e6,
        info["bytes"] / 1e6,
        info["seconds"],
        out,
    )
    return info


def model_skeleton(merged: Path):
    """The merged model's modules with no weights (meta device), in the dtype the weights are quantized from."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(merged)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def checkpoint_shards(merged: Path) -> list[str]:
    """The merged folder's safetensors files, in order: the index's, or the single file."""
    index = merged / INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (merged / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise FileNotFoundError(f"{merged} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def key_renamer(skeleton, plain: dict):
    """checkpoint key -> (the model's name for it, whether a weight converter takes it): transformers' own renaming
    on load (a multimodal checkpoint's `language_model.model.*` is the model's `model.language_model.*`)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings loads checkpoint keys as they are
        return lambda key: (key, False)

    mapping = get_model_conversion_mapping(skeleton)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = skeleton.base_model_prefix

    def rename(key: str) -> tuple[str, bool]:
        # as transformers.core_model_loading.convert_and_load_state_dict_in_model does
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, plain)
        if renamed not in plain and key in plain:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=plain)
        return renamed, pattern is not None

    return rename


def write_quantized_shards(merged: Path, tmp: Path, skeleton, plain: dict, targets: dict, fmt: str) -> int:
    """Each shard of `merged` read, quantized and written to `tmp` under its own name before the next is read;
    the number of layers quantized. Tensors are read one at a time: what is held is the shard's output so far
    and the tensor being quantized."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    rename = key_renamer(skeleton, plain)
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})  # save_pretrained writes one of each pair
    shards = checkpoint_shards(merged)
    weight_map: dict[str, str] = {}
    total_size = 0
    loaded: set[str] = set()
    layers = 0
    for number, shard in enumerate(shards, 1):
        tensors = {}
        with safe_open(str(merged / shard), framework="pt") as f:
            for key in f.keys():
                name, converted = rename(key)
                if name not in plain:  # not the model's: from_pretrained drops it, so it is not saved either
                    log.warning("%s in %s is not a tensor of %s: left out", key, shard, type(skeleton).__name__)
                    continue
                loaded.add(name)
                if name in tied:
                    continue
                tensor = f.get_tensor(key)
                if tensor.is_floating_point():  # from_pretrained's dtype (bfloat16, unless the model keeps fp32)
                    tensor = tensor.to(plain[name].dtype)
                module, _, local = name.rpartition(".")
                if local == "weight" and module in targets:
                    if converted or not key.endswith("weight"):  # not one checkpoint tensor per layer weight
                        raise ValueError(
                            f"{key} in {merged / shard} is read into {name} by a conversion of transformers': "
                            "quantizing such a checkpoint one tensor at a time is not supported"
                        )
                    for param, value in quantized_weight(targets[module], tensor, fmt).items():
                        tensors[key.removesuffix("weight") + param] = value
                    layers += 1
                else:
                    tensors[key] = tensor
                del tensor
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        log.info("quantized shard %d/%d (%s)", number, len(shards), shard)
        del tensors
    missing = sorted((set(dict(skeleton.named_parameters())) & set(plain)) - loaded - tied)
    if missing:
        raise ValueError(f"{merged} lacks weights of the model: {', '.join(missing[:5])}{' ...' * (len(missing) > 5)}")
    if shards != [SINGLE_FILE]:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return layers


def quantized_weight(module, weight, fmt: str) -> dict:
    """The compressed tensors of one quantized layer from its 16-bit weight (local names: `weight` or
    `weight_packed`, `weight_scale`, ...): the scales by `weight_qparams`, the quantization and packing by the
    format's compressed-tensors compressor, as `ModelCompressor.compress_model` does to a loaded layer."""
    from compressed_tensors.compressors.base import BaseCompressor

    scheme = module.quantization_scheme
    shapes = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    uncalibrated = sorted(set(shapes) - {"weight", "bias", *QPARAMS})
    if uncalibrated:
        raise ValueError(f"{scheme} needs {', '.join(uncalibrated)} from calibration data, which this stage has not")
    scale, zero_point = weight_qparams(weight, scheme.weights)
    state = {
        "weight": weight,
        "weight_scale": scale.to(shapes["weight_scale"].dtype).reshape(shapes["weight_scale"].shape),
    }
    if "weight_zero_point" in shapes:
        zp = shapes["weight_zero_point"]
        state["weight_zero_point"] = zero_point.to(zp.dtype).reshape(zp.shape)
    return BaseCompressor.get_value_from_registry(fmt).compress(state, scheme)


def weight_qparams(weight, args):
    """A weight's scale and zero point from its own range: round-to-nearest.

    compressed-tensors leaves the scales to an observer; llm-compressor's min-max observer is the one that would
    run here, but llm-compressor pins a transformers older than both of our environments', so its few lines
    of arithmetic are here, with compressed-tensors' own `calculate_qparams` doing the scale itself."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.float()
    if args.strategy == QuantizationStrategy.GROUP:
        grouped = w.reshape(w.shape[0], -1, args.group_size)
        low, high = grouped.amin(-1), grouped.amax(-1)
    else:  # per output channel
        low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    return calculate_qparams(low, high, args)


def write_configs(merged: Path, tmp: Path, skeleton) -> None:
    """config.json and generation_config.json as save_pretrained writes them for the loaded model (the
    quantization_config is added after, by compressed-tensors)."""
    from transformers import GenerationConfig

    config = skeleton.config
    config.dtype = str(skeleton.dtype).split(".")[1]
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(tmp)
    if skeleton.can_generate():
        if (merged / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(merged).save_pretrained(tmp)
        else:
            skeleton.generation_config.save_pretrained(tmp)
