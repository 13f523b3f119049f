"""Reading the Kubernetes manifests (k8s/) as the cluster gets them, for the test_k8s_*.py files.

Every overlay is rendered (k8s/render.py; the `rendered` fixture in conftest.py) and read as the cluster would get
it. Names, defaults and exit codes are imported from the code, never retyped: the Job's podFailurePolicy against
ExitCode, the ConfigMaps loaded through TRAIN_SCHEMA / SERVE_SCHEMA, the probes against the serve entrypoint's PORT,
the volume hand-off against Layout, the multi-node rendezvous against the launcher's variables (TRAIN_SCHEMA) and
the LeaderWorkerSet group against SERVE_SCHEMA's parallelism. A LeaderWorkerSet's pods are read as its controller
creates them (its labels and variables added), so the checks on pods apply to its leader and worker templates as
to a Deployment's.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import tomllib
from pathlib import Path

from tests.helpers import REPO

K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"k8s_{name}", K8S / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load("render")
crds = _load("crds")
promql = _load("promql")
DASHBOARD_LABEL = promql.DASHBOARD_LABEL  # a ConfigMap the Grafana sidecar loads (components/monitoring)

# Environment variables a manifest may set that belong to a library rather than to our schemas.
LIBRARY_VARS = {
    "HF_TOKEN_PATH": "huggingface_hub: file holding the token (the serving schema reads HF_TOKEN only)",
    "LWS_LEADER_ADDRESS": "LeaderWorkerSet controller: the group leader's DNS name, in every container",
    "LWS_GROUP_SIZE": "LeaderWorkerSet controller: pods in the group, in every container",
    "LWS_WORKER_INDEX": "LeaderWorkerSet controller: 0 on the leader, 1.. on workers",
}
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"  # an Indexed Job pod's index
TRAIN_JOB, EVALUATE_JOB = "tuneserve-train", "tuneserve-evaluate"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def lws_pods(lws: dict) -> list[dict]:
    """A LeaderWorkerSet's leader and worker pods of group 0, as workloads with one template each (so pod_spec and
    the checks on workloads apply), as its controller creates them: its labels added, and its variables put ahead
    of each container's env (k8s/components/leaderworkerset/serve-leaderworkerset.yaml relies on that order)."""
    name, namespace = lws["metadata"]["name"], lws["metadata"].get("namespace", "default")
    lwt = lws["spec"]["leaderWorkerTemplate"]
    out = []
    for role, index, template in (
        ("leader", 0, lwt.get("leaderTemplate", lwt["workerTemplate"])),
        ("worker", 1, lwt["workerTemplate"]),
    ):
        template = copy.deepcopy(template)
        template.setdefault("metadata", {}).setdefault("labels", {}).update(
            {
                "leaderworkerset.sigs.k8s.io/name": name,
                "leaderworkerset.sigs.k8s.io/group-index": "0",
                LWS_WORKER_INDEX_LABEL: str(index),
            }
        )
        injected = [
            {"name": "LWS_LEADER_ADDRESS", "value": f"{name}-0.{name}.{namespace}"},
            {"name": "LWS_GROUP_SIZE", "value": str(lwt.get("size", 1))},
            {"name": "LWS_WORKER_INDEX", "value": str(index)},
        ]
        for container in all_containers(template["spec"]):
            container["env"] = injected + [
                e for e in container.get("env", []) if e["name"] not in {i["name"] for i in injected}
            ]
        out.append(
            {
                "apiVersion": lws["apiVersion"],
                "kind": lws["kind"],
                "role": role,
                "metadata": {**lws["metadata"], "name": f"{name}/{role}"},
                "spec": {"template": template},
            }
        )
    return out


def workloads(objects: list[dict]) -> list[dict]:
    out = [o for o in objects if o["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet", "Pod", "CronJob")]
    for lws in (o for o in objects if o["kind"] == "LeaderWorkerSet"):
        out += lws_pods(lws)
    return out


def server(objects: list[dict]) -> dict:
    """The workload whose pods run vLLM's API server: the Deployment, or a LeaderWorkerSet's leader."""
    found = [o for o in workloads(objects) if o["kind"] == "Deployment" or o.get("role") == "leader"]
    assert len(found) == 1, f"expected one serving Deployment or LeaderWorkerSet, found {len(found)}"
    return found[0]


