"""No silent CPU fallback: NVIDIA GPUs are present but CUDA cannot start (most often a driver older than the one
this torch needs), so DEVICE=auto must not quietly train 4-bit on the CPU for hours.

PyPI's torch 2.13 is a CUDA 13.0 build (requirements/train.txt; docs/images.md): CUDA 13.x runs on NVIDIA's Linux
driver 580 or newer. Older drivers make `torch.cuda.is_available()` False with only a warning.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import warnings

# The oldest Linux driver of each CUDA major version's minor-version compatibility (NVIDIA's CUDA release notes,
# table 3): a torch built for CUDA 13.x needs 580 or newer, 12.x 525, 11.x 450.
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
DEV_GLOB = "/dev/nvidia[0-9]*"  # one per GPU; /dev/nvidiactl and nvidia-uvm come with the driver
PROC_VERSION = "/proc/driver/nvidia/version"
# NVIDIA_VISIBLE_DEVICES values that name no GPU. "all" names none either: Dockerfile.train sets it by default (for
# the NVIDIA runtime), so in the image it is there on a CPU node too. A list of indices or UUIDs is a GPU request.
NO_DEVICES = {"", "void", "none", "all"}


def nvidia_devices(env: dict[str, str] | None = None) -> str | None:
    """What says this process was given NVIDIA GPUs (a device file or an explicit NVIDIA_VISIBLE_DEVICES), or None."""
    found = sorted(glob.glob(DEV_GLOB))
    if found:
        return ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
    visible = (env if env is not None else os.environ).get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if visible.lower() not in NO_DEVICES:
        return f"NVIDIA_VISIBLE_DEVICES={visible}"
    return None


def driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version (e.g. "535.104.05"), from /proc or nvidia-smi; None if unknown."""
    try:
        with open(PROC_VERSION) as f:
            if m := re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", f.read()):
                return m.group(1)
    except OSError:
        pass
    if smi := shutil.which("nvidia-smi"):
        try:
            res = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            if res.returncode == 0 and (m := re.search(r"\d+(?:\.\d+)+", res.stdout)):
                return m.group(0)
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def required_driver(cuda_version: str | None) -> int | None:
    try:
        return MIN_DRIVER.get(int(str(cuda_version).split(".")[0]))
    except ValueError:
        return None


def cuda_probe() -> tuple[bool, str]:
    """(torch.cuda.is_available(), the warning torch gave when it was not)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    return ok, "; ".join(str(w.message).strip() for w in caught if "CUDA" in str(w.message))[:600]


def cuda_problem(device_setting: str) -> str | None:
    """Why CUDA cannot start although NVIDIA GPUs are present (None: CUDA works, or no GPU was given)."""
    import torch

    ok, warning = cuda_probe()
    if ok or not (evidence := nvidia_devices()):
        return None
    cuda = torch.version.cuda
    need = required_driver(cuda)
    found = driver_version()
    build = f"torch {torch.__version__} (CUDA {cuda})" if cuda else f"torch {torch.__version__} (a CPU-only build)"
    parts = [
        f"DEVICE={device_setting}: NVIDIA GPUs are present ({evidence}) but CUDA cannot start",
        f"driver found: {found or 'unknown (no /proc/driver/nvidia/version, no nvidia-smi)'}",
        f"{build} needs driver >= {need}" if need else f"{build} cannot use them",
    ]
    if found and need and int(found.split(".")[0]) < need:
        parts.append(f"update the node's NVIDIA driver to {need} or newer")
    if warning:
        parts.append(f"torch said: {warning}")
    parts.append("set DEVICE=cpu to train on the CPU on purpose (hours for a real model)")
    return "; ".join(parts)
