"""The poll loop: ask for work while a slot is free, back off with jitter when idle.

An idle agent backs off up to ``poll_max_interval_s``, but polls at once when a
report or a heartbeat has just told the coordinator a slot is free (the core counts
in-flight jobs itself and answers 204 until it knows).

No answer stops the loop: one past a limit or malformed that names a valid job id is
handed on as a job with a ``problem`` (the flow fails it with ``invalid_job``); one that
names none is logged and skipped, and no call is ever made with its id.

Before each poll the free space on the state dir's filesystem is checked (one
``statvfs``): below ``min_free_disk_mb`` no job is taken, ``pause_reason()`` says why
(the heartbeat carries it), and the check runs again every few seconds until space
returns. Running jobs go on meanwhile.

While ``paused()`` says so (an operator's drain) no poll is made either, and the loop
stays up: :meth:`PollLoop.wake` after the drain ends polls at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.clock import wait_event
from agent.config import AgentConfig
from agent.coordinator.client import CoordinatorClient, PolledJob
from agent.coordinator.transport import BadAnswer, NotRegistered
from agent.daemon.held import HeldJobs
from agent.errors import CoordinatorError

log = logging.getLogger(__name__)
DISK_RECHECK_S = 5.0


def free_mb(path: Path) -> int | None:
    """Free MiB on the filesystem holding ``path`` (None where it cannot be read)."""
    try:
        return shutil.disk_usage(path).free >> 20
    except OSError:
        return None


class PollLoop:
    """Polls until ``draining()`` is true or ``on_empty()`` says stop."""

    def __init__(self, *, cfg: AgentConfig, client: CoordinatorClient, held: HeldJobs,
                 capacity: int, accept: Callable[[PolledJob], None],
                 reregister: Callable[[str], Awaitable[None]],
                 draining: Callable[[], bool], on_empty: Callable[[], bool],
                 resync: Callable[[], Awaitable[None]] | None = None,
                 on_pause: Callable[[], None] | None = None,
                 before_poll: Callable[[], Awaitable[None]] | None = None,
                 paused: Callable[[], bool] | None = None) -> None:
        self.cfg = cfg
        self.client = client
        self.held = held
        self.capacity = capacity
        self.accept = accept
        self.reregister = reregister
        self.draining = draining
        self.on_empty = on_empty
        self.resync = resync  # tell the coordinator our true in-flight count now
        self.on_pause = on_pause  # called when polling pauses or resumes
        self.before_poll = before_poll  # undelivered reports go before new work is asked
        self.paused = paused  # an operator's drain: no poll until it ends (and wakes us)
        self._paused: str | None = None
        self._now = asyncio.Event()

    def pause_reason(self) -> str | None:
        """Why no job is taken now (low disk), or None while polling."""
        return self._paused

    def _disk_low(self) -> bool:
        """Check the state dir's free space; log and tell ``on_pause`` on each change."""
        floor = self.cfg.min_free_disk_mb
        free = free_mb(self.cfg.state_dir) if floor else None
        was = self._paused
        if free is None or free >= floor:
            self._paused = None
            if was is not None:
                log.info("disk space is back (%s MiB free); taking jobs again", free)
        else:
            self._paused = f"low disk: {free} MiB free < min_free_disk_mb {floor}"
            if was is None:
                log.warning("not taking jobs: %s (state dir %s)", self._paused,
                            self.cfg.state_dir)
        if (was is None) != (self._paused is None) and self.on_pause is not None:
            self.on_pause()
        return self._paused is not None

    def _held_back(self) -> bool:
        """No poll now: the operator's drain, or too little disk (checked either way, so
        :meth:`pause_reason` stays true while drained)."""
        low = self._disk_low()
        return low or (self.paused is not None and self.paused())

    def wake(self) -> None:
        """Poll now instead of after the back-off (a slot just freed)."""
        self._now.set()

    async def run(self) -> None:
        interval = self.cfg.poll_interval_s
        while not self.draining():
            if self._held_back():
                await self._idle(min(DISK_RECHECK_S, self.cfg.poll_max_interval_s))
                continue
            if len(self.held) >= self.capacity:
                await self.held.slot_freed()
                continue
            if self.before_poll is not None:
                await self.before_poll()
            try:
                polled = await self.client.poll()
            except NotRegistered:
                await self.reregister("poll 500")
                continue
            except BadAnswer as exc:
                # It may have handed out a job, now RUNNING on the coordinator until it
                # expires; without a valid id there is nothing to report it with. More
                # work may wait, so this is not "no work", but it is paced like it.
                log.error("poll answer skipped (%s): %s", exc.problem.value, exc)
                if self.resync is not None:  # the coordinator counts it in our in-flight
                    await self.resync()
                await self._idle(self.cfg.poll_interval_s)
                continue
            except CoordinatorError as exc:
                log.warning("poll failed: %s", exc)
                polled = None
            if polled is not None:
                interval = self.cfg.poll_interval_s
                if polled.problem is not None:
                    log.error("job %s: refused, the poll answer is unusable: %s",
                              polled.job_id, polled.problem)
                self.accept(polled)
                continue
            if self.on_empty():
                return
            await self._idle(interval)
            interval = min(interval * 1.5, self.cfg.poll_max_interval_s)

    async def _idle(self, interval: float) -> None:
        jitter = self.cfg.poll_jitter
        self._now.clear()
        await wait_event(self._now, interval * random.uniform(1 - jitter, 1 + jitter))
