"""The core's time helpers: one ISO spelling per use, and a timed wait that a cancel stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import agent
from agent.clock import iso, wait_event, within


def test_iso_spellings_of_packages_and_of_the_reference_wire() -> None:
    assert iso(None) is None
    assert iso(0.5) == "1970-01-01T00:00:00.500+00:00"
    assert iso(0.5, timespec="auto", zulu=True) == "1970-01-01T00:00:00.500000Z"
    assert iso(1.0, timespec="auto", zulu=True) == "1970-01-01T00:00:01Z"


def test_wait_event_says_whether_the_event_came() -> None:
    async def main() -> tuple[bool, bool]:
        event = asyncio.Event()
        missed = await wait_event(event, 0.01)
        asyncio.get_running_loop().call_later(0.01, event.set)
        return missed, await wait_event(event, 5)

    assert asyncio.run(main()) == (False, True)


def test_a_cancel_that_meets_the_event_stops_the_loop() -> None:
    # The daemon's loops wait on an event with a timeout, and shutdown cancels them. With
    # asyncio.wait_for on 3.11, a cancel in the same iteration as the event was swallowed:
    # the loop ran on and the agent never exited (seen in CI as a hung `--burst` run).
    async def main() -> None:
        event = asyncio.Event()

        async def loop() -> None:
            while True:
                await wait_event(event, 10)
                event.clear()

        task = asyncio.create_task(loop())
        await asyncio.sleep(0.01)
        event.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 2)

    asyncio.run(main())


def test_a_cancel_that_meets_a_finished_call_is_not_lost() -> None:
    # The sampler loop awaited an executor future under wait_for; when shutdown's one
    # cancel met the sample's completion, wait_for returned the sample and the loop went
    # on sampling forever (CI: `run --burst` stuck after "draining: 0 job(s)").
    async def main() -> None:
        loop = asyncio.get_running_loop()
        samples: list[asyncio.Future[int]] = []

        async def sampler() -> None:
            while True:
                samples.append(loop.create_future())
                await within(asyncio.shield(samples[-1]), 10)
                await asyncio.sleep(0.01)

        task = asyncio.create_task(sampler())
        await asyncio.sleep(0.001)
        samples[-1].set_result(1)  # the sample arrives ...
        await asyncio.sleep(0)  # ... the shield passes it on ...
        task.cancel()  # ... and shutdown's cancel lands in that same iteration
        with pytest.raises(asyncio.CancelledError):
            await within(asyncio.shield(task), 2)

    asyncio.run(main())


def test_wait_for_never_comes_back_into_the_agent() -> None:
    # Every timed await in the agent goes through clock.within / clock.wait_event.
    root = Path(agent.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "clock.py" and "asyncio.wait_for(" in p.read_text()]
    assert offenders == []
