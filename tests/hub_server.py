"""A fake Hugging Face Hub for tests (huggingface.co is not reachable here): serves folders as model or dataset repos
to the real huggingface_hub client and transformers' from_pretrained in a process whose HF_ENDPOINT is `FakeHub.url`.

Endpoints, as the client reads them: repo info (/api/{models,datasets}/{id}[/revision/{rev}]), the tree listing
snapshot_download and transformers use (/api/{kind}/{id}/tree/{rev}[/{path}]), and HEAD/GET of a file
(/[datasets/]{id}/resolve/{rev}/{file}, answered 200 with X-Repo-Commit, a sha256 ETag and Content-Length; no redirect,
no Range: the client only sends one to resume a partial download, and takes a full 200 answer to it). A revision is
"main" or a commit of the repo: re-adding a repo is a new upstream commit that "main" then names, earlier commits
stay served, as on the Hub. Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), which
the client turns into its typed exceptions.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_TREE = re.compile(rf"/api/(?P<kind>models|datasets)/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?")
_INFO = re.compile(rf"/api/(?P<kind>models|datasets)/{_REPO}(?:/revision/(?P<rev>[^/]+))?")
_RESOLVE = re.compile(rf"/(?P<kind>datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
_COMMIT = re.compile(r"[0-9a-f]{40}")

Reply = tuple[int, dict[str, str], bytes]


class _NotFound(Exception):
    def __init__(self, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        headers |= {"X-Repo-Commit": commit} if commit else {}
        self.reply: Reply = 404, headers, json.dumps({"error": message}).encode()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tree(commit: str, files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict[str, object]]:
    """The Hub's listing of folder `prefix` (all of it, or its direct children), folders included."""
    dirs = {str(p) for f in files for p in PurePosixPath(f).parents if str(p) != "."}
    if prefix and prefix not in dirs:
        raise _NotFound("EntryNotFound", f"{prefix} does not exist on {commit}", commit)
    entries = {d: {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d} for d in dirs}
    entries |= {p: {"type": "file", "oid": _git_blob_id(d), "size": len(d), "path": p} for p, d in files.items()}
    base = f"{prefix}/" if prefix else ""
    keep = [p for p in entries if p.startswith(base) and (recursive or "/" not in p[len(base) :])]
    return [entries[p] for p in sorted(keep)]


def _json(obj: object) -> Reply:
    return 200, {"Content-Type": "application/json"}, json.dumps(obj).encode()


class FakeHub:
    """`with FakeHub() as hub: hub.add_model("org/tiny", folder)`; then HF_ENDPOINT=hub.url in the client's env."""

    def __init__(self) -> None:
        # (kind, repo_id) -> (head commit, {commit: {path: content}})
        self._repos: dict[tuple[str, str], tuple[str, dict[str, dict[str, bytes]]]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._reply(with_body=False)

            def do_GET(self) -> None:
                self._reply(with_body=True)

            def _reply(self, with_body: bool) -> None:
                hub.requests.append(f"{self.command} {urlsplit(self.path).path}")
                status, headers, body = hub._answer(self.path)
                self.send_response(status)
                for key, value in (headers | {"Content-Length": str(len(body))}).items():
                    self.send_header(key, value)
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add_model(self, repo_id: str, folder: Path, commit: str | None = None) -> str:
        return self._add("models", repo_id, folder, commit)

    def add_dataset(self, repo_id: str, folder: Path, commit: str | None = None) -> str:
        return self._add("datasets", repo_id, folder, commit)

    def _add(self, kind: str, repo_id: str, folder: Path, commit: str | None) -> str:
        paths = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in paths}
        if commit is None:
            listing = sorted((path, hashlib.sha256(data).hexdigest()) for path, data in files.items())
            commit = hashlib.sha1(json.dumps([kind, repo_id, listing]).encode()).hexdigest()
        if not _COMMIT.fullmatch(commit):
            raise ValueError(f"a commit is 40 lowercase hex digits, not {commit!r}")
        commits = dict(self._repos.get((kind, repo_id), ("", {}))[1])
        commits[commit] = files
        self._repos[(kind, repo_id)] = (commit, commits)
        return commit

    def _lookup(self, kind: str, repo_id: str, rev: str | None) -> tuple[str, dict[str, bytes]]:
        if (kind, repo_id) not in self._repos:
            raise _NotFound("RepoNotFound", "Repository not found")
        head, commits = self._repos[(kind, repo_id)]
        commit = head if rev in (None, "main") else unquote(rev)
        if commit not in commits:
            raise _NotFound("RevisionNotFound", "Invalid rev id")
        return commit, commits[commit]

    def _answer(self, raw_path: str) -> Reply:
        url = urlsplit(raw_path)
        try:
            if m := _TREE.fullmatch(url.path):
                commit, files = self._lookup(m["kind"], m["repo"], m["rev"])
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                return _json(_tree(commit, files, unquote(m["path"] or "").strip("/"), recursive))
            if m := _INFO.fullmatch(url.path):
                commit, files = self._lookup(m["kind"], m["repo"], m["rev"])
                siblings = [{"rfilename": p, "size": len(d), "blobId": _git_blob_id(d)} for p, d in files.items()]
                info = {"id": m["repo"], "author": m["repo"].partition("/")[0], "sha": commit, "private": False}
                return _json(info | {"gated": False, "disabled": False, "tags": [], "siblings": siblings})
            if m := _RESOLVE.fullmatch(url.path):
                commit, files = self._lookup("datasets" if m["kind"] else "models", m["repo"], m["rev"])
                if (data := files.get(unquote(m["path"]))) is None:
                    raise _NotFound("EntryNotFound", "Entry not found", commit)
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                return 200, {"X-Repo-Commit": commit, "ETag": etag, "Content-Type": "application/octet-stream"}, data
        except _NotFound as e:
            return e.reply
        return 404, {"Content-Type": "text/plain"}, b"Not Found"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
