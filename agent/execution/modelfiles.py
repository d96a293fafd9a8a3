"""A model folder's files: hashing them (while copying), checking them, who has them open.

The model store (:mod:`agent.execution.modelstore`) records what these functions
compute; they know nothing of the store's layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_SKIPPED_DIRS = frozenset({".git", ".cache"})  # VCS and huggingface_hub bookkeeping
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative, with "/" separators
    size: int
    sha256: str


def manifest_digest(files: Iterable[StoredFile]) -> str:
    """One hash of a folder's content: its sorted paths, sizes and file hashes."""
    lines = sorted(f"{f.sha256}  {f.size}  {f.path}" for f in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def hash_file(path: Path, copy_to: Path | None = None) -> StoredFile:
    """Size and sha256 of ``path`` in one read, writing a copy to ``copy_to`` on the way."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as src, (open(copy_to, "xb") if copy_to else contextlib.nullcontext()
                                   ) as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if dst is not None:
                dst.write(chunk)
        if dst is not None:
            dst.flush()
            os.fsync(dst.fileno())
    return StoredFile("", size, digest.hexdigest())


def model_files(folder: Path) -> list[Path]:
    """The regular files of a model folder, following symlinks (a Hugging Face cache
    snapshot is made of them), skipping ``.git`` and ``.cache`` at the top."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        if Path(dirpath) == folder:
            dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames)
                   if (Path(dirpath) / f).is_file())
    return out


def hash_folder(folder: Path, copy_to: Path | None = None) -> list[StoredFile]:
    """Every file of ``folder`` hashed (and copied under ``copy_to``), sorted by path."""
    files = []
    for path in model_files(folder):
        rel = path.relative_to(folder).as_posix()
        target = None
        if copy_to is not None:
            target = copy_to / rel
            target.parent.mkdir(parents=True, exist_ok=True)
        stored = hash_file(path, target)
        files.append(StoredFile(rel, stored.size, stored.sha256))
    return files


def check_folder(folder: Path, files: Iterable[StoredFile]) -> list[str]:
    """What is wrong with ``folder`` against its recorded ``files`` (empty: all match)."""
    if not folder.is_dir():
        return [f"{folder}: folder is missing"]
    problems = []
    expected = {f.path: f for f in files}
    for path in model_files(folder):
        rel = path.relative_to(folder).as_posix()
        want = expected.pop(rel, None)
        if want is None:
            problems.append(f"{rel}: not in the lock file (added after the pull)")
            continue
        got = hash_file(path)
        if got.size != want.size or got.sha256 != want.sha256:
            problems.append(f"{rel}: sha256 {got.sha256[:16]}... size {got.size}, lock file "
                            f"says {want.sha256[:16]}... size {want.size}")
    problems.extend(f"{rel}: missing" for rel in sorted(expected))
    return problems


def users_of(folder: Path, proc: Path = Path("/proc")) -> list[int]:
    """Processes with a file under ``folder`` open or mapped (a job loading it, the warm
    worker holding its weights). Only processes this user may inspect are seen."""
    prefix = str(folder.resolve()) + "/"
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if _opens(entry, prefix):
            found.append(int(entry.name))
    return sorted(found)


def _opens(pid_dir: Path, prefix: str) -> bool:
    try:
        for fd in (pid_dir / "fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(prefix):
                    return True
        with open(pid_dir / "maps", encoding="utf-8", errors="replace") as fh:
            return any(prefix in line for line in fh)
    except OSError:  # gone, or another user's process
        return False
