"""The reference coordinator's ``longpoll`` extension, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from agent.reference import miner_api
from agent.reference.coordinator import ReferenceCoordinator
from agent.reference.model import EXTENSIONS
from tests.agent.coordinator.conftest import GPU_CAPS, MINER_KEY, miner, status, submit

LONGPOLL = {**GPU_CAPS, "extensions": ["longpoll"]}


def raw_miner(coord: ReferenceCoordinator, miner_id: str = "miner-1",
              read_s: float = 10.0) -> httpx.Client:
    return httpx.Client(base_url=coord.base_url, timeout=httpx.Timeout(5.0, read=read_s),
                        headers={"X-Api-Key": MINER_KEY, "X-Miner-ID": miner_id})


def test_a_held_poll_answers_when_a_job_comes_and_204_when_none_does(
        coordinator: ReferenceCoordinator) -> None:
    async def flow() -> None:
        async with miner(coordinator) as client:
            answer = await client.register(GPU_CAPS, 1)
            assert answer.capabilities.longpoll
            # Given nothing queued, an empty held poll answers 204 once its wait is over
            began = time.monotonic()
            assert await client.poll(max_wait_s=0.5) is None
            assert time.monotonic() - began >= 0.45
            # When a job is submitted while a poll is held
            held = asyncio.create_task(client.poll(max_wait_s=20))
            await asyncio.sleep(0.3)
            assert not held.done()
            job_id = await asyncio.to_thread(submit, coordinator)
            # Then that poll hands it over, long before its wait is over
            polled = await asyncio.wait_for(held, 10)
            assert polled is not None and polled.job_id == job_id

    asyncio.run(flow())


def test_a_full_miner_is_held_until_a_lapsed_lease_frees_work(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    coord = make_coordinator(lease_ttl_s=0.5)

    async def flow() -> None:
        async with miner(coord, "a") as first, miner(coord, "b") as second:
            await first.register(GPU_CAPS, 1)
            await second.register(GPU_CAPS, 1)
            job_id = await asyncio.to_thread(submit, coord)
            taken = await first.poll()
            assert taken is not None and taken.lease_id is not None
            # Given a, full, holds a poll, and b holds one: no request comes
            held_a = asyncio.create_task(first.poll(max_wait_s=20))
            held_b = asyncio.create_task(second.poll(max_wait_s=20))
            # When a's lease lapses (a never renews it), the job is requeued by the timer
            done, _ = await asyncio.wait({held_a, held_b}, timeout=10,
                                         return_when=asyncio.FIRST_COMPLETED)
            # Then b, which has a free slot, gets it; a stays held (it is full)
            assert done == {held_b}
            polled = held_b.result()
            assert polled is not None and polled.job_id == job_id
            assert not held_a.done()
            held_a.cancel()

    asyncio.run(flow())


def test_a_poller_that_has_gone_is_handed_nothing(coordinator: ReferenceCoordinator) -> None:
    with raw_miner(coordinator, read_s=0.3) as http:
        assert http.post("/v1/miners/register", json={"capabilities": LONGPOLL,
                                                      "concurrency": 1}).status_code == 200
        # Given a held poll whose client gives up (its read timeout closes the connection)
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/miners/poll", json={"max_wait_seconds": 20})
    time.sleep(0.2)
    # When a job comes while the server still holds that poll
    job_id = submit(coordinator)
    time.sleep(0.5)
    # Then it stays queued: the gone poller got nothing
    assert status(coordinator, job_id)["status"] == "pending"


@pytest.mark.parametrize("wait", ["20", -1, True, [5], {"s": 1}, "NaN", "Infinity", "1e999"])
def test_a_hostile_wait_is_refused_and_a_huge_one_capped(
        coordinator: ReferenceCoordinator, monkeypatch: pytest.MonkeyPatch,
        wait: object) -> None:
    with raw_miner(coordinator) as http:
        http.post("/v1/miners/register", json={"capabilities": LONGPOLL, "concurrency": 1})
        # JSON's non-numbers (NaN, Infinity, 1e999) are written into the body as they are
        body = f'{{"max_wait_seconds": {wait}}}'.encode() if wait in (
            "NaN", "Infinity", "1e999") else None
        resp = http.post("/v1/miners/poll", content=body, json=None if body else
                         {"max_wait_seconds": wait}, headers={"Content-Type":
                                                              "application/json"})
        assert resp.status_code == 422, resp.text
        assert "max_wait_seconds" in resp.json()["detail"]
        # and a huge wait is held no longer than the server's cap
        monkeypatch.setattr(miner_api, "MAX_POLL_WAIT_S", 0.3)
        began = time.monotonic()
        assert http.post("/v1/miners/poll", json={"max_wait_seconds": 1e300}).status_code == 204
        assert time.monotonic() - began < 10


def test_without_the_extension_the_wait_is_ignored(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    offers = make_coordinator(extensions=[e for e in EXTENSIONS if e != "longpoll"])
    full = make_coordinator()
    for coord, caps in ((offers, LONGPOLL), (full, GPU_CAPS)):  # not offered; not declared
        with raw_miner(coord) as http:
            answer = http.post("/v1/miners/register", json={"capabilities": caps,
                                                            "concurrency": 1}).json()
            assert ("longpoll" in answer["extensions"]) == (coord is full)
            began = time.monotonic()
            # A core poll answers at once, whatever it asks (even a wait it would refuse)
            for wait in (20, "soon"):
                resp = http.post("/v1/miners/poll", json={"max_wait_seconds": wait})
                assert resp.status_code == 204
            assert time.monotonic() - began < 10
