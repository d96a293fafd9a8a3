"""Prefetching a job's inputs in the agent, against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any

import pytest

from agent.execution.prefetch import InputRef, PrefetchResult, find_inputs, prefetch, redact
from tests.runtimes import conftest as runtime_fixtures
from tests.runtimes.test_fetch import fetch_read_only

blob_server = runtime_fixtures.blob_server  # the loopback blob server of the runtime tests


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ref(uri: Any, digest: Any = "a" * 64, **extra: Any) -> dict[str, Any]:
    return {"uri": uri, "sha256": digest, **extra}


def test_finds_every_input_a_built_in_runtime_fetches() -> None:
    batch = {"type": "batch_inference",
             "model": ref("https://h/m.pt", format="torchscript", weights=ref("http://h/w")),
             "inputs": ref("https://h/in.npz", "b" * 64)}
    training = {"type": "training", "dataset": ref("https://h/d.npz", format="npz"),
                "resume_from": ref("http://h/ckpt.tar")}

    assert [r.where for r in find_inputs(batch)] == [
        "payload.model", "payload.model.weights", "payload.inputs"]
    assert find_inputs(training) == [
        InputRef("payload.dataset", "https://h/d.npz", "a" * 64),
        InputRef("payload.resume_from", "http://h/ckpt.tar", "a" * 64)]


def test_leaves_to_the_job_what_no_runtime_fetches_by_sha256() -> None:
    assert find_inputs({"type": "training", "dataset": {"uri": "https://h/d"},  # no sha256
                        "resume_from": "https://h/ckpt.tar"}) == []  # string form: no sha
    assert find_inputs({"type": "training", "dataset": ref("/data/local.npz"),
                        "resume_from": ref("file:///ckpt")}) == []
    assert find_inputs({"type": "command", "argv": ["x"], "inputs": ref("https://h/x")}) == []
    assert find_inputs({"type": "inference", "model": ref("https://h/x")}) == []


@pytest.mark.parametrize("payload", [
    None, [], ["batch_inference"], "training", 7, {"type": ["training"]}, {"type": None},
    {"type": "training", "dataset": []}, {"type": "training", "dataset": "https://h/x"},
    {"type": "training", "dataset": ref(7)}, {"type": "training", "dataset": ref(["https://h"])},
    {"type": "training", "dataset": ref({"uri": "https://h"})},
    {"type": "training", "dataset": ref("https://h/x", 12)},
    {"type": "training", "dataset": ref("https://h/x", "")},
    {"type": "training", "dataset": ref("https://h/x", "f" * 10_000)},
    {"type": "training", "dataset": ref("https://h/" + "x" * 10_000)},
    {"type": "training", "dataset": ref("ftp://h/x")},
    {"type": "batch_inference", "model": ["weights"], "inputs": None},
])
def test_hostile_payload_shapes_fetch_nothing_and_do_not_raise(payload, tmp_path) -> None:
    assert prefetch(payload, tmp_path / "cache", 10**6) == PrefetchResult()
    assert not (tmp_path / "cache").exists()


def test_deep_and_circular_payloads_do_not_raise(tmp_path) -> None:
    deep: dict[str, Any] = {"uri": "https://h/x", "sha256": "a" * 64}
    for _ in range(100_000):
        deep = {"dataset": deep, "inputs": [deep]}
    circular: dict[str, Any] = {"type": "batch_inference"}
    circular["model"] = circular
    circular["inputs"] = circular

    for payload in ({"type": "training", **deep}, circular):
        assert prefetch(payload, tmp_path / "cache", 10**6) == PrefetchResult()


def test_prefetch_fills_the_cache_so_a_read_only_fetch_in_the_job_hits(blob_server,
                                                                       tmp_path) -> None:
    # Given a batch job whose model and inputs live on a server
    model, inputs = os.urandom(50_000), os.urandom(70_000)
    payload: dict[str, Any] = {
        "type": "batch_inference",
        "model": {"format": "torchscript", **ref(blob_server.put("m.pt", model),
                                                 sha(model).upper())},
        "inputs": ref(blob_server.put("in.npz", inputs), f"sha256:{sha(inputs)}")}
    cache = tmp_path / "cache"
    # When the agent prefetches them
    result = prefetch(payload, cache, 10**9)
    # Then both are in the cache, verified
    assert result.ok
    assert result.fetched == (cache / "sha256" / sha(model), cache / "sha256" / sha(inputs))
    assert result.fetched[1].read_bytes() == inputs
    # and the job, which cannot write the cache, finds them without a download
    got = fetch_read_only("mount", payload["inputs"]["uri"], sha(inputs), cache,
                          tmp_path / "job-cache")
    assert got["path"] == str(cache / "sha256" / sha(inputs))
    assert blob_server.hits == {"/m.pt": 1, "/in.npz": 1}


def test_a_wrong_digest_is_reported_and_leaves_no_entry(blob_server, tmp_path) -> None:
    good, data = b"good", b"served bytes"
    payload = {"type": "training", "dataset": ref(blob_server.put("d.npz", data), sha(b"x")),
               "resume_from": ref(blob_server.put("c.tar", good), sha(good))}
    cache = tmp_path / "cache"

    result = prefetch(payload, cache, 10**6)

    assert result.fetched == (cache / "sha256" / sha(good),)
    assert len(result.errors) == 1
    assert result.errors[0].startswith("payload.dataset: ")
    assert "sha256 mismatch" in result.errors[0] and sha(data) in result.errors[0]
    assert not (cache / "sha256" / sha(b"x")).exists()
    assert not list((cache / "tmp").iterdir())


def test_failures_are_returned_not_raised(tmp_path) -> None:
    payload = {"type": "batch_inference",
               "model": {"format": "builtin", "weights": ref("http://127.0.0.1:9/w", "a" * 64)},
               "inputs": ref("http://h\x00/x", "b" * 64)}
    training = {"type": "training", "dataset": ref("https://h/d", "not hex")}

    result = prefetch(payload, tmp_path / "cache", 10**6, timeout_s=2)
    bad_sha = prefetch(training, tmp_path / "cache", 10**6)

    assert result.fetched == () and len(result.errors) == 2
    assert result.errors[0].startswith("payload.model.weights: ")
    assert "download failed" in result.errors[0]
    assert result.errors[1].startswith("payload.inputs: ") and "InvalidURL" in result.errors[1]
    assert find_inputs({"type": "training", "dataset": ref("http://[::1/x")}) == []
    assert bad_sha.errors == ("payload.dataset: https://h/d: sha256 must be 64 hex digits, "
                              "not 'not hex'",)


def test_credentials_in_a_uri_reach_neither_errors_nor_logs(tmp_path, caplog) -> None:
    uri = "http://user:pw@127.0.0.1:9/blob?X-Amz-Signature=s3cr3t"
    caplog.set_level(logging.INFO, logger="agent.execution.prefetch")

    result = prefetch({"type": "training", "dataset": ref(uri)}, tmp_path / "c", 10**6,
                      timeout_s=2)

    assert len(result.errors) == 1 and "http://127.0.0.1:9/blob?<redacted>" in result.errors[0]
    for text in (result.errors[0], caplog.text):
        assert "s3cr3t" not in text and "pw@" not in text
    assert redact("https://h/p") == "https://h/p"


def test_the_same_input_named_twice_is_fetched_once(blob_server, tmp_path) -> None:
    data = b"both"
    same = ref(blob_server.put("x", data), sha(data))
    payload = {"type": "batch_inference", "model": {"format": "exported", **same},
               "inputs": dict(same)}

    result = prefetch(payload, tmp_path / "cache", 10**6)

    assert result.ok and len(result.fetched) == 1
    assert blob_server.hits == {"/x": 1}


def test_a_cancel_stops_the_remaining_inputs(blob_server, tmp_path) -> None:
    a, b = os.urandom(2_000_000), b"second"
    payload = {"type": "training", "dataset": ref(blob_server.put("a", a), sha(a)),
               "resume_from": ref(blob_server.put("b", b), sha(b))}

    result = prefetch(payload, tmp_path / "cache", 10**9, cancelled=lambda: True)

    assert result.errors == ("payload.dataset: prefetch canceled",)
    assert result.fetched == ()
    assert "/b" not in blob_server.hits


def test_two_threads_prefetching_one_job_download_each_input_once(blob_server,
                                                                  tmp_path) -> None:
    data = os.urandom(300_000)
    payload = {"type": "training", "dataset": ref(blob_server.put("d", data), sha(data))}
    blob_server.delay_s = 0.3  # the second asks while the first downloads
    results: list[PrefetchResult] = []

    threads = [threading.Thread(target=lambda: results.append(
        prefetch(payload, tmp_path / "cache", 10**9))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)

    assert [r.fetched for r in results] == [(tmp_path / "cache" / "sha256" / sha(data),)] * 2
    assert blob_server.hits == {"/d": 1}


def test_a_cache_dir_that_cannot_be_made_is_an_error_not_a_raise(blob_server,
                                                                 tmp_path) -> None:
    data = b"nowhere to put it"
    payload = {"type": "training", "dataset": ref(blob_server.put("d", data), sha(data))}
    (tmp_path / "file").write_text("not a dir")

    result = prefetch(payload, tmp_path / "file" / "cache", 10**6)

    assert result.fetched == () and len(result.errors) == 1
    assert result.errors[0].startswith("payload.dataset: ") and "NotADirectoryError" in \
        result.errors[0]
    assert blob_server.hits == {}
