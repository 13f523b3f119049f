"""The distribution, as the images and any other installed copy get it: the wheel carries every file the package
reads next to its code, and an installed copy, with no checkout on sys.path, runs both entrypoints.

The wheel is built offline, as the images build it (pyproject.toml, tuneserve/ and entrypoints/ copied out of the
checkout; the pinned setuptools of requirements/build.txt, --no-build-isolation), then installed into scratch
virtual environments whose dependencies are .venv-train's or .venv-serve's, reached through a .pth file that names
their site-packages: a plain path entry, so the .pth files in it (the venvs' own editable install of tuneserve) are
not run, and tuneserve and entrypoints can only come from the scratch environment's site-packages.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, SERVE_PYTHON, clean_env

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
PACKAGES = ("tuneserve", "entrypoints")
KEY = "sk-wheel-test-KEY789"


def run(argv: list, cwd: Path, timeout: float = 300, **overrides: str) -> subprocess.CompletedProcess:
    """clean_env has no PYTHONPATH: only the installed interpreter's own sys.path counts."""
    env = clean_env(PYTHONDONTWRITEBYTECODE="1", **overrides)
    return subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def source_files(package: str) -> list[str]:
    """The package's files in the checkout (what the images' build context holds), as paths in the wheel."""
    return sorted(
        p.relative_to(REPO).as_posix()
        for p in (REPO / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc" and not p.name.startswith(".")
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    res = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--wheel-dir",
            root / "dist",
            src,
        ],
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (built,) = (root / "dist").glob("*.whl")
    assert built.name == f"tuneserve-{VERSION}-py3-none-any.whl"
    return built


def scratch_venv(python: Path, wheel: Path, root: Path) -> Path:
    """A virtual environment of `python`'s base interpreter with the wheel installed and `python`'s environment's
    packages behind it. Returns its interpreter."""
    res = run([python, "-m", "venv", "--without-pip", root], cwd=root.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    scratch = root / "bin" / "python"
    res = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            scratch,
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-index",
            wheel,
        ],
        cwd=root.parent,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    own, deps = (run([p, "-c", where], cwd=root.parent).stdout.strip() for p in (scratch, python))
    assert own.startswith(str(root)) and Path(deps, "torch").is_dir(), (own, deps)
    Path(own, "zz_dependencies.pth").write_text(deps + "\n")
    return scratch


def assert_installed_copy(python: Path, root: Path, cwd: Path) -> None:
    """tuneserve and entrypoints from the scratch environment, the checkout nowhere on sys.path, the package data
    readable."""
    probe = (
        "import importlib.metadata as m, importlib.util, json, sys\n"
        "import entrypoints, tuneserve\n"
        "from tuneserve import passthrough, templates, vllm_flags\n"
        "print(json.dumps({'tuneserve': tuneserve.__file__, 'entrypoints': entrypoints.__file__,\n"
        "  'dist': str(m.distribution('tuneserve').locate_file('')), 'version': m.version('tuneserve'),\n"
        "  'devtools': importlib.util.find_spec('devtools') is not None,\n"
        "  'data': [len(vllm_flags.load()), len(passthrough.load()), len(templates.named_template('chatml'))]}))\n"
    )
    res = run([python, "-c", probe], cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout)
    site = str(root / "lib")
    assert found["tuneserve"].startswith(site) and found["entrypoints"].startswith(site), found
    assert found["dist"].startswith(site) and found["version"] == VERSION, found
    assert found["devtools"] is False, "the checkout is on sys.path"
    assert all(found["data"]), found


def test_wheel_carries_both_packages_with_their_data_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"tuneserve-{VERSION}.dist-info/METADATA").decode()
    expected = [f for package in PACKAGES for f in source_files(package)]
    data = [f for f in expected if not f.endswith(".py")]
    assert "tuneserve/vllm_flags.json" in data and "tuneserve/templates/chatml.jinja" in data
    assert [f for f in expected if f not in names] == [], "missing from the wheel: pyproject.toml's package-data"
    assert {n.split("/")[0] for n in names} == {*PACKAGES, f"tuneserve-{VERSION}.dist-info"}
    assert re.search(rf"^Version: {re.escape(VERSION)}$", metadata, re.M)


