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


def quantized_done(out: Path, merged: Path, scheme: str) -> bool:
    """`out` holds this scheme's quantization of this merged folder."""
    try:
        info = json.loads((out / QUANTIZE_INFO).read_text())
    except (OSError, ValueError):
        return False
    return info.get("scheme") == scheme and info.get("source_id") == merged_id(merged)


def quantize(merged: Path, out: Path, *, scheme: str) -> dict[str, Any]:
    """Quantize the merged folder into `out` (written beside it, renamed into place when complete)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from transformers import AutoModelForCausalLM

    preset, fmt = SCHEMES[scheme]
    start = time.perf_counter()
    tmp = scratch(out)
    shutil.rmtree(tmp, ignore_errors=True)
    # The whole model in host memory at its 16-bit size: compressed-tensors compresses a loaded model.
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16, device_map={"": "cpu"})
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=IGNORE)
    apply_quantization_config(model, config)
    layers = set_weight_scales(model)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    try:
        model.save_pretrained(tmp)
        compressor.update_config(tmp)
        for pattern in COPIED:  # tokenizer, chat template, generation config (its stop ids): as merged
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
    del model
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


def set_weight_scales(model) -> int:
    """Each quantized layer's weight scale (and zero point) from the weight's own range: round-to-nearest.

    compressed-tensors leaves the scales to an observer; llm-compressor's min-max observer is the one that would
    run here, but llm-compressor pins a transformers older than both of our environments', so its few lines
    of arithmetic are here, with compressed-tensors' own `calculate_qparams` doing the scale itself."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    count = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        w = module.weight.data.float()
        if args.strategy == QuantizationStrategy.GROUP:
            grouped = w.reshape(w.shape[0], -1, args.group_size)
            low, high = grouped.amin(-1), grouped.amax(-1)
        else:  # per output channel
            low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        scale, zero_point = calculate_qparams(low, high, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            zp = module.weight_zero_point
            zp.data = zero_point.to(zp.dtype).reshape(zp.shape)
        count += 1
    return count
