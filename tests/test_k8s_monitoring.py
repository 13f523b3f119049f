"""Dashboards and alerts (k8s/components/monitoring): the PodMonitor scrapes the API port of the serving pods in every
overlay, every metric in the alerts and the dashboard is one vLLM 0.32 (as installed in .venv-serve) or the gate
exposes, each alert carries its duration, severity and text, thresholds agree with the manifests they are derived
from, the dashboard is JSON with a query in every panel, and the vendored CRD schemas are of the release the docs
name. That every query parses as PromQL is checked by k8s/promql.py in `make lint-k8s` (promql-parser is a lint
dependency)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, SERVE_PYTHON, need_vllm
from tests.k8s_helpers import (
    DASHBOARD_LABEL,
    K8S,
    OVERLAYS,
    container_port,
    crds,
    effective_env,
    main_container,
    one,
    policies_selecting,
    promql,
    render,
    server,
    workloads,
)
from tuneserve.gate import PUBLIC
from tuneserve.serve import SERVE_SCHEMA

COMPONENT = K8S / "components" / "monitoring"
MONITORING_API = "monitoring.coreos.com/v1"
JOB = "tuneserve-serve"  # the job label the PodMonitor gives its targets, which every query selects
# The gate's counters on /metrics (tuneserve/gate.py), as Prometheus names them.
GATE_METRICS = {
    "tuneserve_gate_refused_total",
    "tuneserve_gate_drains_total",
    "tuneserve_gate_drain_cancelled_total",
    "tuneserve_gate_live_total",
}
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^(\d+[smhdwy])+$")
# Other overlays get the component the way docs/kubernetes.md says to add it.
PLAIN = [o for o in OVERLAYS if o != "monitoring"]


def seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhdwy])", duration))


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory) -> Path:
    """A copy of k8s/, to add overlays to (kustomize takes relative paths only)."""
    copy = tmp_path_factory.mktemp("repo") / "k8s"
    shutil.copytree(K8S, copy)
    return copy


@pytest.fixture(scope="module")
def monitored(rendered, k8s_copy) -> dict[str, list[dict]]:
    """Every overlay with the monitoring component: overlays/monitoring as rendered, the others with it added as
    docs/kubernetes.md says (an overlay of the overlay listing the component)."""
    out = {"monitoring": rendered["monitoring"]}
    for overlay in PLAIN:
        directory = k8s_copy / "overlays" / f"{overlay}-monitored"
        directory.mkdir()
        (directory / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "namespace": "tuneserve",
                    "resources": [f"../{overlay}"],
                    "components": ["../../components/monitoring"],
                }
            )
        )
        out[overlay] = render.build(directory)
    return out


def rules(objects: list[dict]) -> list[dict]:
    rule = one(objects, "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def alert(objects: list[dict], name: str) -> dict:
    (found,) = [r for r in rules(objects) if r.get("alert") == name]
    return found


def threshold(expr: str) -> float:
    """The number an alert's expr compares with at its end (`... > 10`)."""
    return float(re.search(r"[<>]=?\s*([0-9.]+)\s*$", expr)[1])


