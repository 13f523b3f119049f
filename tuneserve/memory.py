"""Memory: what this machine gives (GPUs, host memory under its cgroup limit), where a model too large for one
device is loaded, and preflight's plan of what each stage will hold.

QLoRA trains a model far larger than one GPU: the 4-bit base of a 70B model (about 40 GB) trains on one 80 GB GPU,
while its 16-bit weights (about 140 GB) fit neither that GPU nor most hosts. So no stage after training holds the
16-bit model on one device:
- merge streams tensor by tensor (merge.py) and quantize shard by shard (quantize.py): host memory of about one
  tensor or shard, never the model;
- verify and evaluate load the merged model with accelerate's big-model placement (`load_kwargs`): on one device
  when it fits there, as before; otherwise over every GPU of the node, then host memory, then read from the
  merged folder's own safetensors files layer by layer as each forward needs them (slow, never out of memory).

Host memory is the process's cgroup limit (the container's `--memory`, the pod's memory limit) or the machine's,
whichever is smaller, less what the cgroup already uses: accelerate's own estimate (psutil) sees the machine's
free memory and would place a model a container cannot hold.

Preflight (`plan`) computes each stage's need from the model's config alone (a model built on the meta device:
no weights read) and refuses, exit 2, a run whose training or a later stage cannot fit, before any weights are
read. The figures are lower bounds: weights, optimizer state and working buffers, not activations, which grow
with PER_DEVICE_TRAIN_BATCH_SIZE x MAX_SEQ_LENGTH.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GiB = 1 << 30
# Kept free on each GPU for the CUDA context, cuBLAS workspaces and the allocator's fragmentation.
GPU_RESERVE = 1 * GiB
# Of the host memory left after what the process already holds, the share a loaded model's weights may take: the
# rest is for activations, logits and the layer accelerate is reading from disk.
HOST_WEIGHTS_SHARE = 0.5
# Bytes per parameter of a bitsandbytes NF4 linear weight: 4 bits, an 8-bit absmax per 64 weights and (double
# quantization) a float32 per 256 absmax values.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# LoRA parameters are float32; each has a gradient and AdamW's two moments, all float32.
LORA_TRAIN_BYTES = 16


def fmt(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


# --------------------------------------------------------------------------------------------- the machine
@dataclass(frozen=True)
class Host:
    limit: int  # bytes this process's cgroup may use (the machine's memory when it has no limit)
    available: int  # bytes it may still take
    source: str  # where `limit` comes from, for messages


def _read_int(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    return None if raw in ("max", "") else int(raw)


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def cgroup_memory(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")):
    """(limit, working set) of this process's memory cgroup, the tightest limit of it and its ancestors (v2, or v1's
    memory controller); None when there is no limit. The working set is what Kubernetes and the kernel's OOM killer
    count: usage less the inactive file cache, which the kernel reclaims first."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and (root / "cgroup.controllers").is_file():  # v2
            base, limit_file, usage_file, inactive = root, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # v1
            base, limit_file, usage_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
            inactive = "total_inactive_file"
        else:
            continue
        # Inside a container the cgroup namespace shows the container's own cgroup at the mount's root.
        own = base / path.lstrip("/")
        folder = own if own.is_dir() else base
        limits, probe = [], folder
        while True:
            value = _read_int(probe / limit_file)
            if value is not None and value < (1 << 60):  # v1 writes "no limit" as a huge number
                limits.append(value)
            if probe == base:
                break
            probe = probe.parent
        if not limits:
            return None
        usage = _read_int(folder / usage_file) or 0
        working = max(0, usage - _stat(folder / "memory.stat").get(inactive, 0))
        return min(limits), working
    return None


def host(meminfo: Path = Path("/proc/meminfo"), **cgroup_paths) -> Host:
    info = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", total)
    found = cgroup_memory(**cgroup_paths)
    if found and found[0] < total:
        limit, working = found
        return Host(limit, max(0, min(available, limit - working)), "the cgroup memory limit")
    return Host(total, available, "the machine's memory")


def gpus() -> list[int]:
    """Total memory of each GPU this process sees (none on the CPU). No CUDA context is created."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def rss() -> int:
    """This process's resident memory now."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# --------------------------------------------------------------------------------------------- loading a big model
