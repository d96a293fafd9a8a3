"""Time helpers: the one ISO-8601 formatter (every timestamp is UTC), a timed wait and
a pace (a token bucket) for work a stranger can make arrive faster than it should."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def iso(ts: float | None, *, timespec: str = "milliseconds", zulu: bool = False) -> str | None:
    """``ts`` (seconds since the epoch) as UTC ISO-8601, or None for None.

    Packages write milliseconds and ``+00:00`` (the default); the reference coordinator's
    wire format is Python's ``auto`` precision with a ``Z`` (``timespec="auto", zulu=True``).
    """
    if ts is None:
        return None
    text = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec=timespec)
    return text.replace("+00:00", "Z") if zulu else text


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passes; True when it was set.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancel that arrives in the
    same loop iteration as the event (the task then runs on, and a shutdown that
    cancels and gathers the daemon's loops waits forever). ``asyncio.timeout`` does not.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


async def within(aw: Awaitable[T], timeout_s: float) -> T:
    """``await aw``, raising TimeoutError past ``timeout_s``: the daemon's ``wait_for``.

    ``asyncio.wait_for`` on Python 3.11 returns the result when the awaited thing
    finishes in the same loop iteration as a cancel of the waiting task, so the cancel is
    lost and the task runs on (this held a stopping agent up forever: its sampler loop
    ignored the shutdown's one cancel). ``asyncio.timeout`` re-raises the cancel.
    """
    async with asyncio.timeout(timeout_s):
        return await aw


class Pace:
    """At most ``rate`` units a second on average, ``burst`` at once (a token bucket)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def take(self, cost: float) -> float:
        """Spend ``cost`` units; the seconds to wait before the next spend (0: none)."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - cost
        self._at = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
