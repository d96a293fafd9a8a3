"""The result package: manifest, checksums, zip, and verification.

Layout (the client guide, shared/seed-job-lifecycle.txt)::

    job_<ID>/
      output.json     job id, status, partial, times, progress, metrics, exit,
                      error, environment, and the manifest (path, size, sha256)
      output.sha256   `sha256sum -c output.sha256` passes from inside the folder
      result.txt      the main text result
      logs/stdout.log, logs/stderr.log
      artifacts/...
    job_<ID>.zip, job_<ID>.zip.sha256   beside the folder

What the seal guarantees: every byte it hashes or zips was read through a descriptor
that a no-follow walk opened beneath the folder. The folder is opened with
O_DIRECTORY|O_NOFOLLOW, each directory relative to its parent's descriptor the same way,
each file relative to its directory's descriptor with O_NOFOLLOW, and ``fstat`` on the
opened descriptor has the last word. No path is resolved twice, so a directory swapped
for a symlink, however fast, fails to open (listed as "changed during sealing") and is
never followed. Each file is hashed and copied into the zip in one pass over the same
buffer, so the zip holds exactly the bytes the manifest names. Left out, and listed
under ``skipped`` in output.json with the reason: symlinks, hard links (a second name of
a file that may live outside the folder), FIFOs, sockets and devices, names that
``sha256sum`` would need escaped, entries the agent may not read, and directories more
than MAX_DEPTH levels down.

What it relies on: the executor seals only after every process of the job is gone, so
the folder is final. A process that survives anyway can make the package miss a file
or disagree with the folder afterwards (a file it rewrites fails ``sha256sum -c``), but
cannot get bytes from outside the folder into it. A file moved (not linked) into the
folder is packaged like any other: what the job may move there is the sandbox's rule.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
import zipfile
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from agent.errors import PackageError
from agent.layout import CHECKSUMS, OUTPUT_JSON, checksum_of, zip_of

HASH_CHUNK = 1 << 20
MAX_DEPTH = 64
_TEXT_SUFFIXES = {".log", ".txt", ".json", ".jsonl", ".csv", ".md", ".yaml", ".toml"}
# A file that fits in one read is hashed inline: handing it to a thread costs more.
_PARALLEL_MIN_BYTES = HASH_CHUNK
# Files handed to the hashing threads at once, each holding a descriptor until hashed.
_IN_FLIGHT = 16

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after listing must not hang the open (no effect on files).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# The entry was there when listed and is something else, or gone, when opened.
_CHANGED_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}


class Skip(StrEnum):
    """Why an entry of the folder is not in the package (output.json's ``skipped``)."""

    SYMLINK = "symlink"
    HARD_LINK = "hard link"
    NOT_REGULAR = "not a regular file"
    NEEDS_ESCAPING = "name needs escaping"
    CHANGED = "changed during sealing"
    UNREADABLE = "unreadable"
    TOO_DEEP = "too deep"


# Names the seal writes at the top of the folder; a previous seal's copies are replaced.
_OURS = {OUTPUT_JSON, CHECKSUMS, f".{OUTPUT_JSON}.tmp", f".{CHECKSUMS}.tmp"}


@dataclass
class PackageInfo:
    """What was packaged, for whoever reports it."""

    folder: Path
    zip_path: Path | None
    zip_sha256: str | None
    manifest: list[dict[str, Any]]
    result_hash: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=dict)


def _pump(fd: int, limit: int | None, sink: Callable[[memoryview], object] | None = None,
          hasher: ThreadPoolExecutor | None = None) -> tuple[int, str]:
    """Read ``fd`` (up to ``limit`` bytes) and hash it, feeding ``sink`` the very bytes hashed.

    With ``hasher``, each chunk is hashed in that one thread while ``sink`` takes it. Two
    buffers take turns, and one is refilled only after both have finished with it.
    Closes ``fd``.
    """
    digest = hashlib.sha256()
    size = HASH_CHUNK if limit is None else min(HASH_CHUNK, limit)
    bufs = [memoryview(bytearray(size)) for _ in range(2 if hasher else 1)]
    total = 0
    hashing: Future[None] | None = None
    with open(fd, "rb", buffering=0) as fh:
        while limit is None or total < limit:
            n = fh.readinto(bufs[0][:size if limit is None else min(size, limit - total)])
            if not n:
                break
            chunk = bufs[0][:n]
            if hasher is None:
                digest.update(chunk)
            else:
                if hashing is not None:
                    hashing.result()  # the previous chunk, in the other buffer
                hashing = hasher.submit(digest.update, chunk)
            if sink is not None:
                sink(chunk)
            total += n
            bufs.reverse()
        if hashing is not None:
            hashing.result()
    return total, digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of one file, never through a symlink in its last component."""
    return _pump(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), None)[1]


def sha256_many(paths: list[Path], workers: int | None = None) -> list[str]:
    """Hash files in parallel (hashlib releases the GIL on large buffers)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    workers = workers or min(8, os.cpu_count() or 1, len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(sha256_file, paths))


