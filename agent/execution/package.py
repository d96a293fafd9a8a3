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
that a no-follow walk opened beneath the folder (agent/execution/sealwalk.py says how,
and what it leaves out, listed under ``skipped`` in output.json with the reason). Each
file is hashed and copied into the zip in one pass over the same buffer, so the zip
holds exactly the bytes the manifest names. A zip of up to 8 MiB is built and hashed
in memory, so its sidecar costs no read-back; a larger one is read back once. The zip
is the package's durable copy: see ``_ZipDraft``.

What it relies on: the executor seals only after every process of the job is gone, so
the folder is final. A process that survives anyway can make the package miss a file
or disagree with the folder afterwards (a file it rewrites fails ``sha256sum -c``), but
cannot get bytes from outside the folder into it. A file moved (not linked) into the
folder is packaged like any other: what the job may move there is the sandbox's rule.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import statistics
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.execution.sealwalk import (
    DIR_FLAGS,
    MAX_DEPTH,
    MAX_FILES,
    Opened,
    Skip,
    Walk,
    small_folder,
)
from agent.layout import CHECKSUMS, OUTPUT_JSON, checksum_of, zip_of

__all__ = ["HASH_CHUNK", "MAX_DEPTH", "PackageInfo", "Skip", "build_manifest", "collect_files",
           "replace_at", "result_hash", "sha256_file", "sha256_many", "write_package"]

log = logging.getLogger(__name__)
HASH_CHUNK = 1 << 20
_TEXT_SUFFIXES = {".log", ".txt", ".json", ".jsonl", ".csv", ".md", ".yaml", ".toml"}
# A file that fits in one read is hashed inline: handing it to a thread costs more.
_PARALLEL_MIN_BYTES = HASH_CHUNK
# Files handed to the hashing threads at once, each holding a descriptor until hashed.
_IN_FLIGHT = 16
# A zip up to this size is built and hashed in memory: one write, no read-back.
_MEMORY_ZIP_BYTES = 8 << 20
# Smaller text is stored: deflate costs ~50 us an entry (mostly its 256 KiB state) and
# saves less than one disk block.
_DEFLATE_MIN_BYTES = 4096

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


