"""Pulling a model from the Hugging Face hub into the model store.

The download is ``huggingface_hub``'s own code (``snapshot_download``): it resumes an
interrupted pull, retries, and honours the variables it documents (``HF_ENDPOINT`` for
a mirror, ``HF_TOKEN`` for gated or private repos, ``HF_HUB_OFFLINE``). A branch or tag
is first resolved to its commit, and the files are fetched at that commit, so what is
recorded is exactly what was downloaded. ``huggingface_hub`` is imported only here and
only when a pull runs: the agent's other commands never load it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.execution.modelfiles import hash_folder
from agent.execution.modelstore import (
    ModelStore,
    ModelStoreError,
    PullResult,
    StoredModel,
    check_name,
    verify_model,
)

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# The hub's own rule: [owner/]name, letters, digits, . _ -, at most 96 characters.
REPO_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_REPO_CHARS = 96
MAX_REVISION_CHARS = 255
_NETWORK_ERRORS = frozenset({"TransportError", "RequestException", "ConnectionError",
                             "TimeoutException", "OfflineModeIsEnabled",
                             "LocalEntryNotFoundError"})
_OFFLINE_HELP = ("on a node without network copy the model in with `--from FOLDER`, or set "
                 "HF_ENDPOINT to a hub mirror you can reach (HF_HUB_OFFLINE=1 forbids downloads)")


def pull_hub(store: ModelStore, name: str, repo: str, revision: str = "main",
             allow_patterns: Sequence[str] = ()) -> PullResult:
    """Store ``repo`` at ``revision`` under ``name``; a no-op when that commit is stored
    intact (its files are verified against the lock file, no network needed for a sha)."""
    check_name(name)
    _check_repo(repo, revision)
    patterns = sorted(set(allow_patterns))
    try:
        with _hub_errors(repo, revision):
            commit = revision if COMMIT_RE.fullmatch(revision) else _resolve(repo, revision)
    except ModelStoreError as exc:
        # Offline, a branch cannot be resolved: what an earlier pull resolved it to stands.
        known = _stored(store, repo, None, patterns, revision=revision)
        if exc.code != "hub_unreachable" or known is None:
            raise
        commit = str(known.source["commit"])
    stored = _stored(store, repo, commit, patterns)
    if stored is not None and not verify_model(store, stored):
        return store.add_name(name, stored)
    staged = store.staging(json.dumps(["hub", repo, commit, patterns]))
    with _only_puller(staged), _hub_errors(repo, revision):
        _download(repo, commit, staged, patterns)
    files = hash_folder(staged)  # skips huggingface_hub's .cache/ (resume bookkeeping)
    if not files:
        shutil.rmtree(staged, ignore_errors=True)
        raise ModelStoreError(f"{repo}@{commit[:12]} has no files matching "
                              f"{', '.join(patterns) or 'anything'}; check --allow-pattern",
                              "hub_not_found")
    shutil.rmtree(staged / ".cache", ignore_errors=True)
    source = {"kind": "hub", "repo": repo, "revision": revision, "commit": commit,
              "allow_patterns": patterns}
    result = store.commit(name, staged, source, files)
    staged.with_name(staged.name + ".lock").unlink(missing_ok=True)
    return result


def _check_repo(repo: str, revision: str) -> None:
    if len(repo) > MAX_REPO_CHARS or not REPO_RE.fullmatch(repo) or ".." in repo:
        raise ModelStoreError(f"--repo {repo[:MAX_REPO_CHARS]!r} is not a hub repo id; it "
                              "looks like OWNER/NAME, e.g. openai-community/gpt2",
                              "bad_model_name")
    if (not revision or len(revision) > MAX_REVISION_CHARS or ".." in revision
            or any(c.isspace() or ord(c) < 32 for c in revision)):
        raise ModelStoreError(f"--revision {revision[:64]!r} is not a branch, tag or commit",
                              "bad_model_name")


def _stored(store: ModelStore, repo: str, commit: str | None, patterns: list[str],
            revision: str | None = None) -> StoredModel | None:
    """The stored pull of ``repo`` at ``commit`` (or, offline, as ``revision`` named it)."""
    for model in store.models():
        src = model.source
        if (src.get("kind") == "hub" and src.get("repo") == repo
                and src.get("allow_patterns", []) == patterns
                and (src.get("commit") == commit if commit else src.get("revision") == revision)):
            return model
    return None


def _resolve(repo: str, revision: str) -> str:
    from huggingface_hub import HfApi

    sha = HfApi().model_info(repo, revision=revision).sha
    if not sha or not COMMIT_RE.fullmatch(sha):
        raise ModelStoreError(f"the hub gave no commit for {repo}@{revision}", "hub_error")
    return sha


def _download(repo: str, commit: str, staged: Path, patterns: list[str]) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo, revision=commit, local_dir=staged,
                      allow_patterns=patterns or None)


@contextlib.contextmanager
def _only_puller(staged: Path) -> Iterator[None]:
    """One pull per (repo, commit, patterns) at a time: the staging folder is shared."""
    staged.parent.mkdir(parents=True, exist_ok=True)
    with open(staged.with_name(staged.name + ".lock"), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModelStoreError("another `models pull` of this repo and revision is running; "
                                  "wait for it to finish", "pull_in_progress") from None
        yield


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str) -> Iterator[None]:
    """huggingface_hub's errors as ModelStoreError codes that say what to do next."""
    try:
        yield
    except ModelStoreError:
        raise
    except Exception as exc:  # every failure of the hub library becomes one coded error
        raise _translate(exc, repo, revision) from exc


def _translate(exc: Exception, repo: str, revision: str) -> ModelStoreError:
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    status = _status(exc)
    where = f"{repo}@{revision}"
    if "GatedRepoError" in kinds or status in (401, 403):
        return ModelStoreError(f"the hub refused {where} ({status or 'gated'}): accept the "
                               "model's terms on its hub page and set HF_TOKEN to a token "
                               "that may read it", "hub_refused")
    if kinds & {"RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"}:
        return ModelStoreError(f"the hub has no {where}: check --repo and --revision (a "
                               "private repo needs HF_TOKEN)", "hub_not_found")
    if kinds & _NETWORK_ERRORS or isinstance(exc, OSError) and status is None:
        return ModelStoreError(f"cannot reach the hub for {where} ({_short(exc)}); "
                               f"{_OFFLINE_HELP}", "hub_unreachable")
    return ModelStoreError(f"pulling {where} failed: {_short(exc)}; run the same command "
                           "again to resume", "hub_error")


def _status(exc: Exception) -> int | None:
    response: Any = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
