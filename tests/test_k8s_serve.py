"""The serving workload of every overlay: its ConfigMap loaded through SERVE_SCHEMA, probes and ports against the
serve entrypoint, draining on termination, rollout and PodDisruptionBudget, the model it gets from the Job (from the
claim or from the Hub), and the autoscaler."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s_helpers import (
    LIBRARY_VARS,
    OVERLAYS,
    api_service,
    claim_mount,
    container_port,
    effective_env,
    local_paths,
    main_container,
    one,
    pod_spec,
    schema_knows,
    secret_mount,
    server,
    workloads,
)
from tuneserve.gate import PROBES
from tuneserve.layout import Layout
from tuneserve.serve import SERVE_SCHEMA

HEALTH_PATH = "/health"  # vLLM's readiness route; 503 once the gate drains (docs/serving.md)
LIVE_PATH = "/live"  # the gate's forward-progress route


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_configmap_holds_only_serving_variables_and_loads(rendered, overlay, tmp_path, monkeypatch):
    objects = rendered[overlay]
    deployment = server(objects)
    container = main_container(deployment)
    (source,) = container["envFrom"]
    data = one(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
    unknown = [k for k in data if not schema_knows(SERVE_SCHEMA, k)]
    assert not unknown, f"not serving variables: {unknown}"
    assert not [k for k in data if k in SERVE_SCHEMA.by_name and SERVE_SCHEMA.by_name[k].secret]
    assert not [
        i["name"]
        for i in container.get("env", [])
        if not schema_knows(SERVE_SCHEMA, i["name"]) and i["name"] not in LIBRARY_VARS
    ]
    env = effective_env(objects, container)
    local_model = str(env["MODEL_ID"]).startswith("/")
    env = local_paths(env, tmp_path, files={"API_KEY_FILE"}, dirs={"MODEL_ID"} if local_model else set())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLLM_PORT", raising=False)
    cfg = SERVE_SCHEMA.load(env)
    assert cfg.api_key_file and not cfg.api_key


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_match_the_serve_entrypoint(rendered, overlay):
    objects = rendered[overlay]
    deployment = server(objects)
    container = main_container(deployment)
    env = effective_env(objects, container)
    port = int(env.get("PORT", SERVE_SCHEMA.by_name["PORT"].default))
    assert env.get("HOST", SERVE_SCHEMA.by_name["HOST"].default) == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [port]
    for probe, path in (("startupProbe", HEALTH_PATH), ("readinessProbe", HEALTH_PATH), ("livenessProbe", LIVE_PATH)):
        get = container[probe]["httpGet"]
        assert get["path"] == path and container_port(container, get["port"]) == port, probe
        assert get["path"] in PROBES, f"{probe}: the kubelet sends no API key"
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load needs minutes"
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, "a restart reloads the model"
    # /live may take LIVE_TIMEOUT to answer 503; a probe that gives up first would count a slow success as failure.
    live_timeout = float(env.get("LIVE_TIMEOUT", SERVE_SCHEMA.by_name["LIVE_TIMEOUT"].default))
    assert liveness["timeoutSeconds"] > live_timeout
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"
    service = api_service(objects)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert container_port(container, service_port["targetPort"]) == port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_lets_in_flight_requests_finish(rendered, overlay):
    objects = rendered[overlay]
    deployment = server(objects)
    container = main_container(deployment)
    drain = float(effective_env(objects, container)["DRAIN_SECONDS"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain > 0 and pre_stop > 0
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= pre_stop + drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollout_needs_no_spare_gpu_and_service_links_are_off(rendered, overlay):
    objects = rendered[overlay]
    deployment = server(objects)
    if deployment["kind"] == "Deployment":
        assert deployment["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        }
        assert "replicas" not in deployment["spec"], "apply would reset the autoscaler's replicas"
    else:  # a whole group at a time
        lws = one(objects, "LeaderWorkerSet")
        assert lws["spec"]["rolloutStrategy"] == {
            "type": "RollingUpdate",
            "rollingUpdateConfiguration": {"maxSurge": 0, "maxUnavailable": 1},
        }
        assert "replicas" not in lws["spec"], "apply would reset the autoscaler's replicas"
    for obj in workloads(objects):
        assert pod_spec(obj)["enableServiceLinks"] is False, obj["metadata"]["name"]
    assert "vllm" not in [o["metadata"]["name"] for o in objects if o["kind"] == "Service"]
    pdb = one(objects, "PodDisruptionBudget")
    assert (
        pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


# ------------------------------------------------------------------------------------------------ hand-offs
def test_volume_handoff_serves_output_dir_merged_from_the_same_claim_read_only(rendered):
    objects = rendered["volume"]
    job, deployment = one(objects, "Job"), one(objects, "Deployment")
    job_volume, job_mount = claim_mount(job, main_container(job))
    output_dir = effective_env(objects, main_container(job))["OUTPUT_DIR"]
    assert output_dir == job_mount["mountPath"]
    serve = main_container(deployment)
    volume, mount = claim_mount(deployment, serve)
    assert volume["persistentVolumeClaim"]["claimName"] == job_volume["persistentVolumeClaim"]["claimName"]
    assert volume["persistentVolumeClaim"]["readOnly"] is True and mount["readOnly"] is True
    layout = Layout.of(mount["mountPath"])  # the Job's OUTPUT_DIR as the serving pod sees it
    assert mount["mountPath"] == output_dir
    assert effective_env(objects, serve)["MODEL_ID"] == str(layout.merged)
    (wait,) = pod_spec(deployment)["initContainers"]
    assert wait["command"][-1] == str(layout.verify_report), "serve only what passed verification"
    assert wait["image"] == serve["image"]
    _, wait_mount = claim_mount(deployment, wait)
    assert wait_mount["readOnly"] is True and wait_mount["mountPath"] == mount["mountPath"]


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o.startswith("hub")])
def test_hub_handoff_serves_the_repo_the_job_publishes(rendered, overlay):
    objects = rendered[overlay]
    job, deployment = one(objects, "Job"), one(objects, "Deployment")
    hub_id = effective_env(objects, main_container(job))["HUB_MODEL_ID"]
    serve = main_container(deployment)
    env = effective_env(objects, serve)
    assert env["MODEL_ID"] == hub_id and not hub_id.startswith("/")
    # HUB_PRIVATE defaults to true: the serving pod reads the same token to download it.
    mount = secret_mount(deployment, serve, "tuneserve-hf-token")
    assert Path(env["HF_TOKEN_PATH"]).parent == Path(mount["mountPath"])
    assert not [v for v in pod_spec(deployment)["volumes"] if "persistentVolumeClaim" in v]


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o.endswith("-hpa")])
def test_hpa_scales_the_serving_workload_on_the_vllm_queue(rendered, overlay):
    objects = rendered[overlay]
    hpa = one(objects, "HorizontalPodAutoscaler")
    (target,) = [o for o in objects if o["kind"] in ("Deployment", "LeaderWorkerSet")]
    # A LeaderWorkerSet scales whole groups; its scale subresource selects the leaders, which serve the metric.
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": target["apiVersion"],
        "kind": target["kind"],
        "name": target["metadata"]["name"],
    }
    assert "replicas" not in target["spec"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "vllm:num_requests_waiting".replace(":", "_")
    assert server(objects)["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