def collect_files(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Regular files under ``folder`` (relative POSIX paths), never through a symlink."""
    with Walk(folder) as walk:
        files = []
        for opened in walk.files():
            os.close(opened.fd)
            files.append(opened.rel)
    return files, walk.skipped


def _entry(opened: Opened, sink: Callable[[memoryview], object] | None = None,
           hasher: ThreadPoolExecutor | None = None) -> dict[str, Any]:
    # Reading stops at the size fstat saw, so a file still growing cannot outgrow the
    # zip entry sized for it; the manifest's size is what was read.
    size, digest = _pump(opened.fd, opened.st.st_size, sink, hasher)
    return {"path": opened.rel, "size": size, "sha256": digest}


def _hash_files(files: Iterator[Opened]) -> list[dict[str, Any]]:
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
    with Walk(folder) as walk:
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
    deflate = text and size >= _DEFLATE_MIN_BYTES
    info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    # Level 1: logs compress ~5x at once; level 6 costs 3x the time for ~10% more.
    info._compresslevel = 1  # type: ignore[attr-defined]  # public from 3.13
    return info


def _zip_files(zf: zipfile.ZipFile, top: str, files: Iterator[Opened]) -> list[dict[str, Any]]:
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


def replace_at(dir_fd: int, name: str, data: bytes, durable: bool = False) -> None:
    """Write ``name`` under a temporary name and rename it over the old one.

    Both names are the agent's own (the walk leaves them out). Whatever a job left
    there, a link or a folder, is removed first: its processes are all gone by now.
    """
    tmp = f".{name}.tmp"
    _remove_at(dir_fd, tmp)  # O_EXCL below: never write through a planted link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=dir_fd)
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except IsADirectoryError:  # a job's folder where ours goes: a file cannot replace it
        _remove_at(dir_fd, name)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd``, a file, a link or a whole folder (no link followed)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(name, dir_fd=dir_fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _ZipBuffer:
    """Where the zip's bytes go: memory while the zip is small, the draft file past that.

    A small zip is hashed in memory and written with one call, so its sha256 costs no
    read-back; a larger one spills to the draft file and is read back once at the end
    (its members were still each read once: the zip's own hash is over other bytes).
    """

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self._limit = limit
        self._mem: io.BytesIO | None = io.BytesIO()
        self._pos = 0  # in the draft file, once spilled
        self.discard = False  # the draft is abandoned: writes go nowhere

    def write(self, data: bytes, /) -> int:
        if self.discard:
            return len(data)
        if self._mem is not None:
            if self._mem.tell() + len(data) <= self._limit:
                return self._mem.write(data)
            self._pos = self._mem.tell()
            with self._mem.getbuffer() as held:
                _write_all(self.fd, held)
            self._mem = None
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, self._pos)
            self._pos += written
            view = view[written:]
        return len(data)

    def tell(self) -> int:
        return self._mem.tell() if self._mem is not None else self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self._mem is not None:
            return self._mem.seek(offset, whence)
        if whence != os.SEEK_SET:
            raise OSError(errno.EINVAL, "the zip draft seeks only to absolute offsets")
        self._pos = offset
        return offset

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None  # the draft owns the descriptor

    def finish(self) -> str:
        """Put every byte in the draft file and return the zip's sha256."""
        if self._mem is None:
            os.lseek(self.fd, 0, os.SEEK_SET)
            return _pump(os.dup(self.fd), None)[1]
        with self._mem.getbuffer() as held:
            _write_all(self.fd, held)
            return hashlib.sha256(held).hexdigest()


class _ZipDraft:
    """The zip, written under a temporary name beside the folder and renamed into place.

    Durability, in the order a crash could interrupt it: the finished zip is fsynced
    before its rename, and the folder holding it (the jobs root) once after the zip and
    its ``.sha256`` sidecar are renamed in. That is the one durable copy of the package:
    every member, output.json and output.sha256 included, is inside it. The sidecar and
    the job folder's own output.json/output.sha256 are written after it without an
    fsync of their own; after a power cut they may be empty, and :func:`read_sealed`
    rebuilds them from the zip. Two fsyncs a package instead of one per file written.
    """

    def __init__(self, zip_path: Path) -> None:
        self.path = zip_path
        self.sha256 = ""
        self._tmp = f".{zip_path.name}.tmp"
        self._dir_fd = os.open(zip_path.parent, DIR_FLAGS)
        try:
            self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o644, dir_fd=self._dir_fd)
        except BaseException:
            os.close(self._dir_fd)
            raise
        self._buffer = _ZipBuffer(self._fd, _MEMORY_ZIP_BYTES)
        self.zf = zipfile.ZipFile(self._buffer, "w", allowZip64=True)

    def __enter__(self) -> _ZipDraft:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                self._commit()
        except BaseException:
            self._abandon()
            raise
        finally:
            if exc_type is not None:
                self._abandon()
            os.close(self._fd)
            if exc_type is not None or not self.sha256:
                with suppress(FileNotFoundError):
                    os.unlink(self._tmp, dir_fd=self._dir_fd)
            os.close(self._dir_fd)

    def _abandon(self) -> None:
        """Let the zip object go without another write: left open, its finaliser would
        write the central directory to a closed descriptor (or a full disk)."""
        self._buffer.discard = True
        with suppress(Exception):
            self.zf.close()
        self.zf.fp = None

    def _commit(self) -> None:
        self.zf.close()
        digest = self._buffer.finish()
        os.fsync(self._fd)
        os.replace(self._tmp, self.path.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        self.sha256 = digest
        sidecar = checksum_of(self.path).name
        replace_at(self._dir_fd, sidecar, f"{digest}  {self.path.name}\n".encode())
        os.fsync(self._dir_fd)


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


def write_package(folder: Path, output: dict[str, Any], make_zip: bool = True,
                  max_files: int | None = MAX_FILES,
                  max_bytes: int | None = None) -> PackageInfo:
    """Seal a job folder whose processes are all gone: output.json, output.sha256, the zip.

    The folder's output.json is written last, once the zip is durable: a folder that
    has one had its zip finished first. The walk stops past ``max_files`` entries and
    leaves out files past ``max_bytes`` (see :mod:`agent.execution.sealwalk`; None: no
    limit). Where the disk has no room for the zip (a copy of every file), the folder
    is sealed alone, its output.json saying why (``zip_error``): a package that
    ``sha256sum -c`` accepts, where there was none.
    """
    if make_zip:
        try:
            return _seal(folder, output, zip_of(folder), max_files, max_bytes)
        except _NoRoomForZip as exc:
            log.warning("%s: no room on the disk for the zip (%s); sealing the folder alone",
                        folder.name, exc)
            output = {**output, "zip_error": f"no room on the node's disk for the zip: {exc}"}
    return _seal(folder, output, None, max_files, max_bytes)


class _NoRoomForZip(Exception):
    """Raised when the zip draft could not be written for lack of space (or quota)."""


def _seal(folder: Path, output: dict[str, Any], zip_path: Path | None,
          max_files: int | None, max_bytes: int | None) -> PackageInfo:
    with Walk(folder, max_files, max_bytes) as walk:
        if zip_path is None:
            manifest = _hash_files(walk.files())
            sealed, body, sums = _sealed_output(output, manifest, walk.skipped)
        else:
            try:
                with _ZipDraft(zip_path) as draft:
                    manifest = _zip_files(draft.zf, folder.name, walk.files())
                    sealed, body, sums = _sealed_output(output, manifest, walk.skipped)
                    for name, data in ((OUTPUT_JSON, body), (CHECKSUMS, sums)):
                        draft.zf.writestr(_zip_info(f"{folder.name}/{name}",
                                                    stat.S_IFREG | 0o644, time.time(),
                                                    len(data)), data)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _NoRoomForZip(str(exc)) from exc
                raise
        # Without a zip the folder is the only copy: then its output.json is made durable.
        replace_at(walk.root_fd, CHECKSUMS, sums)
        replace_at(walk.root_fd, OUTPUT_JSON, body, durable=zip_path is None)
        if zip_path is None:
            os.fsync(walk.root_fd)
    info = PackageInfo(folder, None, None, manifest, sealed["result_hash"], walk.skipped, sealed)
    if zip_path is not None:
        info.zip_path, info.zip_sha256 = zip_path, draft.sha256
    return info


class InlineSeals:
    """Whether a package is sealed on the event loop instead of in a thread.

    For a tiny job the hop costs more than the seal: 0.4-1 ms of the agent's CPU here
    (GIL hand-offs and context switches around each of the seal's ~25 system calls, the
    hop's own wake-ups), where the seal takes ~0.5 ms of CPU. Handing only its two
    fsyncs to a thread was dearer still (two hops). Only a package of a few small files
    qualifies (:func:`small_folder`), and as its fsyncs then hold the loop, a slow disk
    sends every seal to the thread for ``backoff_s``: when the median of the last
    ``window`` seals took longer than ``slow_s``, or one took longer than ``stall_s``.
    One seal past ``slow_s`` is not enough: on a busy node the loop's thread is
    preempted for 20-30 ms now and then, which says nothing about the disk, and a
    switch on each such blip would put every tiny job back on the dearer path.
    """

    def __init__(self, slow_s: float = 0.02, backoff_s: float = 300.0, *, window: int = 5,
                 stall_s: float = 0.25) -> None:
        self.slow_s = slow_s
        self.stall_s = stall_s
        self.backoff_s = backoff_s
        self._recent: deque[float] = deque(maxlen=window)
        self._thread_until = 0.0

    def allowed(self, folder: Path, small: bool | None = None) -> bool:
        """``small``: :func:`small_folder`'s answer for ``folder``, where the caller has it."""
        return time.monotonic() >= self._thread_until and (
            small if small is not None else small_folder(folder))

    def took(self, seconds: float) -> None:
        """How long an inline seal held the loop."""
        self._recent.append(seconds)
        full = len(self._recent) == self._recent.maxlen
        if seconds > self.stall_s or (full and statistics.median(self._recent) > self.slow_s):
            self._thread_until = time.monotonic() + self.backoff_s
            log.info("sealing a package took %.0f ms on the event loop (median of the last "
                     "%d: %.0f ms): packages are sealed in a thread for the next %.0f s",
                     seconds * 1000, len(self._recent),
                     statistics.median(self._recent) * 1000, self.backoff_s)
            self._recent.clear()