# ------------------------------------------------------------------------------------------------ the scrape
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_scrapes_the_api_port_of_the_serving_pods_only(monitored, overlay):
    objects = monitored[overlay]
    monitor = one(objects, "PodMonitor")
    api = server(objects)  # the Deployment, or the LeaderWorkerSet's leader
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"} and "namespaceSelector" not in monitor["spec"], "its own namespace only"
    assert monitor["metadata"]["namespace"] == api["metadata"]["namespace"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    # Targets: the selected pods with a container port of that name (LeaderWorkerSet workers have none).
    targets = [
        w["metadata"]["name"]
        for w in workloads(objects)
        if selector["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        and any(
            p.get("name") == endpoint["port"]
            for c in w["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        )
    ]
    assert targets == [api["metadata"]["name"]]
    container = main_container(api)
    port = int(effective_env(objects, container).get("PORT", SERVE_SCHEMA.by_name["PORT"].default))
    assert container_port(container, endpoint["port"]) == port
    assert endpoint["path"] == "/metrics" and endpoint["path"] in PUBLIC, "Prometheus sends no API key"
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert (int(annotations["prometheus.io/port"]), annotations["prometheus.io/path"]) == (port, endpoint["path"])
    assert endpoint["relabelings"] == [{"action": "replace", "targetLabel": "job", "replacement": JOB}]
    # Prometheus runs in the namespace the serving NetworkPolicy lets reach the API port.
    admitted = [
        rule
        for policy in policies_selecting(objects, api)
        for rule in policy["spec"].get("ingress", [])
        if {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in rule["from"]
    ]
    assert [container_port(container, p["port"]) for rule in admitted for p in rule["ports"]] == [port]
    assert crds.validate(monitor) == [] and crds.validate(one(objects, "PrometheusRule")) == []


# ------------------------------------------------------------------------------------------------ metric names
def exposed_names(sources: dict[str, str]) -> set[str]:
    """The series names the metrics created in these Python sources expose, by prometheus_client's rules: a counter
    NAME (with or without _total) as NAME_total, a gauge as NAME, a histogram as NAME_bucket, NAME_sum, NAME_count."""
    out = set()
    pattern = re.compile(r"_?(counter|gauge|histogram)(?:_cls)?\(\s*(?:name=)?\s*\"([a-z_:][a-z0-9_:]*)\"", re.I)
    for text in sources.values():
        for kind, name in pattern.findall(text):
            kind = kind.lower()
            if kind == "counter":
                out.add(name.removesuffix("_total") + "_total")
            elif kind == "gauge":
                out.add(name)
            else:
                out |= {name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return out


@pytest.fixture(scope="module")
def vllm_sources() -> dict[str, str]:
    """The Python sources of vLLM and of the HTTP instrumentator its server attaches, as installed in .venv-serve."""
    need_vllm()
    found = subprocess.run(
        [
            str(SERVE_PYTHON),
            "-c",
            "import importlib.metadata as m, importlib.util as u, json; print(json.dumps({"
            "'vllm': u.find_spec('vllm').submodule_search_locations[0], "
            "'instrumentator': u.find_spec('prometheus_fastapi_instrumentator').submodule_search_locations[0], "
            "'version': m.packages_distributions()['vllm'] and m.version(m.packages_distributions()['vllm'][0])}))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    paths = json.loads(found.stdout)
    pinned = re.search(r"^vllm(?:-cpu)?==(\S+)", (REPO / "requirements" / "serve-cpu.txt").read_text(), re.M)[1]
    assert paths["version"] == pinned, f"checked against vLLM {paths['version']}, requirements pin {pinned}"
    vllm = {str(p): p.read_text(errors="replace") for p in Path(paths["vllm"]).rglob("*.py")}
    instrumentator = {str(p): p.read_text() for p in Path(paths["instrumentator"]).glob("*.py")}
    attach = Path(paths["vllm"]) / "entrypoints" / "serve" / "instrumentator" / "metrics.py"
    assert "Instrumentator(" in attach.read_text(), "vLLM's server no longer attaches the HTTP instrumentator"
    return {"vllm": vllm, "instrumentator": instrumentator}


def test_every_metric_in_the_alerts_and_the_dashboard_is_one_vllm_or_the_gate_exposes(rendered, vllm_sources):
    vllm = {n for n in exposed_names(vllm_sources["vllm"]) if n.startswith("vllm:")}
    http = {n for n in exposed_names(vllm_sources["instrumentator"]) if n.startswith("http_")}
    assert {
        "vllm:num_requests_waiting",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
    } <= vllm
    assert "http_requests_total" in http, "the instrumentator's default metrics, on vLLM's /metrics"
    known = vllm | http | GATE_METRICS
    found = promql.queries(rendered["monitoring"])
    assert len(found) >= 15
    used = set()
    for where, expr in found:
        names = promql.metric_names(expr)
        assert names, where
        assert names <= known, f"{where}: {sorted(names - known)} exposed by neither vLLM nor the gate"
        used |= names
    assert GATE_METRICS <= used, "a gate counter neither alerted on nor shown"


def test_gate_metrics_are_the_ones_the_gate_counts():
    """The names above against tuneserve/gate.py, once it counts on /metrics (skipped while it does not)."""
    counted = exposed_names({"gate": (REPO / "tuneserve" / "gate.py").read_text()})
    counted = {n for n in counted if n.startswith("tuneserve_gate_")}
    if not counted:
        pytest.skip("tuneserve/gate.py creates no tuneserve_gate_* metric yet")
    assert counted == GATE_METRICS


@pytest.mark.parametrize("overlay", ["monitoring"])
def test_every_query_selects_the_podmonitor_targets(rendered, overlay):
    for where, expr in promql.queries(rendered[overlay]):
        for name in promql.metric_names(expr):
            for matchers in re.findall(re.escape(name) + r"(?![\w:])\s*(\{[^}]*\})?", expr):
                assert f'job="{JOB}"' in matchers, f"{where}: {name} without job={JOB}"


# ------------------------------------------------------------------------------------------------ alerts
def test_each_alert_has_a_duration_a_severity_and_text(rendered):
    found = rules(rendered["monitoring"])
    names = [r["alert"] for r in found]
    assert len(set(names)) == len(names) >= 4 and all(n.startswith("Tuneserve") for n in names)
    for rule in found:
        assert DURATION.match(rule["for"]) and seconds(rule["for"]) > 0, rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]
        assert threshold(rule["expr"]) >= 0, rule["alert"]


def test_thresholds_agree_with_the_manifests_they_are_derived_from(rendered):
    objects = rendered["monitoring"]
    (endpoint,) = one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]
    for rule in rules(objects):  # rate() and increase() need several samples in their window
        for window in re.findall(r"\[(\w+)\]", rule["expr"]):
            assert seconds(window) >= 4 * seconds(endpoint["interval"]), rule["alert"]
    # The queue alert fires only above the autoscaler's target: scaling out comes first.
    hpa = one(rendered["hub-hpa"], "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    waiting = alert(objects, "TuneserveRequestsWaiting")
    assert "vllm:num_requests_waiting" in waiting["expr"]
    assert threshold(waiting["expr"]) >= float(metric["pods"]["target"]["averageValue"])
    # The stall alert's window holds the kubelet's failures before a restart.
    liveness = main_container(server(objects))["livenessProbe"]
    stalled = alert(objects, "TuneserveEngineStalled")
    (window,) = re.findall(r"\[(\w+)\]", stalled["expr"])
    assert seconds(window) >= liveness["periodSeconds"] * liveness["failureThreshold"]
    assert 'result="fail"' in stalled["expr"] and threshold(stalled["expr"]) < liveness["failureThreshold"]
    # Draining refusals are expected on every rollout.
    assert 'reason!="draining"' in alert(objects, "TuneserveRefusalsSpiking")["expr"]


# ------------------------------------------------------------------------------------------------ the dashboard
def test_dashboard_is_json_with_a_query_in_every_panel(rendered):
    objects = rendered["monitoring"]
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap" and DASHBOARD_LABEL in o["metadata"]["labels"]]
    assert config_map["metadata"]["labels"][DASHBOARD_LABEL] == "1", "kube-prometheus-stack's sidecar wants 1"
    (text,) = config_map["data"].values()
    assert text == (COMPONENT / "serve-dashboard.json").read_text()
    (where, dashboard), *_ = promql.dashboards(objects)
    assert dashboard["uid"] and dashboard["title"] and where
    panels = promql.panels(dashboard)
    assert len(panels) >= 8
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels:
        targets = panel["targets"]
        assert targets and all(t["expr"].strip() for t in targets), panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used)
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "first token", "inter-token", "waiting", "kv cache", "refusals", "/live", "drains"):
        assert topic in titles, topic


# ------------------------------------------------------------------------------------------------ schemas and docs
def test_crd_schemas_are_of_the_release_the_docs_name_and_strict():
    releases = {
        crds.load_schema(crds.SCHEMAS[(MONITORING_API, kind)])["x-release"] for kind in ("PodMonitor", "PrometheusRule")
    }
    docs = set(
        re.findall(r"prometheus-operator (v[0-9]+\.[0-9]+\.[0-9]+)", (REPO / "docs" / "kubernetes.md").read_text())
    )
    assert len(releases) == 1 and docs == releases, (releases, docs)
    schema = crds.load_schema(crds.SCHEMAS[(MONITORING_API, "PrometheusRule")])
    good = {
        "apiVersion": MONITORING_API,
        "kind": "PrometheusRule",
        "metadata": {"name": "x"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": "5m"}]}]},
    }
    assert crds.check(schema, good) == []
    bad = json.loads(json.dumps(good))
    bad["spec"]["groups"][0]["rules"][0].update({"for": "5 min", "severity": "critical"})
    bad["spec"]["groups"].append({"name": "g", "rules": []})
    bad["spec"]["groups"][1]["name"] = "g"
    errors = crds.check(schema, bad)
    for expected in ("'5 min' does not match", "severity: unknown field", "duplicate item"):
        assert any(expected in e for e in errors), (expected, errors)
    schema = crds.load_schema(crds.SCHEMAS[(MONITORING_API, "PodMonitor")])
    errors = crds.check(schema, {"spec": {"selector": {}, "podMetricsEndpoints": [{"port": "http", "interval": "30"}]}})
    assert any("'30' does not match" in e for e in errors), errors


def docs_section() -> str:
    text = (REPO / "docs" / "kubernetes.md").read_text()
    return text.split("## Dashboards and alerts", 1)[1].split("\n## ", 1)[0]


def docs_threshold_patch() -> str:
    """The kustomization docs/kubernetes.md shows for changing a threshold."""
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", docs_section(), re.S) if "op: replace" in b]
    return block


def test_docs_list_the_alerts_in_the_order_a_patch_counts_them(rendered):
    """A patch names a rule by its position; the docs' table gives them in that order."""
    assert re.findall(r"^\| `(Tuneserve\w+)` \|", docs_section(), re.M) == [
        r["alert"] for r in rules(rendered["monitoring"])
    ]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_the_documented_threshold_patch_changes_the_alert_it_names(k8s_copy):
    block = docs_threshold_patch()
    path = re.match(r"# (k8s/overlays/\S+/kustomization\.yaml)\n", block)[1]
    overlay = k8s_copy.parent / path
    overlay.parent.mkdir()
    overlay.write_text(block)
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay.parent)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    before = {r["alert"]: r for r in rules(render.build(K8S / "overlays" / "monitoring"))}
    after = {r["alert"]: r for r in rules(list(yaml.safe_load_all(out)))}
    changed = [name for name in after if after[name] != before[name]]
    assert changed == ["TuneserveRequestsWaiting"], changed
    assert threshold(after["TuneserveRequestsWaiting"]["expr"]) > threshold(before["TuneserveRequestsWaiting"]["expr"])
