"""The reference coordinator's client queries: list, delete, download, events, retry.

A real coordinator on loopback; the miner side is driven over its real HTTP API by a
hand-held miner (register, poll, logs, progress, package, result), so each job is put
in the state a test needs without a daemon.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sqlite3
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.reference.coordinator import ReferenceCoordinator
from agent.reference.events_api import EventsAPI
from agent.reference.model import CLIENT_STATUSES
from agent.reference.store import LOG_CHUNKS_SQL, STATUS_WHERE, Store
from tests.agent.coordinator.conftest import GPU_CAPS, MINER_KEY, client_http, submit

TRAINING = {"type": "training", "model": {"arch": "mlp"}, "steps": 8}


class HandMiner:
    """A miner over the real miner API, one call at a time."""

    def __init__(self, coord: ReferenceCoordinator, miner_id: str = "m1",
                 extensions: tuple[str, ...] = ("progress", "logs", "package", "cancel")) -> None:
        self.http = httpx.Client(base_url=coord.base_url, timeout=5.0,
                                 headers={"X-Api-Key": MINER_KEY, "X-Miner-ID": miner_id})
        self.http.post("/v1/miners/register", json={
            "capabilities": {**GPU_CAPS, "extensions": list(extensions)},
            "concurrency": 50}).raise_for_status()

    def take(self) -> str:
        resp = self.http.post("/v1/miners/poll", json={})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["job_id"])

    def progress(self, job_id: str, fraction: float) -> None:
        self.http.post(f"/v1/miners/{job_id}/progress",
                       json={"fraction": fraction, "stage": "steps"}).raise_for_status()

    def log(self, job_id: str, data: bytes, stream: str = "stdout", offset: int = 0) -> None:
        self.http.post(f"/v1/miners/{job_id}/logs", json={
            "stream": stream, "offset": offset,
            "data_b64": base64.b64encode(data).decode()}).raise_for_status()

    def package(self, job_id: str, data: bytes) -> None:
        self.http.put(f"/v1/miners/{job_id}/package", content=data, headers={
            "X-Content-SHA256": hashlib.sha256(data).hexdigest()}).raise_for_status()

    def complete(self, job_id: str, units: float = 1.5) -> None:
        self.http.post(f"/v1/miners/{job_id}/result", json={
            "result": {"status": "completed"},
            "metrics": {"units": units, "unit_type": "gpu_seconds"}}).raise_for_status()

    def fail(self, job_id: str) -> None:
        self.http.post(f"/v1/miners/{job_id}/fail", json={
            "error_code": "job_failed", "error_message": "boom"}).raise_for_status()


@pytest.fixture
def hand(coordinator: ReferenceCoordinator) -> Iterator[HandMiner]:
    m = HandMiner(coordinator)
    yield m
    m.http.close()


def package_zip(job_id: str, checkpoints: dict[str, bytes] | None = None) -> bytes:
    """A package zip: ``job_<ID>/`` with a result and, optionally, checkpoint files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"job_{job_id}/result.txt", "done\n")
        zf.writestr(f"job_{job_id}/logs/stdout.log", "")
        for name, data in (checkpoints or {}).items():
            zf.writestr(f"job_{job_id}/artifacts/checkpoints/{name}", data)
    return buf.getvalue()


def ids(answer: dict[str, Any]) -> list[str]:
    return [j["job_id"] for j in answer["jobs"]]


