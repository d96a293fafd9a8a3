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

Every failure is ``JobFailed("input_error", ...)`` naming the URI.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx

from runtimes.base import JobCancelled, JobFailed

DEFAULT_MAX_BYTES = 50 * 1024**3
CHUNK_BYTES = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_LOCK_POLL_S = 0.1

ProgressFn = Callable[[int, "int | None"], None]


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


def fetch(uri: str, sha256: str | None, cache_dir: Path, max_bytes: int, *,
          timeout_s: float = 60.0, on_progress: ProgressFn | None = None,
          cancelled: Callable[[], bool] | None = None) -> Path:
    """Return a local path holding the bytes of ``uri`` (checked against ``sha256``).

    ``on_progress(done_bytes, total_bytes_or_None)`` is called while
    downloading; ``cancelled()`` is polled while waiting and downloading, and a
    True answer raises :class:`JobCancelled`.
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
    entry = Path(cache_dir) / "sha256" / digest
    stop = cancelled or (lambda: False)
    with _locked(Path(cache_dir) / "locks" / f"{digest}.lock", stop):
        if _reuse(entry, digest):
            return entry
        _download(uri, digest, entry, max_bytes, timeout_s, on_progress, stop)
    evict(Path(cache_dir), max_bytes, keep=entry)
    return entry


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


def _reuse(entry: Path, digest: str) -> bool:
    """True when ``entry`` exists with the right bytes (touched); a bad one is deleted."""
    if not entry.exists():
        return False
    actual = file_sha256(entry)
    if actual == digest:
        os.utime(entry)  # mtime is the LRU clock
        return True
    print(f"[miner] cache entry {entry} is corrupt (sha256 {actual}); fetching it again",
          file=sys.stderr, flush=True)
    entry.unlink(missing_ok=True)
    return False


@contextmanager
def _locked(lock_path: Path, stop: Callable[[], bool]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``, polling so a cancel can interrupt."""
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


def _download(uri: str, digest: str, entry: Path, max_bytes: int, timeout_s: float,
              on_progress: ProgressFn | None, stop: Callable[[], bool]) -> None:
    tmp = entry.parent.parent / "tmp" / f"{digest}.part"  # ours alone: we hold its lock
    tmp.parent.mkdir(parents=True, exist_ok=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        actual = _stream_to(uri, tmp, max_bytes, timeout_s, on_progress, stop)
        if actual != digest:
            raise JobFailed("input_error", f"{uri}: sha256 mismatch, expected {digest}, "
                            f"got {actual}", expected=digest, actual=actual)
        os.replace(tmp, entry)
    except httpx.HTTPError as exc:
        raise JobFailed("input_error", f"{uri}: download failed: {type(exc).__name__}: "
                        f"{exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _stream_to(uri: str, tmp: Path, max_bytes: int, timeout_s: float,
               on_progress: ProgressFn | None, stop: Callable[[], bool]) -> str:
    """Stream ``uri`` into ``tmp``; returns the sha256 of what was written."""
    h = hashlib.sha256()
    done = 0
    with httpx.stream("GET", uri, follow_redirects=True, timeout=timeout_s) as response:
        if response.status_code != 200:
            raise JobFailed("input_error", f"{uri}: HTTP {response.status_code}",
                            status=response.status_code)
        total = _content_length(response)
        if total is not None and total > max_bytes:
            raise JobFailed("input_error", f"{uri}: {total} bytes is over the cache limit "
                            f"of {max_bytes} bytes")
        with open(tmp, "wb") as fh:
            for chunk in response.iter_bytes(CHUNK_BYTES):
                done += len(chunk)
                if done > max_bytes:
                    raise JobFailed("input_error", f"{uri}: more than the cache limit of "
                                    f"{max_bytes} bytes")
                if stop():
                    raise JobCancelled("canceled during download")
                fh.write(chunk)
                h.update(chunk)
                if on_progress is not None:
                    on_progress(done, total)
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
