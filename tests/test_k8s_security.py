"""Security of every overlay: Pod Security Standards "restricted", secrets from Secret files only, images pinned
by tag and digest in one place, and NetworkPolicies that admit only who must connect."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.k8s_helpers import (
    K8S,
    OVERLAYS,
    TRAIN_JOB,
    VERSION,
    all_containers,
    effective_env,
    main_container,
    one,
    pod_spec,
    policies_selecting,
    secret_mount,
    server,
    serving_pods,
    workloads,
)
from tuneserve.config import TRAIN_SCHEMA
from tuneserve.serve import SERVE_SCHEMA

# Pod Security Standards "restricted": the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
# Pod Security Standards "baseline" (and so "restricted"): the sysctls a pod may set.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_both_pods(rendered, overlay):
    objects = rendered[overlay]
    for obj in workloads(objects):
        selecting = policies_selecting(objects, obj)
        assert selecting, obj["metadata"]["name"]
        for policy in selecting:
            assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}, policy["metadata"]["name"]
    job = one(objects, "Job", TRAIN_JOB)
    for policy in policies_selecting(objects, job):
        for rule in policy["spec"].get("ingress", []):
            # Nothing connects to a single-node training pod; the pods of a multi-node group connect to each other.
            assert job["spec"].get("completionMode") == "Indexed", "nothing connects to the training pod"
            assert rule["from"] == [{"podSelector": policy["spec"]["podSelector"]}], "only the group's own pods"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_port_admits_labelled_clients_the_gateway_and_monitoring_only(rendered, overlay):
    objects = rendered[overlay]
    deployment = server(objects)
    own = deployment["spec"]["template"]["metadata"]["labels"]
    allowed = [
        {"podSelector": {"matchLabels": {"tuneserve.io/client": "true"}}},
        {"namespaceSelector": {"matchLabels": {"tuneserve.io/gateway": "true"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]
    peers = []
    for policy in policies_selecting(objects, deployment):
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits every pod"
            for peer in rule["from"]:
                group = (
                    peer.get("podSelector", {}).get("matchLabels", {}).items() <= own.items()
                    and "namespaceSelector" not in peer
                    and peer.get("podSelector", {}).get("matchLabels")
                )
                assert peer in allowed or group, f"{policy['metadata']['name']} admits {peer}"
                peers.append(peer)
    assert all(p in peers for p in allowed)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_pod_security_restricted(rendered, overlay):
    objects = rendered[overlay]
    labels = one(objects, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    for obj in workloads(objects):
        pod = pod_spec(obj)
        pod_context = pod.get("securityContext", {})
        assert pod["automountServiceAccountToken"] is False
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"))
        assert {s["name"] for s in pod_context.get("sysctls", [])} <= SAFE_SYSCTLS
        for volume in pod["volumes"]:
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume["name"]
        for container in all_containers(pod):
            where = f"{obj['metadata']['name']}/{container['name']}"
            ctx = container.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert not ctx.get("privileged"), where
            assert "ALL" in ctx["capabilities"]["drop"], where
            assert set(ctx["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}, where
            assert ctx.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, where
            assert ctx.get("runAsUser", pod_context.get("runAsUser")) not in (None, 0), where
            seccomp = ctx.get("seccompProfile", pod_context.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert not [p for p in container.get("ports", []) if "hostPort" in p], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_secret_files_never_literals(rendered, overlay):
    objects = rendered[overlay]
    secret_vars = {v.name for schema in (TRAIN_SCHEMA, SERVE_SCHEMA) for v in schema.vars if v.secret}
    for cm in (o for o in objects if o["kind"] == "ConfigMap"):
        assert not secret_vars & set(cm["data"]), cm["metadata"]["name"]
    for obj in workloads(objects):
        for container in all_containers(pod_spec(obj)):
            for item in container.get("env", []):
                assert item["name"] not in secret_vars, f"{item['name']}: mount the Secret and use the _FILE variable"
    job, deployment = one(objects, "Job", TRAIN_JOB), server(objects)
    token = secret_mount(job, main_container(job), "tuneserve-hf-token")
    assert Path(effective_env(objects, main_container(job))["HF_TOKEN_FILE"]).parent == Path(token["mountPath"])
    key = secret_mount(deployment, main_container(deployment), "tuneserve-api-key")
    assert Path(effective_env(objects, main_container(deployment))["API_KEY_FILE"]).parent == Path(key["mountPath"])
    text = yaml.safe_dump_all(objects)
    assert not re.search(r"\bhf_[A-Za-z0-9]{20,}|\bsk-[A-Za-z0-9_-]{16,}", text), "a token-like literal"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_by_tag_and_digest(rendered, overlay):
    objects = rendered[overlay]
    pinned = re.compile(rf"^[a-z0-9.-]+(/[a-z0-9._-]+)+:{re.escape(VERSION)}@sha256:[0-9a-f]{{64}}$")
    for obj in workloads(objects):
        for container in all_containers(pod_spec(obj)):
            assert pinned.match(container["image"]), container["image"]
    assert main_container(one(objects, "Job", TRAIN_JOB))["image"].split("@")[0].endswith(f"/tuneserve-train:{VERSION}")
    for obj in serving_pods(objects):
        for container in all_containers(pod_spec(obj)):
            assert container["image"].split("@")[0].endswith(f"/tuneserve-serve:{VERSION}"), container["name"]


def test_each_image_is_pinned_in_one_place():
    pins = []
    for path in K8S.rglob("kustomization.yaml"):
        pins += [i["name"] for i in yaml.safe_load(path.read_text()).get("images", [])]
    assert sorted(pins) == ["tuneserve-serve", "tuneserve-train"]