def test_list_is_newest_first_with_the_true_total_and_paging(
        coordinator: ReferenceCoordinator) -> None:
    jobs = [submit(coordinator, {"type": "sleep" if i % 2 else "command"}) for i in range(5)]
    with client_http(coordinator) as http:
        first = http.get("/v1/jobs", params={"limit": 2}).json()
        assert ids(first) == [jobs[4], jobs[3]]
        assert (first["total"], first["limit"], first["offset"]) == (5, 2, 0)
        assert ids(http.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()) == \
            [jobs[2], jobs[1]]
        sleeps = http.get("/v1/jobs", params={"type": "sleep"}).json()
        assert ids(sleeps) == [jobs[3], jobs[1]] and sleeps["total"] == 2
        # since/until are ISO 8601 on created_at, until exclusive
        middle = http.get(f"/v1/jobs/{jobs[2]}").json()["created_at"]
        assert ids(http.get("/v1/jobs", params={"since": middle}).json()) == jobs[:1:-1]
        assert ids(http.get("/v1/jobs", params={"until": middle}).json()) == [jobs[1], jobs[0]]
        bad = http.get("/v1/jobs", params={"status": "bogus"})
        assert bad.status_code == 422 and "unknown status" in bad.json()["detail"]
        bad = http.get("/v1/jobs", params={"since": "yesterday"})
        assert bad.status_code == 422 and "ISO-8601" in bad.json()["detail"]


def test_each_status_filter_selects_the_jobs_the_view_calls_that(
        coordinator: ReferenceCoordinator, hand: HandMiner) -> None:
    # Given one job in each client status, put there over the real miner API
    assigned, running, canceling, completed, failed = (submit(coordinator) for _ in range(5))
    for _ in range(5):
        hand.take()
    pending = submit(coordinator)
    canceled = submit(coordinator)
    hand.progress(running, 0.5)
    hand.progress(canceling, 0.5)
    with client_http(coordinator) as http:
        http.post(f"/v1/jobs/{canceled}/cancel").raise_for_status()
        http.post(f"/v1/jobs/{canceling}/cancel").raise_for_status()
        hand.complete(completed)
        hand.fail(failed)
        expected = {"pending": pending, "assigned": assigned, "running": running,
                    "canceling": canceling, "completed": completed, "failed": failed,
                    "canceled": canceled}
        assert set(STATUS_WHERE) == set(CLIENT_STATUSES) == set(expected)
        for status, job_id in expected.items():
            page = http.get("/v1/jobs", params={"status": status}).json()
            assert ids(page) == [job_id], status
            assert page["jobs"][0]["status"] == status
        both = http.get("/v1/jobs", params={"status": "failed,canceled"}).json()
        assert sorted(ids(both)) == sorted([failed, canceled]) and both["total"] == 2


def test_delete_removes_everything_and_is_refused_while_running(
        coordinator: ReferenceCoordinator, hand: HandMiner) -> None:
    done = submit(coordinator)
    hand.take()
    hand.log(done, b"hello\n")
    hand.package(done, package_zip(done))
    hand.complete(done)
    active = submit(coordinator)
    hand.take()
    queued = submit(coordinator)
    with client_http(coordinator) as http:
        refused = http.delete(f"/v1/jobs/{active}")
        assert refused.status_code == 409
        assert refused.json()["detail"] == "job is assigned: cancel it first, then delete it"
        assert http.delete("/v1/jobs/nope").json() == {"detail": "Job not found"}
        assert coordinator.store.receipts(done)
        assert http.delete(f"/v1/jobs/{done}").json() == {"job_id": done, "deleted": True}
        assert http.get(f"/v1/jobs/{done}").status_code == 404
        assert http.delete(f"/v1/jobs/{queued}").status_code == 200
    store = coordinator.store
    assert store.receipts(done) == [] and store.package_info(done) is None
    assert store.read_log(done, "stdout") == b""


def test_download_is_the_package_under_the_name_the_guide_uses(
        coordinator: ReferenceCoordinator, hand: HandMiner) -> None:
    job_id = submit(coordinator)
    hand.take()
    data = package_zip(job_id)
    hand.package(job_id, data)
    with client_http(coordinator) as http:
        resp = http.get(f"/v1/jobs/{job_id}/download")
        assert resp.content == data == http.get(f"/v1/jobs/{job_id}/package").content
        assert resp.headers["X-Content-SHA256"] == hashlib.sha256(data).hexdigest()
        assert f'filename="job_{job_id}.zip"' in resp.headers["Content-Disposition"]


