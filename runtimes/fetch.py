"""A content-addressed download cache shared by the jobs on one node.

``fetch(uri, sha256, cache_dir, max_bytes)`` returns a local path whose bytes
are known. Local paths and ``file://`` URIs are used in place (verified when a
digest is given). ``http(s)://`` URIs must name their sha256: the blob is
streamed into a temp file, hashed on the way, checked, and renamed to
``cache_dir/sha256/<hex>``. A later job asking for the same digest reuses the
entry after re-hashing it (a corrupt entry is deleted and fetched again).

Concurrency: one ``fcntl`` lock file per digest (``cache_dir/locks/<hex>.lock``),
so two jobs fetching the same blob download it once. Size: after each
download, least-recently-used entries are evicted until the cache holds at
most ``max_bytes``; each use touches the entry's mtime, which is the recency
used. An entry being fetched (its lock held) is never evicted. Eviction unlinks
files, so a job that already opened a blob keeps reading it.

Read-only caches: inside a job's sandbox the node's cache is mounted read-only
(the agent prefetches a job's inputs before it starts). A write the cache
refuses (EROFS, EACCES, EPERM on the lock, a temp file, an unlink) switches to
reading it without the lock: a verified entry is returned as it is (its mtime
left alone); a missing or corrupt one (never deleted, never used) is
downloaded into the job's own cache dir instead, ``$MINER_JOB_CACHE_DIR`` when
set, else a temp dir made once per process, through the same locks and checks.

Every failure is ``JobFailed("input_error", ...)`` naming the URI.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlparse

from runtimes.base import JobCancelled, JobFailed

if TYPE_CHECKING:
    import httpx

DEFAULT_MAX_BYTES = 50 * 1024**3
CHUNK_BYTES = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_LOCK_POLL_S = 0.1
# What a write into a read-only mount, or into a tree that is not ours, fails with.
_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})

ProgressFn = Callable[[int, "int | None"], None]


class _NotWritable(Exception):
    """Raised inside this module when a cache dir refuses a write."""


@dataclass(frozen=True)
class _Request:
    uri: str
    digest: str
    max_bytes: int
    timeout_s: float
    on_progress: ProgressFn | None
    stop: Callable[[], bool]


def cache_dir_from_env(environ: Mapping[str, str] | None = None) -> Path:
    """``$MINER_CACHE_DIR`` (set by the agent), else ``~/.cache/miner-agent``."""
    env = os.environ if environ is None else environ
    raw = env.get("MINER_CACHE_DIR", "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "miner-agent"


def max_bytes_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``$MINER_CACHE_MAX_BYTES`` when set to a positive integer, else 50 GiB."""
    env = os.environ if environ is None else environ
    raw = env.get("MINER_CACHE_MAX_BYTES", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_MAX_BYTES


def job_cache_dir_from_env(environ: Mapping[str, str] | None = None) -> Path:
    """``$MINER_JOB_CACHE_DIR`` (set by the agent), else a private temp dir of this process."""
    env = os.environ if environ is None else environ
    raw = env.get("MINER_JOB_CACHE_DIR", "").strip()
    return Path(raw).expanduser() if raw else _process_temp_dir()


@functools.cache
def _process_temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="miner-fetch-"))