def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def load_kwargs(folder: Path, device: str, *, offload_folder: Path | None = None) -> tuple[dict[str, Any], str]:
    """from_pretrained's placement arguments for the model in `folder`, and a sentence for the log.

    One device when its weights fit there (what verify and evaluate always did); otherwise accelerate's big-model
    placement (`device_map="auto"`): every GPU with GPU_RESERVE kept free, then host memory within its limit, then
    the checkpoint's own files, read layer by layer (transformers maps disk-placed weights to the safetensors they
    are stored in, copying nothing)."""
    size = weights_bytes(folder)
    hosted = host()
    host_budget = int(hosted.available * HOST_WEIGHTS_SHARE)
    if device == "cuda":
        memory = gpus()
        budgets = {i: max(0, m - GPU_RESERVE) for i, m in enumerate(memory)}
        if size <= budgets.get(0, 0):
            return {"device_map": {"": "cuda"}}, f"on GPU 0 ({fmt(size)})"
    else:
        budgets = {}
        if size <= host_budget:
            return {"device_map": {"": "cpu"}}, f"in host memory ({fmt(size)})"
    on_gpus = sum(budgets.values())
    spill = size - on_gpus
    where = [f"{len(budgets)} GPU(s) ({fmt(on_gpus)})"] if budgets else []
    hosted_part = fmt(min(max(spill, 0), host_budget))
    where.append(f"host memory ({hosted_part} of {fmt(hosted.available)} free, {hosted.source})")
    if spill > host_budget:
        where.append(f"the rest ({fmt(spill - host_budget)}) read from disk at each forward: slow")
    kwargs: dict[str, Any] = {"device_map": "auto", "max_memory": {**budgets, "cpu": host_budget}}
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs, f"{fmt(size)} does not fit one device: spread over " + ", ".join(where)


def release() -> None:
    """Give back the memory of the models the caller has just let go of, so the next stage's model loads in its
    place: Python's cycles collected, torch's cached GPU blocks freed, and glibc's heap trimmed. malloc_trim is by
    hand because nothing else returns it: the many mid-sized buffers of loading and training stay in glibc's arenas
    once freed (measured on the CPU: the merge after training peaked at 1.58 GB for a 2.2 GB (16-bit) model
    without it, at 1.04 GB for a 3.2 GB one with it)."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


def input_device(model):
    """Where a model's inputs go: its embedding's device (the CPU when accelerate keeps that on disk)."""
    import torch

    dev = model.get_input_embeddings().weight.device
    return torch.device("cpu") if dev.type == "meta" else dev


# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ModelSize:
    params: int  # every parameter, tied ones once
    quantized: int  # parameters of the linear layers a 4-bit load quantizes
    lora: int  # LoRA parameters for the configured targets and rank
    largest_tensor: int  # parameters of the largest tensor
    largest_linear: int  # parameters of the largest weight a 4-bit load quantizes, merge and quantize compute with
    largest_block: int  # parameters of the largest decoder layer (what offloading moves at a time)
    dtype_bytes: int  # bytes per parameter of the checkpoint's 16-bit (or 32-bit) weights

    @property
    def bytes16(self) -> int:
        return self.params * self.dtype_bytes


def model_size(config, *, target_modules, rank: int, trust_remote_code: bool = False) -> ModelSize:
    """Sizes from the config alone: the model is built on the meta device (no memory, no weights)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    architecture = getattr(transformers, (config.architectures or [""])[0], None)
    with torch.device("meta"):
        if architecture is not None:
            model = architecture._from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skip = set(get_keys_to_not_convert(model))
    params = sum(p.numel() for p in model.parameters())
    largest_tensor = max(p.numel() for p in model.parameters())
    targets = None if target_modules in ("all-linear", ["all-linear"]) else list(target_modules or [])
    quantized = lora = largest_linear = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in skip or name in skip:
            continue
        quantized += module.weight.numel()
        largest_linear = max(largest_linear, module.weight.numel())
        if targets is None or leaf in targets or name in targets:
            lora += rank * (module.in_features + module.out_features)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    largest_block = max(
        (sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in blocks),
        default=largest_tensor,
    )
    text = config.get_text_config()
    dtype = str(getattr(text, "dtype", None) or getattr(config, "dtype", None) or "bfloat16")
    return ModelSize(
        params, quantized, lora, largest_tensor, largest_linear, largest_block, 4 if "float32" in dtype else 2
    )


