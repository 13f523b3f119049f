"""The renderer (k8s/render.py, the subset of kustomize k8s/ uses) against `kubectl kustomize`, its merge rules
and refusals, and what every overlay renders: the whole flow in one namespace."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.k8s_helpers import (
    DASHBOARD_LABEL,
    EVALUATE_JOB,
    K8S,
    OUTPUT_CLAIM,
    OVERLAYS,
    TRAIN_JOB,
    api_service,
    claims_mounted,
    one,
    render,
)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert render.build(K8S / "overlays" / overlay) == list(yaml.safe_load_all(out.stdout))


def test_renderer_strategic_merge_and_refusals(tmp_path):
    original = {
        "spec": {
            "containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["p", "q"]}],
            "keep": 1,
            "drop": 2,
        }
    }
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}], "args": ["r"]}], "drop": None}}
    assert render.strategic_merge(original, patch) == {
        "spec": {
            "containers": [
                {"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "1"}], "args": ["r"]}
            ],
            "keep": 1,
        }
    }
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(render.RenderError, match="commonLabels not supported"):
        render.build(tmp_path)
    # A generated ConfigMap without disableNameSuffixHash would get a hash kustomize computes and this renderer not.
    (tmp_path / "a.json").write_text("{}\n")
    (tmp_path / "kustomization.yaml").write_text("configMapGenerator: [{name: d, files: [a.json]}]\n")
    with pytest.raises(render.RenderError, match="name hash is not supported"):
        render.build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "configMapGenerator: [{name: d, files: [k=a.json], options: {disableNameSuffixHash: true}}]\n"
    )
    assert render.build(tmp_path) == [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "d"}, "data": {"k": "{}\n"}}
    ]


def test_renderer_deletes_objects_and_copies_whole_list_items(tmp_path):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "image": "x", "args": ["1"]}]},
    }
    other = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q"}, "spec": {"containers": [{"name": "a"}]}}
    (tmp_path / "objects.yaml").write_text(yaml.safe_dump_all([pod, other]))
    (tmp_path / "delete.yaml").write_text("$patch: delete\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["objects.yaml"], "patches": [{"path": "delete.yaml"}], "components": ["copy"]})
    )
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "Component",
                "replacements": [
                    {
                        "source": {"kind": "Pod", "name": "p", "fieldPath": "spec.containers.[name=a]"},
                        "targets": [
                            {"select": {"kind": "Pod", "name": "q"}, "fieldPaths": ["spec.containers.[name=a]"]}
                        ],
                    }
                ],
            }
        )
    )
    # The component runs first (copies p's container into q), then the parent's patch deletes p.
    (q,) = render.build(tmp_path)
    assert q["metadata"]["name"] == "q" and q["spec"]["containers"] == pod["spec"]["containers"]
    assert "&id" not in yaml.safe_dump(q), "a copied map must not be shared (YAML anchors in the output)"
    (tmp_path / "delete.yaml").write_text("$patch: replace\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    with pytest.raises(render.RenderError, match="replace not supported"):
        render.build(tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_flow_in_one_namespace(rendered, overlay):
    objects = rendered[overlay]
    kinds = sorted(o["kind"] for o in objects)
    for kind in ("Namespace", "ServiceAccount", "PodDisruptionBudget"):
        assert kinds.count(kind) == 1, kind
    # The output claim, and any other claim only where a pod mounts it (the compile cache: where a Deployment serves)
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    assert OUTPUT_CLAIM in claims and claims == claims_mounted(objects), claims
    jobs = sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Job")
    assert jobs == ([EVALUATE_JOB, TRAIN_JOB] if overlay == "quantized" else [TRAIN_JOB]), "training, then evaluation"
    assert kinds.count("Deployment") + kinds.count("LeaderWorkerSet") == 1, "one way of serving"
    # The training and serving configuration; a Grafana dashboard (components/monitoring) is a ConfigMap too.
    assert len([o for o in objects if o["kind"] == "ConfigMap" and DASHBOARD_LABEL not in o["metadata"]["labels"]]) == 2
    api_service(objects)  # one Service for clients; a headless one may name the training pods
    namespace = one(objects, "Namespace")["metadata"]["name"]
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {namespace}
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by the user, never shipped"