def test_image_builds_get_what_the_install_needs_and_label_pyprojects_version():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for admitted in ("!pyproject.toml", *(f"!{p}/" for p in PACKAGES), "!requirements/"):
        assert admitted in ignore, admitted
    for dockerfile in ("Dockerfile.train", "Dockerfile.serve"):
        text = (REPO / dockerfile).read_text()
        assert re.findall(r"^ARG VERSION=(\S+)$", text, re.M) == [VERSION], dockerfile
        assert 'org.opencontainers.image.version="${VERSION}"' in text, dockerfile
        final_stage = text.split("\nFROM ")[-1].splitlines()  # the image itself: installed code only, no sources
        assert not [
            line for line in final_stage if line.startswith("COPY") and re.search(r"tuneserve|entrypoints", line)
        ]


def test_installed_training_entrypoint_runs_help_and_check_outside_the_checkout(
    wheel, tmp_path, chatml_base, qa_dataset
):
    python = scratch_venv(Path(sys.executable), wheel, tmp_path / "venv")
    cwd = tmp_path / "work"
    cwd.mkdir()
    assert_installed_copy(python, tmp_path / "venv", cwd)
    res = run([python, "-m", "entrypoints.train", "--help"], cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage: python -m entrypoints.train" in res.stdout and "BASE_MODEL" in res.stdout
    usage = " ".join(res.stdout.split("Configuration")[0].split())  # argparse wraps the help at the terminal width
    assert "trains nothing, writes nothing" in usage and "vLLM" not in usage
    out = tmp_path / "out"
    res = run(
        [python, "-m", "entrypoints.train", "--check"],
        cwd=cwd,
        BASE_MODEL=str(chatml_base),
        DATASET=str(qa_dataset),
        OUTPUT_DIR=str(out),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "preflight passed" in res.stderr and "assistant turns end with '<|im_end|>'" in res.stderr
    assert not out.exists()


def test_installed_serving_entrypoint_runs_help_and_check_outside_the_checkout(wheel, tmp_path, chatml_base):
    if not SERVE_PYTHON.is_file():
        pytest.fail(f"{SERVE_PYTHON} is missing: `make setup` builds .venv-serve")
    python = scratch_venv(SERVE_PYTHON, wheel, tmp_path / "venv")
    cwd = tmp_path / "work"
    cwd.mkdir()
    assert_installed_copy(python, tmp_path / "venv", cwd)
    res = run([python, "-m", "entrypoints.serve", "--help"], cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage: python -m entrypoints.serve" in res.stdout and "MODEL_ID" in res.stdout
    assert "without starting vLLM" in res.stdout and "dataset" not in res.stdout.split("Configuration")[0]
    # A vLLM flag set through VLLM_ARG_*: validated and mapped from the package data (vllm_flags.json).
    res = run(
        [python, "-m", "entrypoints.serve", "--check"],
        cwd=cwd,
        MODEL_ID=str(chatml_base),
        API_KEY=KEY,
        MAX_MODEL_LEN="128",
        VLLM_ARG_ENFORCE_EAGER="true",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"--model {chatml_base}" in res.stderr and "--max-model-len 128 " in res.stderr
    assert "--enforce-eager" in res.stderr and "(API key from VLLM_API_KEY)" in res.stderr
    assert KEY not in res.stdout + res.stderr
    # The engine evaluation's command ships in the same package, for the serving image.
    res = run([python, "-m", "entrypoints.evaluate", "--help"], cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage: python -m entrypoints.evaluate" in res.stdout and "QUANTIZE_MAX_DROP" in res.stdout
    res = run([python, "-m", "entrypoints.evaluate", "--check"], cwd=cwd, OUTPUT_DIR=str(tmp_path / "none"))
    assert res.returncode == 2 and "holds no merged model of a finished training run" in res.stderr, res.stderr[-3000:]
