"""overlays/quantized: the training Job also quantizes, the engine evaluation Job (components/engine-eval) gates
the quantized model in vLLM, and the Deployment serves it only once the verdict on the claim says it passed."""

from __future__ import annotations

import re

import yaml

from tests.helpers import REPO
from tests.k8s_helpers import (
    EVALUATE_JOB,
    OVERLAYS,
    TRAIN_JOB,
    claim_mount,
    effective_env,
    job_action,
    local_paths,
    main_container,
    mount_of,
    one,
    pod_spec,
    quantity,
    render,
)
from tuneserve.engine_eval import EVAL_SCHEMA
from tuneserve.exitcodes import ExitCode
from tuneserve.layout import ENGINE_GATE, QUANTIZE_INFO, Layout


def test_training_then_evaluation_then_serving_on_one_claim(rendered):
    objects = rendered["quantized"]
    train, evaluate, deployment = (
        one(objects, "Job", TRAIN_JOB),
        one(objects, "Job", EVALUATE_JOB),
        one(objects, "Deployment"),
    )
    output_dir = effective_env(objects, main_container(train))["OUTPUT_DIR"]
    layout = Layout.of(output_dir)
    assert effective_env(objects, main_container(train))["QUANTIZE"] in ("int8", "fp8", "w4a16")

    # The evaluation: the serving image (it has vLLM), the same claim, writable (reports and the verdict).
    container = main_container(evaluate)
    assert container["image"] == main_container(deployment)["image"]
    assert container["command"] == ["python3", "-m", "entrypoints.evaluate"]
    assert effective_env(objects, container)["OUTPUT_DIR"] == output_dir
    volume, mount = claim_mount(evaluate, container)
    _, train_mount = claim_mount(train, main_container(train))
    assert mount["mountPath"] == train_mount["mountPath"] and not mount.get("readOnly")
    (wait,) = pod_spec(evaluate)["initContainers"]
    assert wait["command"][-1] == str(layout.quantized / QUANTIZE_INFO), "starts once training wrote quantized/"
    assert wait["image"] == container["image"] and "nvidia.com/gpu" not in wait["resources"].get("requests", {})

    # Serving: the quantized folder, once its verdict passed.
    serve = main_container(deployment)
    assert effective_env(objects, serve)["MODEL_ID"] == str(layout.quantized)
    (wait_model,) = pod_spec(deployment)["initContainers"]
    assert wait_model["command"] == ["python3", "-m", "tuneserve.wait", str(layout.quantized / ENGINE_GATE)]


def test_evaluation_job_fails_at_once_on_a_verdict_and_retries_transient_failures(rendered):
    job = one(rendered["quantized"], "Job", EVALUATE_JOB)
    for code in (ExitCode.CONFIG, ExitCode.VERIFY, ExitCode.DISK_FULL):
        assert job_action(job, int(code)) == "FailJob", f"{code!r}: a rerun fails the same way"
    for code in (ExitCode.RETRYABLE, ExitCode.TERMINATED, ExitCode.UNEXPECTED):
        assert job_action(job, int(code)) == "Count"
    assert all(job_action(job, int(c), disrupted=True) == "Ignore" for c in ExitCode if c is not ExitCode.OK)
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["podReplacementPolicy"] == "Failed"


def test_evaluation_job_environment_loads_through_its_schema(rendered, tmp_path, monkeypatch):
    objects = rendered["quantized"]
    env = effective_env(objects, main_container(one(objects, "Job", EVALUATE_JOB)))
    monkeypatch.chdir(tmp_path)
    cfg = EVAL_SCHEMA.load(local_paths(env, tmp_path, files={"HF_TOKEN_FILE"}))
    assert 0 <= cfg.quantize_max_drop < 0.1 and cfg.hf_token_file


def test_the_init_containers_wait_for_a_passing_verdict_or_for_a_file(tmp_path, monkeypatch):
    from tuneserve import wait

    verdict, record = tmp_path / "engine_gate.json", tmp_path / "quantize_info.json"
    written = ["", '{"passed": false}', '{"passed": true}']  # half-written, failed (a rerun may pass), passed
    slept = []

    def sleep(seconds):  # while the pod waits, the Job writes the file's next state
        slept.append(seconds)
        verdict.write_text(written[len(slept) - 1])
        record.write_text("{}")

    monkeypatch.setattr(wait.time, "sleep", sleep)
    assert wait.main([str(verdict)]) == 0 and len(slept) == 3  # missing, half-written, failed: it waits on
    slept.clear()
    record.unlink()
    assert wait.main(["--exists", str(record)]) == 0 and len(slept) == 1


def evaluation_gpus(objects: list[dict], job: dict) -> int:
    """The evaluation pod's GPUs, checked to be set once: the request equals the limit (Kubernetes refuses a pod
    where they differ), and ENGINE_TENSOR_PARALLEL_SIZE is unset (each model's engine takes what it needs of
    them) or the same number."""
    container = main_container(job)
    resources = container["resources"]
    gpus = int(resources["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and int(resources["requests"]["nvidia.com/gpu"]) == gpus
    env = effective_env(objects, container)
    assert env.get("ENGINE_TENSOR_PARALLEL_SIZE") in (None, str(gpus)), "the env var and nvidia.com/gpu disagree"
    # /dev/shm holds vLLM's message queues between its GPU workers: 160 MB + 240 MB per GPU (v1's
    # multiproc executor: one 16 MB x 10 broadcast queue, one 24 MB x 10 response queue per worker), for as
    # many GPUs as a node has (8), so that raising nvidia.com/gpu needs nothing else.
    volume, mount = mount_of(job, container, lambda v: v.get("emptyDir", {}).get("medium") == "Memory")
    assert mount["mountPath"] == "/dev/shm"
    assert quantity(volume["emptyDir"]["sizeLimit"]) >= (160 + 240 * max(gpus, 8)) * 2**20
    return gpus


def test_the_evaluation_jobs_gpus_are_set_in_one_place(rendered):
    """In every overlay with the evaluation Job. Its engines take at most these GPUs, and a model needing more
    exits 2 (FailJob) naming how many (tests/test_engine_tp.py)."""
    with_evaluation = [o for o in OVERLAYS if any(x["metadata"]["name"] == EVALUATE_JOB for x in rendered[o])]
    assert "quantized" in with_evaluation
    for overlay in with_evaluation:
        objects = rendered[overlay]
        evaluation_gpus(objects, one(objects, "Job", EVALUATE_JOB))


def test_the_documented_gpu_patch_keeps_request_limit_and_shared_memory_in_agreement(rendered):
    """docs/kubernetes.md's patch for a model that needs 4 GPUs, applied as kustomize would (strategic merge)."""
    text = (REPO / "docs" / "kubernetes.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if f"name: {EVALUATE_JOB}" in b]
    patch = yaml.safe_load(block)
    objects = rendered["quantized"]
    job = render.strategic_merge(one(objects, "Job", EVALUATE_JOB), patch)
    assert evaluation_gpus(objects, job) == 4
