"""The heartbeat loop: the true in-flight count, status, telemetry, lease renewals, cancels.

It runs on its own timer so job work never delays it. Jobs coming and going do not
wake it: the coordinator counts a job in flight when it hands it over and frees the
slot at its ``/result``. It beats at once only for what it alone can say: a report that
ended without a ``/result`` (a ``/fail``, a drop), a job dropped unreported, a drain or
pause, a registration. With leases held it beats at least every third of the shortest
lease, so a short lease survives a long interval. The
status is the node's truth: ``ONLINE``, or ``DRAINING`` (the reason in the metadata)
while it takes no new work; the daemon's shutdown sends the last one, ``OFFLINE``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent.clock import wait_event
from agent.coordinator.client import CoordinatorClient
from agent.coordinator.transport import NotRegistered
from agent.daemon.cancels import CancelInbox
from agent.daemon.held import HeldJobs
from agent.errors import CancelReason, CoordinatorError

log = logging.getLogger(__name__)

MIN_LEASE_BEAT_S = 0.25  # the shortest wait between beats that a lease can ask for


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
        self._beat_asked = False
        self._replanned = asyncio.Event()  # a lease came in (see _beat_once)
        self._carried: dict[str, str] = {}  # the leases the latest beat left with
        held.on_lease = self.replan  # a job with a short lease shortens the wait at once

    def wake(self) -> None:
        """Beat now (the node's state just changed)."""
        self._beat_asked = True
        self._now.set()

    def replan(self) -> None:
        """Work out the wait again (a lease came in), beating only if it is already due."""
        self._now.set()
        self._replanned.set()

    async def run(self) -> None:
        while True:
            self._beat_asked = False  # a wake during the beat asks for the next one
            await self._beat_once()
            beaten = time.monotonic()
            while not self._beat_asked:
                left = beaten + self.every_s() - time.monotonic()
                if left <= 0:
                    break
                self._now.clear()
                await wait_event(self._now, left)

    async def _beat_once(self) -> None:
        """One beat; started over if it outlasts the shortest lease held's third.

        A beat that left with no lease may wait out a long retry (a ``Retry-After``, an
        outage) with the leases it left with; a lease that comes in meanwhile would be
        renewed only once it gave up. Past a third of that lease it is started over,
        carrying the leases held now (its own retries end in time, see :meth:`beat`).
        """
        while True:
            started = time.monotonic()
            beat = asyncio.ensure_future(self.beat())
            try:
                while True:
                    self._replanned.clear()
                    left = started + self.every_s() - time.monotonic()
                    if left <= 0:
                        if self._leases().keys() - self._carried.keys():
                            break  # a lease it does not carry would wait on it
                        left = self.every_s()  # nothing new: it ends by its own deadline
                    replanned = asyncio.ensure_future(self._replanned.wait())
                    try:
                        await asyncio.wait({beat, replanned}, timeout=left,
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        replanned.cancel()
                    if beat.done():
                        beat.result()
                        return
            finally:
                if not beat.done():
                    beat.cancel()
            log.info("heartbeat: started over to carry a lease that came in meanwhile")

    async def beat(self) -> None:
        sent = self._carried = self._leases()
        try:
            # Its retries end in time for the shortest lease held (a third of it): a
            # failed beat is followed by a fresh one, with the leases held by then.
            answer = await self.client.heartbeat(len(self.held), self.metadata(),
                                                 leases=sent or None,
                                                 status=self.status(),
                                                 deadline_s=self.every_s())
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
            # Only the attempt whose lease this beat sent: a beat that left before the
            # job was handed out again must not stop the new attempt.
            active = self.held.get(job_id)
            if active is not None and active.lease_id == sent.get(job_id):
                self.inbox.cancel(job_id, CancelReason.LEASE_LOST)

    def _leases(self) -> dict[str, str]:
        owed = self.owed_leases() if self.owed_leases is not None else {}
        return {**owed, **self.held.leases()}

    def every_s(self) -> float:
        """The configured interval, or a third of the shortest lease held, if shorter.

        Never under ``MIN_LEASE_BEAT_S`` for a lease: a coordinator that hands out a
        lease of a millisecond would otherwise get beats as fast as the loop can send.
        """
        ttls = [a.lease_ttl_s for a in self.held if a.lease_ttl_s]
        return min([self.interval_s, *(max(t / 3, MIN_LEASE_BEAT_S) for t in ttls)])
