"""The core's cancel: a running job that left the coordinator's running list is stopped.

The core protocol has no cancel message; a canceled (or expired) job just leaves
``/v1/miners/{id}/jobs``. Checked every ``cancel_check_interval_s`` while a job runs.
"""

from __future__ import annotations

import asyncio
import logging

from agent.coordinator.client import CoordinatorClient
from agent.daemon.cancels import CancelInbox
from agent.daemon.held import HeldJobs
from agent.errors import CancelReason, CoordinatorError

log = logging.getLogger(__name__)


class CancelCheckLoop:
    """Compares the running jobs with the coordinator's list, every ``interval_s``."""

    def __init__(self, *, client: CoordinatorClient, held: HeldJobs, inbox: CancelInbox,
                 interval_s: float) -> None:
        self.client = client
        self.held = held
        self.inbox = inbox
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()

    async def check(self) -> None:
        running = [a.job_id for a in self.held.running()]
        if not running:
            return
        try:
            listed = await self.client.running_jobs()
        except CoordinatorError as exc:
            log.warning("running-jobs check failed: %s", exc)
            return
        for job_id in running:
            if job_id not in listed:
                self.inbox.cancel(job_id, CancelReason.DELISTED)
