"""Render a kustomization in k8s/ the way `kubectl kustomize DIR` does, for machines without kubectl.

    python k8s/render.py k8s/overlays/volume > volume.yaml

Why it exists: the tests (`make test`, in .venv-train) read the rendered overlays, and neither a kustomize
binary nor a Python wheel of it can be installed everywhere this project runs. kubectl's built-in kustomize
is the reference: tests/test_k8s.py renders every overlay with both and fails if the objects differ, and
`make lint-k8s` uses kubectl when it is there.

It handles only what k8s/ uses, and refuses anything else rather than ignoring it: resources (files and
directories), components, configMapGenerator (from files, with disableNameSuffixHash: the hash kustomize would
append is not computed here), namespace, images, patches (strategic merge, from a file, matched by kind and
name; a patch whose top level says `$patch: delete` removes the object) and replacements (dotted field
paths with [key=value] list selectors; the value copied may be a scalar, a map or a list). Components run
before their parent's generators and own transformers, which run in kustomize's order: patches, namespace,
images, replacements. Needs PyYAML only.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KNOWN_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "configMapGenerator",
    "namespace",
    "images",
    "patches",
    "replacements",
}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
}
# Strategic merge: lists merged item by item on this key (Kubernetes' patchMergeKey); other lists are replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
# kustomize's "legacy" output order: these kinds first and last, the others by group_version_kind between.
ORDER_FIRST = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


class RenderError(Exception):
    pass


def build(directory: str | Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` prints, in the same order."""
    return sorted(_build(Path(directory), "Kustomization", []), key=_order)


def _load_kustomization(directory: Path, kind: str) -> dict:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(path.read_text()) or {}
    unknown = set(k) - KNOWN_FIELDS
    if unknown:
        raise RenderError(
            f"{path}: {', '.join(sorted(unknown))} not supported by this renderer (use kubectl kustomize)"
        )
    if k.get("kind", "Kustomization") != kind:
        raise RenderError(f"{path}: expected kind {kind}, found {k.get('kind')}")
    return k


def _build(directory: Path, kind: str, objects: list[dict]) -> list[dict]:
    k = _load_kustomization(directory, kind)
    for ref in k.get("resources", []):
        path = directory / ref
        if path.is_dir():
            objects += _build(path, "Kustomization", [])
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for ref in k.get("components", []):
        objects = _build(directory / ref, "Component", objects)
    objects += [_generated_config_map(directory, entry) for entry in k.get("configMapGenerator", [])]
    for entry in k.get("patches", []):
        if set(entry) != {"path"}:
            raise RenderError(f"{directory}: only patches with a path are supported, got {entry}")
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        target = _find(objects, patch["kind"], patch["metadata"]["name"], f"{directory}/{entry['path']}")
        directive = patch.pop("$patch", None)
        if directive == "delete":
            objects.remove(target)
        elif directive is None:
            objects[objects.index(target)] = strategic_merge(target, patch)
        else:
            raise RenderError(f"{directory}/{entry['path']}: $patch: {directive} not supported by this renderer")
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = k["namespace"]
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for entry in k.get("images", []):
        for obj in objects:
            _set_images(obj, entry)
    for rep in k.get("replacements", []):
        src = rep["source"]
        value = get_path(_find(objects, src["kind"], src["name"], str(directory)), src["fieldPath"])
        for target in rep["targets"]:
            obj = _find(objects, target["select"]["kind"], target["select"]["name"], str(directory))
            for field_path in target["fieldPaths"]:
                set_path(obj, field_path, value, create=target.get("options", {}).get("create", False))
    return objects


