"""Retries against real injected faults: 429, 5xx storms, resets, a coordinator down."""

from __future__ import annotations

import asyncio
import email.utils
import random
import threading
import time
from collections.abc import Callable

import pytest

from agent.coordinator.retry import RetryPolicy, parse_retry_after
from agent.coordinator.transport import AmbiguousSend, CoordinatorUnavailable, RetriesStopped
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.coordinator.conftest import GPU_CAPS, client_http, miner


def test_backoff_is_full_jitter_under_a_cap() -> None:
    policy = RetryPolicy(base_s=0.1, cap_s=1.0)
    rng = random.Random(7)
    samples = [policy.backoff_s(attempt, rng) for attempt in range(40) for _ in range(20)]
    assert all(0.0 <= s <= 1.0 for s in samples)
    assert max(policy.backoff_s(0, rng) for _ in range(200)) <= 0.1
    assert max(policy.backoff_s(100, rng) for _ in range(200)) > 0.5  # grows up to the cap


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = time.time()
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert 8.0 <= (parse_retry_after(date, now=now) or 0) <= 11.0
    past = email.utils.formatdate(now - 100, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("99999") == 300.0


def test_429_honours_retry_after(core: ReferenceCoordinator) -> None:
    async def flow() -> float:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 1)
            core.faults.rate_limit(retry_after_s=1, count=1, paths=("/v1/miners/heartbeat",))
            started = time.monotonic()
            await client.heartbeat(0, deadline_s=5)
            stats = client.stats.get("heartbeat")
            assert stats.attempts == 2 and stats.errors == {"http_429": 1}
            return time.monotonic() - started

    waited = asyncio.run(flow())
    assert 0.95 <= waited < 1.8  # the backoff alone would have been ~10 ms


def test_429_past_the_deadline_gives_up_at_once(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    coord = make_coordinator(extensions=(), rate_limits={"heartbeat": 2})

    async def flow() -> None:
        async with miner(coord) as client:
            await client.register(GPU_CAPS, 1)
            await client.heartbeat(0)
            await client.heartbeat(0)
            started = time.monotonic()
            with pytest.raises(CoordinatorUnavailable) as err:
                await client.heartbeat(0, deadline_s=2)  # Retry-After ~60 s > deadline
            assert err.value.last_error == "http_429"
            assert time.monotonic() - started < 0.5

    asyncio.run(flow())


def test_5xx_storm_then_success_with_capped_backoff(core: ReferenceCoordinator) -> None:
    # Given 20 answers of 503 in a row on poll
    core.faults.set(status=503, count=20, paths=("/v1/miners/poll",))

    async def flow() -> float:
        async with miner(core, policy=RetryPolicy(base_s=0.005, cap_s=0.03)) as client:
            await client.register(GPU_CAPS, 1)
            started = time.monotonic()
            assert await client.poll(deadline_s=10) is None
            stats = client.stats.get("poll")
            assert stats.attempts == 21 and stats.errors == {"http_503": 20}
            assert stats.retries == 20 and stats.ok == 1
            return time.monotonic() - started

    elapsed = asyncio.run(flow())
    assert elapsed < 20 * 0.03 + 1.0  # the cap bounds every wait


def test_5xx_until_the_deadline_raises_unavailable(core: ReferenceCoordinator) -> None:
    core.faults.set(status=502, count=1000)

    async def flow() -> None:
        async with miner(core) as client:
            started = time.monotonic()
            with pytest.raises(CoordinatorUnavailable, match="deadline"):
                await client.heartbeat(0, deadline_s=0.5)
            assert time.monotonic() - started < 1.0

    asyncio.run(flow())


def test_connection_resets_are_retried(core: ReferenceCoordinator) -> None:
    async def flow() -> None:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 1)
            core.faults.reset(count=3, paths=("/v1/miners/heartbeat",))
            await client.heartbeat(0, deadline_s=5)
            stats = client.stats.get("heartbeat")
            assert stats.attempts == 4 and stats.errors.get("reset", 0) >= 1

    asyncio.run(flow())


def test_coordinator_down_then_up_within_the_deadline(core: ReferenceCoordinator) -> None:
    async def flow() -> float:
        async with miner(core, policy=RetryPolicy(base_s=0.02, cap_s=0.1)) as client:
            await client.register(GPU_CAPS, 1)
            await client.heartbeat(0)  # a keep-alive connection is now pooled
            core.faults.down()
            threading.Timer(0.6, core.faults.up).start()
            started = time.monotonic()
            await client.heartbeat(0, deadline_s=5)
            assert client.stats.get("heartbeat").errors.get("connect", 0) >= 1
            return time.monotonic() - started

    assert 0.5 <= asyncio.run(flow()) < 3.0


def test_stop_retrying_aborts_a_forever_retrying_result(core: ReferenceCoordinator) -> None:
    core.faults.set(status=503, count=10_000, paths=("/v1/miners/",))

    async def flow() -> None:
        async with miner(core, policy=RetryPolicy(base_s=0.05, cap_s=0.2)) as client:
            task = asyncio.create_task(client.result("job-1", {"status": "ok"}))
            await asyncio.sleep(0.3)
            assert not task.done()  # no deadline: still retrying
            client.stop_retrying()
            with pytest.raises(RetriesStopped):
                await asyncio.wait_for(task, 2)

    asyncio.run(flow())


def test_read_timeout_is_retried(core: ReferenceCoordinator) -> None:
    core.faults.set(status=None, delay_s=0.6, count=1, paths=("/v1/miners/heartbeat",))

    async def flow() -> None:
        async with miner(core, read_timeout_s=0.2) as client:
            await client.register(GPU_CAPS, 1)
            await client.heartbeat(0, deadline_s=5)
            assert client.stats.get("heartbeat").errors == {"timeout": 1}

    asyncio.run(flow())


def test_a_send_that_may_have_arrived_is_not_repeated_blindly(
        core: ReferenceCoordinator) -> None:
    # A core /result is not idempotent: a reset after the request went out must reach
    # the caller (who looks at the running list), not be sent again by the transport.
    path = "/v1/miners/job-1/result"
    core.faults.reset(count=1, paths=(path,))

    async def flow() -> None:
        async with miner(core) as client:
            with pytest.raises(AmbiguousSend):
                await client.result("job-1", {"status": "ok"}, deadline_s=5,
                                    retry_ambiguous=False)
            assert core.faults.arrived(path) == 1

    asyncio.run(flow())


def test_a_refused_connection_is_retried_even_for_a_guarded_send(
        core: ReferenceCoordinator) -> None:
    # Nothing went out while connects are refused: retrying is safe, and done.
    with client_http(core) as http:
        job_id = http.post("/v1/jobs", json={"payload": {"type": "sleep"}}).json()["job_id"]

    async def flow() -> None:
        async with miner(core, policy=RetryPolicy(base_s=0.02, cap_s=0.1)) as client:
            await client.register(GPU_CAPS, 1)
            polled = await client.poll()
            assert polled is not None and polled.job_id == job_id
            core.faults.down()
            threading.Timer(0.5, core.faults.up).start()
            await client.fail(job_id, "runtime_error", deadline_s=5, retry_ambiguous=False)
            assert client.stats.get("fail").errors.get("connect", 0) >= 1

    asyncio.run(flow())
    with client_http(core) as http:
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "failed"
