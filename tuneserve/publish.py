"""Stage: publish to the Hugging Face Hub, atomically and retryably.

The repo's branch moves once, from its previous state to the complete model: every file goes up in one
commit to a pull-request ref, the remote file list and sizes are checked against the local folder, and
only then is the pull request merged. A transient failure (timeout, connection error, 429/5xx) is retried
with exponential backoff; if it persists the process exits 75 with everything kept, and rerunning the same
command publishes without retraining or re-merging (publish.json records what is done).

The token comes from HF_TOKEN / HF_TOKEN_FILE through the environment; it is checked (present, valid,
allowed to write to the namespace) in preflight, before training.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tuneserve.exitcodes import ConfigError, RetryableError
from tuneserve.layout import read_json, write_json_atomic

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_STATUS = {408, 409, 423, 429, 500, 502, 503, 504}


def hub_client():
    """The Hub client (huggingface_hub.HfApi). Tests replace this function with a fake."""
    from huggingface_hub import HfApi

    return HfApi()


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    status = _status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS or status >= 500
    try:
        from httpx2 import TransportError
    except ImportError:  # pragma: no cover - huggingface_hub always ships its HTTP client
        TransportError = ()  # noqa: N806
    return isinstance(exc, (TimeoutError, ConnectionError, TransportError))


def with_retries(what: str, fn: Callable[[], T], attempts: int, backoff: float) -> T:
    """Call fn, retrying transient failures; a persistent one becomes RetryableError (exit 75)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not transient
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise RetryableError(
                    f"{what} failed {attempts} times ({type(exc).__name__}: {str(exc)[:200]}); everything produced "
                    "is kept in OUTPUT_DIR: rerun the same command to publish without retraining"
                ) from None
            delay = backoff * 2 ** (attempt - 1)
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs",
                what,
                type(exc).__name__,
                str(exc)[:200],
                attempt,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------- preflight
def token_present() -> bool:
    from huggingface_hub import get_token

    return bool(get_token())