@dataclass
class Stage:
    name: str
    where: str  # "GPU" (each training process's) | "host"
    need: int
    has: int
    note: str = ""

    @property
    def fits(self) -> bool:
        return self.need <= self.has


@dataclass
class Plan:
    model: ModelSize
    stages: list[Stage] = field(default_factory=list)
    placement: str = ""  # where verify and evaluate put the merged model

    def problems(self) -> list[str]:
        return [
            f"{s.name} needs at least {fmt(s.need)} of {s.where} memory ({s.note}) but "
            f"{fmt(s.has)} {'is free' if s.where == 'host' else 'is the smallest GPU'}"
            for s in self.stages
            if not s.fits
        ]

    def table(self) -> str:
        rows = [f"  {s.name:<9} {s.where:<5} needs {fmt(s.need):>9} of {fmt(s.has):>9}  {s.note}" for s in self.stages]
        return "\n".join(rows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_bytes_16bit": self.model.bytes16,
            "parameters": self.model.params,
            "stages": {s.name: {"where": s.where, "need": s.need, "has": s.has, "fits": s.fits} for s in self.stages},
            "verify_placement": self.placement,
        }


def plan(
    size: ModelSize,
    *,
    device: str,
    compute_bytes: int,
    load_in_4bit: bool,
    gpu_memory: list[int],
    hosted: Host,
    quantize: bool,
) -> Plan:
    """Each stage's memory need against what it has. Training holds the whole (4-bit) model in each process: on
    one GPU per process, or in host memory on the CPU. The stages after it run in host memory, except verify and
    evaluate, which spread the merged model over GPUs, host memory and disk and so always fit; their adapter model
    is the training model, which fits where training fits."""
    other = size.params - size.quantized
    base = int(size.quantized * NF4_BYTES) + other * compute_bytes if load_in_4bit else size.params * compute_bytes
    # Quantized on load one tensor at a time: the 16-bit tensor read, its float32 copy and the quantizer's buffers.
    loading = size.largest_linear * (size.dtype_bytes + 8) if load_in_4bit else 0
    train_need = base + size.lora * LORA_TRAIN_BYTES + loading
    result = Plan(size)
    if device == "cuda":
        smallest = min(gpu_memory) if gpu_memory else 0
        result.stages.append(
            Stage(
                "train",
                "GPU",
                train_need + GPU_RESERVE,
                smallest,
                f"{'4-bit' if load_in_4bit else '16-bit'} base {fmt(base)} + LoRA and optimizer state "
                f"{fmt(size.lora * LORA_TRAIN_BYTES)} + loading {fmt(loading)} + {fmt(GPU_RESERVE)} reserve, "
                "on each GPU",
            )
        )
    else:
        result.stages.append(
            Stage(
                "train",
                "host",
                train_need,
                hosted.available,
                f"{'4-bit' if load_in_4bit else '16-bit'} base {fmt(base)} + LoRA and optimizer state "
                f"{fmt(size.lora * LORA_TRAIN_BYTES)} + loading {fmt(loading)}",
            )
        )
    # Streamed: one 16-bit tensor read, its float32 sum with the LoRA product, the 16-bit result written.
    tensor = size.largest_linear * (size.dtype_bytes * 2 + 4)
    adapter = size.lora * 4
    result.stages.append(
        Stage("merge", "host", tensor + adapter, hosted.available, "streamed: the largest tensor at a time + adapter")
    )
    # Offloading moves one decoder layer at a time to the device that computes it.
    layer = size.largest_block * size.dtype_bytes
    result.stages.append(
        Stage(
            "verify",
            "host" if device == "cpu" else "GPU",
            layer,
            hosted.available if device == "cpu" else (max(gpu_memory) if gpu_memory else 0),
            f"16-bit model {fmt(size.bytes16)} over GPUs, host memory and disk; one layer at a time at least",
        )
    )
    if quantize:
        result.stages.append(
            Stage("quantize", "host", tensor, hosted.available, "shard by shard: the largest tensor at a time")
        )
    spread = sum(max(0, m - GPU_RESERVE) for m in gpu_memory) if device == "cuda" else 0
    host_budget = int(hosted.available * HOST_WEIGHTS_SHARE)
    if size.bytes16 <= (max(gpu_memory) - GPU_RESERVE if spread else host_budget):
        result.placement = "one device"
    elif size.bytes16 <= spread + host_budget:
        result.placement = "spread over " + ("GPUs and host memory" if spread else "host memory")
    else:
        result.placement = f"{fmt(size.bytes16 - spread - host_budget)} read from disk at each forward (slow)"
    return result