def test_events_long_poll_answers_on_each_change(coordinator: ReferenceCoordinator,
                                                 hand: HandMiner) -> None:
    job_id = submit(coordinator)
    with client_http(coordinator) as http:
        def events(after: int, wait_s: float = 0) -> dict[str, Any]:
            return dict(http.get(f"/v1/jobs/{job_id}/events", timeout=40,
                                 params={"after": after, "wait_s": wait_s}).json())

        first = events(0)
        assert [e["status"] for e in first["events"]] == ["pending"] and not first["done"]
        # A long-poll with nothing new waits, and is answered as soon as the miner acts
        answered: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: answered.update(events(first["next"], 20)))
        t0 = time.monotonic()
        waiter.start()
        time.sleep(0.3)
        hand.take()
        waiter.join(10)
        assert time.monotonic() - t0 < 3
        assert [e["status"] for e in answered["events"]] == ["assigned"]
        # Logs and progress come as events in order; nothing new: empty at wait_s
        hand.log(job_id, b"step 1\n")
        hand.progress(job_id, 0.5)
        hand.log(job_id, b"step 2\n", offset=7)
        got = events(answered["next"])
        assert [(e["type"], e.get("data") or e.get("progress")) for e in got["events"]] == [
            ("log", "step 1\n"), ("state", 50.0), ("log", "step 2\n")]
        assert got["events"][2]["offset"] == 7
        t0 = time.monotonic()
        idle = events(got["next"], 0.5)
        assert idle["events"] == [] and idle["next"] == got["next"]
        assert 0.4 < time.monotonic() - t0 < 3
        hand.complete(job_id)
        last = events(got["next"], 20)
        assert last["done"] and last["events"][-1]["status"] == "completed"
        assert last["events"][-1]["progress"] == 100.0
        assert http.get("/v1/jobs/nope/events").status_code == 404


