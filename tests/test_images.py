"""The two images, run in a real container runtime (podman) the way users run them: the training image
on a tiny model with environment variables only, a read-only root filesystem and a non-root user; the
serving image on the merged folder it produced, over HTTP through a published port.

The images are built by `make test-images` (images/local/build.sh: Dockerfile.train and Dockerfile.serve
on local stand-in bases). These tests run only in that lane (marker `images`); they fail, never skip,
when an image is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest

from devtools.health import free_port, wait_healthy
from tests.helpers import LEARN_ENV, QA, REPO, STEP_LOGGED, ask, clean_env

pytestmark = pytest.mark.images

IMAGE_TRAIN = os.environ.get("IMAGE_TRAIN", "localhost/tuneserve-train:test")
IMAGE_SERVE = os.environ.get("IMAGE_SERVE", "localhost/tuneserve-serve:test")
UID = "10001"
TOKEN = "hf_imagetestTOKENabcdefghijklmnopqrstu"  # a made-up token: it must not reach the image or the volume
KEY = "sk-image-test-KEY456"
# Each run is the user's `docker run`: read-only root (podman mounts a tmpfs on /tmp), numeric non-root
# user, no network for training (everything is mounted).
HARDENED = ["--read-only", "--user", f"{UID}:{UID}", "--security-opt", "no-new-privileges", "--cap-drop", "ALL"]


def podman(
    *args: str, check: bool = True, timeout: float = 600, env: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CONTAINERS_CONF": str(REPO / "images" / "local" / "containers.conf"), **(env or {})}
    res = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=full_env, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... exited {res.returncode}:\n{res.stderr[-4000:]}")
    return res


@pytest.fixture(scope="module", autouse=True)
def images():
    missing = [
        i for i in (IMAGE_TRAIN, IMAGE_SERVE) if subprocess.run(["podman", "image", "exists", i]).returncode != 0
    ]
    if missing:
        pytest.fail(f"images not built: {missing}. `make test-images` builds them (images/local/build.sh).")


def writable_volume(path: Path) -> Path:
    """A host directory the container's user can write, as a user would chown a volume."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, int(UID), int(UID))
    return path


def train_run(out: Path, base: Path, data: Path, env: dict, name: str | None = None) -> list[str]:
    args = [
        "run",
        "--rm",
        *HARDENED,
        "--network",
        "none",
        "--shm-size",
        "256m",
        "-v",
        f"{base}:/models/base:ro",
        "-v",
        f"{data}:/data/train.jsonl:ro",
        "-v",
        f"{out}:/output",
        "-e",
        "BASE_MODEL=/models/base",
        "-e",
        "DATASET=/data/train.jsonl",
        "-e",
        "HF_TOKEN",
    ]
    if name:
        args += ["--name", name]
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    return [*args, IMAGE_TRAIN]


@pytest.fixture(scope="module")
def trained_volume(tmp_path_factory, chatml_base, qa_dataset) -> tuple[Path, subprocess.CompletedProcess]:
    out = writable_volume(tmp_path_factory.mktemp("image-train") / "output")
    # HF_TOKEN is handed over by name (`-e HF_TOKEN`), so its value is in no command line. QUANTIZE: the
    # training image also writes quantized/ (compressed-tensors in the image).
    env = {**LEARN_ENV, "QUANTIZE": "int8"}
    res = podman(*train_run(out, chatml_base, qa_dataset, env), env={"HF_TOKEN": TOKEN}, timeout=900)
    return out, res


@pytest.mark.slow
def test_training_image_runs_read_only_as_non_root_and_leaves_the_merged_model_on_the_volume(trained_volume):
    out, res = trained_volume
    assert res.returncode == 0, res.stderr[-4000:]
    merged = out / "merged"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (merged / name).is_file(), name
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] is True
    # Written by the image's user, not root.
    assert {p.stat().st_uid for p in out.rglob("*")} == {int(UID)}
    # The run's configuration came from the environment alone and OUTPUT_DIR from the image's default.
    config = json.loads((out / "config.json").read_text())
    assert config["BASE_MODEL"] == "/models/base" and config["OUTPUT_DIR"] == "/output"
    assert config["HF_TOKEN"] == "***"  # the token was handed over, and masked


