"""The download cache against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from runtimes.base import JobCancelled, JobFailed
from runtimes.fetch import cache_dir_from_env, evict, fetch


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
