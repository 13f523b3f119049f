"""The training Job of every overlay: its podFailurePolicy against ExitCode, retries that resume from the claim,
its ConfigMap loaded through TRAIN_SCHEMA, and the GPU node, shared memory and writable /tmp every GPU pod gets."""

from __future__ import annotations

import pytest

from tests.k8s_helpers import (
    LIBRARY_VARS,
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
    schema_knows,
    serving_pods,
)
from tuneserve.config import TRAIN_SCHEMA
from tuneserve.exitcodes import ExitCode


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_pod_failure_policy_follows_the_exit_codes(rendered, overlay):
    job = one(rendered[overlay], "Job", TRAIN_JOB)
    every_code = {int(c) for c in ExitCode}
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert set(rule["onExitCodes"]["values"]) <= every_code, "a code the pipeline never exits with"
    for code in (ExitCode.CONFIG, ExitCode.DATA, ExitCode.VERIFY, ExitCode.DISK_FULL):
        assert job_action(job, int(code)) == "FailJob", f"{code!r}: retrying cannot help"
    for code in (ExitCode.RETRYABLE, ExitCode.TERMINATED):
        assert job_action(job, int(code)) == "Count", f"{code!r}: must retry, and stop at backoffLimit"
    assert job_action(job, int(ExitCode.UNEXPECTED)) == "Count"
    for code in ExitCode:
        if code is not ExitCode.OK:
            assert job_action(job, int(code), disrupted=True) == "Ignore", f"{code!r} after preemption"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_retries_resume_from_a_claim_and_are_bounded(rendered, overlay):
    objects = rendered[overlay]
    job = one(objects, "Job", TRAIN_JOB)
    spec, pod = job["spec"], pod_spec(job)
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it; a retry is a new pod
    assert spec["podReplacementPolicy"] == "Failed"  # never two pods on the same checkpoints
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    # The Kubernetes default (30 s) is too short to finish a step and write a checkpoint.
    assert pod["terminationGracePeriodSeconds"] >= 120
    container = main_container(job)
    volume, mount = claim_mount(job, container)
    assert effective_env(objects, container)["OUTPUT_DIR"] == mount["mountPath"]
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_train_configmap_holds_only_training_variables_and_loads(rendered, overlay, tmp_path, monkeypatch):
    objects = rendered[overlay]
    job = one(objects, "Job", TRAIN_JOB)
    container = main_container(job)
    (source,) = container["envFrom"]
    data = one(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
    unknown = [k for k in data if not schema_knows(TRAIN_SCHEMA, k)]
    assert not unknown, f"not training variables: {unknown}"
    assert not [k for k in data if k in TRAIN_SCHEMA.by_name and TRAIN_SCHEMA.by_name[k].secret]
    assert not [
        i["name"]
        for i in container.get("env", [])
        if not schema_knows(TRAIN_SCHEMA, i["name"]) and i["name"] not in LIBRARY_VARS
    ]
    monkeypatch.chdir(tmp_path)  # no stray .env
    indexes = range(job["spec"]["completions"]) if job["spec"].get("completionMode") == "Indexed" else [None]
    for index in indexes:  # every pod of an Indexed Job, with its own completion index
        env = local_paths(
            effective_env(objects, container, completion_index=index),
            tmp_path,
            files={"HF_TOKEN_FILE"},
            dirs={"OUTPUT_DIR"},
        )
        cfg = TRAIN_SCHEMA.load(env)
        assert cfg.base_model == data["BASE_MODEL"] and cfg.hf_token_file


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_pods_get_a_gpu_node_shm_and_a_writable_tmp(rendered, overlay):
    for obj in [o for o in rendered[overlay] if o["kind"] == "Job"] + serving_pods(rendered[overlay]):
        pod, container = pod_spec(obj), main_container(obj)
        resources = container["resources"]
        assert int(resources["requests"]["nvidia.com/gpu"]) >= 1
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
        assert pod["nodeSelector"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        volume, _ = mount_of(obj, container, lambda v: v.get("emptyDir", {}).get("medium") == "Memory")
        assert [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume["name"]] == ["/dev/shm"]
        assert volume["emptyDir"]["sizeLimit"]
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp, "every cache of the images is under /tmp; the root filesystem is read-only"
        (tmp_volume,) = [v for v in pod["volumes"] if v["name"] == tmp[0]["name"]]
        assert "emptyDir" in tmp_volume and tmp_volume["emptyDir"]["sizeLimit"]
