"""Multi-node training (an Indexed Job whose pods meet through a headless Service) and multi-node serving (a
LeaderWorkerSet running vLLM's Ray recipe), and the LeaderWorkerSet's vendored CRD schema."""

from __future__ import annotations

import copy
import re

import pytest

from tests.k8s_helpers import (
    COMPLETION_INDEX,
    K8S,
    LWS_WORKER_INDEX_LABEL,
    OUTPUT_CLAIM,
    OVERLAYS,
    api_service,
    claim_mount,
    container_port,
    crds,
    effective_env,
    env_vars,
    local_paths,
    lws_pods,
    main_container,
    mount_of,
    one,
    pod_spec,
    policies_selecting,
    quantity,
    render,
)
from tuneserve.config import TRAIN_SCHEMA
from tuneserve.layout import Layout
from tuneserve.serve import SERVE_SCHEMA

MULTINODE_TRAIN = [o for o in OVERLAYS if o.startswith("multinode")]
MULTINODE_SERVE = [o for o in OVERLAYS if o.startswith("multinode") and o != "multinode-train"]
LWS_API = "leaderworkerset.x-k8s.io/v1"
# What the training launcher reads (tuneserve/launch.py): each must be a training variable.
RENDEZVOUS_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE")


def gpus(container: dict) -> int:
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    return int(resources["limits"]["nvidia.com/gpu"])


def headless_service_of(objects: list[dict], job: dict) -> dict:
    subdomain = pod_spec(job)["subdomain"]
    service = one(objects, "Service", subdomain)
    assert service["spec"]["clusterIP"] == "None", "the pods' DNS names come from a headless Service"
    return service


