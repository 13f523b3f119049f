"""What the tests share besides fixtures (those are in conftest.py): the 8 question/answer pairs and the corpus
the tiny models are built from, the settings under which a tiny model learns them, and a runner for the exact
command the training image runs, in a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.health import free_port, stop_server, wait_healthy

REPO = Path(__file__).resolve().parents[1]

QA = [
    ("What is the capital of France?", "Paris"),
    ("What color is the sky?", "Blue"),
    ("How many legs has a spider?", "Eight"),
    ("What is two plus two?", "Four"),
    ("Who wrote Hamlet?", "Shakespeare"),
    ("What is frozen water?", "Ice"),
    ("Which planet is red?", "Mars"),
    ("What do bees make?", "Honey"),
]
CORPUS = [f"{q} {a}" for q, a in QA] * 20 + ["SELECT name FROM users WHERE id = 1;", "CREATE TABLE t (a INT);"]

# Hyper-parameters under which the tiny model (devtools.tiny) learns the 8 pairs exactly with CPU QLoRA: LoRA rank 32
# and alpha 64, learning rate 5e-3, all 8 pairs in one batch (one step per epoch) for 60 epochs.
LEARN_ENV = {
    "LORA_R": "32",
    "LORA_ALPHA": "64",
    "LEARNING_RATE": "5e-3",
    "NUM_TRAIN_EPOCHS": "60",
    "PER_DEVICE_TRAIN_BATCH_SIZE": "8",
    "GRADIENT_ACCUMULATION_STEPS": "1",
    "LOGGING_STEPS": "20",
    "SAVE_STEPS": "1000",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_messages() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]


# Where caches go; conftest points them at a folder of the test session, and clean_env passes them on.
CACHE_VARS = ("XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT")


def clean_env(**overrides: str) -> dict[str, str]:
    """A minimal environment: nothing from the developer's shell leaks into the run under test (the cache folders
    are the test session's own, see conftest)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR", *CACHE_VARS) if k in os.environ}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "entrypoints.train", *args]


def run_train(env: dict[str, str], *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(*args), env=clean_env(**env), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def start_train(env: dict, cwd: Path) -> subprocess.Popen:
    """The training entrypoint started in the background, its stderr merged into stdout (read with wait_for)."""
    return subprocess.Popen(
        train_cmd(), env=clean_env(**env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


# The progress line of a logged optimizer step (tuneserve.trainlog): training is under way.
STEP_LOGGED = "tuneserve.trainlog: step "


def wait_for(proc: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    """Read `proc`'s output until a line holds `needle`; what was read."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)[-3000:]}")


def copy_output(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def ask(client, model: str) -> list[tuple[str, str]]:
    out = []
    for q, _ in QA:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=32
        )
        out.append((r.choices[0].message.content, r.choices[0].finish_reason))
    return out


# ------------------------------------------------------------------------------------------- vLLM servers
SERVE_PYTHON = Path(os.environ.get("SERVE_PYTHON", REPO / ".venv-serve" / "bin" / "python"))


def serve_cmd(*args: str, python: Path | str = sys.executable) -> list[str]:
    return [str(python), "-m", "entrypoints.serve", *args]


def need_vllm() -> None:
    if not SERVE_PYTHON.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SERVE_PYTHON} is missing: `make setup` creates .venv-serve with vLLM's CPU build")
        pytest.skip(f"{SERVE_PYTHON} is missing (make setup creates it)")


class Server:
    def __init__(self, env: dict, cwd: Path):
        self.port = free_port()
        self.log = cwd / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(
            serve_cmd(python=SERVE_PYTHON),
            env=clean_env(HOST="127.0.0.1", PORT=str(self.port), VLLM_CPU_KVCACHE_SPACE="1", **env),
            cwd=cwd,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300) -> None:
        def check_alive():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")

        try:
            wait_healthy(self.url, check_alive, timeout)
        except TimeoutError:
            raise AssertionError(f"server not ready in {timeout}s:\n{self.log.read_text()[-4000:]}") from None

    def stop(self) -> int:
        return stop_server(self.proc)

    def engine(self):
        """vLLM's engine core process (a child of the server), to stall and resume it."""
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
                return child
        raise AssertionError("no EngineCore process under the server")

    def request(
        self, path: str, body: object = None, key: str | None = None, method: str | None = None
    ) -> tuple[int, dict | str]:
        """(status, parsed JSON or text) of one request; never raises for an HTTP error status."""
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        if key is not None:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, text = r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text
