"""The heartbeat loop: the true in-flight count, status, telemetry, lease renewals, cancels.

It runs on its own timer so job work never delays it, and beats at once when woken
(a job accepted, a slot freed, a report sent). With leases held it beats at least
every third of the shortest lease, so a short lease survives a long interval. The
status is the node's truth: ``ONLINE``, or ``DRAINING`` (the reason in the metadata)
while it takes no new work; the daemon's shutdown sends the last one, ``OFFLINE``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agent.clock import wait_event
from agent.coordinator.client import CoordinatorClient
from agent.coordinator.transport import NotRegistered
from agent.daemon.cancels import CancelInbox
from agent.daemon.held import HeldJobs
from agent.errors import CancelReason, CoordinatorError

log = logging.getLogger(__name__)


class HeartbeatLoop:
    """Beats every ``interval_s`` (or sooner, see :meth:`every_s`) until canceled."""

    def __init__(self, *, client: CoordinatorClient, held: HeldJobs, inbox: CancelInbox,
                 interval_s: float, capacity: int, metadata: Callable[[], dict[str, Any]],
                 status: Callable[[], str],
                 reregister: Callable[[str], Awaitable[None]],
                 on_free_slot: Callable[[], None],
                 owed_leases: Callable[[], dict[str, str]] | None = None) -> None:
        self.client = client
        self.held = held
        self.inbox = inbox
        self.interval_s = interval_s
        self.capacity = capacity
        self.metadata = metadata
        self.status = status
        self.reregister = reregister
        self.on_free_slot = on_free_slot
        # Leases of finished jobs whose reports still wait: renewed too, so a report slowed
        # by an outage does not let the lease lapse and the job run again.
        self.owed_leases = owed_leases
        self._now = asyncio.Event()

    def wake(self) -> None:
        """Beat now (the node's state just changed)."""
        self._now.set()

    async def run(self) -> None:
        while True:
            self._now.clear()
            await self.beat()
            await wait_event(self._now, self.every_s())

    async def beat(self) -> None:
        try:
            answer = await self.client.heartbeat(len(self.held), self.metadata(),
                                                 leases=self._leases() or None,
                                                 status=self.status(),
                                                 deadline_s=self.interval_s)
        except NotRegistered:
            await self.reregister("heartbeat 404")
            return
        except CoordinatorError as exc:
            log.warning("heartbeat failed: %s", exc)
            return
        if len(self.held) < self.capacity:
            self.on_free_slot()
        for job_id in answer.cancel:
            self.inbox.cancel(job_id, CancelReason.HEARTBEAT, force=job_id in answer.kill)
        for job_id in answer.lost:
            self.inbox.cancel(job_id, CancelReason.LEASE_LOST)

    def _leases(self) -> dict[str, str]:
        owed = self.owed_leases() if self.owed_leases is not None else {}
        return {**owed, **self.held.leases()}

    def every_s(self) -> float:
        """The configured interval, or a third of the shortest lease held, if shorter."""
        ttls = [a.lease_ttl_s for a in self.held if a.lease_ttl_s]
        return min([self.interval_s, *(t / 3 for t in ttls)])