def test_retry_and_resume_from_the_last_checkpoint(coordinator: ReferenceCoordinator,
                                                   hand: HandMiner, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a failed training job whose package holds two checkpoints, latest step 4
    job_id = submit(coordinator, TRAINING, {"min_vram_mb": 1000}, ttl_s=120)
    hand.take()
    hand.package(job_id, package_zip(job_id, {
        "step-000002/meta.json": b'{"step": 2}', "step-000004/meta.json": b'{"step": 4}',
        "step-000004/model.safetensors": b"weights", "latest": b"step-000004\n"}))
    hand.fail(job_id)
    with client_http(coordinator) as http:
        # When it is retried plainly, the new job has the same payload and constraints
        again = http.post(f"/v1/jobs/{job_id}/retry", json={})
        assert again.status_code == 201 and again.json()["retry_of"] == job_id
        assert again.json()["payload"] == TRAINING
        assert again.json()["constraints"] == {"min_vram_mb": 1000}
        # And with resume, the payload names the checkpoint, served without a key
        resumed = http.post(f"/v1/jobs/{job_id}/retry", json={"resume": True}).json()
        ref = resumed["payload"]["resume_from"]
        blob = httpx.get(ref["uri"])
        assert blob.status_code == 200 and hashlib.sha256(blob.content).hexdigest() == \
            ref["sha256"]
        with zipfile.ZipFile(io.BytesIO(blob.content)) as zf:
            assert sorted(zf.namelist()) == ["step-000004/meta.json",
                                             "step-000004/model.safetensors"]
        # Not resumable: a job of another type, a completed one, one with no checkpoint
        other = submit(coordinator, {"type": "sleep"})
        refused = http.post(f"/v1/jobs/{other}/retry", json={"resume": True})
        assert refused.status_code == 409 and refused.json()["error"] == "not_resumable"
        http.delete(f"/v1/jobs/{resumed['job_id']}").raise_for_status()
        assert httpx.get(ref["uri"]).status_code == 404
    # Then the training runtime's own resume finds that checkpoint at that URL
    again_ref = resume_ref(coordinator, job_id)
    monkeypatch.setenv("MINER_JOB_CACHE_DIR", str(tmp_path / "cache"))
    from runtimes.checkpoint import resolve_resume

    found = resolve_resume(again_ref, tmp_path / "work")
    assert found.name == "step-000004" and (found / "meta.json").read_text() == '{"step": 4}'


def resume_ref(coord: ReferenceCoordinator, job_id: str) -> dict[str, Any]:
    with client_http(coord) as http:
        return dict(http.post(f"/v1/jobs/{job_id}/retry",
                              json={"resume": True}).json()["payload"]["resume_from"])


def test_cancel_force_ends_a_canceling_job_at_once(coordinator: ReferenceCoordinator,
                                                   hand: HandMiner) -> None:
    job_id = submit(coordinator)
    hand.take()
    hand.progress(job_id, 0.1)
    with client_http(coordinator) as http:
        assert http.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceling"
        forced = http.post(f"/v1/jobs/{job_id}/cancel", json={"force": True}).json()
        assert forced["status"] == "canceled" and forced["finished_at"]


def test_a_database_from_before_the_event_columns_still_opens(tmp_path: Path) -> None:
    # Given a database written by the release before seq existed, with a job and a log
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (job_id TEXT PRIMARY KEY, payload TEXT NOT NULL,
            constraints TEXT NOT NULL, state TEXT NOT NULL, miner_id TEXT,
            created_at REAL NOT NULL, expires_at REAL NOT NULL, assigned_at REAL,
            started_at REAL, finished_at REAL, finished_by TEXT, result TEXT, metrics TEXT,
            error_code TEXT, error_message TEXT, partial INTEGER, lease_id TEXT,
            lease_expires_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
            cancel_requested_at REAL, progress TEXT);
        CREATE TABLE logs (job_id TEXT NOT NULL, stream TEXT NOT NULL, start INTEGER NOT NULL,
            data BLOB NOT NULL, PRIMARY KEY (job_id, stream, start));""")
    now = time.time()
    db.execute("INSERT INTO jobs (job_id, payload, constraints, state, created_at, expires_at) "
               "VALUES ('old', '{\"type\": \"sleep\"}', '{}', 'COMPLETED', ?, ?)",
               (now, now + 60))
    db.execute("INSERT INTO logs VALUES ('old', 'stdout', 0, x'6869')")
    db.commit()
    db.close()
    # When the store opens it, its events are there from the start
    store = Store(str(path))
    try:
        answer = EventsAPI(store).collect("old", 0)
        assert [e["type"] for e in answer["events"]] == ["log", "state"]
        assert answer["events"][0]["data"] == "hi" and answer["done"]
    finally:
        store.close()


def test_retention_drops_old_and_over_cap_packages_but_keeps_the_records(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    coord = make_coordinator(retain_days=1.0, retain_bytes=2500)
    store = coord.store
    ids = [store.submit({"type": "sleep"}, {}, 900.0) for _ in range(4)]
    now = time.time()
    for age_days, job_id in zip((3.0, 0.3, 0.2, 0.1), ids, strict=True):
        store.update_job(job_id, state="COMPLETED", finished_at=now - age_days * 86400)
        store.put_package(job_id, "0" * 64, b"x" * 1000)
        with store.tx() as db:  # as if uploaded that long ago
            db.execute("UPDATE packages SET created_at=? WHERE job_id=?",
                       (now - age_days * 86400, job_id))
    running = store.submit({"type": "sleep"}, {}, 900.0)
    store.update_job(running, state="RUNNING")
    store.put_package(running, "0" * 64, b"y" * 1000)
    gone = store.retain(now)
    # Past retain_days: the oldest. Past 2500 bytes, newest first: the running job's
    # 1000 (it counts, and stays) and the newest finished 1000; the older two go.
    assert sorted(gone) == sorted(ids[:3])
    assert all(store.package_data(j) is None for j in ids[:3])
    assert store.package_data(ids[3]) is not None
    assert store.package_data(running) is not None  # never a job still running
    assert store.job(ids[0]) is not None  # the record stays
    with client_http(coord) as http:
        assert http.get(f"/v1/jobs/{ids[0]}/download").status_code == 404


def test_retention_counts_and_drops_a_finished_jobs_logs_with_its_package(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    # Given (the logs of every job stayed for ever: the embedded coordinator's database,
    # in the agent's state dir, grew by every log a job printed, past any setting)
    coord = make_coordinator(retain_days=1.0, retain_bytes=3500)
    store = coord.store
    now = time.time()
    old, logged, packaged, running = (store.submit({"type": "sleep"}, {}, 900.0)
                                      for _ in range(4))
    for job_id, age_days in ((old, 3.0), (logged, 0.2), (packaged, 0.1)):
        store.update_job(job_id, state="COMPLETED", finished_at=now - age_days * 86400)
    store.update_job(running, state="RUNNING")
    store.append_log(old, "stdout", 0, b"o" * 1000)  # logs only, three days old
    store.append_log(logged, "stdout", 0, b"l" * 1000)  # logs only, 1500 bytes
    store.append_log(logged, "stderr", 0, b"e" * 500)
    store.put_package(packaged, "0" * 64, b"p" * 1000)  # package and logs, 2000 bytes
    with store.tx() as db:
        db.execute("UPDATE packages SET created_at=? WHERE job_id=?",
                   (now - 0.1 * 86400, packaged))
    store.append_log(packaged, "stdout", 0, b"q" * 1000)
    store.append_log(running, "stdout", 0, b"r" * 1000)  # counts, never goes
    # When retention runs
    gone = store.retain(now)
    # Then past retain_days the old job's logs go; past 3500 bytes, newest first (the
    # running job's 1000, the packaged job's 2000), the logged job's 1500 go
    assert sorted(gone) == sorted([old, logged])
    assert store.read_log(old, "stdout") == b"" and store.read_log(logged, "stderr") == b""
    assert store.read_log(packaged, "stdout") == b"q" * 1000
    assert store.package_data(packaged) == b"p" * 1000
    assert store.read_log(running, "stdout") == b"r" * 1000
    assert store.job(old) is not None  # the record stays


def test_a_long_log_is_read_a_page_at_a_time(coordinator: ReferenceCoordinator,
                                             hand: HandMiner,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a log stored as three chunks
    job_id = submit(coordinator)
    hand.take()
    for i, byte in enumerate(b"abc"):
        hand.log(job_id, bytes([byte]) * 1000, offset=1000 * i)
    with client_http(coordinator) as http:
        def logs(**params: Any) -> httpx.Response:
            return http.get(f"/v1/jobs/{job_id}/logs", params={"stream": "stdout", **params})

        # A page across a chunk boundary: its bytes, where it ends and where the log does
        page = logs(offset=500, limit=1000)
        assert page.content == b"a" * 500 + b"b" * 500
        assert (page.headers["X-Log-Offset"], page.headers["X-Log-End"],
                page.headers["X-Log-Size"]) == ("500", "1500", "3000")
        assert logs(offset=2900, limit=1000).content == b"c" * 100
        assert logs().content == b"a" * 1000 + b"b" * 1000 + b"c" * 1000
        assert logs(offset=10 ** 30).content == b""
        assert logs(limit="many").status_code == 422
        # Without a limit, one answer stops at the coordinator's own bound (a log may be
        # gigabytes, and the embedded coordinator lives in the agent's process)
        monkeypatch.setattr("agent.reference.client_api.MAX_LOG_ANSWER_BYTES", 1200)
        capped = logs()
        assert capped.content == b"a" * 1000 + b"b" * 200
        assert capped.headers["X-Log-End"] == "1200" and capped.headers["X-Log-Size"] == "3000"
    # And the events read a log's chunks along an index, not by sorting every chunk left
    # (blobs and all) for each page
    with sqlite3.connect(coordinator.store.path) as db:
        plan = " ".join(str(row) for row in db.execute("EXPLAIN QUERY PLAN " + LOG_CHUNKS_SQL,
                                                       (job_id, 0)))
    assert "TEMP B-TREE" not in plan and "logs_seq" in plan, plan


def test_a_package_goes_in_and_out_a_piece_at_a_time(coordinator: ReferenceCoordinator,
                                                      hand: HandMiner, tmp_path: Path) -> None:
    # Given a 48 MiB package (not a whole number of pieces), uploaded and downloaded while
    # the coordinator's Python allocations are traced (it held each whole, and a download
    # twice over: the embedded coordinator lives in the agent's process, which reached
    # 640 MB on a 200 MB upload and 830 MB on its download)
    job_id = submit(coordinator)
    hand.take()
    size = (48 << 20) + 12345
    path = tmp_path / "package.zip"
    with open(path, "wb") as fh:
        for i in range(49):
            fh.write(hashlib.sha256(b"%d" % i).digest() * 32768)
        fh.truncate(size)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while piece := fh.read(256 << 10):
                yield piece

    got = hashlib.sha256()
    tracemalloc.start()
    try:
        hand.http.put(f"/v1/miners/{job_id}/package", content=chunks(), headers={
            "X-Content-SHA256": digest}, timeout=60).raise_for_status()
        upload_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        with client_http(coordinator) as http, \
                http.stream("GET", f"/v1/jobs/{job_id}/download", timeout=60) as resp:
            assert resp.status_code == 200 and resp.headers["X-Content-SHA256"] == digest
            assert resp.headers["Content-Length"] == str(size)
            for piece in resp.iter_bytes(256 << 10):
                got.update(piece)
        download_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Then the bytes come back as they went, and neither way held the package whole
    assert got.hexdigest() == digest
    assert upload_peak < 16 << 20 and download_peak < 16 << 20, (upload_peak, download_peak)
    assert coordinator.store.package_data(job_id) == path.read_bytes()
    # And a package replaced, or deleted, leaves no piece of the one before
    hand.package(job_id, b"small")
    assert coordinator.store.package_data(job_id) == b"small"
    with sqlite3.connect(coordinator.store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM package_pieces").fetchone() == (1,)
    coordinator.store.delete_job(job_id)
    with sqlite3.connect(coordinator.store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM package_pieces").fetchone() == (0,)


def test_a_package_stored_whole_by_an_older_coordinator_still_downloads(
        coordinator: ReferenceCoordinator, hand: HandMiner) -> None:
    job_id = submit(coordinator)
    data = package_zip(job_id)
    with sqlite3.connect(coordinator.store.path) as db:  # as one stored before pieces
        db.execute("INSERT INTO packages VALUES (?, ?, ?, ?, ?)",
                   (job_id, hashlib.sha256(data).hexdigest(), len(data), data, time.time()))
    with client_http(coordinator) as http:
        assert http.get(f"/v1/jobs/{job_id}/download").content == data
    assert coordinator.store.read_package(job_id, hashlib.sha256(data).hexdigest(), 10, 5) \
        == data[10:15]


def test_a_package_removed_while_it_downloads_breaks_the_download(
        coordinator: ReferenceCoordinator, caplog: pytest.LogCaptureFixture) -> None:
    # Given a 20 MiB package whose download has begun
    job_id = submit(coordinator)
    data = b"x" * (20 << 20)
    coordinator.store.put_package(job_id, hashlib.sha256(data).hexdigest(), data)
    with client_http(coordinator) as http, \
            http.stream("GET", f"/v1/jobs/{job_id}/download") as resp:
        pieces = resp.iter_bytes(1 << 20)
        assert len(next(pieces)) == 1 << 20
        # When the job is deleted before the rest is read
        coordinator.store.delete_job(job_id)
        # Then the client sees a broken download, never a short one that ends cleanly
        with pytest.raises(httpx.TransportError):
            for _ in pieces:
                pass
        # And the coordinator says why and goes on serving
        assert http.get("/health").status_code == 200
    assert "changed while it was sent" in caplog.text