def _safe_name(rel: str) -> bool:
    if "\n" in rel or "\\" in rel or "\r" in rel:
        return False
    try:
        rel.encode()  # a name that is not UTF-8 arrives with surrogates
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class _Opened:
    """A regular file the walk opened; its descriptor is the consumer's to close."""

    rel: str
    fd: int
    st: os.stat_result


class _Walk:
    """Sorted, depth-first, no-follow walk beneath a folder, by descriptors only.

    ``files()`` yields each packageable file already opened; everything left out is in
    ``skipped``. The root and every directory descriptor are closed on leaving the block.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root_fd = -1
        self.skipped: list[dict[str, str]] = []
        self._files: Generator[_Opened, None, None] | None = None

    def __enter__(self) -> _Walk:
        try:
            self.root_fd = os.open(self.folder, _DIR_FLAGS)
        except FileNotFoundError as exc:
            raise PackageError(f"package folder {self.folder} does not exist") from exc
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            raise PackageError(f"package folder {self.folder} is not a directory "
                               "(a symlink is never followed)") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self._files is not None:
            self._files.close()
        os.close(self.root_fd)

    def files(self) -> Iterator[_Opened]:
        self._files = self._dir(self.root_fd, "", 0)
        return self._files

    def _skip(self, rel: str, reason: Skip) -> None:
        self.skipped.append({"path": rel, "reason": reason.value})

    def _dir(self, dir_fd: int, prefix: str, depth: int) -> Generator[_Opened, None, None]:
        for name in sorted(os.listdir(dir_fd)):
            if not prefix and name in _OURS:
                continue
            rel = prefix + name
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                self._skip(rel, Skip.CHANGED)
                continue
            if stat.S_ISLNK(mode):
                self._skip(rel, Skip.SYMLINK)
            elif stat.S_ISDIR(mode):
                yield from self._subdir(dir_fd, name, rel, depth + 1)
            elif not stat.S_ISREG(mode):
                self._skip(rel, Skip.NOT_REGULAR)
            elif not _safe_name(rel):
                self._skip(rel.encode("unicode_escape").decode(), Skip.NEEDS_ESCAPING)
            elif (opened := self._open_file(dir_fd, name, rel)) is not None:
                yield opened

    def _subdir(self, parent_fd: int, name: str, rel: str, depth: int) -> Iterator[_Opened]:
        if depth > MAX_DEPTH:
            self._skip(rel, Skip.TOO_DEEP)
            return
        fd = self._open(parent_fd, name, rel, _DIR_FLAGS)
        if fd is None:
            return
        try:
            yield from self._dir(fd, rel + "/", depth)
        finally:
            os.close(fd)

    def _open_file(self, dir_fd: int, name: str, rel: str) -> _Opened | None:
        fd = self._open(dir_fd, name, rel, _FILE_FLAGS)
        if fd is None:
            return None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return _Opened(rel, fd, st)
        os.close(fd)
        self._skip(rel, Skip.NOT_REGULAR if not stat.S_ISREG(st.st_mode) else Skip.HARD_LINK)
        return None

    def _open(self, dir_fd: int, name: str, rel: str, flags: int) -> int | None:
        try:
            return os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in _CHANGED_ERRNOS:
                self._skip(rel, Skip.CHANGED)
            elif exc.errno in _DENIED_ERRNOS:
                self._skip(rel, Skip.UNREADABLE)
            else:
                raise
            return None


def collect_files(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Regular files under ``folder`` (relative POSIX paths), never through a symlink."""
    with _Walk(folder) as walk:
        files = []
        for opened in walk.files():
            os.close(opened.fd)
            files.append(opened.rel)
    return files, walk.skipped


def _entry(opened: _Opened, sink: Callable[[memoryview], object] | None = None,
           hasher: ThreadPoolExecutor | None = None) -> dict[str, Any]:
    # Reading stops at the size fstat saw, so a file still growing cannot outgrow the
    # zip entry sized for it; the manifest's size is what was read.
    size, digest = _pump(opened.fd, opened.st.st_size, sink, hasher)
    return {"path": opened.rel, "size": size, "sha256": digest}


def _hash_files(files: Iterator[_Opened]) -> list[dict[str, Any]]:
    """Manifest entries in walk order; large files are hashed in threads."""
    entries: list[dict[str, Any] | Future[dict[str, Any]]] = []
    in_flight: deque[Future[dict[str, Any]]] = deque()
    pool: ThreadPoolExecutor | None = None
    try:
        for opened in files:
            if opened.st.st_size < _PARALLEL_MIN_BYTES:
                entries.append(_entry(opened))
                continue
            pool = pool or ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
            future = pool.submit(_entry, opened)
            entries.append(future)
            in_flight.append(future)
            if len(in_flight) >= _IN_FLIGHT:
                in_flight.popleft().result()
        return [e.result() if isinstance(e, Future) else e for e in entries]
    finally:
        if pool is not None:
            pool.shutdown()


