"""Kubernetes manifests (k8s/): the contract between the rendered overlays and the code they run.

Every overlay is rendered (k8s/render.py; checked against `kubectl kustomize` where kubectl exists) and
read as the cluster would get it. Names, defaults and exit codes are imported from the code, never retyped:
the Job's podFailurePolicy against ExitCode, the ConfigMaps loaded through TRAIN_SCHEMA / SERVE_SCHEMA, the
probes against the serve entrypoint's PORT, the volume hand-off against Layout, the multi-node rendezvous
against the launcher's variables (TRAIN_SCHEMA) and the LeaderWorkerSet group against SERVE_SCHEMA's
parallelism. A LeaderWorkerSet's pods are read as its controller creates them (its labels and variables
added), so the checks on pods apply to its leader and worker templates as to a Deployment's.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tuneserve.config import TRAIN_SCHEMA
from tuneserve.exitcodes import ExitCode
from tuneserve.gate import PROBES
from tuneserve.layout import Layout
from tuneserve.serve import SERVE_SCHEMA

REPO = Path(__file__).resolve().parents[1]
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

# Environment variables a manifest may set that belong to a library rather than to our schemas.
LIBRARY_VARS = {"HF_TOKEN_PATH": "huggingface_hub: file holding the token (the serving schema reads HF_TOKEN only)",
                "LWS_LEADER_ADDRESS": "LeaderWorkerSet controller: the group leader's DNS name, in every container",
                "LWS_GROUP_SIZE": "LeaderWorkerSet controller: pods in the group, in every container",
                "LWS_WORKER_INDEX": "LeaderWorkerSet controller: 0 on the leader, 1.. on workers"}
# Pod Security Standards "restricted": the volume types it allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
# Pod Security Standards "baseline" (and so "restricted"): the sysctls a pod may set.
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
HEALTH_PATH = "/health"  # vLLM's readiness route; 503 once the gate drains (README: Serving)
LIVE_PATH = "/live"  # the gate's forward-progress route
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"  # an Indexed Job pod's index
LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render.build(K8S / "overlays" / name) for name in OVERLAYS}


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
    for role, index, template in (("leader", 0, lwt.get("leaderTemplate", lwt["workerTemplate"])),
                                  ("worker", 1, lwt["workerTemplate"])):
        template = copy.deepcopy(template)
        template.setdefault("metadata", {}).setdefault("labels", {}).update(
            {"leaderworkerset.sigs.k8s.io/name": name, "leaderworkerset.sigs.k8s.io/group-index": "0",
             LWS_WORKER_INDEX_LABEL: str(index)})
        injected = [{"name": "LWS_LEADER_ADDRESS", "value": f"{name}-0.{name}.{namespace}"},
                    {"name": "LWS_GROUP_SIZE", "value": str(lwt.get("size", 1))},
                    {"name": "LWS_WORKER_INDEX", "value": str(index)}]
        for container in all_containers(template["spec"]):
            container["env"] = injected + [e for e in container.get("env", []) if e["name"] not in
                                           {i["name"] for i in injected}]
        out.append({"apiVersion": lws["apiVersion"], "kind": lws["kind"], "role": role,
                    "metadata": {**lws["metadata"], "name": f"{name}/{role}"}, "spec": {"template": template}})
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
            env[item["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                       lambda m: str(env.get(m.group(1), m.group(0))), item["value"])
        elif completion_index is not None and item["valueFrom"].get("fieldRef", {}).get("fieldPath") == \
                COMPLETION_INDEX:
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


def claim_mount(obj: dict, container: dict) -> tuple[dict, dict]:
    return mount_of(obj, container, lambda v: "persistentVolumeClaim" in v)


def policies_selecting(objects: list[dict], obj: dict) -> list[dict]:
    labels = obj["spec"]["template"]["metadata"]["labels"]
    return [p for p in objects if p["kind"] == "NetworkPolicy"
            and p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]


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
            if disrupted and any(c["type"] == "DisruptionTarget" and c.get("status", "True") == "True"
                                 for c in rule["onPodConditions"]):
                return rule["action"]
            continue
        codes = rule["onExitCodes"]
        if codes.get("containerName", container) != container:
            continue
        if (code in codes["values"]) == (codes["operator"] == "In"):
            return rule["action"]
    return "Count"


def exit_code_table(job: dict) -> str:
    """The README's table of what each exit code does to the Job, computed from the Job's podFailurePolicy."""
    limit = job["spec"]["backoffLimit"]
    does = {"FailJob": "Fails the Job at once; no new pod.",
            "Count": f"A new pod resumes from the claim; counts toward `backoffLimit` ({limit}).",
            "Ignore": "A new pod resumes from the claim; not counted."}
    rows = ["| Exit code | Name | What the Job does |", "|---|---|---|",
            f"| {int(ExitCode.OK)} | `{ExitCode.OK.name}` | The Job completes. |"]
    rows += [f"| {int(c)} | `{c.name}` | {does[job_action(job, int(c))]} |" for c in ExitCode if c is not ExitCode.OK]
    rows.append(f"| any, after preemption, eviction or a node drain (`DisruptionTarget`) | | "
                f"{does[job_action(job, int(ExitCode.TERMINATED), disrupted=True)]} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ renderer
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         check=True, timeout=60)
    assert render.build(K8S / "overlays" / overlay) == list(yaml.safe_load_all(out.stdout))


def test_renderer_strategic_merge_and_refusals(tmp_path):
    original = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["p", "q"]}],
                         "keep": 1, "drop": 2}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}], "args": ["r"]}],
                      "drop": None}}
    assert render.strategic_merge(original, patch) == {"spec": {"containers": [
        {"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "1"}], "args": ["r"]}], "keep": 1}}
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(render.RenderError, match="commonLabels not supported"):
        render.build(tmp_path)


def test_renderer_deletes_objects_and_copies_whole_list_items(tmp_path):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]}]}}
    other = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q"}, "spec": {"containers": [{"name": "a"}]}}
    (tmp_path / "objects.yaml").write_text(yaml.safe_dump_all([pod, other]))
    (tmp_path / "delete.yaml").write_text("$patch: delete\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["objects.yaml"], "patches": [{"path": "delete.yaml"}],
        "components": ["copy"]}))
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "kustomization.yaml").write_text(yaml.safe_dump({
        "kind": "Component", "replacements": [{
            "source": {"kind": "Pod", "name": "p", "fieldPath": "spec.containers.[name=a]"},
            "targets": [{"select": {"kind": "Pod", "name": "q"}, "fieldPaths": ["spec.containers.[name=a]"]}]}]}))
    # The component runs first (copies p's container into q), then the parent's patch deletes p.
    (q,) = render.build(tmp_path)
    assert q["metadata"]["name"] == "q" and q["spec"]["containers"] == pod["spec"]["containers"]
    assert "&id" not in yaml.safe_dump(q), "a copied map must not be shared (YAML anchors in the output)"
    (tmp_path / "delete.yaml").write_text("$patch: replace\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    with pytest.raises(render.RenderError, match="replace not supported"):
        render.build(tmp_path)


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_flow_in_one_namespace(rendered, overlay):
    objects = rendered[overlay]
    kinds = sorted(o["kind"] for o in objects)
    for kind in ("Namespace", "ServiceAccount", "PersistentVolumeClaim", "Job", "PodDisruptionBudget"):
        assert kinds.count(kind) == 1, kind
    assert kinds.count("Deployment") + kinds.count("LeaderWorkerSet") == 1, "one way of serving"
    assert kinds.count("ConfigMap") == 2
    api_service(objects)  # one Service for clients; a headless one may name the training pods
    namespace = one(objects, "Namespace")["metadata"]["name"]
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {namespace}
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by the user, never shipped"


# ------------------------------------------------------------------------------------------------ the Job
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_pod_failure_policy_follows_the_exit_codes(rendered, overlay):
    job = one(rendered[overlay], "Job")
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
    job = one(objects, "Job")
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
    job = one(objects, "Job")
    container = main_container(job)
    (source,) = container["envFrom"]
    data = one(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
    unknown = [k for k in data if not schema_knows(TRAIN_SCHEMA, k)]
    assert not unknown, f"not training variables: {unknown}"
    assert not [k for k in data if k in TRAIN_SCHEMA.by_name and TRAIN_SCHEMA.by_name[k].secret]
    assert not [i["name"] for i in container.get("env", [])
                if not schema_knows(TRAIN_SCHEMA, i["name"]) and i["name"] not in LIBRARY_VARS]
    monkeypatch.chdir(tmp_path)  # no stray .env
    indexes = range(job["spec"]["completions"]) if job["spec"].get("completionMode") == "Indexed" else [None]
    for index in indexes:  # every pod of an Indexed Job, with its own completion index
        env = local_paths(effective_env(objects, container, completion_index=index), tmp_path,
                          files={"HF_TOKEN_FILE"}, dirs={"OUTPUT_DIR"})
        cfg = TRAIN_SCHEMA.load(env)
        assert cfg.base_model == data["BASE_MODEL"] and cfg.hf_token_file


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_pods_get_a_gpu_node_shm_and_a_writable_tmp(rendered, overlay):
    for obj in [one(rendered[overlay], "Job")] + serving_pods(rendered[overlay]):
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


# ------------------------------------------------------------------------------------------------ serving
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
    assert not [i["name"] for i in container.get("env", [])
                if not schema_knows(SERVE_SCHEMA, i["name"]) and i["name"] not in LIBRARY_VARS]
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
        assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                                  "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
        assert "replicas" not in deployment["spec"], "apply would reset the autoscaler's replicas"
    else:  # a whole group at a time
        lws = one(objects, "LeaderWorkerSet")
        assert lws["spec"]["rolloutStrategy"] == {"type": "RollingUpdate", "rollingUpdateConfiguration":
                                                  {"maxSurge": 0, "maxUnavailable": 1}}
        assert "replicas" not in lws["spec"], "apply would reset the autoscaler's replicas"
    for obj in workloads(objects):
        assert pod_spec(obj)["enableServiceLinks"] is False, obj["metadata"]["name"]
    assert "vllm" not in [o["metadata"]["name"] for o in objects if o["kind"] == "Service"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_both_pods(rendered, overlay):
    objects = rendered[overlay]
    for obj in workloads(objects):
        selecting = policies_selecting(objects, obj)
        assert selecting, obj["metadata"]["name"]
        for policy in selecting:
            assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}, policy["metadata"]["name"]
    job = one(objects, "Job")
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
    allowed = [{"podSelector": {"matchLabels": {"tuneserve.io/client": "true"}}},
               {"namespaceSelector": {"matchLabels": {"tuneserve.io/gateway": "true"}}},
               {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    peers = []
    for policy in policies_selecting(objects, deployment):
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits every pod"
            for peer in rule["from"]:
                group = peer.get("podSelector", {}).get("matchLabels", {}).items() <= own.items() and \
                    "namespaceSelector" not in peer and peer.get("podSelector", {}).get("matchLabels")
                assert peer in allowed or group, f"{policy['metadata']['name']} admits {peer}"
                peers.append(peer)
    assert all(p in peers for p in allowed)


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
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": target["apiVersion"], "kind": target["kind"],
                                             "name": target["metadata"]["name"]}
    assert "replicas" not in target["spec"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "vllm:num_requests_waiting".replace(":", "_")
    assert server(objects)["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


# ------------------------------------------------------------------------------------------------ multi-node
MULTINODE_TRAIN = [o for o in OVERLAYS if o.startswith("multinode")]
MULTINODE_SERVE = [o for o in OVERLAYS if o.startswith("multinode") and o != "multinode-train"]
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
    assert env["MASTER_ADDR"] in {node0, f"{node0}.{namespace}", f"{node0}.{namespace}.svc",
                                  f"{node0}.{namespace}.svc.cluster.local"}
    (port,) = service["spec"]["ports"]
    assert int(env["MASTER_PORT"]) == port["port"] == container_port(container, port["targetPort"])
    # One process per GPU of the pod.
    assert int(env["NPROC_PER_NODE"]) == gpus(container) > 1
    # Every node's configuration loads, with its own rank.
    monkeypatch.chdir(tmp_path)
    for index in range(nnodes):
        cfg = TRAIN_SCHEMA.load(local_paths(effective_env(objects, container, completion_index=index), tmp_path,
                                            files={"HF_TOKEN_FILE"}, dirs={"OUTPUT_DIR"}))
        assert (cfg.nnodes, cfg.node_rank, cfg.master_addr, cfg.master_port) == \
            (nnodes, index, env["MASTER_ADDR"], port["port"])
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
        rules = [r for p in policies_selecting(objects, job) for r in p["spec"].get(direction, [])
                 if r.get(peers) and all("podSelector" in peer for peer in r[peers])]
        assert rules, f"no {direction} rule between the group's pods"
        for rule in rules:
            for peer in rule[peers]:  # the group's pods, no one else
                assert peer["podSelector"]["matchLabels"].items() <= \
                    job["spec"]["template"]["metadata"]["labels"].items()
                assert peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "train"
        assert [port for r in rules for port in r["ports"]] == wanted, direction


@pytest.mark.parametrize("overlay", MULTINODE_TRAIN)
def test_multinode_claim_is_read_write_many_and_every_node_mounts_it(rendered, overlay):
    objects = rendered[overlay]
    claim = one(objects, "PersistentVolumeClaim")
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
    assert one(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


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
    good = {"apiVersion": LWS_API, "kind": "LeaderWorkerSet", "metadata": {"name": "x"},
            "spec": {"leaderWorkerTemplate": {"size": 2, "workerTemplate": {"spec": {}}}}}
    assert crds.check(schema, good) == []
    bad = copy.deepcopy(good)
    bad["spec"]["replica"] = 2
    bad["spec"]["leaderWorkerTemplate"].update(size="2", restartPolicy="Always")
    bad["spec"]["leaderWorkerTemplate"].pop("workerTemplate")
    bad["spec"]["leaderWorkerTemplate"]["volumeClaimTemplates"] = []  # not validated here, so refused
    errors = crds.check(schema, bad)
    for expected in ("spec.replica: unknown field", "size: expected an integer", "'Always' is not one of",
                     "missing required field 'workerTemplate'", "volumeClaimTemplates: unknown field"):
        assert any(expected in e for e in errors), (expected, errors)


def test_readme_installs_the_lws_release_whose_schema_is_vendored():
    schema = crds.load_schema(crds.SCHEMAS[(LWS_API, "LeaderWorkerSet")])
    readme = (REPO / "README.md").read_text()
    releases = set(re.findall(r"kubernetes-sigs/lws/releases/download/(v[0-9.]+)/manifests\.yaml", readme))
    assert releases == {schema["x-release"]}, "install the release the manifests are validated against"


# ------------------------------------------------------------------------------------------------ security
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
    job, deployment = one(objects, "Job"), server(objects)
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
    assert main_container(one(objects, "Job"))["image"].split("@")[0].endswith(f"/tuneserve-train:{VERSION}")
    for obj in serving_pods(objects):
        for container in all_containers(pod_spec(obj)):
            assert container["image"].split("@")[0].endswith(f"/tuneserve-serve:{VERSION}"), container["name"]


def test_each_image_is_pinned_in_one_place():
    pins = []
    for path in K8S.rglob("kustomization.yaml"):
        pins += [i["name"] for i in yaml.safe_load(path.read_text()).get("images", [])]
    assert sorted(pins) == ["tuneserve-serve", "tuneserve-train"]


# ------------------------------------------------------------------------------------------------ README
def test_readme_exit_code_table_matches_the_job(rendered):
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- BEGIN k8s-exit-codes -->\n(.*?)\n<!-- END k8s-exit-codes -->", readme, re.S)
    assert match, "README.md lacks the k8s-exit-codes section"
    expected = exit_code_table(one(rendered["volume"], "Job"))
    assert match.group(1) == expected, f"update the README's Kubernetes exit-code table to:\n{expected}"