def can_write(info: dict, namespace: str) -> bool:
    names = {info.get("name")} | {o.get("name") for o in info.get("orgs", []) if isinstance(o, dict)}
    if namespace not in names:
        return False
    token = (info.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    if role == "write" or role is None:
        return True
    if role == "fineGrained":
        fg = token.get("fineGrained") or {}
        if "repo.write" in (fg.get("global") or []):
            return True
        for scope in fg.get("scoped") or []:
            entity = scope.get("entity") or {}
            if entity.get("name") == namespace and "repo.write" in (scope.get("permissions") or []):
                return True
    return False


def preflight(repos: list[str], *, attempts: int, backoff: float) -> None:
    """Before training: a token is there, valid, and may write to every target namespace (exit 2 if not)."""
    if not token_present():
        raise ConfigError(
            f"HUB_MODEL_ID={repos[0]!r} is set but there is no Hugging Face token: set HF_TOKEN "
            "(or HF_TOKEN_FILE, e.g. a mounted Secret) to a token with write access"
        )
    api = hub_client()
    try:
        info = with_retries("checking the Hub token", api.whoami, attempts, backoff)
    except RetryableError:
        raise
    except Exception as exc:  # noqa: BLE001
        if _status(exc) in (401, 403):
            raise ConfigError(
                "the Hugging Face token is invalid or expired (the Hub answered "
                f"{_status(exc)}); set HF_TOKEN to a valid write token"
            ) from None
        raise
    for repo in repos:
        namespace = repo.split("/")[0]
        if not can_write(info, namespace):
            raise ConfigError(
                f"the Hugging Face token of {info.get('name')!r} cannot write to {namespace!r} "
                f"(needed for {repo!r}): use a write token of that user or organization"
            )


# --------------------------------------------------------------------------------------------- publishing
def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def fingerprint(folder: Path) -> str:
    """Identifies the folder's content: small files by their bytes, weight files by size and mtime (hashing
    gigabytes on every rerun would cost minutes; the merge rewrites them whenever they change)."""
    h = hashlib.sha256()
    for p in folder_files(folder):
        st = p.stat()
        ident = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size <= 16 * 2**20 else st.st_mtime_ns
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{ident}\n".encode())
    return h.hexdigest()[:16]


@contextmanager
def _refusal_exits_2(kind: str, repo: str) -> Iterator[None]:
    """The Hub refusing the token (401, 403) becomes exit 2 with advice; transient failures stay retryable."""
    try:
        yield
    except RetryableError:
        raise
    except Exception as exc:  # noqa: BLE001 - only the Hub's refusals are turned into a documented code
        if _status(exc) in (401, 403):
            raise ConfigError(
                f"publishing {kind} to {repo}: the Hub refused the token ({_status(exc)}); everything "
                "produced is kept in OUTPUT_DIR: fix HF_TOKEN and rerun the same command"
            ) from None
        raise


def publish_folder(
    folder: Path,
    repo: str,
    *,
    revision: str,
    private: bool,
    message: str,
    attempts: int,
    backoff: float,
    state_file: Path,
    kind: str,
) -> dict[str, Any]:
    """One atomic publication of `folder` to `repo`@`revision`. Idempotent through `state_file`."""
    with _refusal_exits_2(kind, repo):
        from huggingface_hub import CommitOperationAdd

        fp = fingerprint(folder)
        state = read_json(state_file) or {}
        done = state.get(kind) or {}
        if (
            done.get("merged")
            and done.get("repo") == repo
            and done.get("revision") == revision
            and done.get("fingerprint") == fp
        ):
            log.info("%s already published to %s@%s (%s); skipping", kind, repo, revision, done.get("commit_url"))
            return done
        api = hub_client()
        with_retries(
            f"creating {repo}", lambda: api.create_repo(repo, private=private, exist_ok=True), attempts, backoff
        )
        if revision != "main":
            with_retries(
                f"creating branch {revision}",
                lambda: api.create_branch(repo, branch=revision, exist_ok=True),
                attempts,
                backoff,
            )
        files = folder_files(folder)
        ops = [CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p)) for p in files]
        log.info(
            "uploading %d files (%.1f MB) of %s to a pull request on %s@%s",
            len(ops),
            sum(p.stat().st_size for p in files) / 1e6,
            kind,
            repo,
            revision,
        )
        commit = with_retries(
            f"uploading to {repo}",
            lambda: api.create_commit(repo, ops, commit_message=message, revision=revision, create_pr=True),
            attempts,
            backoff,
        )
        record = {
            "repo": repo,
            "revision": revision,
            "fingerprint": fp,
            "pr_num": commit.pr_num,
            "pr_revision": commit.pr_revision,
            "merged": False,
        }
        state[kind] = record
        write_json_atomic(state_file, state)

        remote = with_retries(
            "listing the uploaded files",
            lambda: {
                item.path: getattr(item, "size", None)
                for item in api.list_repo_tree(repo, revision=commit.pr_revision, recursive=True)
            },
            attempts,
            backoff,
        )
        missing = [
            str(p.relative_to(folder)) for p in files if remote.get(str(p.relative_to(folder))) != p.stat().st_size
        ]
        if missing:
            raise RetryableError(
                f"the pull request {commit.pr_revision} on {repo} lacks or has wrong sizes for "
                f"{', '.join(missing[:5])}; it was not merged. Rerun to upload again"
            )
        merged = with_retries(
            f"merging {commit.pr_revision}",
            lambda: api.merge_pull_request(
                repo, commit.pr_num, comment="Checked: every file present with its size. Published by tuneserve."
            ),
            attempts,
            backoff,
        )
        record.update(merged=True, commit_url=getattr(merged, "url", None) or commit.commit_url)
        write_json_atomic(state_file, state)
        log.info("published %s to https://huggingface.co/%s (revision %s)", kind, repo, revision)
        return record
