"""Shared fixtures: tiny real models and datasets built by the tests (no Hub is reachable), a finished training
run, and the rendered Kubernetes overlays. Plain helpers and constants are in helpers.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import CACHE_VARS, CORPUS, LEARN_ENV, qa_messages, run_train, write_jsonl


def pytest_configure(config):
    """Every cache the code under test writes (the datasets' Arrow files, vLLM's compile cache, pip's) goes to a
    folder of this session, passed on to the entrypoints the tests start (helpers.clean_env): a run here behaves
    like one on a machine that never ran the project, and leaves nothing in the user's ~/.cache."""
    config._tuneserve_saved_env = {k: os.environ.get(k) for k in CACHE_VARS}
    config._tuneserve_cache = Path(tempfile.mkdtemp(prefix="tuneserve-test-cache-"))
    os.environ["XDG_CACHE_HOME"] = str(config._tuneserve_cache)
    os.environ["HF_HOME"] = str(config._tuneserve_cache / "huggingface")
    os.environ["VLLM_CACHE_ROOT"] = str(config._tuneserve_cache / "vllm")


def pytest_unconfigure(config):
    for key, value in getattr(config, "_tuneserve_saved_env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if cache := getattr(config, "_tuneserve_cache", None):
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def chatml_base(tmp_path_factory) -> Path:
    """A tiny Qwen2 base whose tokenizer has a ChatML template: turns end with <|im_end|>, eos is
    <|endoftext|> (end-of-turn != eos)."""
    from devtools.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "chatml", CORPUS, template="chatml")


@pytest.fixture(scope="session")
def pt_base(tmp_path_factory) -> Path:
    """A tiny base ('-pt') model: no chat template, no chat special tokens."""
    from devtools.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "pt", CORPUS, template=None)


@pytest.fixture(scope="session")
def qa_dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", qa_messages())


@pytest.fixture(scope="session")
def trained_output(tmp_path_factory, chatml_base, qa_dataset) -> Path:
    """A finished run of the whole job on the 8 question/answer pairs: adapter, merged folder (MERGE_BASE
    original), verify.json with both merge bases compared. Tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("trained")
    out = root / "out"
    res = run_train(
        {
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(out),
            "VERIFY_COMPARE_MERGE_BASES": "true",
            **LEARN_ENV,
        },
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Every overlay of k8s/overlays rendered (k8s/render.py) as the cluster would get it, by overlay name."""
    from tests.k8s_helpers import K8S, OVERLAYS, render

    return {name: render.build(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 600 KB (root only: mount); `resize(kb)` grows it as an operator would enlarge a volume."""
    import os
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a small tmpfs for the disk-full test: {res.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {res.stderr.strip()}")

    def resize(kb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kb}k", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
