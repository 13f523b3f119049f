"""Publishing against a fake Hub client (the Hub is the one thing unreachable here; the only fake in the
suite). The pipeline runs in-process through the real entrypoint function so the fake can be injected."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError

from tests.helpers import LEARN_ENV, copy_output, run_train
from tuneserve import publish
from tuneserve.exitcodes import ExitCode
from tuneserve.trainlog import CURVES_PNG

pytestmark = pytest.mark.slow

SECRET = "hf_PUBLISHsecretTOKEN55555"


def http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/models")
    return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, request=request))


class FakeHub:
    """Records every call; `fail_on` maps a call number (1-based, all methods) to the exception it raises,
    `always_fail` names methods that always raise a 503. Models branches and pull requests so tests can
    check that a branch moves once, from nothing to complete."""

    def __init__(
        self,
        fail_on: dict[int, Exception] | None = None,
        always_fail: tuple[str, ...] = (),
        role: str = "write",
        user: str = "alice",
        orgs: tuple[str, ...] = ("acme",),
    ):
        self.calls: list[tuple[str, dict]] = []
        self.fail_on = dict(fail_on or {})
        self.always_fail = always_fail
        self.role, self.user, self.orgs = role, user, orgs
        self.repos: dict[str, dict] = {}

    def _call(self, method: str, **kwargs):
        self.calls.append((method, kwargs))
        exc = self.fail_on.pop(len(self.calls), None)
        if exc is not None:
            raise exc
        if method in self.always_fail:
            raise http_error(503)

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    def whoami(self):
        self._call("whoami")
        return {
            "name": self.user,
            "orgs": [{"name": o} for o in self.orgs],
            "auth": {"accessToken": {"role": self.role}},
        }

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self._call("create_repo", repo_id=repo_id, private=private)
        self.repos.setdefault(repo_id, {"private": private, "branches": {"main": []}, "prs": {}})

    def create_branch(self, repo_id, branch, exist_ok=False):
        self._call("create_branch", repo_id=repo_id, branch=branch)
        self.repos[repo_id]["branches"].setdefault(branch, [])

    def create_commit(self, repo_id, operations, commit_message, revision=None, create_pr=False):
        self._call("create_commit", repo_id=repo_id, revision=revision, create_pr=create_pr)
        files = {op.path_in_repo: Path(op.path_or_fileobj).stat().st_size for op in operations}
        contents = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        repo = self.repos[repo_id]
        num = len(repo["prs"]) + 1
        repo["prs"][num] = {"target": revision or "main", "files": files, "contents": contents, "merged": False}
        return SimpleNamespace(pr_num=num, pr_revision=f"refs/pr/{num}", commit_url=f"https://hub/{repo_id}/c{num}")

    def list_repo_tree(self, repo_id, revision=None, recursive=False):
        self._call("list_repo_tree", repo_id=repo_id, revision=revision)
        pr = self.repos[repo_id]["prs"][int(revision.rsplit("/", 1)[1])]
        return [SimpleNamespace(path=p, size=s) for p, s in pr["files"].items()]

    def merge_pull_request(self, repo_id, discussion_num, comment=None):
        self._call("merge_pull_request", repo_id=repo_id, discussion_num=discussion_num)
        pr = self.repos[repo_id]["prs"][discussion_num]
        pr["merged"] = True
        self.repos[repo_id]["branches"][pr["target"]].append(pr["files"])
        return SimpleNamespace(url=f"https://hub/{repo_id}/discussions/{discussion_num}")


@pytest.fixture
def run_job(monkeypatch, tmp_path, chatml_base, qa_dataset):
    """Run `python -m entrypoints.train`'s main() in-process with the environment given and a fake Hub."""
    from entrypoints.train import main

    def run(hub: FakeHub, out: Path, **env) -> int:
        monkeypatch.setattr(publish, "hub_client", lambda: hub)
        for key in [k for k in list(__import__("os").environ) if k.startswith(("HUB_", "PUSH_", "PUBLISH_"))]:
            monkeypatch.delenv(key)
        # The training settings of trained_output (conftest), whose copies these runs continue.
        base = {
            **LEARN_ENV,
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(out),
            "HF_TOKEN": SECRET,
            "HUB_MODEL_ID": "alice/qa-model",
            "PUBLISH_BACKOFF_SECONDS": "0",
            "PUBLISH_RETRIES": "3",
        }
        for key, value in {**base, **env}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(tmp_path)
        return main([])

    return run