def serving_pods(objects: list[dict]) -> list[dict]:
    """Every workload whose pods serve: the Deployment, or a LeaderWorkerSet's leader and worker."""
    return [o for o in workloads(objects) if o["kind"] in ("Deployment", "LeaderWorkerSet")]


def api_service(objects: list[dict]) -> dict:
    """The Service clients use (ClusterIP); headless Services only give pods DNS names."""
    (service,) = [o for o in objects if o["kind"] == "Service" and o["spec"].get("clusterIP") != "None"]
    return service


def env_vars(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def main_container(obj: dict) -> dict:
    (container,) = pod_spec(obj)["containers"]
    return container


def effective_env(objects: list[dict], container: dict, completion_index: int | None = None) -> dict[str, object]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env (which wins), with
    $(NAME) in env values expanded from the variables before it. An Indexed Job pod's completion index is filled
    in when given; any other value from a Secret or a field is kept as its valueFrom mapping."""
    env: dict[str, object] = {}
    for source in container.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: str(env.get(m.group(1), m.group(0))), item["value"]
            )
        elif (
            completion_index is not None and item["valueFrom"].get("fieldRef", {}).get("fieldPath") == COMPLETION_INDEX
        ):
            env[item["name"]] = str(completion_index)
        else:
            env[item["name"]] = item["valueFrom"]
    return env


def mount_of(obj: dict, container: dict, predicate) -> tuple[dict, dict]:
    """(volume, volumeMount) of the one volume of the pod matching predicate that the container mounts."""
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
    found = [(volumes[m["name"]], m) for m in container.get("volumeMounts", []) if predicate(volumes[m["name"]])]
    assert len(found) == 1, f"{container['name']}: expected one such mount, found {len(found)}"
    return found[0]


def secret_mount(obj: dict, container: dict, secret_name: str) -> dict:
    _, mount = mount_of(obj, container, lambda v: v.get("secret", {}).get("secretName") == secret_name)
    return mount


OUTPUT_CLAIM = "tuneserve-output"  # the training OUTPUT_DIR (k8s/base/output-pvc.yaml)


def claim_mount(obj: dict, container: dict) -> tuple[dict, dict]:
    """(volume, volumeMount) of the output claim in the container."""
    return mount_of(obj, container, lambda v: v.get("persistentVolumeClaim", {}).get("claimName") == OUTPUT_CLAIM)


def claims_mounted(node) -> set[str]:
    """Every claim named by a pod volume anywhere in an object (its templates, a LeaderWorkerSet's included)."""
    if isinstance(node, dict):
        found = {node["persistentVolumeClaim"]["claimName"]} if "persistentVolumeClaim" in node else set()
        return found.union(*(claims_mounted(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(claims_mounted(v) for v in node))
    return set()


def policies_selecting(objects: list[dict], obj: dict) -> list[dict]:
    labels = obj["spec"]["template"]["metadata"]["labels"]
    return [
        p
        for p in objects
        if p["kind"] == "NetworkPolicy" and p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]


def quantity(text: str) -> int:
    """A Kubernetes quantity in bytes (the binary suffixes k8s/ uses)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", str(text)).groups()
    return int(number) * units.get(unit, 1)


def container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def schema_knows(schema, name: str) -> bool:
    return name in schema.by_name or any(name.startswith(p.prefix) for p in schema.prefixes)


def local_paths(env: dict, tmp: Path, files: set[str] = frozenset(), dirs: set[str] = frozenset()) -> dict:
    """The environment with in-pod paths replaced by real ones under tmp (files get a token, dirs exist), so
    the schema's checks (file exists, directory exists) run as they would in the pod."""
    out = dict(env)
    for name in files | dirs:
        if name in out:
            path = tmp / out[name].lstrip("/")
            if name in dirs:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("not-a-real-token\n")
            out[name] = str(path)
    return out


def job_action(job: dict, code: int, disrupted: bool = False) -> str:
    """What the Job does when its pod fails with exit `code`, by Kubernetes' podFailurePolicy rules: the first
    matching rule wins; a failure no rule matches counts toward backoffLimit."""
    container = main_container(job)["name"]
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onPodConditions" in rule:
            if disrupted and any(
                c["type"] == "DisruptionTarget" and c.get("status", "True") == "True" for c in rule["onPodConditions"]
            ):
                return rule["action"]
            continue
        codes = rule["onExitCodes"]
        if codes.get("containerName", container) != container:
            continue
        if (code in codes["values"]) == (codes["operator"] == "In"):
            return rule["action"]
    return "Count"