def test_the_multinode_overlays_exist():
    assert {"multinode-train", "multinode", "multinode-hpa"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", MULTINODE_TRAIN)
def test_multinode_job_rendezvous_matches_the_launchers_variables(rendered, overlay, tmp_path, monkeypatch):
    objects = rendered[overlay]
    job = one(objects, "Job")
    spec, container = job["spec"], main_container(job)
    for name in RENDEZVOUS_VARS:
        assert name in TRAIN_SCHEMA.by_name, f"{name}: not a training variable (tuneserve/config.py)"
    env, items = effective_env(objects, container), env_vars(container)
    # One pod per node, all at once, each knowing its rank from its completion index.
    assert spec["completionMode"] == "Indexed"
    nnodes = int(env["NNODES"])
    assert nnodes > 1 and spec["completions"] == spec["parallelism"] == nnodes
    assert items["NODE_RANK"]["valueFrom"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}
    # Node 0 by its stable name: <job>-<index> is the hostname of an Indexed Job's pod, the subdomain a headless
    # Service selecting the Job's pods.
    service = headless_service_of(objects, job)
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"].get("publishNotReadyAddresses") is True, "node 0 must resolve before it is Ready"
    namespace = job["metadata"]["namespace"]
    node0 = f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert env["MASTER_ADDR"] in {
        node0,
        f"{node0}.{namespace}",
        f"{node0}.{namespace}.svc",
        f"{node0}.{namespace}.svc.cluster.local",
    }
    (port,) = service["spec"]["ports"]
    assert int(env["MASTER_PORT"]) == port["port"] == container_port(container, port["targetPort"])
    # One process per GPU of the pod.
    assert int(env["NPROC_PER_NODE"]) == gpus(container) > 1
    # Every node's configuration loads, with its own rank.
    monkeypatch.chdir(tmp_path)
    for index in range(nnodes):
        cfg = TRAIN_SCHEMA.load(
            local_paths(
                effective_env(objects, container, completion_index=index),
                tmp_path,
                files={"HF_TOKEN_FILE"},
                dirs={"OUTPUT_DIR"},
            )
        )
        assert (cfg.nnodes, cfg.node_rank, cfg.master_addr, cfg.master_port) == (
            nnodes,
            index,
            env["MASTER_ADDR"],
            port["port"],
        )
        assert cfg.nproc_per_node == env["NPROC_PER_NODE"]


@pytest.mark.parametrize("overlay", MULTINODE_TRAIN)
def test_multinode_job_restarts_as_a_group_and_succeeds_with_node_rank_0(rendered, overlay):
    job = one(rendered[overlay], "Job")
    spec = job["spec"]
    # Retries per index, so that one restart of the group costs each index one retry whatever the number of
    # nodes; one index out of retries fails the Job; the Job-wide limit never stops it first.
    assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0
    assert spec["backoffLimit"] == spec["completions"] * spec["backoffLimitPerIndex"]
    # Rank 0 alone merges, verifies and publishes: its success is the Job's.
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    # The exit-code policy is the single-node Job's (test_job_pod_failure_policy_follows_the_exit_codes runs on it).
    base = one(render.build(K8S / "overlays" / "volume"), "Job")
    assert spec["podFailurePolicy"] == base["spec"]["podFailurePolicy"]
    assert spec["podReplacementPolicy"] == "Failed" and pod_spec(job)["restartPolicy"] == "Never"


@pytest.mark.parametrize("overlay", MULTINODE_TRAIN)
def test_multinode_group_may_reach_rendezvous_and_nccl_ports_of_its_own_pods_only(rendered, overlay):
    objects = rendered[overlay]
    job = one(objects, "Job")
    container = main_container(job)
    master_port = int(effective_env(objects, container)["MASTER_PORT"])
    (sysctl,) = [s for s in pod_spec(job)["securityContext"]["sysctls"] if s["name"] == "net.ipv4.ip_local_port_range"]
    low, high = (int(v) for v in sysctl["value"].split())
    wanted = [{"protocol": "TCP", "port": master_port}, {"protocol": "TCP", "port": low, "endPort": high}]
    for direction, peers in (("ingress", "from"), ("egress", "to")):
        rules = [
            r
            for p in policies_selecting(objects, job)
            for r in p["spec"].get(direction, [])
            if r.get(peers) and all("podSelector" in peer for peer in r[peers])
        ]
        assert rules, f"no {direction} rule between the group's pods"
        for rule in rules:
            for peer in rule[peers]:  # the group's pods, no one else
                assert (
                    peer["podSelector"]["matchLabels"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
                )
                assert peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "train"
        assert [port for r in rules for port in r["ports"]] == wanted, direction


@pytest.mark.parametrize("overlay", MULTINODE_TRAIN)
def test_multinode_claim_is_read_write_many_and_every_node_mounts_it(rendered, overlay):
    objects = rendered[overlay]
    claim = one(objects, "PersistentVolumeClaim", OUTPUT_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes mount OUTPUT_DIR at once"
    job = one(objects, "Job")
    volume, mount = claim_mount(job, main_container(job))
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert effective_env(objects, main_container(job))["OUTPUT_DIR"] == mount["mountPath"]


@pytest.mark.parametrize("overlay", MULTINODE_SERVE)
def test_leaderworkerset_runs_vllms_multinode_recipe(rendered, overlay, tmp_path, monkeypatch):
    objects = rendered[overlay]
    lws = one(objects, "LeaderWorkerSet")
    assert lws["apiVersion"] == LWS_API
    lwt = lws["spec"]["leaderWorkerTemplate"]
    leader, worker = lws_pods(lws)
    serve, ray_worker = main_container(leader), main_container(worker)
    env = effective_env(objects, serve)
    for name in ("TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE"):
        assert name in SERVE_SCHEMA.by_name, f"{name}: not a serving variable (tuneserve/serve.py)"
    # One pipeline stage per node of the group, every GPU of a node in its tensor-parallel group.
    assert lwt["size"] > 1 and int(env["PIPELINE_PARALLEL_SIZE"]) == lwt["size"]
    assert int(env["TENSOR_PARALLEL_SIZE"]) == gpus(serve) == gpus(ray_worker)
    assert env["VLLM_ARG_DISTRIBUTED_EXECUTOR_BACKEND"] == "ray"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLLM_PORT", raising=False)
    cfg = SERVE_SCHEMA.load(local_paths(env, tmp_path, files={"API_KEY_FILE"}, dirs={"MODEL_ID"}))
    assert (cfg.tensor_parallel_size, cfg.pipeline_parallel_size) == (gpus(serve), lwt["size"])
    # The leader starts Ray's head, then execs the serving entrypoint (so SIGTERM reaches vLLM); the workers
    # join it on the same port, after waiting for it.
    shell = serve["command"][-1]
    assert serve["command"][:2] == ["sh", "-c"]
    head = re.search(r"\bray start --head --port=(\d+)\b", shell)
    assert head and shell.rstrip().endswith("&& exec python3 -m entrypoints.serve")
    ray_port = int(head.group(1))
    assert ray_worker["command"][:2] == ["ray", "start"] and "--block" in ray_worker["command"]
    assert f"--address=$(LWS_LEADER_ADDRESS):{ray_port}" in ray_worker["command"]
    (wait,) = pod_spec(worker)["initContainers"]
    assert wait["command"][-2:] == ["$(LWS_LEADER_ADDRESS)", str(ray_port)]
    # Ray's object store fits the memory-backed /dev/shm of each pod.
    for obj, container, command in ((leader, serve, shell), (worker, ray_worker, " ".join(ray_worker["command"]))):
        store = int(re.search(r"--object-store-memory=(\d+)", command).group(1))
        shm, _ = mount_of(obj, container, lambda v: v.get("emptyDir", {}).get("medium") == "Memory")
        assert store < quantity(shm["emptyDir"]["sizeLimit"])
    # A group lives and dies as one; workers are created with the leader (which is ready only once they joined).
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"


@pytest.mark.parametrize("overlay", MULTINODE_SERVE)
def test_leaderworkerset_service_reaches_leaders_only_and_workers_outlive_the_drain(rendered, overlay):
    objects = rendered[overlay]
    leader, worker = lws_pods(one(objects, "LeaderWorkerSet"))
    selector = api_service(objects)["spec"]["selector"]
    assert selector.items() <= leader["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert selector[LWS_WORKER_INDEX_LABEL] == "0"
    serve, ray_worker = main_container(leader), main_container(worker)
    drain = float(effective_env(objects, serve)["DRAIN_SECONDS"])
    leader_stop = serve["lifecycle"]["preStop"]["sleep"]["seconds"]
    worker_stop = ray_worker["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The leader's pipeline needs the workers until it has drained.
    assert worker_stop >= leader_stop + drain
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > worker_stop
    startup = serve["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200, "a group and a large model load"
    # Ray has no authentication: a rule that opens every port (Ray's, NCCL's) admits the group's own pods only.
    for obj in (leader, worker):
        for policy in policies_selecting(objects, obj):
            for rule in policy["spec"].get("ingress", []):
                if any("port" not in port for port in rule.get("ports", [{}])):
                    assert rule["from"] == [{"podSelector": policy["spec"]["podSelector"]}], policy["metadata"]


@pytest.mark.parametrize("overlay", MULTINODE_SERVE)
def test_leaderworkerset_serves_output_dir_merged_read_only_once_verified(rendered, overlay):
    objects = rendered[overlay]
    job = one(objects, "Job")
    _, job_mount = claim_mount(job, main_container(job))
    layout = Layout.of(job_mount["mountPath"])
    leader, worker = lws_pods(one(objects, "LeaderWorkerSet"))
    for obj in (leader, worker):  # every node loads its stage from the claim
        volume, mount = claim_mount(obj, main_container(obj))
        assert volume["persistentVolumeClaim"] == {"claimName": "tuneserve-output", "readOnly": True}
        assert mount["readOnly"] is True and mount["mountPath"] == job_mount["mountPath"]
    assert effective_env(objects, main_container(leader))["MODEL_ID"] == str(layout.merged)
    (wait,) = pod_spec(leader)["initContainers"]
    assert wait["name"] == "wait-for-model" and wait["command"][-1] == str(layout.verify_report)
    assert one(objects, "PersistentVolumeClaim", OUTPUT_CLAIM)["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", MULTINODE_SERVE)
def test_leaderworkerset_passes_its_crd_schema_and_yields_its_pod_templates(rendered, overlay):
    lws = one(rendered[overlay], "LeaderWorkerSet")
    assert crds.validate(lws) == []
    templates = crds.pod_templates(lws)
    assert [t["metadata"]["name"] for t in templates] == ["tuneserve-serve-leader", "tuneserve-serve-worker"]
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert [t["template"] for t in templates] == [lwt["leaderTemplate"], lwt["workerTemplate"]]


def test_crd_validation_is_strict():
    schema = crds.load_schema(crds.SCHEMAS[(LWS_API, "LeaderWorkerSet")])
    good = {
        "apiVersion": LWS_API,
        "kind": "LeaderWorkerSet",
        "metadata": {"name": "x"},
        "spec": {"leaderWorkerTemplate": {"size": 2, "workerTemplate": {"spec": {}}}},
    }
    assert crds.check(schema, good) == []
    bad = copy.deepcopy(good)
    bad["spec"]["replica"] = 2
    bad["spec"]["leaderWorkerTemplate"].update(size="2", restartPolicy="Always")
    bad["spec"]["leaderWorkerTemplate"].pop("workerTemplate")
    bad["spec"]["leaderWorkerTemplate"]["volumeClaimTemplates"] = []  # not validated here, so refused
    errors = crds.check(schema, bad)
    for expected in (
        "spec.replica: unknown field",
        "size: expected an integer",
        "'Always' is not one of",
        "missing required field 'workerTemplate'",
        "volumeClaimTemplates: unknown field",
    ):
        assert any(expected in e for e in errors), (expected, errors)
