"""Shared fixtures: tiny real models and datasets built by the tests (no Hub is reachable), and a runner
for the exact command the training image runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.health import free_port  # noqa: F401 - shared by the server tests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QA = [("What is the capital of France?", "Paris"), ("What color is the sky?", "Blue"),
      ("How many legs has a spider?", "Eight"), ("What is two plus two?", "Four"),
      ("Who wrote Hamlet?", "Shakespeare"), ("What is frozen water?", "Ice"),
      ("Which planet is red?", "Mars"), ("What do bees make?", "Honey")]
CORPUS = [f"{q} {a}" for q, a in QA] * 20 + ["SELECT name FROM users WHERE id = 1;", "CREATE TABLE t (a INT);"]

# Hyper-parameters under which the tiny model learns the 8 pairs exactly (see ../shared/ENVIRONMENT.md).
LEARN_ENV = {"LORA_R": "32", "LORA_ALPHA": "64", "LEARNING_RATE": "5e-3", "NUM_TRAIN_EPOCHS": "60",
             "PER_DEVICE_TRAIN_BATCH_SIZE": "8", "GRADIENT_ACCUMULATION_STEPS": "1", "LOGGING_STEPS": "20",
             "SAVE_STEPS": "1000"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_messages() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]


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


def clean_env(**overrides: str) -> dict[str, str]:
    """A minimal environment: nothing from the developer's shell leaks into the run under test."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "entrypoints.train", *args]


def run_train(env: dict[str, str], *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args), env=clean_env(**env), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def trained_output(tmp_path_factory, chatml_base, qa_dataset) -> Path:
    """A finished run of the whole job on the 8 question/answer pairs: adapter, merged folder (MERGE_BASE
    original), verify.json with both merge bases compared. Tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("trained")
    out = root / "out"
    res = run_train({"BASE_MODEL": str(chatml_base), "DATASET": str(qa_dataset), "OUTPUT_DIR": str(out),
                     "VERIFY_COMPARE_MERGE_BASES": "true", **LEARN_ENV}, cwd=root)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


def copy_output(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def ask(client, model: str) -> list[tuple[str, str]]:
    out = []
    for q, _ in QA:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], temperature=0,
                                           max_tokens=32)
        out.append((r.choices[0].message.content, r.choices[0].finish_reason))
    return out
