"""The download cache against a real HTTP server on loopback."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import runtimes.fetch as fetch_module
from runtimes.base import JobCancelled, JobFailed
from runtimes.fetch import cache_dir_from_env, evict, fetch, job_cache_dir_from_env

ROOT = Path(__file__).resolve().parents[2]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_http_download_lands_under_its_digest_and_is_reused(blob_server, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one chunk
    url = blob_server.put("blob.bin", data)
    cache = tmp_path / "cache"
    seen: list[int] = []

    first = fetch(url, sha(data), cache, max_bytes=10**9,
                  on_progress=lambda done, _total: seen.append(done))
    second = fetch(url, sha(data).upper(), cache, max_bytes=10**9)

    assert first == second == cache / "sha256" / sha(data)
    assert first.read_bytes() == data
    assert blob_server.hits == {"/blob.bin": 1}
    assert seen[-1] == len(data)
    assert not list((cache / "tmp").iterdir())


def test_http_needs_a_sha256(blob_server, tmp_path):
    url = blob_server.put("x.bin", b"abc")
    with pytest.raises(JobFailed) as info:
        fetch(url, None, tmp_path / "cache", max_bytes=10**6)
    assert info.value.code == "input_error"
    assert "sha256" in info.value.message
    assert blob_server.hits == {}


def test_sha_mismatch_names_expected_and_actual_and_keeps_nothing(blob_server, tmp_path):
    url = blob_server.put("x.bin", b"the real bytes")
    wrong = sha(b"other bytes")
    cache = tmp_path / "cache"
    with pytest.raises(JobFailed) as info:
        fetch(url, wrong, cache, max_bytes=10**6)
    assert info.value.code == "input_error"
    assert wrong in info.value.message and sha(b"the real bytes") in info.value.message
    assert not (cache / "sha256" / wrong).exists()
    assert not list((cache / "tmp").iterdir())


def test_corrupt_cache_entry_is_fetched_again(blob_server, tmp_path):
    data = b"good data" * 100
    url = blob_server.put("x.bin", data)
    cache = tmp_path / "cache"
    entry = fetch(url, sha(data), cache, max_bytes=10**6)
    # Given a cache entry whose bytes went bad on disk
    entry.write_bytes(b"bit rot")
    # When a job asks for it again
    again = fetch(url, sha(data), cache, max_bytes=10**6)
    # Then it is downloaded again and the bytes are right
    assert again.read_bytes() == data
    assert blob_server.hits["/x.bin"] == 2


def test_http_errors_and_size_limit_are_input_errors(blob_server, tmp_path):
    with pytest.raises(JobFailed, match="HTTP 404") as info:
        fetch(blob_server.url("missing"), sha(b""), tmp_path / "c", max_bytes=10**6)
    assert info.value.code == "input_error"
    big = b"x" * 5000
    with pytest.raises(JobFailed, match="over the cache limit"):
        fetch(blob_server.put("big", big), sha(big), tmp_path / "c", max_bytes=4000)
    with pytest.raises(JobFailed, match="download failed"):
        fetch("http://127.0.0.1:9/nothing", sha(b""), tmp_path / "c", max_bytes=10**6,
              timeout_s=2)
    with pytest.raises(JobFailed, match="download failed: InvalidURL"):
        fetch("http://h\x00/x", sha(b""), tmp_path / "c", max_bytes=10**6)
    with pytest.raises(JobFailed, match="unsupported URI scheme"):
        fetch("s3://bucket/key", sha(b""), tmp_path / "c", max_bytes=10**6)


def test_local_paths_need_no_sha_but_are_verified_when_given(tmp_path):
    path = tmp_path / "in.bin"
    path.write_bytes(b"local")
    assert fetch(str(path), None, tmp_path / "c", 10) == path
    assert fetch(path.as_uri(), sha(b"local"), tmp_path / "c", 10) == path
    with pytest.raises(JobFailed, match="mismatch") as info:
        fetch(str(path), sha(b"else"), tmp_path / "c", 10)
    assert info.value.code == "input_error"
    with pytest.raises(JobFailed, match="no such file"):
        fetch(str(tmp_path / "nope"), None, tmp_path / "c", 10)


def test_least_recently_used_entries_are_evicted_beyond_max_bytes(blob_server, tmp_path):
    cache = tmp_path / "cache"
    blobs = {name: name.encode() * 100 for name in ("a", "b", "c")}  # 100 bytes each
    for name in ("a", "b"):
        fetch(blob_server.put(name, blobs[name]), sha(blobs[name]), cache, max_bytes=250)
    old = (cache / "sha256" / sha(blobs["a"])).stat().st_mtime - 100
    os.utime(cache / "sha256" / sha(blobs["b"]), (old, old))  # b is older than a now
    fetch(blob_server.url("a"), sha(blobs["a"]), cache, max_bytes=250)  # touches a

    fetch(blob_server.put("c", blobs["c"]), sha(blobs["c"]), cache, max_bytes=250)

    left = {p.name for p in (cache / "sha256").iterdir()}
    assert left == {sha(blobs["a"]), sha(blobs["c"])}
    assert evict(cache, 0, keep=cache / "sha256" / sha(blobs["c"])) == [
        cache / "sha256" / sha(blobs["a"])]


def test_two_fetchers_of_one_blob_download_it_once(blob_server, tmp_path):
    data = os.urandom(200_000)
    url = blob_server.put("shared.bin", data)
    blob_server.delay_s = 0.3  # keeps the first download in flight while the second asks
    results: list[Path | BaseException] = []

    def worker() -> None:
        try:
            results.append(fetch(url, sha(data), tmp_path / "cache", max_bytes=10**7))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(results) == 2 and all(isinstance(r, Path) for r in results), results
    assert blob_server.hits == {"/shared.bin": 1}


def test_cancel_while_downloading_leaves_no_entry(blob_server, tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    url = blob_server.put("big.bin", data)
    with pytest.raises(JobCancelled):
        fetch(url, sha(data), tmp_path / "cache", 10**8, cancelled=lambda: True)
    assert not (tmp_path / "cache" / "sha256" / sha(data)).exists()
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_cache_dir_comes_from_the_environment(tmp_path):
    assert cache_dir_from_env({"MINER_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert cache_dir_from_env({}) == Path.home() / ".cache" / "miner-agent"


def test_job_cache_dir_comes_from_the_environment_else_a_private_temp_dir(tmp_path,
                                                                         monkeypatch):
    assert job_cache_dir_from_env({"MINER_JOB_CACHE_DIR": str(tmp_path)}) == tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fetch_module._process_temp_dir.cache_clear()
    try:
        fallback = job_cache_dir_from_env({})
        assert fallback == job_cache_dir_from_env({})  # one per process
    finally:
        fetch_module._process_temp_dir.cache_clear()
    assert fallback.parent == tmp_path and fallback.name.startswith("miner-fetch-")
    assert fallback.stat().st_mode & 0o077 == 0


def test_an_entry_whose_mtime_cannot_be_touched_is_still_used(blob_server, tmp_path,
                                                              monkeypatch):
    data = b"shared but not ours"
    url = blob_server.put("x.bin", data)
    entry = fetch(url, sha(data), tmp_path / "cache", 10**6)

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "utime", refuse)
    assert fetch(url, sha(data), tmp_path / "cache", 10**6) == entry
    assert blob_server.hits == {"/x.bin": 1}


# -- a read-only cache --------------------------------------------------------------
#
# Tests run as root, where mode bits stop no write (CAP_DAC_OVERRIDE), so each fetch
# runs in a child process that truly cannot write the cache:
#   "mount": the cache is bind-mounted read-only over itself in a new mount namespace
#            (`unshare --user --map-root-user --mount`, else `bwrap --ro-bind`): EROFS;
#   "chmod": the cache tree is made a-w (dirs 0555, files 0444) and, as root, the child
#            runs under `setpriv` without CAP_DAC_OVERRIDE and CAP_FOWNER: EACCES.
# Each mode is probed once and skipped, with its reason, where the host cannot do it.

READ_ONLY_MODES = ("mount", "chmod")

FETCH_IN_CHILD = """
import json, sys
from pathlib import Path
from runtimes.base import JobFailed
from runtimes.fetch import fetch
a = json.loads(sys.argv[1])
try:
    path = fetch(a["uri"], a["sha256"], Path(a["cache"]), 10**9, timeout_s=10,
                 fallback=a["fallback"])
    print(json.dumps({"path": str(path)}))