@pytest.mark.slow
def test_serving_image_holds_the_engine_evaluation_and_refuses_an_ungated_quantized_folder(trained_volume):
    """The training image wrote quantized/; the serving image has the engine evaluation's command, which checks
    OUTPUT_DIR (this run held out no rows: exit 2, saying so), and its server refuses the folder until then."""
    out, res = trained_volume
    assert res.returncode == 0, res.stderr[-4000:]
    info = json.loads((out / "quantized" / "quantize_info.json").read_text())
    assert info["scheme"] == "int8" and info["bytes"] < info["source_bytes"]
    common = ["run", "--rm", *HARDENED, "--network", "none", "-v", f"{out}:/output:ro"]
    check = podman(
        *common, "--entrypoint", "python3", IMAGE_SERVE, "-m", "entrypoints.evaluate", "--check", check=False
    )
    assert check.returncode == 2 and "no held-out rows to evaluate with" in check.stderr, check.stderr[-3000:]
    serve = podman(
        *common,
        "-e",
        "MODEL_ID=/output/quantized",
        "-e",
        "API_KEY",
        IMAGE_SERVE,
        "--check",
        check=False,
        env={"API_KEY": KEY},
    )
    assert serve.returncode == 2 and "has not been through the engine evaluation" in serve.stderr, serve.stderr[-3000:]


@pytest.mark.slow
def test_runtime_token_reaches_neither_the_volume_nor_the_logs_nor_the_image(trained_volume):
    out, res = trained_volume
    assert res.returncode == 0, res.stderr[-4000:]
    assert TOKEN not in res.stdout + res.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for image in (IMAGE_TRAIN, IMAGE_SERVE):
        inspect = podman("image", "inspect", image).stdout
        assert TOKEN not in inspect and "HF_TOKEN=" not in inspect
        # Every layer of the image, streamed: the token is nowhere in it.
        proc = subprocess.Popen(["podman", "image", "save", image], stdout=subprocess.PIPE)
        tail, found = b"", False
        while chunk := proc.stdout.read(1 << 22):
            found = found or TOKEN.encode() in tail + chunk
            tail = chunk[-len(TOKEN) :]
        assert proc.wait() == 0 and not found, image


def test_images_run_as_a_numeric_non_root_user():
    for image in (IMAGE_TRAIN, IMAGE_SERVE):
        user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
        assert user == f"{UID}:{UID}", (image, user)
        ids = podman("run", "--rm", "--read-only", "--entrypoint", "id", image).stdout
        assert ids.startswith(f"uid={UID}(") and f" gid={UID}(" in ids, (image, ids)


