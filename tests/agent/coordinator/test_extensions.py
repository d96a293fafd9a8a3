"""Each extension end to end: lease, progress, cancel, logs, package, presigned upload."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.coordinator.client import LogOffsetConflict, LogOffsets
from agent.coordinator.transport import CoordinatorHTTPError, LeaseLost
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.coordinator.conftest import GPU_CAPS, client_http, miner, status, submit


def test_register_agrees_on_the_intersection(coordinator: ReferenceCoordinator) -> None:
    async def flow() -> None:
        async with miner(coordinator) as client:
            answer = await client.register(GPU_CAPS, 1)
            assert answer.extensions == {"lease", "progress", "logs", "package", "cancel",
                                         "longpoll", "logs-binary"}
            only = await client.register({**GPU_CAPS, "extensions": ["logs"]}, 1)
            assert only.extensions == {"logs"} and "lease" in only.announced
            job_id = submit(coordinator)
            polled = await client.poll()
            assert polled is not None and polled.job_id == job_id
            assert polled.lease_id is None  # lease not declared: core behaviour

    asyncio.run(flow())


def test_lease_renewed_by_heartbeat_then_lost_after_lapse(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    coord = make_coordinator(lease_ttl_s=0.4)
    job_id = submit(coord)

    async def flow() -> None:
        async with miner(coord, "a") as a, miner(coord, "b") as b:
            await a.register(GPU_CAPS, 1)
            await b.register(GPU_CAPS, 1)
            polled = await a.poll()
            assert polled is not None and polled.lease_id and polled.lease_ttl_s == 0.4
            assert polled.job_dict()["lease_id"] == polled.lease_id
            for _ in range(3):  # renewed past its first TTL
                await asyncio.sleep(0.2)
                beat = await a.heartbeat(1, leases={job_id: polled.lease_id})
                assert beat.renewed == {job_id: 0.4} and not beat.lost
            # When miner a goes silent, the lease lapses and the job goes to miner b
            await asyncio.sleep(0.5)
            again = await b.poll()
            assert again is not None and again.job_id == job_id
            assert again.lease_id != polled.lease_id
            beat = await a.heartbeat(1, leases={job_id: polled.lease_id})
            assert beat.lost == {job_id}
            # Then a's late report is refused and b's lands, once and idempotently
            with pytest.raises(LeaseLost):
                await a.result(job_id, {"status": "ok"}, lease_id=polled.lease_id)
            with pytest.raises(LeaseLost):
                await a.progress(job_id, lease_id=polled.lease_id, fraction=0.9)
            first = await b.result(job_id, {"status": "ok"}, {"units": 1}, lease_id=again.lease_id)
            replay = await b.result(job_id, {"status": "ok"}, {"units": 1},
                                    lease_id=again.lease_id)
            assert first == replay and first is not None

    asyncio.run(flow())
    view = status(coord, job_id)
    assert view["status"] == "completed" and view["attempts"] == 2 and view["miner_id"] == "b"


def test_progress_shows_to_the_client_and_answers_cancel(
        coordinator: ReferenceCoordinator) -> None:
    job_id = submit(coordinator)

    async def flow() -> None:
        async with miner(coordinator) as client:
            await client.register(GPU_CAPS, 1)
            polled = await client.poll()
            assert polled is not None and polled.lease_id is not None
            assert status(coordinator, job_id)["status"] == "assigned"
            cancel = await client.progress(job_id, lease_id=polled.lease_id, fraction=0.45,
                                           stage="train", message="epoch 1/3", eta_s=30,
                                           metrics={"step": 100, "loss": 0.7})
            assert cancel is False
            view = status(coordinator, job_id)
            assert view["status"] == "running" and view["progress"] == 45.0
            assert view["progress_detail"]["metrics"]["loss"] == 0.7
            assert view["estimated_completion"] is not None
            # A stage and a message past their bounds are cut (an agent before the cut)
            await client.progress(job_id, lease_id=polled.lease_id, fraction=0.46,
                                  stage="s" * 5000, message="m" * 5000)
            detail = status(coordinator, job_id)["progress_detail"]
            assert detail["stage"] == "s" * 200 and detail["message"] == "m" * 1000
            # When the client cancels, the next progress and heartbeat answers say so
            with client_http(coordinator) as http:
                assert http.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceling"
            assert await client.progress(job_id, lease_id=polled.lease_id, fraction=0.5)
            beat = await client.heartbeat(1, leases={job_id: polled.lease_id})
            assert beat.cancel == {job_id}
            assert await client.running_jobs() == {job_id}  # kept until confirmed
            # Then the final report of a canceled job says canceled, with partial results
            receipt = await client.result(job_id, {"status": "canceled", "partial": True},
                                          lease_id=polled.lease_id)
            assert receipt is None

    asyncio.run(flow())
    view = status(coordinator, job_id)
    assert view["status"] == "canceled" and view["partial"] is True


def test_a_completed_job_shows_100_percent_whatever_its_last_progress_said(
        coordinator: ReferenceCoordinator) -> None:
    job_id = submit(coordinator)

    async def flow() -> None:
        async with miner(coordinator) as client:
            await client.register(GPU_CAPS, 1)
            polled = await client.poll()
            assert polled is not None
            await client.progress(job_id, lease_id=polled.lease_id, fraction=0.82, eta_s=5)
            assert status(coordinator, job_id)["progress"] == 82.0
            await client.result(job_id, {"status": "completed"}, lease_id=polled.lease_id)

    asyncio.run(flow())
    view = status(coordinator, job_id)
    assert view["status"] == "completed"
    assert view["progress"] == 100.0 and view["estimated_completion"] is None


def test_unconfirmed_cancel_falls_back_to_the_core(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    coord = make_coordinator(cancel_grace_s=0.2)
    job_id = submit(coord)

    async def flow() -> None:
        async with miner(coord) as client:
            await client.register(GPU_CAPS, 1)
            assert await client.poll() is not None
            with client_http(coord) as http:
                http.post(f"/v1/jobs/{job_id}/cancel")
            await asyncio.sleep(0.3)
            assert await client.running_jobs() == set()

    asyncio.run(flow())
    assert status(coord, job_id)["status"] == "canceled"


def test_log_chunks_neither_lost_nor_duplicated(coordinator: ReferenceCoordinator) -> None:
    job_id = submit(coordinator)
    text = b"".join(b"line %d\n" % i for i in range(200))

    async def flow() -> None:
        async with miner(coordinator) as client:
            await client.register(GPU_CAPS, 1)
            polled = await client.poll()
            assert polled is not None
            lease = polled.lease_id
            assert await client.ship_logs(job_id, "stdout", 0, text[:100], lease_id=lease) \
                == LogOffsets(100, 0)
            # A retry of the same chunk and an overlapping one add only new bytes
            await client.ship_logs(job_id, "stdout", 0, text[:100], lease_id=lease)
            ends = await client.ship_logs(job_id, "stdout", 50, text[50:300], lease_id=lease)
            assert ends.stdout == 300
            await client.ship_logs(job_id, "stderr", 0, b"warn\n", lease_id=lease)
            # A chunk past the end is refused with the ends to resend from
            with pytest.raises(LogOffsetConflict) as err:
                await client.ship_logs(job_id, "stdout", 400, text[400:], lease_id=lease)
            assert err.value.offsets == LogOffsets(300, 5)
            # After a crash the agent asks where to resume
            resume = (await client.log_offsets(job_id)).of("stdout")
            await client.ship_logs(job_id, "stdout", resume, text[resume:], lease_id=lease)

    asyncio.run(flow())
    with client_http(coordinator) as http:
        resp = http.get(f"/v1/jobs/{job_id}/logs", params={"stream": "stdout"})
        assert resp.content == text and resp.headers["X-Log-End"] == str(len(text))
        tail = http.get(f"/v1/jobs/{job_id}/logs", params={"stream": "stdout", "offset": 1000})
        assert tail.content == text[1000:]
        assert http.get(f"/v1/jobs/{job_id}/logs?stream=stderr").content == b"warn\n"


def _zip(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "result.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("output.json", '{"status": "ok"}')
        zf.writestr("result.txt", "x" * 300_000)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_package_upload_is_checked(coordinator: ReferenceCoordinator, tmp_path: Path) -> None:
    job_id = submit(coordinator)
    path, sha = _zip(tmp_path)

    async def flow() -> None:
        async with miner(coordinator) as client:
            await client.register(GPU_CAPS, 1)
            polled = await client.poll()
            assert polled is not None
            with pytest.raises(CoordinatorHTTPError) as err:
                await client.upload_package(job_id, path, "0" * 64, lease_id=polled.lease_id)
            assert err.value.status == 422 and err.value.code == "sha256_mismatch"
            answer = await client.upload_package(job_id, path, sha, lease_id=polled.lease_id)
            assert answer.sha256 == sha and answer.size == path.stat().st_size
            assert answer.url == f"/v1/jobs/{job_id}/package"

    asyncio.run(flow())
    with client_http(coordinator) as http:
        resp = http.get(f"/v1/jobs/{job_id}/package")
        assert resp.content == path.read_bytes() and resp.headers["X-Content-SHA256"] == sha
    assert status(coordinator, job_id)["package"] == {"sha256": sha, "size": path.stat().st_size}


def test_presigned_put_carries_no_api_key(coordinator: ReferenceCoordinator, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    path, sha = _zip(tmp_path)
    url = coordinator.presign()

    async def flow() -> None:
        async with miner(coordinator) as client:
            with pytest.raises(CoordinatorHTTPError):
                await client.put_presigned(url, path, "f" * 64)
            await client.put_presigned(url, path, sha)
            stats = client.stats.get("presigned")
            assert stats.ok == 1 and stats.failed == 1

    with caplog.at_level(logging.DEBUG):
        asyncio.run(flow())
    assert coordinator.presigned_object(url) == path.read_bytes()
    assert "/presigned/" in caplog.text and "signature=stand-in" not in caplog.text