except JobFailed as exc:
    print(json.dumps({"code": exc.code, "message": exc.message}))
"""

PROBE_IN_CHILD = """
import os, sys
try:
    os.mkdir(os.path.join(sys.argv[1], "probe"))
    print("writable")
except OSError as exc:
    print(exc.errno)
"""


Wrapper = Callable[[str], list[str]]


def _unshare(path: str) -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", path]


def _bwrap(path: str) -> list[str]:
    return ["bwrap", "--dev-bind", "/", "/", "--ro-bind", path, path]


def _without_dac_override(_path: str) -> list[str]:
    return ["setpriv", "--bounding-set=-dac_override,-fowner", "--"] if os.geteuid() == 0 \
        else []


def _set_modes(root: Path, writable: bool) -> None:
    dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]
    for path in [p for p in root.rglob("*") if not p.is_dir()]:
        path.chmod(0o644 if writable else 0o444)
    for path in dirs if writable else reversed(dirs):
        path.chmod(0o755 if writable else 0o555)


@contextmanager
def _read_only(mode: str, cache: Path, wrapper: Wrapper) -> Iterator[list[str]]:
    cache.mkdir(parents=True, exist_ok=True)
    if mode == "chmod":
        _set_modes(cache, writable=False)
    try:
        yield wrapper(str(cache))
    finally:
        if mode == "chmod":
            _set_modes(cache, writable=True)


def _probe(mode: str, tool: str, wrapper: Wrapper) -> str | None:
    """None when a child under ``wrapper`` runs Python and cannot write; else why not."""
    if tool and shutil.which(tool) is None:
        return f"{tool} is not installed"
    with tempfile.TemporaryDirectory() as tmp, \
            _read_only(mode, Path(tmp) / "box", wrapper) as cmd:
        done = subprocess.run([*cmd, sys.executable, "-c", PROBE_IN_CHILD, f"{tmp}/box"],
                              capture_output=True, text=True, timeout=60)
    answer = done.stdout.strip()
    if done.returncode == 0 and answer in (str(errno.EROFS), str(errno.EACCES)):
        return None
    return f"{tool or mode}: {answer or done.stderr.strip()[-200:]}"


@functools.cache
def read_only_wrapper(mode: str) -> Wrapper | str:
    """The wrapper that makes ``mode`` work on this host, or why none does."""
    candidates: list[tuple[str, Wrapper]]
    if mode == "chmod":
        candidates = [("setpriv" if os.geteuid() == 0 else "", _without_dac_override)]
    else:
        candidates = [("unshare", _unshare), ("bwrap", _bwrap)]
    problems = []
    for tool, wrapper in candidates:
        problem = _probe(mode, tool, wrapper)
        if problem is None:
            return wrapper
        problems.append(problem)
    return f"cannot make a read-only cache by {mode} here: " + "; ".join(problems)


@contextmanager
def read_only(mode: str, cache: Path) -> Iterator[list[str]]:
    """Yield the command prefix of a child that cannot write ``cache`` (skip if none)."""
    wrapper = read_only_wrapper(mode)
    if isinstance(wrapper, str):
        pytest.skip(wrapper)
    with _read_only(mode, cache, wrapper) as cmd:
        yield cmd


def fetch_read_only(mode: str, uri: str, digest: str, cache: Path, job_cache: Path | None,
                    fallback: bool = True) -> dict[str, Any]:
    """``fetch`` in a child that cannot write ``cache``; its path, or its JobFailed."""
    env = {k: v for k, v in os.environ.items() if k != "MINER_JOB_CACHE_DIR"}
    env["TMPDIR"] = str(cache.parent / "child-tmp")  # where a temp job cache goes
    Path(env["TMPDIR"]).mkdir(exist_ok=True)
    if job_cache is not None:
        env["MINER_JOB_CACHE_DIR"] = str(job_cache)
    args = json.dumps({"uri": uri, "sha256": digest, "cache": str(cache),
                       "fallback": fallback})
    with read_only(mode, cache) as cmd:
        done = subprocess.run([*cmd, sys.executable, "-c", FETCH_IN_CHILD, args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout), "stderr": done.stderr}


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``root``: size, mtime in ns, and bytes."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", READ_ONLY_MODES)
def test_read_only_hit_is_used_without_a_write(mode, blob_server, tmp_path):
    # Given an entry the agent fetched, with an old mtime, in a cache now read-only
    data = os.urandom(100_000)
    url = blob_server.put("in.bin", data)
    cache = tmp_path / "cache"
    entry = fetch(url, sha(data), cache, 10**9)
    os.utime(entry, ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(cache)
    # When the job fetches it
    got = fetch_read_only(mode, url, sha(data), cache, tmp_path / "job-cache")
    # Then it gets the entry itself, and nothing was written, touched or downloaded
    assert got["path"] == str(entry)
    assert snapshot(cache) == before
    assert blob_server.hits == {"/in.bin": 1}
    assert not (tmp_path / "job-cache").exists()


@pytest.mark.parametrize("mode", READ_ONLY_MODES)
def test_read_only_miss_is_fetched_into_the_job_cache(mode, blob_server, tmp_path):
    data = os.urandom(100_000)
    url = blob_server.put("in.bin", data)
    cache, job_cache = tmp_path / "cache", tmp_path / "job-cache"

    got = fetch_read_only(mode, url, sha(data), cache, job_cache)

    assert got["path"] == str(job_cache / "sha256" / sha(data))
    assert Path(got["path"]).read_bytes() == data
    assert snapshot(cache) == {}
    # the same checks hold in the job's cache: a wrong digest leaves nothing there
    wrong = fetch_read_only(mode, url, sha(b"other"), cache, job_cache)
    assert wrong["code"] == "input_error" and "sha256 mismatch" in wrong["message"]
    assert not (job_cache / "sha256" / sha(b"other")).exists()
    assert not list((job_cache / "tmp").iterdir())


@pytest.mark.parametrize("mode", READ_ONLY_MODES)
def test_read_only_corrupt_entry_is_neither_used_nor_deleted(mode, blob_server, tmp_path):
    # Given an entry that went bad on disk in a cache now read-only
    data = b"good data" * 1000
    url = blob_server.put("in.bin", data)
    cache = tmp_path / "cache"
    entry = fetch(url, sha(data), cache, 10**9)
    entry.write_bytes(b"bit rot")
    # When the job fetches it, with no job cache dir named
    got = fetch_read_only(mode, url, sha(data), cache, None)
    # Then the good bytes come from a private temp dir, and the bad entry stays as it was
    path = Path(got["path"])
    assert path.read_bytes() == data
    assert path.parent.parent.name.startswith("miner-fetch-")
    assert path.is_relative_to(tmp_path / "child-tmp")
    assert entry.read_bytes() == b"bit rot"
    assert "is corrupt" in got["stderr"] and "read-only" in got["stderr"]
    assert blob_server.hits == {"/in.bin": 2}


@pytest.mark.parametrize("mode", READ_ONLY_MODES)
def test_read_only_cache_without_a_writable_job_cache_fails_clearly(mode, blob_server,
                                                                    tmp_path):
    data = b"x" * 100
    url = blob_server.put("in.bin", data)
    cache = tmp_path / "cache"
    (cache / "inner").mkdir(parents=True)

    got = fetch_read_only(mode, url, sha(data), cache, cache / "inner")
    assert got["code"] == "input_error"
    assert "is read-only" in got["message"] and "not writable" in got["message"]
    no_fallback = fetch_read_only(mode, url, sha(data), cache, None, fallback=False)
    assert no_fallback["code"] == "input_error" and "not writable" in no_fallback["message"]
    assert blob_server.hits == {}
    assert not (tmp_path / "child-tmp").exists() or not any(
        (tmp_path / "child-tmp").iterdir())
