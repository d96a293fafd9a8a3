"""The shipping loop: each running job's new log bytes and latest progress, on a tick.

Only where the coordinator offers the ``logs`` or ``progress`` extension; the log
files on disk are the buffer, so a slow coordinator never slows a job. A progress
answer may carry a cancel, which goes to the inbox like every other.

The loop waits ``interval_s`` only when every job's logs are caught up. A job logging
flat out is shipped as fast as the coordinator takes chunks: a tick that used its whole
time budget is followed by the next at once, and one that found a chunk or more of new
log looks again after :data:`~agent.daemon.shippers.BUSY_WAIT_S`. Jobs ship side by side,
so one chatty job does not hold back another's logs; progress goes first each tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from agent.daemon.cancels import CancelInbox
from agent.daemon.held import HeldJobs
from agent.daemon.session import Session
from agent.daemon.shippers import BUSY_WAIT_S, Shipped
from agent.errors import CancelReason


class ShipLoop:
    """Ships every ``interval_s`` for each held job whose process has started, sooner
    while a job's logs are behind."""

    def __init__(self, *, held: HeldJobs, inbox: CancelInbox,
                 session: Callable[[], Session], interval_s: float) -> None:
        self.held = held
        self.inbox = inbox
        self.session = session
        self.interval_s = interval_s

    async def run(self) -> None:
        wait_s = self.interval_s
        while True:
            await asyncio.sleep(wait_s)
            wait_s = self._next_wait(await self.ship_once())

    async def ship_once(self) -> list[Shipped]:
        """One tick: progress, then every running job's logs for up to ``interval_s``."""
        session = self.session()
        running = list(self.held.running())
        for active in running:
            assert active.run is not None
            if session.progress is not None and await session.progress.maybe_send(
                    active.job_id, active.lease_id, active.run.progress):
                self.inbox.cancel(active.job_id, CancelReason.PROGRESS)
        if session.shipper is None:
            return []
        shipper = session.shipper
        return list(await asyncio.gather(*(
            shipper.ship_for(active.job_id, active.run.folder, self.interval_s)
            for active in running if active.run is not None)))

    def _next_wait(self, shipped: list[Shipped]) -> float:
        if Shipped.BEHIND in shipped:
            return 0.0
        if Shipped.BUSY in shipped:
            return min(BUSY_WAIT_S, self.interval_s)
        return self.interval_s