def test_images_run_the_installed_distribution_not_a_copy_of_the_sources():
    """Both images install the project into their Python (pyproject.toml's packages and package data, its version):
    the code comes from site-packages, the working directory holds no sources, the label carries the version."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    probe = (
        "import importlib.metadata as m, json, os\n"
        "import entrypoints, tuneserve\n"
        "from tuneserve import passthrough, vllm_flags\n"
        "print(json.dumps({'tuneserve': tuneserve.__file__, 'entrypoints': entrypoints.__file__,\n"
        "  'version': m.version('tuneserve'), 'data': [len(vllm_flags.load()), len(passthrough.load())],\n"
        "  'cwd': sorted(os.listdir('.'))}))\n"
    )
    for image in (IMAGE_TRAIN, IMAGE_SERVE):
        res = podman("run", "--rm", *HARDENED, "--network", "none", "--entrypoint", "python3", image, "-c", probe)
        found = json.loads(res.stdout)
        assert "-packages/tuneserve/" in found["tuneserve"], (image, found)  # site- or dist-packages
        assert "-packages/entrypoints/" in found["entrypoints"], (image, found)
        assert found["version"] == version and all(found["data"]) and found["cwd"] == [], (image, found)
        labels = json.loads(podman("image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout)
        assert labels["org.opencontainers.image.version"] == version, (image, labels)


def test_training_image_reports_configuration_errors_with_exit_2(tmp_path):
    res = podman(
        "run",
        "--rm",
        *HARDENED,
        "--network",
        "none",
        "-e",
        "BASE_MODEL=",
        "-e",
        "LORA_R=many",
        IMAGE_TRAIN,
        check=False,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "BASE_MODEL is required" in res.stderr and "LORA_R='many'" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_podman_stop_mid_run_exits_143_with_a_checkpoint_and_a_rerun_resumes(tmp_path, chatml_base, qa_dataset):
    out = writable_volume(tmp_path / "output")
    env = {
        "MAX_STEPS": "400",
        "SAVE_STEPS": "1000",
        "PER_DEVICE_TRAIN_BATCH_SIZE": "2",
        "LOGGING_STEPS": "1",
        "MERGE": "false",
    }
    name = f"tuneserve-stop-{uuid.uuid4().hex[:8]}"
    cmd = ["podman", *train_run(out, chatml_base, qa_dataset, env, name=name)]
    conf = {**os.environ, "CONTAINERS_CONF": str(REPO / "images" / "local" / "containers.conf")}
    proc = subprocess.Popen(cmd, env=conf, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        for line in proc.stdout:
            log.append(line)
            if STEP_LOGGED in line:  # the first logged step: training is under way
                break
        else:
            raise AssertionError("training never started:\n" + "".join(log)[-4000:])
        stop = podman("stop", "--time", "120", name, check=False)
        log.append(proc.communicate(timeout=300)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(log)
    assert proc.returncode == 143, f"podman stop: {stop.stderr}\n{text[-4000:]}"
    assert "stopped by SIGTERM at step" in text
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "checkpoint_complete.json").is_file(), text[-3000:]
    step = int(ckpts[0].name.split("-")[1])
    assert 0 < step < 400

    res = podman(*train_run(out, chatml_base, qa_dataset, env), timeout=900)
    assert f"resuming from /output/checkpoints/{ckpts[0].name} (step {step})" in res.stderr
    assert json.loads((out / "train_report.json").read_text())["global_step"] == 400


@pytest.mark.slow
def test_serving_image_answers_chat_completions_from_the_merged_folder(trained_volume):
    import openai

    out, res = trained_volume
    assert res.returncode == 0, res.stderr[-4000:]
    port, name = free_port(), f"tuneserve-serve-{uuid.uuid4().hex[:8]}"
    # vLLM's engine talks to its API process through /dev/shm (160 MiB here; the runtime default is 64 MB).
    podman(
        "run",
        "-d",
        "--name",
        name,
        *HARDENED,
        "--shm-size",
        "1g",
        "-p",
        f"127.0.0.1:{port}:8000",
        "-v",
        f"{out}:/output:ro",
        "-e",
        "MODEL_ID=/output/merged",
        "-e",
        "SERVED_MODEL_NAME=qa-model",
        "-e",
        "MAX_MODEL_LEN=128",
        "-e",
        "API_KEY",
        "-e",
        "VLLM_CPU_KVCACHE_SPACE=1",
        IMAGE_SERVE,
        env={"API_KEY": KEY},
    )
    try:

        def check_alive():
            state = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", "server exited:\n" + podman("logs", name, check=False).stderr[-4000:]

        try:
            wait_healthy(f"http://127.0.0.1:{port}", check_alive, timeout=420, interval=2)
        except TimeoutError:
            raise AssertionError("not ready:\n" + podman("logs", name, check=False).stderr[-4000:]) from None
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY)
        assert ask(client, "qa-model") == [(a, "stop") for _, a in QA]
        # The gate is in the image: a route vLLM leaves open wants the key; the liveness probe does not.
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as keyless:
            urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=b"{}"), timeout=30
            )
        assert keyless.value.code == 401
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/live", timeout=30) as live:
            assert live.status == 200
        # `podman stop`'s SIGTERM reaches vLLM through the supervisor (PID 1): a drain, a clean exit, not a kill.
        podman("stop", "--time", "60", name)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", podman("logs", name, check=False).stderr[-3000:]
    finally:
        podman("rm", "--force", name, check=False)


def test_images_benchmark_smoke_measures_both_built_images(tmp_path):
    """The images benchmark (make bench) reads the images this lane built; its smoke run sizes each of them."""
    from test_bench import assert_documented_structure

    results = tmp_path / "results"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.images",
            "--smoke",
            "--results-dir",
            str(results),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        env=clean_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads((results / "images.json").read_text())
    assert_documented_structure(r, "images")
    rows = {row["key"]: row for row in r["rows"]}
    assert {"train", "serve", "vllm", "serve-added"} <= set(rows), r["not_run"]
    for key in ("train", "serve", "vllm"):
        assert rows[key]["unpacked_gb"] > 0 and rows[key]["layers"] > 0
    # The serving image is its vLLM base plus our layers: strictly larger, by what those layers add.
    assert 0 < rows["serve-added"]["unpacked_gb"] < rows["serve"]["unpacked_gb"]


def test_training_image_compiles_a_c_module_the_way_triton_does():
    """On CUDA, TRL's loss runs a Triton kernel and Triton first compiles a C launcher: gcc (else clang) found
    on PATH, Python's headers, `-O3 -shared -fPIC`, written under its cache on /tmp (triton/runtime/build.py).
    Here the same build, in the hardened container (read-only root, non-root), then the module is imported."""
    script = r'''
import importlib.util, os, shutil, subprocess, sysconfig
cache = os.environ["TRITON_CACHE_DIR"]
os.makedirs(cache, exist_ok=True)
src = os.path.join(cache, "probe.c")
open(src, "w").write("""#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "probe", NULL, -1, methods};
PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&mod); }
""")
cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
so = os.path.join(cache, "probe" + sysconfig.get_config_var("EXT_SUFFIX"))
subprocess.check_call([cc, src, "-O3", "-shared", "-fPIC", "-Wno-psabi", "-o", so,
                       "-I" + sysconfig.get_paths()["include"]])
spec = importlib.util.spec_from_file_location("probe", so)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print("answer", module.answer(), cc)
'''
    res = podman("run", "--rm", *HARDENED, "--network", "none", "--entrypoint", "python", IMAGE_TRAIN, "-c", script)
    assert "answer 42 /usr/bin/gcc" in res.stdout, res.stdout + res.stderr