def build_manifest(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The manifest (path, size, sha256) of ``folder`` and what was skipped, by the seal's walk."""
    with _Walk(folder) as walk:
        manifest = _hash_files(walk.files())
    return manifest, walk.skipped


def result_hash(manifest: list[dict[str, Any]]) -> str:
    """One hash over the manifest: the package's identity for receipts."""
    lines = "".join(f"{m['sha256']}  {m['path']}\n" for m in manifest)
    return hashlib.sha256(lines.encode()).hexdigest()


def _zip_info(name: str, mode: int, mtime: float, size: int) -> zipfile.ZipInfo:
    # A job may set any mtime it likes; a zip holds 1980 to 2107 (localtime fails far out).
    date_time = time.localtime(min(max(mtime, 0.0), 4354819199.0))[:6]
    date_time = min(max(date_time, (1980, 1, 1, 0, 0, 0)), (2107, 12, 31, 23, 59, 59))
    info = zipfile.ZipInfo(name, date_time)
    info.external_attr = (mode & 0xFFFF) << 16
    info.file_size = size  # decides whether the entry needs zip64
    text = PurePosixPath(name).suffix in _TEXT_SUFFIXES
    info.compress_type = zipfile.ZIP_DEFLATED if text else zipfile.ZIP_STORED
    # Level 1: logs compress ~5x at once; level 6 costs 3x the time for ~10% more.
    info._compresslevel = 1  # type: ignore[attr-defined]  # public from 3.13
    return info


def _zip_files(zf: zipfile.ZipFile, top: str, files: Iterator[_Opened]) -> list[dict[str, Any]]:
    """Copy each file into the zip, hashing the very bytes written: one read per file.

    A large file's hash runs in a helper thread while the zip takes the same chunk, so
    hashing costs no time beside compressing and writing.
    """
    manifest = []
    hasher: ThreadPoolExecutor | None = None
    try:
        for opened in files:
            st = opened.st
            large = st.st_size >= _PARALLEL_MIN_BYTES
            if large and hasher is None:
                hasher = ThreadPoolExecutor(max_workers=1)
            try:
                dst = zf.open(_zip_info(f"{top}/{opened.rel}", st.st_mode, st.st_mtime,
                                        st.st_size), "w")
            except BaseException:
                os.close(opened.fd)
                raise
            with dst:
                manifest.append(_entry(opened, dst.write, hasher if large else None))
    finally:
        if hasher is not None:
            hasher.shutdown()
    return manifest


def _atomic_write_at(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.tmp"
    with suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=dir_fd)
    with open(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


@contextmanager
def _zip_draft(zip_path: Path) -> Iterator[zipfile.ZipFile]:
    """A zip written under a temporary name beside the folder, renamed into place on success."""
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with open(fd, "w+b") as fh, zipfile.ZipFile(fh, "w", allowZip64=True) as zf:
            yield zf
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.replace(tmp, zip_path)


def _sealed_output(output: dict[str, Any], manifest: list[dict[str, Any]],
                   skipped: list[dict[str, str]]) -> tuple[dict[str, Any], bytes, bytes]:
    """output.json's dict and bytes, and output.sha256's bytes."""
    sealed = dict(output)
    sealed["files"] = manifest
    sealed["skipped"] = skipped
    sealed["result_hash"] = result_hash(manifest)
    body = (json.dumps(sealed, indent=2, sort_keys=False, default=str) + "\n").encode()
    lines = [f"{hashlib.sha256(body).hexdigest()}  {OUTPUT_JSON}\n"]
    lines += [f"{m['sha256']}  {m['path']}\n" for m in manifest]
    return sealed, body, "".join(lines).encode()


def write_package(folder: Path, output: dict[str, Any], make_zip: bool = True) -> PackageInfo:
    """Seal a job folder whose processes are all gone: output.json, output.sha256, the zip."""
    zip_path = zip_of(folder) if make_zip else None
    with _Walk(folder) as walk, _zip_draft(zip_path) if zip_path else nullcontext() as zf:
        if zf is None:
            manifest = _hash_files(walk.files())
        else:
            manifest = _zip_files(zf, folder.name, walk.files())
        sealed, body, sums = _sealed_output(output, manifest, walk.skipped)
        for name, data in ((OUTPUT_JSON, body), (CHECKSUMS, sums)):
            _atomic_write_at(walk.root_fd, name, data)
            if zf is not None:  # the bytes just written, not a re-read of the file
                zf.writestr(_zip_info(f"{folder.name}/{name}", stat.S_IFREG | 0o644,
                                      time.time(), len(data)), data)
    info = PackageInfo(folder, None, None, manifest, sealed["result_hash"], walk.skipped, sealed)
    if zip_path is not None:
        info.zip_path, info.zip_sha256 = zip_path, _write_sidecar(zip_path)
    return info


def _write_sidecar(zip_path: Path) -> str:
    """Hash the finished zip and write its ``sha256sum`` line beside it."""
    digest = sha256_file(zip_path)
    sidecar = checksum_of(zip_path)
    dir_fd = os.open(sidecar.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _atomic_write_at(dir_fd, sidecar.name, f"{digest}  {zip_path.name}\n".encode())
    finally:
        os.close(dir_fd)
    return digest
