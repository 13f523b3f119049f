"""Validate the custom resources (LeaderWorkerSet, PodMonitor, PrometheusRule) in rendered manifests, which
kubernetes-validate cannot.

    python k8s/crds.py [--kubernetes-version 1.37.0] [--pod-templates OUT.yaml] RENDERED.yaml...
    python k8s/crds.py --vendor CRD.yaml RELEASE > k8s/schemas/KIND.json      (refresh a vendored schema)

kubernetes-validate knows Kubernetes' own kinds only: for a LeaderWorkerSet it prints a warning and passes it.
For each object of a kind in SCHEMAS this
  1. validates the object against the openAPIV3Schema of the CRD release docs/kubernetes.md installs, vendored in
     k8s/schemas/ (descriptions removed), strictly: a field the schema does not name is an error (the API server
     would silently drop it), as are a wrong type, a value outside an enum, a string that does not match the
     schema's pattern (a PrometheusRule's `for: 5 min`) or is too short, a missing required field and two items
     of a list-type map or set with the same key;
  2. takes out its pod templates (the schema holds them as plain objects) and writes each as a v1 PodTemplate to
     --pod-templates, which `make lint-k8s` passes to kubernetes-validate --strict (Kubernetes' own pod schema)
     and to checkov (whose pod checks skip kinds they do not know, and read a PodTemplate).
With --kubernetes-version, any other object whose kind has no schema in kubernetes-validate is an error too, so
nothing in k8s/ reaches a cluster unvalidated.

Not validated: what the CRD's admission webhook checks beyond its schema (for LeaderWorkerSet: that
subGroupSize divides size, the rollout's maxSurge/maxUnavailable limits, immutable fields; for PrometheusRule: that
each expr is PromQL, which k8s/promql.py checks instead), and whether the cluster runs the release the schema comes
from. Needs PyYAML only (kubernetes-validate for --kubernetes-version).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
# (apiVersion, kind) -> the vendored schema, where the CRD file comes from (for the schema's $comment) and where in
# the object its pod templates are.
LWS_SOURCE = "kubernetes-sigs/lws {release} (config/crd/bases/{file})"
PROMETHEUS_OPERATOR_SOURCE = (
    "prometheus-operator/prometheus-operator {release} (example/prometheus-operator-crd/{file})"
)
SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): {
        "schema": HERE / "schemas" / "leaderworkerset.x-k8s.io_v1_leaderworkerset.json",
        "source": LWS_SOURCE,
        "pod_templates": {
            "leader": ("spec", "leaderWorkerTemplate", "leaderTemplate"),
            "worker": ("spec", "leaderWorkerTemplate", "workerTemplate"),
        },
    },
    # k8s/components/monitoring: the scrape of the serving pods and the alerts, for the prometheus-operator.
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "schema": HERE / "schemas" / "monitoring.coreos.com_v1_podmonitor.json",
        "source": PROMETHEUS_OPERATOR_SOURCE,
        "pod_templates": {},
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "schema": HERE / "schemas" / "monitoring.coreos.com_v1_prometheusrule.json",
        "source": PROMETHEUS_OPERATOR_SOURCE,
        "pod_templates": {},
    },
}
INT32 = (-(2**31), 2**31 - 1)


def schema_for(obj: dict) -> dict | None:
    return SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))


def load_schema(entry: dict) -> dict:
    return json.loads(entry["schema"].read_text())


def check(schema: dict, value: Any, path: str = "") -> list[str]:
    """Errors of value against a CRD structural schema (the subset of OpenAPI v3 CRDs use), strict."""
    where = path or "(root)"
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected an integer or a string, got {value!r}"]
    kind = schema.get("type")
    errors: list[str] = []
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {value!r}"]
        properties = schema.get("properties")
        if properties is not None:
            for key, item in value.items():
                if key in properties:
                    errors += check(properties[key], item, f"{path}.{key}" if path else key)
                else:
                    errors.append(f"{path}.{key}: unknown field" if path else f"{key}: unknown field")
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                errors += check(schema["additionalProperties"], item, f"{path}.{key}")
        errors += [
            f"{where}: missing required field {name!r}" for name in schema.get("required", []) if name not in value
        ]
    elif kind == "array":
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        for i, item in enumerate(value):
            errors += check(schema.get("items", {}), item, f"{path}[{i}]")
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: more than {schema['maxItems']} items")
        # The API server refuses two items with the same key (map) or two equal items (set).
        list_type = schema.get("x-kubernetes-list-type")
        if list_type in ("map", "set"):
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [
                json.dumps(
                    [i.get(k) for k in keys] if list_type == "map" and isinstance(i, dict) else i, sort_keys=True
                )
                for i in value
            ]
            errors += [f"{where}: duplicate item {key}" for key in sorted({k for k in seen if seen.count(k) > 1})]
    elif kind == "string":
        if not isinstance(value, str):
            return [f"{where}: expected a string, got {value!r}"]
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: {value!r} is shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: {value!r} is longer than {schema['maxLength']}")
        if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    elif kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: expected an integer, got {value!r}"]
        low, high = INT32 if schema.get("format") == "int32" else (None, None)
        low = schema.get("minimum", low)
        high = schema.get("maximum", high)
        if (low is not None and value < low) or (high is not None and value > high):
            errors.append(f"{where}: {value} is outside [{low}, {high}]")
    elif kind == "boolean":
        if not isinstance(value, bool):
            return [f"{where}: expected true or false, got {value!r}"]
    elif kind is not None:
        return [f"{where}: schema type {kind!r} not supported by this validator"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    return errors


def _pattern(pattern: str) -> re.Pattern:
    """A schema's pattern (Go's RE2 syntax, which the patterns of the vendored schemas share with Python's re)."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} not supported by this validator: {exc}") from None


