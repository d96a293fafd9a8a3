"""The core's time helpers: one ISO spelling per use, and a timed wait that a cancel stops."""

from __future__ import annotations

import asyncio

import pytest

from agent.clock import iso, wait_event


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