def fetch(uri: str, sha256: str | None, cache_dir: Path, max_bytes: int, *,
          timeout_s: float = 60.0, on_progress: ProgressFn | None = None,
          cancelled: Callable[[], bool] | None = None, fallback: bool = True) -> Path:
    """Return a local path holding the bytes of ``uri`` (checked against ``sha256``).

    ``on_progress(done_bytes, total_bytes_or_None)`` is called while
    downloading; ``cancelled()`` is polled while waiting and downloading, and a
    True answer raises :class:`JobCancelled`. When ``cache_dir`` is read-only and
    lacks a good entry, the blob goes to :func:`job_cache_dir_from_env`, or with
    ``fallback=False`` the fetch fails (the agent's prefetch, which only the
    shared cache serves).
    """
    digest = _normalise_sha(sha256, uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return _local(uri, parsed.path if parsed.scheme == "file" else uri, digest)
    if parsed.scheme not in ("http", "https"):
        raise JobFailed("input_error", f"unsupported URI scheme {parsed.scheme!r} in {uri!r} "
                        "(use a local path, file://, http:// or https://)")
    if digest is None:
        raise JobFailed("input_error", f"{uri}: an http(s) input needs its sha256")
    req = _Request(uri, digest, max_bytes, timeout_s, on_progress,
                   cancelled or (lambda: False))
    try:
        return _fetch_cached(req, Path(cache_dir))
    except _NotWritable as exc:
        return _fetch_read_only(req, Path(cache_dir), exc, fallback)


def _fetch_cached(req: _Request, cache: Path) -> Path:
    """Reuse or download under the digest's lock, then evict; raises :class:`_NotWritable`."""
    entry = cache / "sha256" / req.digest
    with _locked(cache / "locks" / f"{req.digest}.lock", req.stop):
        if _reuse(entry, req.digest):
            return entry
        _download(req, entry)
    evict(cache, req.max_bytes, keep=entry)
    return entry


def _fetch_read_only(req: _Request, cache: Path, why: _NotWritable, fallback: bool) -> Path:
    """``cache`` refused a write: a verified entry as it is, else the job's own cache."""
    entry = cache / "sha256" / req.digest
    actual = _sha_or_none(entry)
    if actual == req.digest:
        return entry  # no lock to take and no mtime to touch: the cache is not ours to write
    if not fallback:
        raise JobFailed("input_error", f"{req.uri}: the cache {cache} is not writable ({why})")
    job_cache = job_cache_dir_from_env()
    if actual is not None:
        print(f"[miner] cache entry {entry} is corrupt (sha256 {actual}) and the cache is "
              f"read-only; fetching into {job_cache}", file=sys.stderr, flush=True)
    try:
        return _fetch_cached(req, job_cache)
    except _NotWritable as exc:
        raise JobFailed("input_error", f"{req.uri}: the cache {cache} is read-only ({why}) "
                        f"and the job's cache {job_cache} is not writable ({exc})") from None


@contextmanager
def _writing() -> Iterator[None]:
    """Turn a write refused by a read-only or foreign cache dir into :class:`_NotWritable`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            raise _NotWritable(f"{exc.strerror}: {exc.filename}") from exc
        raise


def _normalise_sha(sha256: str | None, uri: str) -> str | None:
    if sha256 is None or sha256 == "":
        return None
    digest = sha256.strip().lower().removeprefix("sha256:")
    if not _SHA_RE.match(digest):
        raise JobFailed("input_error", f"{uri}: sha256 must be 64 hex digits, not {sha256!r}")
    return digest


def _local(uri: str, raw_path: str, digest: str | None) -> Path:
    path = Path(unquote(raw_path)).expanduser()
    if not path.is_file():
        raise JobFailed("input_error", f"{uri}: no such file")
    if digest is not None:
        actual = file_sha256(path)
        if actual != digest:
            raise JobFailed("input_error", f"{uri}: sha256 mismatch, expected {digest}, "
                            f"got {actual}", expected=digest, actual=actual)
    return path


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _sha_or_none(path: Path) -> str | None:
    """The sha256 of ``path``, or None when it is missing or cannot be read."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def _reuse(entry: Path, digest: str) -> bool:
    """True when ``entry`` exists with the right bytes (touched); a bad one is deleted."""
    if not entry.exists():
        return False
    actual = file_sha256(entry)
    if actual == digest:
        try:
            os.utime(entry)  # mtime is the LRU clock
        except OSError:
            pass  # an entry we may read but not touch only loses its place in the LRU
        return True
    print(f"[miner] cache entry {entry} is corrupt (sha256 {actual}); fetching it again",
          file=sys.stderr, flush=True)
    with _writing():
        entry.unlink(missing_ok=True)
    return False


@contextmanager
def _locked(lock_path: Path, stop: Callable[[], bool]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``, polling so a cancel can interrupt."""
    with _writing():
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if stop():
                raise JobCancelled("canceled while waiting for another job's download")
            time.sleep(_LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _download(req: _Request, entry: Path) -> None:
    import httpx  # here, not at the top: its CLI module pulls rich and click (~0.1 s)

    tmp = entry.parent.parent / "tmp" / f"{req.digest}.part"  # ours alone: we hold its lock
    with _writing():  # before the request, so a read-only cache costs no download
        tmp.parent.mkdir(parents=True, exist_ok=True)
        entry.parent.mkdir(parents=True, exist_ok=True)
        fh = open(tmp, "wb")
    try:
        with fh:
            actual = _stream_to(req, fh)
        if actual != req.digest:
            raise JobFailed("input_error", f"{req.uri}: sha256 mismatch, expected "
                            f"{req.digest}, got {actual}", expected=req.digest, actual=actual)
        with _writing():
            os.replace(tmp, entry)
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:  # idna: UnicodeError
        raise JobFailed("input_error", f"{req.uri}: download failed: {type(exc).__name__}: "
                        f"{exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _stream_to(req: _Request, fh: BinaryIO) -> str:
    """Stream ``req.uri`` into ``fh``; returns the sha256 of what was written."""
    import httpx

    uri, max_bytes = req.uri, req.max_bytes
    h = hashlib.sha256()
    done = 0
    with httpx.stream("GET", uri, follow_redirects=True, timeout=req.timeout_s) as response:
        if response.status_code != 200:
            raise JobFailed("input_error", f"{uri}: HTTP {response.status_code}",
                            status=response.status_code)
        total = _content_length(response)
        if total is not None and total > max_bytes:
            raise JobFailed("input_error", f"{uri}: {total} bytes is over the cache limit "
                            f"of {max_bytes} bytes")
        for chunk in response.iter_bytes(CHUNK_BYTES):
            done += len(chunk)
            if done > max_bytes:
                raise JobFailed("input_error", f"{uri}: more than the cache limit of "
                                f"{max_bytes} bytes")
            if req.stop():
                raise JobCancelled("canceled during download")
            fh.write(chunk)
            h.update(chunk)
            if req.on_progress is not None:
                req.on_progress(done, total)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


def _content_length(response: httpx.Response) -> int | None:
    raw = response.headers.get("content-length", "")
    return int(raw) if raw.isdigit() else None


def evict(cache_dir: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete least-recently-used entries until the cache holds at most ``max_bytes``.

    Skips ``keep`` and any entry whose lock another job holds. Returns what it deleted.
    """
    blobs = cache_dir / "sha256"
    entries = []
    for path in blobs.glob("*") if blobs.is_dir() else []:
        try:
            st = path.stat()
        except FileNotFoundError:  # another job evicted it meanwhile
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _mtime, size, _path in entries)
    deleted: list[Path] = []
    for _mtime, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if keep is not None and path == keep:
            continue
        if _try_delete(cache_dir / "locks" / f"{path.name}.lock", path):
            total -= size
            deleted.append(path)
    return deleted


def _try_delete(lock_path: Path, path: Path) -> bool:
    """Delete ``path`` if nobody holds its lock right now."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)
