"""The core's cancel: a running job that left the coordinator's running list is stopped.

The core protocol has no cancel message; a canceled (or expired) job just leaves
``/v1/miners/{id}/jobs``. Checked every ``cancel_check_interval_s`` while a job runs.

The same list also guards a core report (see :mod:`agent.daemon.outbox`): a ``/result``
for a job no longer listed would flip it back to COMPLETED. One :class:`RunningList`
serves both: a look asked for "after moment T" is answered by any fetch sent at or after
T, the cancel check's included, and concurrent looks share one call.
"""

from __future__ import annotations

import asyncio
import logging
import time

from agent.coordinator.client import CoordinatorClient
from agent.daemon.cancels import CancelInbox
from agent.daemon.held import HeldJobs
from agent.errors import CancelReason, CoordinatorError

log = logging.getLogger(__name__)


class RunningList:
    """The coordinator's running list for this miner, fetched once for every look that a
    fetch sent after a given moment answers."""

    def __init__(self, client: CoordinatorClient) -> None:
        self.client = client
        self._latest: tuple[float, frozenset[str]] | None = None  # (sent at, ids)
        self._fetch: tuple[float, asyncio.Task[frozenset[str]]] | None = None
        self.fetches = 0  # calls made (tests and benchmarks count them)

    async def since(self, moment: float, deadline_s: float | None = None) -> frozenset[str]:
        """The job ids listed by a fetch sent at or after ``moment`` (``time.monotonic()``):
        the latest such answer, one in flight, or a new fetch. Raises CoordinatorError."""
        if self._latest is not None and self._latest[0] >= moment:
            return self._latest[1]
        if self._fetch is None or self._fetch[0] < moment:
            sent = time.monotonic()  # before the request goes out: never later than it
            task = asyncio.create_task(self._get(sent, deadline_s))
            task.add_done_callback(_retrieved)  # its error is each waiter's, or no one's
            self._fetch = (sent, task)
        # Shielded: one caller canceled (a report's try deadline) leaves the others' look.
        return await asyncio.shield(self._fetch[1])

    async def _get(self, sent: float, deadline_s: float | None) -> frozenset[str]:
        self.fetches += 1
        try:
            if deadline_s is None:
                ids = frozenset(await self.client.running_jobs())
            else:
                ids = frozenset(await self.client.running_jobs(deadline_s=deadline_s))
        finally:
            if self._fetch is not None and self._fetch[0] == sent:
                self._fetch = None
        if self._latest is None or self._latest[0] < sent:
            self._latest = (sent, ids)
        return ids


def _retrieved(task: asyncio.Task[frozenset[str]]) -> None:
    if not task.cancelled():
        task.exception()


class CancelCheckLoop:
    """Compares the running jobs with the coordinator's list, every ``interval_s``."""

    def __init__(self, *, client: CoordinatorClient, held: HeldJobs, inbox: CancelInbox,
                 interval_s: float, running: RunningList | None = None) -> None:
        self.client = client
        self.held = held
        self.inbox = inbox
        self.interval_s = interval_s
        # Shared with the outbox: a list this loop fetches also covers pending reports.
        self.running = running or RunningList(client)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()

    async def check(self) -> None:
        running = [a.job_id for a in self.held.running()]
        if not running:
            return
        try:
            # Every job counted here was handed over before now, so the list has it
            # unless the coordinator let go of it.
            listed = await self.running.since(time.monotonic())
        except CoordinatorError as exc:
            log.warning("running-jobs check failed: %s", exc)
            return
        for job_id in running:
            if job_id not in listed:
                self.inbox.cancel(job_id, CancelReason.DELISTED)