# --------------------------------------------------------------------------------------------- measured peaks
def _status() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


class Peaks:
    """Each stage's peak memory in this process, for memory.json and the log: its anonymous memory, sampled every
    20 ms (what the kernel cannot reclaim; resident memory would also count the checkpoint files a stage maps,
    which the kernel drops under pressure) and, on a GPU, torch's peak allocation."""

    INTERVAL = 0.02

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, int]] = {}

    def measure(self, name: str):
        import contextlib
        import threading

        @contextlib.contextmanager
        def measuring():
            cuda = _cuda_ready()
            if cuda:
                import torch

                torch.cuda.reset_peak_memory_stats()
            anon = [_status().get("RssAnon", 0)]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(self.INTERVAL):
                    anon[0] = max(anon[0], _status().get("RssAnon", 0))

            thread = threading.Thread(target=sample, name=f"peak-{name}", daemon=True)
            thread.start()
            try:
                yield
            finally:
                done.set()
                thread.join()
                now = _status()
                peak = {"anon": max(anon[0], now.get("RssAnon", 0))}
                if cuda:
                    import torch

                    peak["gpu"] = int(torch.cuda.max_memory_allocated())
                self.stages[name] = peak
                log.info(
                    "%s: peak memory %s%s",
                    name,
                    fmt(peak["anon"]),
                    f", {fmt(peak['gpu'])} on the GPU" if "gpu" in peak else "",
                )

        return measuring()


def _cuda_ready() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.is_initialized()


# --------------------------------------------------------------------------------------------- preflight
def preflight(cfg, placement, *, train: bool, merge: bool) -> Plan | None:
    """The plan for this run's stages that are still to run (a rerun past training plans no training), logged as a
    table; None when the model's sizes cannot be worked out from its config (logged; the run goes on)."""
    from tuneserve.exitcodes import ConfigError
    from tuneserve.model import model_config

    try:
        config = model_config(cfg)
    except ConfigError:  # training's own check says why, after the data's (the order --check has always had)
        log.info("memory plan: skipped, %s's config cannot be read", cfg.base_model)
        return None
    try:
        size = model_size(
            config, target_modules=cfg.lora_target_modules, rank=cfg.lora_r, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as exc:  # an architecture that cannot be built on the meta device: no plan, no refusal
        log.warning("memory plan: cannot size %s from its config (%s); no memory check", cfg.base_model, exc)
        return None
    gpu_memory, hosted = (gpus() if placement.device == "cuda" else []), host()
    result = plan(
        size,
        device=placement.device,
        compute_bytes=4 if placement.dtype_name == "float32" else 2,
        load_in_4bit=cfg.load_in_4bit,
        gpu_memory=gpu_memory,
        hosted=hosted,
        quantize=cfg.quantize != "none",
    )
    result.stages = [s for s in result.stages if (s.name != "train" or train) and (s.name == "train" or merge)]
    log.info(
        "memory plan: %s parameters, %s at 16 bits; %s; host %s free of %s (%s); verify and evaluate load the "
        "merged model %s\n%s",
        f"{size.params / 1e9:.2f} B" if size.params >= 1e8 else f"{size.params / 1e6:.1f} M",
        fmt(size.bytes16),
        f"{len(gpu_memory)} GPU(s) of {fmt(min(gpu_memory))}" if gpu_memory else "no GPU",
        fmt(hosted.available),
        fmt(hosted.limit),
        hosted.source,
        result.placement,
        result.table(),
    )
    return result
