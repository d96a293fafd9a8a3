"""The shipping loop: each running job's new log bytes and latest progress, on a tick.

Only where the coordinator offers the ``logs`` or ``progress`` extension; the log
files on disk are the buffer, so a slow coordinator never slows a job. A progress
answer may carry a cancel, which goes to the inbox like every other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from agent.daemon.cancels import CancelInbox
from agent.daemon.held import HeldJobs
from agent.daemon.session import Session
from agent.errors import CancelReason


class ShipLoop:
    """Ships every ``interval_s`` for each held job whose process has started."""

    def __init__(self, *, held: HeldJobs, inbox: CancelInbox,
                 session: Callable[[], Session], interval_s: float) -> None:
        self.held = held
        self.inbox = inbox
        self.session = session
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.ship_once()

    async def ship_once(self) -> None:
        session = self.session()
        for active in self.held.running():
            assert active.run is not None
            if session.shipper is not None:
                await session.shipper.ship(active.job_id, active.run.folder)
            if session.progress is not None and await session.progress.maybe_send(
                    active.job_id, active.lease_id, active.run.progress):
                self.inbox.cancel(active.job_id, CancelReason.PROGRESS)
