"""No silent CPU fallback (tuneserve/driver.py): NVIDIA GPUs given to the process but CUDA unable to start (a driver
older than torch's CUDA needs) stops DEVICE=auto with exit 2 and both driver versions, instead of training 4-bit on
the CPU for hours. The CUDA probe, the device files and the driver's version file are faked: fast, on any machine."""

from __future__ import annotations

import pytest

from tuneserve import driver
from tuneserve.config import load_train_config
from tuneserve.exitcodes import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:CUDA initialization")

OLD_DRIVER = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"


def settings(**env):
    return load_train_config({"BASE_MODEL": "org/m", "DATASET": "org/d", **env})


@pytest.fixture
def no_cuda(monkeypatch, tmp_path):
    """torch.cuda.is_available() False with torch's old-driver warning; no GPU device files, no version file."""
    import warnings

    import torch

    def unavailable():
        too_old = "CUDA initialization: The NVIDIA driver on your system is too old (found version 12020)."
        warnings.warn(too_old, stacklevel=2)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(driver, "DEV_GLOB", str(tmp_path / "dev" / "nvidia[0-9]*"))
    monkeypatch.setattr(driver, "PROC_VERSION", str(tmp_path / "proc-version"))
    monkeypatch.setattr(driver.shutil, "which", lambda name: None)  # no nvidia-smi
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def gpus(root, n=2):
    (root / "dev").mkdir()
    for i in range(n):
        (root / "dev" / f"nvidia{i}").touch()


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_gpu_device_files_with_an_old_driver_stop_the_run_naming_both_drivers(no_cuda, device):
    from tuneserve.model import resolve_placement

    gpus(no_cuda)
    (no_cuda / "proc-version").write_text(OLD_DRIVER)
    with pytest.raises(ConfigError) as exc:
        resolve_placement(settings(DEVICE=device))
    msg = str(exc.value)
    assert f"DEVICE={device}: NVIDIA GPUs are present" in msg and "nvidia0, " in msg
    assert "driver found: 535.104.05" in msg and "needs driver >= 580" in msg and "CUDA 13.0" in msg
    assert "update the node's NVIDIA driver to 580 or newer" in msg and "found version 12020" in msg
    assert "DEVICE=cpu" in msg
    assert int(ConfigError.exit_code) == 2  # the entrypoint exits with it


def test_an_explicit_gpu_request_without_device_files_is_also_refused(no_cuda, monkeypatch):
    from tuneserve.model import resolve_placement

    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-1f2e3d4c,GPU-5a6b7c8d")
    with pytest.raises(ConfigError, match=r"NVIDIA_VISIBLE_DEVICES=GPU-1f2e3d4c.*driver found: unknown"):
        resolve_placement(settings())


@pytest.mark.parametrize("visible", [None, "", "void", "none", "all", "NONE"])
def test_no_gpu_given_is_the_cpu_as_before(no_cuda, monkeypatch, visible):
    """`all` is Dockerfile.train's own default (for the NVIDIA runtime), present on a CPU node too: no signal."""
    from tuneserve.model import resolve_placement

    if visible is not None:
        monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", visible)
    assert resolve_placement(settings(DEVICE="auto")).device == "cpu"


def test_driver_version_from_nvidia_smi_when_proc_has_none(no_cuda, monkeypatch):
    import subprocess

    monkeypatch.setattr(driver.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(
        driver.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout="550.54.15\n", stderr="")
    )
    assert driver.driver_version() == "550.54.15"


@pytest.mark.parametrize("cuda, need", [("13.0", 580), ("12.8", 525), ("11.8", 450), (None, None), ("x", None)])
def test_required_driver_follows_torchs_cuda_major_version(cuda, need):
    assert driver.required_driver(cuda) == need


def test_the_pinned_torch_is_the_cuda_13_build_the_minimum_is_documented_for():
    """requirements/train.txt's torch is PyPI's CUDA 13.0 build; the documented minimum is that version's."""
    from tests.helpers import REPO

    assert "torch==2.13.0" in (REPO / "requirements" / "train.txt").read_text()
    images = (REPO / "docs" / "images.md").read_text()
    assert f"driver {driver.MIN_DRIVER[13]} or newer" in images
