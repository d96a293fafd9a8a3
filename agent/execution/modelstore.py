"""The local model store: models kept by name, every file hashed, read-only to jobs.

Layout under the store's folder (config ``model_store_dir``, default ``<cache_dir>/models``)::

    models.lock            JSON: each stored model's names, source, files (path, size,
                           sha256) and when it was pulled; replaced atomically
    <slug>-<digest12>/     one folder per distinct content (digest of its file list)
    .pull-<key>/           a pull in progress (a hub pull resumes here after a crash)
    .trash-<random>/       a removed folder, renamed away before it is deleted
    .writer                flock: one writer of models.lock at a time

Only the agent's side writes here (``miner-agent models ...``); jobs see the folder
read-only. Names map to folders through :func:`resolve_models`, which merges the
lock file with config ``models`` (config wins: the operator's explicit choice).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_config
from agent.errors import AgentError
from agent.execution.cgroups import pid_alive
from agent.execution.modelfiles import (
    StoredFile,
    check_folder,
    hash_folder,
    manifest_digest,
)

LOCK_FILE = "models.lock"
LOCK_VERSION = 1
MAX_NAME_CHARS = 128
# What clients send: `llama3.2:3b`, `gpt2`, `meta-llama/Llama-3.2-3B`, `qwen2.5@q4`.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]*")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
FOLDER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}")  # what slug() and a digest make


class ModelStoreError(AgentError):
    """Raised when the model store cannot do what was asked; ``code`` says which case."""

    code = "model_store_error"


# -- what the lock file records ---------------------------------------------------

@dataclass(frozen=True)
class StoredModel:
    """One folder of the store and the names clients use for it."""

    names: tuple[str, ...]
    folder: str  # under the store's root
    source: dict[str, Any]  # {"kind": "hub", repo, revision, commit} or {"kind": "local", path}
    files: tuple[StoredFile, ...]
    pulled_at: str  # ISO 8601, UTC

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "folder": self.folder, "source": self.source,
                "pulled_at": self.pulled_at,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256}
                          for f in self.files]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredModel:
        """An entry of the lock file; ValueError when it could point outside the store."""
        files = tuple(StoredFile(str(f["path"]), int(f["size"]), str(f["sha256"]))
                      for f in data["files"])
        folder = str(data["folder"])
        if not FOLDER_RE.fullmatch(folder) or any(
                p.startswith("/") or ".." in p.split("/") for p in (f.path for f in files)):
            raise ValueError(f"entry {folder[:80]!r} names a path outside the store")
        names = tuple(check_name(str(n)) for n in data["names"])
        return cls(names, folder, dict(data["source"]), files, str(data["pulled_at"]))


def check_name(name: str) -> str:
    """``name`` if clients may use it; raises ModelStoreError (bad_model_name) if not."""
    parts = name.split("/")
    if (len(name) > MAX_NAME_CHARS or not NAME_RE.fullmatch(name)
            or any(p in ("", ".", "..") for p in parts)):
        raise ModelStoreError(
            f"model name {name[:MAX_NAME_CHARS]!r} is not allowed: use at most "
            f"{MAX_NAME_CHARS} letters, digits and . _ : @ + - / (not starting with one of "
            "them, no '..' or empty parts), e.g. llama3.2:3b", "bad_model_name")
    return name


# -- the store --------------------------------------------------------------------

@dataclass
class PullResult:
    model: StoredModel
    changed: bool  # False: the name already had this content (verified): nothing changed
    replaced: list[str] = field(default_factory=list)  # folders no name uses any more
    trash: list[Path] = field(default_factory=list)  # them, renamed away: finish() deletes

    def finish(self) -> None:
        for path in self.trash:
            shutil.rmtree(path, ignore_errors=True)


class ModelStore:
    """The store at ``root``; readers need no lock, writers take ``.writer``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of(cls, cfg: AgentConfig) -> ModelStore:
        return cls(cfg.model_store)

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    def models(self) -> list[StoredModel]:
        """Every stored model, as the lock file says (none when there is no store yet)."""
        try:
            data = json.loads(self.lock_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ModelStoreError(f"{self.lock_path} is unreadable ({exc}); restore it or "
                                  "remove the store's folder and pull again",
                                  "model_store_unreadable") from None
        try:
            return [StoredModel.from_json(m) for m in data["models"]]
        except (KeyError, TypeError, ValueError, ModelStoreError) as exc:
            raise ModelStoreError(f"{self.lock_path} is not a model store lock file "
                                  f"({exc!r})", "model_store_unreadable") from None

    def find(self, name: str) -> StoredModel | None:
        return next((m for m in self.models() if name in m.names), None)

    def folder_of(self, model: StoredModel) -> Path:
        return self.root / model.folder

    def table(self) -> dict[str, str]:
        """Name -> folder for every stored model whose folder is there."""
        out: dict[str, str] = {}
        for model in self.models():
            folder = self.folder_of(model)
            if folder.is_dir():
                out.update({name: str(folder) for name in model.names})
        return out

    # -- writing --------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the store's writer lock (other writers wait)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".writer", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def staging(self, key: str) -> Path:
        """A folder for one pull in progress; the same key gives the same folder (resume)."""
        return self.root / f".pull-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def commit(self, name: str, staged: Path, source: dict[str, Any],
               files: list[StoredFile]) -> PullResult:
        """Move a staged, hashed folder into place and record it under ``name``."""
        digest = manifest_digest(files)
        with self.writing():
            models = self.models()
            same = next((m for m in models if manifest_digest(m.files) == digest), None)
            if same is not None and not verify_model(self, same):
                # The same content is stored intact: share its folder.
                shutil.rmtree(staged, ignore_errors=True)
                if name in same.names:
                    return PullResult(model=same, changed=False)
                folder = same.folder
            else:  # new content, or a damaged copy of it that this pull repairs
                folder = same.folder if same is not None else f"{slug(name)}-{digest[:12]}"
                target = self.root / folder
                if target.exists():
                    self._discard(target)
                os.rename(staged, target)
            model = StoredModel((name,), folder, source, tuple(sorted(files, key=_path)),
                                _now())
            result = self._record(models, model)
            result.changed = True  # new content, or a repaired copy
        result.finish()
        return result

    def add_name(self, name: str, model: StoredModel) -> PullResult:
        """Record ``name`` for an already stored folder (a re-pull that found it intact)."""
        with self.writing():
            models = self.models()
            current = next((m for m in models if m.folder == model.folder), model)
            if name in current.names:
                return PullResult(model=current, changed=False)
            result = self._record(models, StoredModel((name,), current.folder, current.source,
                                                      current.files, current.pulled_at))
        result.finish()
        return result

    def _record(self, models: list[StoredModel], new: StoredModel) -> PullResult:
        """Write ``models`` with ``new``'s name on ``new``'s folder; caller holds the lock.

        A folder no name uses any more is renamed away here and deleted by the caller's
        ``finish`` (outside the lock: deleting gigabytes must not hold up other writers).
        """
        (name,) = new.names
        before = next((m.folder for m in models if name in m.names), None)
        out, dropped = _with_name(models, new)
        trash = [self._discard(self.root / f, delete=False) for f in dropped
                 if (self.root / f).exists()]
        self._write(out)
        return PullResult(model=next(m for m in out if name in m.names),
                          changed=before != new.folder, replaced=dropped, trash=trash)

    def remove(self, name: str) -> tuple[StoredModel, bool]:
        """Drop ``name``; its folder goes once no name uses it (renamed away, then deleted).

        Returns the model and whether its folder was deleted.
        """
        with self.writing():
            models = self.models()
            model = next((m for m in models if name in m.names), None)
            if model is None:
                raise ModelStoreError(f"no stored model is named {name!r}; `miner-agent "
                                      "models list` shows what is stored", "model_not_found")
            rest = tuple(n for n in model.names if n != name)
            kept = [m for m in models if m is not model]
            trash = None
            if rest:
                kept.append(StoredModel(rest, model.folder, model.source, model.files,
                                        model.pulled_at))
            elif self.folder_of(model).exists():
                trash = self._discard(self.folder_of(model), delete=False)
            self._write(kept)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return model, not rest

    def _discard(self, folder: Path, delete: bool = True) -> Path:
        """Rename ``folder`` out of the way (jobs starting now cannot half-see it)."""
        trash = self.root / f".trash-{uuid.uuid4().hex[:12]}"
        os.rename(folder, trash)
        if delete:
            shutil.rmtree(trash, ignore_errors=True)
        return trash

    def _write(self, models: list[StoredModel]) -> None:
        data = {"version": LOCK_VERSION, "models": [m.to_json() for m in models]}
        tmp = self.lock_path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.lock_path)
        _fsync_dir(self.root)

    def clean_leftovers(self) -> None:
        """Delete what interrupted commands left: renamed-away folders, and copies whose
        process is gone (a hub pull's ``.pull-*`` stays: the next pull resumes it)."""
        for path in self.root.glob(".trash-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".copy-*"):
            pid = path.name.split("-")[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)

    def pull_local(self, name: str, source_dir: Path) -> PullResult:
        """Copy a local folder in under ``name``, hashing every file as it is copied."""
        check_name(name)
        src = source_dir.expanduser().resolve()
        if not src.is_dir():
            raise ModelStoreError(f"{source_dir} is not a folder; give --from the folder "
                                  "that holds the model's config.json and weights",
                                  "source_not_found")
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_leftovers()
        staged = self.root / f".copy-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            staged.mkdir()
            files = hash_folder(src, copy_to=staged)
            if not files:
                raise ModelStoreError(f"{src} holds no files", "source_not_found")
            return self.commit(name, staged, {"kind": "local", "path": str(src)}, files)
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def _with_name(models: list[StoredModel], new: StoredModel
               ) -> tuple[list[StoredModel], list[str]]:
    """``models`` with ``new``'s one name moved onto ``new``'s folder; emptied folders out."""
    (name,) = new.names
    out: list[StoredModel] = []
    merged = False
    for m in models:
        names = tuple(n for n in m.names if n != name)
        if m.folder == new.folder:
            out.append(StoredModel((*names, name), m.folder, new.source, new.files,
                                   new.pulled_at))
            merged = True
        elif names:
            out.append(StoredModel(names, m.folder, m.source, m.files, m.pulled_at))
    if not merged:
        out.append(new)
    kept = {m.folder for m in out}
    return out, [m.folder for m in models if m.folder not in kept]


def verify_model(store: ModelStore, model: StoredModel) -> list[str]:
    """What is wrong with a stored model's folder (empty when every file matches)."""
    return check_folder(store.folder_of(model), model.files)


# -- the name map -------------------------------------------------------------------

def resolve_models(cfg: AgentConfig) -> dict[str, str]:
    """The names clients send -> local folders: the store's, then config ``models``
    (config wins a clash: the operator named that folder on purpose).

    An unreadable lock file counts as an empty store here (``models verify`` says why),
    so a broken store never stops the agent from serving config's models.
    """
    try:
        stored = ModelStore.of(cfg).table()
    except ModelStoreError:
        stored = {}
    return {**stored, **dict(cfg.models)}


def exec_models(models_file: Path | None) -> tuple[dict[str, str], list[Path]]:
    """For ``miner-agent exec``: ``MINER_MODELS`` with the default store's models, and the
    store's folder to bind read-only. A name the ``--models`` file maps is left out: the
    file is the caller's explicit choice (the job reads MINER_MODELS last)."""
    try:
        store = ModelStore.of(load_config())
        table = store.table()
    except AgentError:  # no usable config or lock file: exec runs without the store
        return {}, []
    for name in _file_names(models_file):
        table.pop(name, None)
    if not table:
        return {}, []
    return {"MINER_MODELS": json.dumps(table)}, [store.root]


def _file_names(models_file: Path | None) -> list[str]:
    if models_file is None:
        return []
    try:
        text = models_file.read_text(encoding="utf-8")
        data = tomllib.loads(text) if models_file.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError):
        return []  # the job reports the unreadable file itself
    if isinstance(data, dict) and isinstance(data.get("models"), dict):
        data = data["models"]
    return [str(k) for k in data] if isinstance(data, dict) else []


def slug(name: str) -> str:
    """A folder-safe spelling of a model name (the digest suffix keeps folders apart)."""
    return _SLUG_UNSAFE.sub("-", name).strip(".-")[:64] or "model"


def _path(f: StoredFile) -> str:
    return f.path


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