def test_transient_failures_are_retried_then_the_branch_moves_once(run_job, tmp_path, trained_output, capsys):
    out = copy_output(trained_output, tmp_path / "out")
    # calls: 1 whoami, 2 create_repo, 3 create_commit (503), 4 create_commit (timeout), 5 create_commit, ...
    hub = FakeHub(fail_on={3: http_error(503), 4: TimeoutError("read timed out")})
    assert run_job(hub, out) == ExitCode.OK
    assert hub.methods() == [
        "whoami",
        "create_repo",
        "create_commit",
        "create_commit",
        "create_commit",
        "list_repo_tree",
        "merge_pull_request",
    ]
    assert all(kw["create_pr"] for m, kw in hub.calls if m == "create_commit")
    repo = hub.repos["alice/qa-model"]
    assert repo["private"] is True
    assert len(repo["branches"]["main"]) == 1  # main moved once
    published = repo["branches"]["main"][0]
    local = {str(p.relative_to(out / "merged")): p.stat().st_size for p in (out / "merged").rglob("*") if p.is_file()}
    assert published == local and {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= set(published)
    state = json.loads((out / "publish.json").read_text())
    assert state["model"]["merged"] is True and state["model"]["repo"] == "alice/qa-model"
    err = capsys.readouterr().err
    assert "retry 1/2" in err and "retry 2/2" in err and "training already done" in err
    # The card published with the model holds the serve command and no secret.
    card = repo["prs"][1]["contents"]["README.md"].decode()
    assert "vllm serve alice/qa-model" in card and "MODEL_ID=alice/qa-model" in card and SECRET not in card
    for contents in repo["prs"][1]["contents"].values():
        assert SECRET.encode() not in contents


def test_persistent_failure_exits_75_keeps_everything_and_rerun_publishes_without_training(
    run_job, tmp_path, trained_output, capsys
):
    out = copy_output(trained_output, tmp_path / "out")
    adapter_mtime = (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    merged_mtime = (out / "merged" / "model.safetensors").stat().st_mtime_ns
    down = FakeHub(always_fail=("create_commit",))
    assert run_job(down, out) == ExitCode.RETRYABLE
    assert down.methods().count("create_commit") == 3 and "merge_pull_request" not in down.methods()
    assert "uploading to alice/qa-model failed 3 times" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (
        out / "merged" / "model.safetensors"
    ).is_file()

    back = FakeHub()
    assert run_job(back, out) == ExitCode.OK
    err = capsys.readouterr().err
    assert "training already done" in err and "merge already done" in err and "verification already passed" in err
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime
    assert (out / "merged" / "model.safetensors").stat().st_mtime_ns == merged_mtime
    assert len(back.repos["alice/qa-model"]["branches"]["main"]) == 1

    # Once published, a rerun publishes nothing again.
    again = FakeHub()
    assert run_job(again, out) == ExitCode.OK
    assert again.methods() == ["whoami"]


def test_nothing_is_published_after_a_verify_failure(run_job, tmp_path, trained_output):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = copy_output(trained_output, tmp_path / "out")
    shutil.rmtree(out / "merged")
    weights = out / "adapter" / "adapter_model.safetensors"
    tensors = {
        k: (torch.full_like(v, float("nan")) if "lora_B" in k else v) for k, v in load_file(str(weights)).items()
    }
    save_file(tensors, str(weights))
    hub = FakeHub()
    assert run_job(hub, out) == ExitCode.VERIFY
    assert hub.methods() == ["whoami"]  # preflight only
    assert not (out / "publish.json").exists()


def test_branch_revision_and_adapter_publishing(run_job, tmp_path, trained_output):
    out = copy_output(trained_output, tmp_path / "out")
    hub = FakeHub()
    assert (
        run_job(hub, out, HUB_REVISION="v1", PUSH_ADAPTER="true", HUB_PRIVATE="false", HUB_MODEL_ID="acme/qa")
        == ExitCode.OK
    )
    assert ("create_branch", {"repo_id": "acme/qa", "branch": "v1"}) in hub.calls
    assert {kw["revision"] for m, kw in hub.calls if m == "create_commit"} == {"v1"}
    assert hub.repos["acme/qa"]["private"] is False
    model, adapter = hub.repos["acme/qa"], hub.repos["acme/qa-adapter"]
    assert model["branches"]["main"] == [] and len(model["branches"]["v1"]) == 1
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(adapter["branches"]["v1"][0])
    # Both cards carry the loss curves drawn from metrics.jsonl, uploaded beside them in the same commit.
    for repo in (model, adapter):
        pr = next(pr for pr in repo["prs"].values() if pr["merged"])
        assert pr["contents"][CURVES_PNG].startswith(b"\x89PNG\r\n\x1a\n")
        assert f"]({CURVES_PNG})" in pr["contents"]["README.md"].decode()


def test_token_without_write_access_fails_preflight_with_exit_2(run_job, tmp_path, trained_output, capsys):
    out = copy_output(trained_output, tmp_path / "out")
    assert run_job(FakeHub(role="read"), out) == ExitCode.CONFIG
    assert "cannot write to 'alice'" in capsys.readouterr().err
    assert run_job(FakeHub(), out, HUB_MODEL_ID="someone-else/model") == ExitCode.CONFIG
    invalid = FakeHub(fail_on={1: http_error(401)})
    assert run_job(invalid, out) == ExitCode.CONFIG
    assert "token is invalid or expired" in capsys.readouterr().err


def test_missing_token_fails_before_training(tmp_path, chatml_base, qa_dataset):
    out = tmp_path / "out"
    res = run_train(
        {
            "BASE_MODEL": str(chatml_base),
            "DATASET": str(qa_dataset),
            "OUTPUT_DIR": str(out),
            "HUB_MODEL_ID": "alice/m",
            "HF_HOME": str(tmp_path / "hf"),
        },
        cwd=tmp_path,
    )
    assert res.returncode == ExitCode.CONFIG
    assert "there is no Hugging Face token" in res.stderr
    assert not out.exists()


def test_retry_classification():
    assert publish.is_transient(http_error(503)) and publish.is_transient(http_error(429))
    assert publish.is_transient(TimeoutError()) and publish.is_transient(ConnectionResetError())
    assert publish.is_transient(httpx2.ConnectError("refused"))
    assert not publish.is_transient(http_error(404)) and not publish.is_transient(ValueError("x"))
