"""Stage: the base model (4-bit NF4 for QLoRA, or unquantized for LoRA) and the LoRA configuration.

Mirrors TRL's `get_quantization_config()` / `get_peft_config()`: each returns what the trainer needs,
or None when that part is switched off.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tuneserve import driver, launch
from tuneserve.exitcodes import ConfigError
from tuneserve.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" | "cpu"
    dtype_name: str  # "bfloat16" | "float16" | "float32"

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)


def resolve_placement(cfg: Settings) -> Placement:
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device in ("auto", "cuda") and not cuda and (problem := driver.cuda_problem(cfg.device)):
        raise ConfigError(problem)  # GPUs given but unusable (an old driver): no silent CPU fallback
    if cfg.device == "cuda" and not cuda:
        raise ConfigError(
            "DEVICE=cuda but no CUDA device is visible (check --gpus all / the nvidia.com/gpu "
            "request); use DEVICE=cpu or auto"
        )
    device = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and cuda)) else "cpu"
    if (
        device == "cuda"
        and not launch.in_worker()
        and launch.nproc_per_node(cfg) == 1
        and (n := torch.cuda.device_count()) > 1
    ):
        # transformers would count every visible GPU for one process and TRL refuses nn.DataParallel.
        raise ConfigError(
            f"one training process but {n} GPUs are visible (NPROC_PER_NODE={cfg.nproc_per_node}): "
            "set NPROC_PER_NODE=auto to train on all of them (one process each), or "
            "CUDA_VISIBLE_DEVICES (docker run --gpus '\"device=0\"', the nvidia.com/gpu request) to "
            "the one to use"
        )
    if device == "cuda" and (problem := compiler_problem()):
        raise ConfigError(problem)
    if cfg.attn_implementation and (problem := attention_problem(cfg.attn_implementation, device)):
        raise ConfigError(f"ATTN_IMPLEMENTATION={cfg.attn_implementation}: {problem}")
    native, evidence = native_bf16(device)
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if native else ("float16" if device == "cuda" else "float32")
        log.info(
            "compute dtype %s (DTYPE=auto: %s %s bfloat16 natively)",
            dtype,
            evidence,
            "computes" if native else "does not compute",
        )
    elif dtype == "bfloat16" and device == "cuda" and not native:
        raise ConfigError(
            f"DTYPE=bfloat16 but this GPU ({evidence}) does not compute bfloat16 natively (torch "
            "would emulate it, several times slower); use DTYPE=float16 or auto"
        )
    if dtype == "float16" and device == "cpu":
        raise ConfigError("DTYPE=float16 is not supported for training on the CPU; use bfloat16 or float32")
    if device == "cpu":
        threads, why = cpu_threads()
        torch.set_num_threads(threads)
        log.info("torch uses %d CPU thread(s) (%s)", threads, why)
    placement = Placement(device, dtype)
    if cfg.distributed_strategy == "fsdp":
        get_quantization_config(cfg, placement)  # refuses a 4-bit storage FSDP cannot shard, before anything loads
        log.info(
            "DISTRIBUTED_STRATEGY=fsdp (FSDP2): each process loads the whole %smodel on its own GPU, then its "
            "layers are sharded across the processes: training memory is shared, loading memory is not",
            "4-bit " if cfg.load_in_4bit else "",
        )
    return placement


def compiler_problem() -> str | None:
    """Why Triton could not build its launcher here (None when it can). On CUDA, TRL's loss (a fused LM head) runs
    a Triton kernel, and Triton compiles a small C module against Python's headers on first use, with $CC, else
    gcc, else clang (triton/runtime/build.py); without them the first training step fails."""
    import shutil
    import sysconfig

    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return (
            "no C compiler (gcc, clang or $CC): Triton, which runs TRL's loss kernel on CUDA, compiles a small "
            "C module on first use; install gcc and libc6-dev (the training image has them)"
        )
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        return f"no Python headers ({header}): Triton compiles its launcher against them; install python3-dev"
    return None


# The package each attention kernel needs beyond torch (transformers imports it when the model loads).
ATTENTION_PACKAGES = {
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3 (built from flash-attention/hopper)"),
}


def attention_problem(name: str, device: str) -> str | None:
    """Why the attention kernel `name` cannot run here (its package missing, or a CUDA kernel on the CPU), checked
    before the weights load; None when it can. A Hub kernel (`kernels-community/flash-attn2`) needs `kernels`."""
    import importlib.util

    if "/" in name:
        package, pip_name = "kernels", "kernels"
    elif name in ATTENTION_PACKAGES:
        package, pip_name = ATTENTION_PACKAGES[name]
    else:
        return None  # eager, sdpa, flex_attention: torch's own; an unknown name is transformers' error to give
    if importlib.util.find_spec(package) is None:
        return (
            f"needs the {package!r} package, which is not installed in this image (pip install {pip_name}, "
            "in an image built FROM this one); or use sdpa, which keeps packed rows apart too"
        )
    if device != "cuda" and "/" not in name:
        return f"{name} runs on CUDA GPUs only; use sdpa on the CPU"
    return None


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether `device` computes bfloat16 in hardware, and the evidence for the log: what DTYPE=auto decides by.
    torch counts bfloat16 emulated in float32 as supported by default; only the hardware's own counts here."""
    if device == "cuda":
        import torch

        return torch.cuda.is_bf16_supported(including_emulation=False), torch.cuda.get_device_name()
    return cpu_native_bf16()


