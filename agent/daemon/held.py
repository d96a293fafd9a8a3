"""The jobs this node holds now, one record each, and the signal that a slot freed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from agent.daemon.release import Release
from agent.daemon.scheduler import Assignment
from agent.errors import CancelReason
from agent.execution.executor import JobRun
from agent.jobs import Job


@dataclass
class Active:
    """A job this node holds now: from the poll that handed it over until its slot is free."""

    job_id: str
    lease_id: str | None
    lease_ttl_s: float | None = None
    job: Job | None = None
    run: JobRun | None = None
    assignment: Assignment | None = None
    cancel_reason: CancelReason | None = None
    dropped: bool = False  # the coordinator no longer wants a report of it (core)
    accepted_at: float = field(default_factory=time.time)  # when poll handed it over
    release: Release = field(default_factory=Release)  # how its GPUs came free

    def cancel(self, reason: CancelReason, dropped: bool) -> None:
        """Stop it (or keep it from starting); the first reason is the one recorded."""
        self.dropped = self.dropped or dropped
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.run is not None:
            self.run.cancel(reason)

    @property
    def gpu_count(self) -> int:
        return len(self.assignment.gpu_indices) if self.assignment else 0


class HeldJobs:
    """The held jobs by id; :meth:`release` frees a slot and wakes whoever waits for one."""

    def __init__(self) -> None:
        self._jobs: dict[str, Active] = {}
        self._slot_freed = asyncio.Event()
        # Called when a job with a lease comes in (the heartbeat renews leases in time).
        self.on_lease: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __iter__(self) -> Iterator[Active]:
        return iter(list(self._jobs.values()))

    def get(self, job_id: str) -> Active | None:
        return self._jobs.get(job_id)

    def add(self, active: Active) -> None:
        self._jobs[active.job_id] = active
        if active.lease_ttl_s and self.on_lease is not None:
            self.on_lease()

    def release(self, job_id: str) -> None:
        """Forget the job and say a slot is free."""
        self._jobs.pop(job_id, None)
        self._slot_freed.set()

    async def slot_freed(self) -> None:
        """Wait until the next :meth:`release`."""
        self._slot_freed.clear()
        await self._slot_freed.wait()

    def wake_slot_waiters(self) -> None:
        """Let whoever waits for a slot look again (a drain, a cancel of a waiting job)."""
        self._slot_freed.set()

    def leases(self) -> dict[str, str]:
        """job_id -> lease_id of every held job that has a lease."""
        return {a.job_id: a.lease_id for a in self._jobs.values() if a.lease_id}

    def running(self) -> list[Active]:
        """The held jobs whose process has been started."""
        return [a for a in self._jobs.values() if a.run is not None]