def _generated_config_map(directory: Path, entry: dict) -> dict:
    """A configMapGenerator entry's ConfigMap: one key per file (`KEY=PATH` or `PATH`, keyed by its file name)."""
    options = entry.get("options", {})
    if set(entry) - {"name", "files", "options"} or set(options) - {"disableNameSuffixHash", "labels", "annotations"}:
        raise RenderError(
            f"{directory}: configMapGenerator {entry.get('name')}: only name, files and options "
            "(disableNameSuffixHash, labels, annotations) are supported by this renderer"
        )
    if options.get("disableNameSuffixHash") is not True:
        raise RenderError(
            f"{directory}: configMapGenerator {entry['name']}: the name hash is not supported by this "
            "renderer (set options.disableNameSuffixHash: true)"
        )
    data = {}
    for item in entry.get("files", []):
        key, _, path = item.rpartition("=")
        data[key or Path(path).name] = (directory / path).read_text()
    meta = {"name": entry["name"]}
    for field in ("labels", "annotations"):
        if options.get(field):
            meta[field] = {k: str(v) for k, v in options[field].items()}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _find(objects: list[dict], kind: str, name: str, where: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(found) != 1:
        raise RenderError(f"{where}: {len(found)} objects match {kind}/{name}")
    return found[0]


def _order(obj: dict) -> tuple:
    kind = obj["kind"]
    group_version = obj["apiVersion"] if "/" in obj["apiVersion"] else f"~G/{obj['apiVersion']}"
    gvk = f"{group_version.replace('/', '_')}_{kind}"
    if kind in ORDER_FIRST:
        rank = (0, ORDER_FIRST.index(kind), "")
    elif kind in ORDER_LAST:
        rank = (2, ORDER_LAST.index(kind), "")
    else:
        rank = (1, 0, gvk)
    meta = obj["metadata"]
    return rank, meta.get("namespace", ""), meta["name"]


def strategic_merge(original: Any, patch: Any, key: str | None = None) -> Any:
    """Kubernetes' strategic merge patch for the fields in MERGE_KEYS; maps merge, null deletes, lists replace."""
    if isinstance(original, dict) and isinstance(patch, dict):
        out = dict(original)
        for k, v in patch.items():
            if k.startswith("$"):
                raise RenderError(f"patch directive {k} not supported by this renderer")
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = v
        return out
    if isinstance(original, list) and isinstance(patch, list) and key in MERGE_KEYS:
        # kustomize's order: the patch's items (merged into their originals), then the untouched originals.
        mk = MERGE_KEYS[key]
        by_key = {item[mk]: item for item in original}
        merged = [strategic_merge(by_key[p[mk]], p) if p[mk] in by_key else p for p in patch]
        patched = {p[mk] for p in patch}
        return merged + [item for item in original if item[mk] not in patched]
    return patch


def _set_images(node: Any, entry: dict) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                for container in v:
                    container["image"] = _new_image(container["image"], entry)
            else:
                _set_images(v, entry)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, entry)


def _new_image(image: str, entry: dict) -> str:
    name, _, digest = image.partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    if name != entry["name"]:
        return image
    name = entry.get("newName", name)
    if "newTag" in entry:
        tag, digest = str(entry["newTag"]), ""
    if "digest" in entry:
        digest = entry["digest"]
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _segments(field_path: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in field_path:
        if ch == "." and depth == 0:
            out.append(current)
            current = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        current += ch
    return out + [current]


def _step(node: Any, segment: str, create: bool) -> Any:
    if segment.startswith("["):
        key, _, value = segment[1:-1].partition("=")
        matches = [item for item in node if str(item.get(key)) == value]
        if len(matches) != 1:
            raise RenderError(f"{segment}: {len(matches)} list items match")
        return matches[0]
    if segment not in node:
        if not create:
            raise RenderError(f"{segment}: no such field (options.create is off)")
        node[segment] = {}
    return node[segment]


def get_path(obj: dict, field_path: str) -> Any:
    node: Any = obj
    for segment in _segments(field_path):
        node = _step(node, segment, create=False)
    return node


def set_path(obj: dict, field_path: str, value: Any, create: bool = False) -> None:
    *parents, last = _segments(field_path)
    node: Any = obj
    for segment in parents:
        node = _step(node, segment, create)
    if last.startswith("["):  # a whole list item, e.g. containers.[name=x]
        node[node.index(_step(node, last, create=False))] = copy.deepcopy(value)
        return
    if last not in node and not create:
        raise RenderError(f"{field_path}: no such field (options.create is off)")
    node[last] = copy.deepcopy(value)  # a map or list copied to two places must not be one object


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        objects = build(argv[0])
    except (RenderError, OSError, KeyError, yaml.YAMLError) as exc:
        print(f"render.py: {argv[0]}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=True, default_flow_style=False, width=120))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