def cpu_native_bf16(cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX-BF16, Arm BF16), and the evidence
    for the log. Without them torch converts every bfloat16 operation to float32 and back."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    found = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return bool(
        found
    ), f"this CPU ({', '.join(found)})" if found else "this CPU (no avx512_bf16, amx_bf16 or bf16 flag)"


def cpu_threads(cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """torch's CPU threads: the CPUs this process may run on, bounded by its cgroup's CPU quota (a container
    limited to 4 CPUs on a 64-core node would otherwise run 64 threads on 4 CPUs' worth of time).
    OMP_NUM_THREADS, when set, wins."""
    import math

    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    usable = len(os.sched_getaffinity(0))
    quota = None
    try:
        q, period = (cgroup / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "400000 100000"
        quota = None if q == "max" else max(1, math.ceil(int(q) / int(period)))
    except (OSError, ValueError):
        try:  # cgroup v1
            q = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            quota = max(1, math.ceil(q / int((cgroup / "cpu" / "cpu.cfs_period_us").read_text()))) if q > 0 else None
        except (OSError, ValueError):
            pass
    threads = min(usable, quota or usable)
    return threads, f"{usable} CPU(s) available to this process, cgroup CPU quota {quota or 'none'}"


def get_quantization_config(cfg: Settings, placement: Placement):
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    kwargs = dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=placement.dtype,
    )
    if cfg.distributed_strategy == "fsdp":
        # fully_shard turns parameters into DTensors, which only floating-point storage survives: the packed 4-bit
        # weights are stored in the compute dtype. With uint8 storage accelerate leaves them out of the sharding,
        # every GPU keeping the whole 4-bit base.
        kwargs["bnb_4bit_quant_storage"] = placement.dtype
    kwargs.update(cfg.extras.get("bnb", {}))
    storage = str(kwargs.get("bnb_4bit_quant_storage", "uint8")).removeprefix("torch.")
    if cfg.distributed_strategy == "fsdp" and storage not in ("bfloat16", "float16", "float32"):
        raise ConfigError(
            f"DISTRIBUTED_STRATEGY=fsdp with BNB_4BIT_QUANT_STORAGE={storage}: FSDP cannot shard "
            "integer 4-bit storage and would keep the whole base on every GPU; leave it unset (the "
            "compute dtype) or use DISTRIBUTED_STRATEGY=ddp"
        )
    try:
        return BitsAndBytesConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"quantization configuration rejected by transformers.BitsAndBytesConfig: {exc}") from None


def language_model_linears(model) -> list[str] | None:
    """For a multimodal base, the linear layers of its language model (text rows never reach the vision tower,
    whose LoRA weights would only cost memory and stop vLLM from serving the adapter). None otherwise."""
    import torch

    if model is None or getattr(model.config, "vision_config", None) is None:
        return None
    names = [
        n
        for n, m in model.named_modules()
        if ".language_model." in f".{n}." and isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]
    return names or None


def get_peft_config(cfg: Settings, added_token_ids: list[int], model=None):
    from peft import LoraConfig

    target = cfg.lora_target_modules
    target = target[0] if target == ["all-linear"] else target
    if target == "all-linear" and (text_linears := language_model_linears(model)) is not None:
        log.info(
            "multimodal base: LoRA on the %d linear layers of its language model (all-linear there)", len(text_linears)
        )
        target = text_linears
    modules_to_save = list(cfg.lora_modules_to_save or [])
    kwargs = dict(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target,
        bias="none",
        task_type="CAUSAL_LM",
    )
    kwargs.update(cfg.extras.get("lora", {}))
    if added_token_ids:
        # Same as TRL's SFTTrainer does after `clone_chat_template`: train the new embedding rows
        # (PEFT TrainableTokens) and the output layer, so the model can read and write the new tokens.
        if "embed_tokens" not in modules_to_save:
            tti = dict(kwargs.get("trainable_token_indices") or {})
            tti["embed_tokens"] = sorted(set(tti.get("embed_tokens", [])) | set(added_token_ids))
            kwargs["trainable_token_indices"] = tti
        if "lm_head" not in modules_to_save:
            modules_to_save.append("lm_head")
    kwargs["modules_to_save"] = modules_to_save or None
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"LoRA configuration rejected by peft.LoraConfig: {exc}") from None