def _get(obj: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def pod_templates(obj: dict) -> list[dict]:
    """The object's pod templates as v1 PodTemplates named <object>-<role>, in its namespace."""
    entry = schema_for(obj)
    out = []
    for role, keys in (entry["pod_templates"] if entry else {}).items():
        template = _get(obj, keys)
        if template is None:
            continue
        # The template's annotations too: checkov reads its skips (checkov.io/skipN) from the object's own.
        annotations = dict(template.get("metadata", {}).get("annotations", {}))
        annotations["tuneserve/extracted-from"] = f"{obj['kind']}/{obj['metadata']['name']} {'.'.join(keys)}"
        meta = {"name": f"{obj['metadata']['name']}-{role}", "annotations": annotations}
        if "namespace" in obj["metadata"]:
            meta["namespace"] = obj["metadata"]["namespace"]
        out.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": copy.deepcopy(template)})
    return out


def validate(obj: dict) -> list[str]:
    """Errors of a custom resource of a kind in SCHEMAS against its vendored schema."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    return [f"{name}: {e}" for e in check(load_schema(schema_for(obj)), obj)]


def vendor(crd_path: str, release: str) -> dict:
    """The schema to vendor from a CRD file: descriptions and status removed, pod templates as plain objects."""
    crd = yaml.safe_load(Path(crd_path).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    kind = crd["spec"]["names"]["kind"]
    api_version = f"{crd['spec']['group']}/{version['name']}"
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)

    def strip(node: Any, names: bool = False) -> Any:
        """Without the schema keyword "description" (a field of that name, a key of "properties", is kept)."""
        if isinstance(node, dict):
            return {
                k: strip(v, k == "properties" and not names) for k, v in node.items() if names or k != "description"
            }
        return [strip(v) for v in node] if isinstance(node, list) else node

    schema = strip(schema)
    entry = SCHEMAS[(api_version, kind)]
    removed = ["descriptions and status removed"]
    for keys in entry["pod_templates"].values():
        parent = schema
        for key in keys[:-1]:
            parent = parent["properties"][key]
        parent["properties"][keys[-1]] = {"type": "object"}  # validated as a PodTemplate instead
    if entry["pod_templates"]:
        removed.append("pod templates validated separately (k8s/crds.py)")
    lwt = schema["properties"]["spec"]["properties"].get("leaderWorkerTemplate", {}).get("properties", {})
    if lwt.pop("volumeClaimTemplates", None) is not None:  # embedded PVCs: not validated here, so refused
        removed.append("volumeClaimTemplates removed")
    source = entry["source"].format(release=release, file=Path(crd_path).name)
    return {
        "$comment": f"openAPIV3Schema of {kind} {api_version} from {source}, {', '.join(removed)}. "
        f"Regenerate: python k8s/crds.py --vendor CRD.yaml RELEASE",
        "x-release": release,
        **schema,
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--vendor"] and len(argv) == 3:
        print(json.dumps(vendor(argv[1], argv[2]), indent=1, sort_keys=True))
        return 0
    version = out = None
    files = []
    args = iter(argv)
    for arg in args:
        if arg == "--kubernetes-version":
            version = next(args)
        elif arg == "--pod-templates":
            out = next(args)
        else:
            files.append(arg)
    if not files:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    errors, templates, checked = [], [], 0
    for path in files:
        for obj in (o for o in yaml.safe_load_all(Path(path).read_text()) if o):
            if schema_for(obj):
                errors += [f"{path}: {e}" for e in validate(obj)]
                templates += pod_templates(obj)
                checked += 1
            elif version is not None:
                import kubernetes_validate  # noqa: PLC0415 - only the lint environment has it

                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.SchemaNotFoundError:
                    errors.append(
                        f"{path}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}: no schema "
                        f"in kubernetes-validate {version} nor in k8s/crds.py SCHEMAS"
                    )
                except kubernetes_validate.ValidationError:
                    pass  # reported by kubernetes-validate itself, which the Makefile runs next
    if out is not None:
        Path(out).write_text(yaml.safe_dump_all(templates, sort_keys=True, default_flow_style=False, width=120))
    for error in errors:
        print(f"crds.py: {error}", file=sys.stderr)
    if not errors:
        print(
            f"crds.py: {checked} custom resources valid against their CRD schemas; {len(templates)} pod templates "
            f"written{' to ' + out if out else ''}"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
