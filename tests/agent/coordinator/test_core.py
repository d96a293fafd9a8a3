"""The core protocol against the reference coordinator, quirks included."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import pytest

from agent.coordinator.transport import AuthError, BodyTooLarge, NotRegistered
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.coordinator.conftest import GPU_CAPS, MINER_KEY, miner, status, submit


def test_register_poll_result_flow(core: ReferenceCoordinator) -> None:
    # Given a core coordinator with one job queued
    job_id = submit(core, {"type": "inference", "prompt": "hi", "model": "llama3.2:3b"})

    async def flow() -> None:
        async with miner(core) as client:
            answer = await client.register(GPU_CAPS, concurrency=2, region="eu")
            assert answer.session_token and answer.extensions == frozenset()
            # When the miner polls, it gets the job, RUNNING and its own
            polled = await client.poll()
            assert polled is not None and polled.job_id == job_id and polled.lease_id is None
            assert polled.payload["model"] == "llama3.2:3b"
            assert await client.running_jobs() == {job_id}
            assert await client.poll() is None  # nothing else queued: 204
            await client.heartbeat(1, {"gpu_util": 0.9})
            receipt = await client.result(job_id, {"status": "ok", "output": "hello"},
                                          {"duration_ms": 1200, "units": 1.2,
                                           "unit_type": "gpu_seconds"})
            # Then the job is completed, with a signed receipt
            assert receipt is not None and receipt["units"] == 1.2 and receipt["signature"]
            assert await client.running_jobs() == set()

    asyncio.run(flow())
    view = status(core, job_id)
    assert view["status"] == "completed" and view["result"]["output"] == "hello"


def test_poll_without_body_is_422(core: ReferenceCoordinator) -> None:
    headers = {"X-Api-Key": MINER_KEY, "X-Miner-ID": "m"}
    with httpx.Client(base_url=core.base_url, headers=headers) as http:
        assert http.post("/v1/miners/poll").status_code == 422
        assert http.get("/health").json()["status"] == "ok"
        assert http.get("/v1/health").status_code == 404


def test_unregistered_miner_gets_not_registered(core: ReferenceCoordinator) -> None:
    async def flow() -> None:
        async with miner(core, "ghost") as client:
            with pytest.raises(NotRegistered):
                await client.heartbeat(0)  # 404
            with pytest.raises(NotRegistered):
                await client.poll()  # 500 on the real server: must not be retried
            assert client.stats.get("poll").attempts == 1
            await client.register(GPU_CAPS, 1)
            await client.heartbeat(0)
            assert await client.poll() is None

    asyncio.run(flow())


def test_result_on_canceled_job_flips_it_to_completed(core: ReferenceCoordinator) -> None:
    # This is why the agent must never post /result for a job that left its running list.
    job_id = submit(core)

    async def flow() -> None:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 1)
            assert (await client.poll()) is not None
            with httpx.Client(base_url=core.base_url,
                              headers={"X-Api-Key": "client-secret-key-456"}) as http:
                canceled = http.post(f"/v1/jobs/{job_id}/cancel").json()
            assert canceled["status"] == "canceled"
            assert await client.running_jobs() == set()  # the only cancel signal in core
            await client.result(job_id, {"status": "canceled"})
            await client.result(job_id, {"status": "canceled"})  # not idempotent

    asyncio.run(flow())
    view = status(core, job_id)
    assert view["status"] == "completed" and view["state"] == "COMPLETED"
    with httpx.Client(base_url=core.base_url,
                      headers={"X-Api-Key": "client-secret-key-456"}) as http:
        assert http.get(f"/v1/jobs/{job_id}/result").json()["receipts"] == 2


def test_fail_keeps_inflight_and_register_resets_it(core: ReferenceCoordinator) -> None:
    job_id = submit(core)
    submit(core)

    async def flow() -> None:
        async with miner(core) as client:
            await client.register(GPU_CAPS, concurrency=1)
            assert (await client.poll()) is not None
            await client.fail(job_id, "unsupported_job_type", "no runtime for 'command'")
            # The slot is still taken on the server until a heartbeat tells the truth
            assert await client.poll() is None
            await client.heartbeat(0)
            assert (await client.poll()) is not None
            assert await client.poll() is None
            await client.register(GPU_CAPS, concurrency=1)  # zeroes in-flight
            assert core.store.miner("miner-1")["inflight"] == 0  # type: ignore[index]

    asyncio.run(flow())
    view = status(core, job_id)
    assert view["status"] == "failed" and view["error"]["code"] == "unsupported_job_type"


def test_job_ttl_expires_and_is_never_requeued(core: ReferenceCoordinator) -> None:
    job_id = submit(core, ttl_s=0.3)

    async def flow() -> None:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 2)
            assert (await client.poll()) is not None
            await asyncio.sleep(0.4)
            assert await client.running_jobs() == set()
            assert await client.poll() is None

    asyncio.run(flow())
    view = status(core, job_id)
    assert view["state"] == "EXPIRED" and view["status"] == "failed"
    assert view["error"]["code"] == "expired"


def test_dispatch_matches_capabilities(core: ReferenceCoordinator) -> None:
    big = submit(core, constraints={"min_vram_mb": 80_000})
    other_model = submit(core, {"type": "inference", "prompt": "x", "model": "mistral:7b"})
    wrong_cuda = submit(core, constraints={"cuda": "11.8"})
    fits = submit(core, {"type": "inference", "prompt": "x", "model": "llama3.2:3b"},
                  {"min_vram_mb": 16_000, "cuda": "12"})

    async def flow() -> None:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 4)
            polled = await client.poll()
            assert polled is not None and polled.job_id == fits
            assert await client.poll() is None

    asyncio.run(flow())
    for job_id in (big, other_model, wrong_cuda):
        assert status(core, job_id)["status"] == "pending"


def test_bad_key_raises_auth_error_without_leaking_it(
        core: ReferenceCoordinator, caplog: pytest.LogCaptureFixture) -> None:
    async def flow() -> None:
        async with miner(core, api_key="wrong-key-789") as client:
            with pytest.raises(AuthError) as err:
                await client.register(GPU_CAPS, 1)
            assert err.value.code == "auth" and "api_key" in str(err.value)
            assert "wrong-key-789" not in str(err.value) + repr(client)
            assert client.stats.get("register").attempts == 1  # never retried
        async with miner(core, api_key="client-secret-key-456") as client:
            with pytest.raises(AuthError, match="403"):
                await client.heartbeat(0)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(flow())
    assert "wrong-key-789" not in caplog.text and MINER_KEY not in caplog.text


def test_a_401_reads_the_key_again_once_before_giving_up(
        core: ReferenceCoordinator, caplog: pytest.LogCaptureFixture) -> None:
    reads: list[str] = []

    def key_file(holds: str) -> Callable[[], str]:
        def read() -> str:
            reads.append(holds)
            return holds
        return read

    async def flow() -> None:
        # Given a miner whose key was rotated under it: the file holds the new one
        async with miner(core, api_key="old-key-111", key_source=key_file(MINER_KEY)) as client:
            # When a call is refused with 401, the key is read again and the call goes on
            await client.register(GPU_CAPS, 1)
            await client.heartbeat(0)  # and the new key stays in use
        assert reads == [MINER_KEY]
        # Given a file that still holds the refused key, the 401 stands after one read
        reads.clear()
        async with miner(core, api_key="old-key-111",
                         key_source=key_file("old-key-111")) as client:
            with pytest.raises(AuthError):
                await client.register(GPU_CAPS, 1)
        assert reads == ["old-key-111"]

    with caplog.at_level(logging.DEBUG):
        asyncio.run(flow())
    assert "holds a new key" in caplog.text and MINER_KEY not in caplog.text


def test_body_over_10_mib_is_413(core: ReferenceCoordinator) -> None:
    # The server answers 413 (it drains the body, so the client reads the answer) ...
    headers = {"X-Api-Key": MINER_KEY, "X-Miner-ID": "m", "Content-Type": "application/json"}
    with httpx.Client(base_url=core.base_url, headers=headers) as http:
        resp = http.post("/v1/miners/j/result", content=b"{" + b" " * (11 << 20) + b"}")
        assert resp.status_code == 413

    # ... and the client refuses such a body before sending it, instead of retrying.
    async def flow() -> None:
        async with miner(core) as client:
            with pytest.raises(BodyTooLarge, match="limit"):
                await client.result("j", {"output": "x" * (11 * 1024 * 1024)})
            assert client.stats.get("result").attempts == 0

    asyncio.run(flow())


def test_a_nan_in_a_body_goes_out_as_null(core: ReferenceCoordinator) -> None:
    # Given a result whose metrics hold NaN and infinities (JSON has neither; encoding
    # raised ValueError, which took the agent's outbox loop down, every try)
    job_id = submit(core, {"type": "sleep"})

    async def flow() -> None:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 1)
            assert (await client.poll()) is not None
            await client.result(job_id, {"output": "ok", "metrics": {"loss": float("nan")}},
                                {"duration_ms": 1.0, "tflops": float("inf"),
                                 "spread": [float("-inf"), 2.0]})

    asyncio.run(flow())
    # Then the coordinator took it, with null where the numbers were not numbers
    job = status(core, job_id)
    assert job["status"] == "completed"
    assert job["result"]["metrics"] == {"loss": None}


def test_keep_alive_requests_are_fast(core: ReferenceCoordinator) -> None:
    async def flow() -> float:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 1)
            started = time.monotonic()
            for _ in range(20):
                await client.heartbeat(0)
            return (time.monotonic() - started) / 20

    assert asyncio.run(flow()) < 0.04  # ~44 ms each without TCP_NODELAY