def attach_adapter(model, adapter_dir):
    """PeftModel of `model` + the adapter in `adapter_dir`, the embeddings first grown to the adapter's tokenizer
    (training added template tokens) the way training grew them."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    return PeftModel.from_pretrained(model, str(adapter_dir))


def model_config(cfg: Settings):
    """BASE_MODEL's config (config.json alone, no weights), or exit 2 saying why it cannot be read."""
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.base_model_revision:
        kwargs["revision"] = cfg.base_model_revision
    from huggingface_hub.errors import StrictDataclassError

    try:
        config = AutoConfig.from_pretrained(cfg.base_model, **kwargs)
    except (OSError, ValueError, StrictDataclassError) as exc:  # the last: a config its class's validators refuse
        raise ConfigError(
            f"BASE_MODEL={cfg.base_model!r}: cannot load the model's config ({str(exc).splitlines()[0]})"
        ) from None
    folder = Path(cfg.base_model).expanduser()
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConfigError(
            f"BASE_MODEL={cfg.base_model!r}: the folder holds a config but no weights (*.safetensors or *.bin); "
            "give the folder save_pretrained wrote, or a Hub id"
        )
    return config


def load_base(ref: str, revision: str | None = None, **kwargs):
    """TRL's create_model_from_path, the model class chosen from the config at `revision`.

    create_model_from_path picks the class from the config of the default branch whatever `revision` says (TRL
    1.16), which would read a moving branch in a run pinned to a commit; so the class is chosen here the way it
    chooses it, from the pinned config."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from trl.trainer.utils import create_model_from_path

    config = AutoConfig.from_pretrained(
        ref, revision=revision, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    architecture = getattr(transformers, (config.architectures or [""])[0], None)
    if architecture is None:  # remote code: the most specific auto class its auto_map declares
        auto_map = getattr(config, "auto_map", None) or {}
        architecture = next(
            (c for c in (AutoModelForImageTextToText, AutoModelForCausalLM) if c.__name__ in auto_map),
            AutoModelForCausalLM,
        )
    if revision:
        kwargs["revision"] = revision
    return create_model_from_path(ref, architecture=architecture, **kwargs)


def load_model(cfg: Settings, tok_info, placement: Placement):
    """The base model, quantized when LOAD_IN_4BIT, its embeddings resized for added tokens.

    The model class follows the checkpoint's config (TRL's `create_model_from_path`): a multimodal
    base such as Gemma 3 4B loads as its image-text-to-text class and trains on text rows too.
    """
    kwargs = dict(dtype=placement.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quant = get_quantization_config(cfg, placement)
    if quant is not None:
        kwargs["quantization_config"] = quant
    # Always a device map naming one device: without one TRL passes device_map="auto", which spreads a model over
    # every visible GPU and which accelerate refuses to train in a process group. DDP keeps the whole 4-bit model
    # on each process's GPU; FSDP2 loads it there too, then shards it (train.fsdp_options).
    kwargs["device_map"] = {"": "cpu" if placement.device == "cpu" else int(os.environ.get("LOCAL_RANK", "0"))}
    log.info(
        "loading %s (%s%s, %s)",
        cfg.base_model,
        "4-bit NF4, compute " if quant else "",
        placement.dtype_name,
        placement.device,
    )
    try:
        model = load_base(cfg.base_model, cfg.base_model_revision, **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"BASE_MODEL={cfg.base_model!r}: cannot load the model ({str(exc).splitlines()[0]})"
        ) from None
    except ImportError as exc:  # a kernel or quantization package this model needs beyond what preflight checks
        raise ConfigError(
            f"BASE_MODEL={cfg.base_model!r} with ATTN_IMPLEMENTATION={cfg.attn_implementation}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    tok = tok_info.tokenizer
    if tok_info.added_tokens:
        emb = model.get_input_embeddings().weight.shape[0]
        if len(tok) > emb:
            model.resize_token_embeddings(len(tok))
            log.info(
                "resized the embeddings from %d to %d rows for %s", emb, len(tok), ", ".join(tok_info.added_tokens)
            )
    model.config.get_text_config().pad_token_id = tok.pad_token_id
    # Training never reuses keys and values; with a cache, transformers skips the block-diagonal mask of packed
    # rows (masking_utils builds it only without one), so every forward that TRL does not make itself, e.g. a
    # loss from full logits, would let packed rows attend to each other.
    model.config.use_cache = model.config.get_text_config().use_cache = False
    return model
