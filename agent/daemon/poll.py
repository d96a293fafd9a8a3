"""The poll loop: ask for work while a slot is free, back off with jitter when idle.

Where the coordinator offers ``longpoll`` (and the operator's ``extensions`` allow it)
each poll asks it to hold an empty answer up to ``poll_wait_s``: the job comes the
moment it is submitted, and the next poll goes out as soon as an empty one comes back
(one that came back sooner than ``poll_interval_s`` is paced like a core one). A drain,
a stop or an operator's pause abandons a held poll at once (its connection closes, so
the coordinator hands it nothing). Burst runs never hold a poll: they stop on the first
empty answer.

Against a core coordinator an idle agent backs off from ``poll_interval_s`` up to
``poll_max_interval_s`` (3 s by default), and starts again from ``poll_interval_s``
the moment a job comes or a slot frees: it polls at once when a report or a heartbeat
has just told the coordinator a slot is free (the core counts in-flight jobs itself
and answers 204 until it knows). A full node never polls, held or not.

No answer stops the loop: one past a limit or malformed that names a valid job id is
handed on as a job with a ``problem`` (the flow fails it with ``invalid_job``); one that
names none is logged and skipped, and no call is ever made with its id.

Before each poll the free space on the state dir's filesystem is checked (one
``statvfs``): below ``min_free_disk_mb``, or with fewer than 1 % of its inodes free, no
job is taken, ``pause_reason()`` says why
(the heartbeat carries it), and the check runs again every few seconds until space
returns. Running jobs go on meanwhile.

While ``paused()`` says so (an operator's drain) no poll is made either, and the loop
stays up: :meth:`PollLoop.wake` after the drain ends polls at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable

from agent.clock import wait_event
from agent.config import AgentConfig
from agent.coordinator.client import CoordinatorClient, PolledJob
from agent.coordinator.transport import BadAnswer, NotRegistered
from agent.daemon.held import HeldJobs
from agent.errors import CoordinatorError
from agent.node.disk import low_disk

log = logging.getLogger(__name__)
DISK_RECHECK_S = 5.0
RELEASE_WAIT_S = 5.0  # a held poll goes in one loop turn; this bounds a wait on a bug


class _Next(enum.Enum):
    """What to do after a poll that handed over no job."""

    AGAIN = "again"  # poll again now: abandoned, registered again, or already paced
    HELD = "held"  # an empty long-poll the coordinator held: its wait paced it
    IDLE = "idle"  # empty (or failed): back off


class _Abandoned(Exception):
    """Raised when a drain, a stop or a pause ends a held poll before its answer."""


class PollLoop:
    """Polls until ``draining()`` is true or ``on_empty()`` says stop."""

    def __init__(self, *, cfg: AgentConfig, client: CoordinatorClient, held: HeldJobs,
                 capacity: int, accept: Callable[[PolledJob], None],
                 reregister: Callable[[str], Awaitable[None]],
                 draining: Callable[[], bool], on_empty: Callable[[], bool],
                 resync: Callable[[], Awaitable[None]] | None = None,
                 on_pause: Callable[[], None] | None = None,
                 before_poll: Callable[[], Awaitable[None]] | None = None,
                 paused: Callable[[], bool] | None = None,
                 longpoll: Callable[[], bool] | None = None) -> None:
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
        self.longpoll = longpoll  # may a poll be held now (the coordinator offers it)?
        self._paused: str | None = None
        self._now = asyncio.Event()
        self._abandon = asyncio.Event()
        self._no_held = asyncio.Event()  # no held poll in flight
        self._no_held.set()

    def pause_reason(self) -> str | None:
        """Why no job is taken now (low disk), or None while polling."""
        return self._paused

    def _disk_low(self) -> bool:
        """Check the state dir's free space and inodes; log and tell ``on_pause`` on each
        change."""
        floor = self.cfg.min_free_disk_mb
        why = low_disk(self.cfg.state_dir, floor) if floor else None
        was = self._paused
        if why is None:
            self._paused = None
            if was is not None:
                log.info("disk space is back; taking jobs again")
        else:
            self._paused = why
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
        """Poll now instead of after the back-off (a slot freed, a heartbeat told the
        coordinator so, a drain ended); while draining or paused, abandon a held poll."""
        self._now.set()
        if self._stop_asked():
            self._abandon.set()

    async def released(self, timeout_s: float = RELEASE_WAIT_S) -> bool:
        """Until no held poll is in flight: after a drain, a stop or a pause has woken
        the loop, its connection is closed when this returns (True; False past
        ``timeout_s``). Whoever says "no new work" waits for it first: a job submitted
        after that goes to no poll of ours (docs/protocol-extensions.md, "longpoll")."""
        # (the transport's close, scheduled as the poll was canceled, runs before the
        # wake-up of this wait: tests/agent/daemon/test_poll.py checks it on both loops)
        return await wait_event(self._no_held, timeout_s)

    def _stop_asked(self) -> bool:
        return self.draining() or (self.paused is not None and self.paused())

    async def run(self) -> None:
        interval = self.cfg.poll_interval_s
        while not self.draining():
            if self._held_back():
                self._now.clear()
                await self._idle(min(DISK_RECHECK_S, self.cfg.poll_max_interval_s))
                continue
            if len(self.held) >= self.capacity:
                await self.held.slot_freed()
                interval = self.cfg.poll_interval_s
                continue
            if self.before_poll is not None:
                await self.before_poll()
            held_then = len(self.held)
            polled = await self._poll()
            if isinstance(polled, PolledJob):
                interval = self.cfg.poll_interval_s
                self.accept(polled)
                continue
            if polled is _Next.AGAIN:
                continue
            if self.on_empty():
                return
            if polled is _Next.HELD:
                continue
            # Woken early by a heartbeat, the back-off goes on growing; by a slot that
            # freed since the poll, it starts again from poll_interval_s.
            await self._idle(interval)
            if len(self.held) < held_then:
                interval = self.cfg.poll_interval_s
            else:
                interval = min(interval * 1.5, self.cfg.poll_max_interval_s)

    async def _poll(self) -> PolledJob | _Next:
        """One poll (held where the coordinator offers it); the job, or what to do next."""
        wait_s = self.cfg.poll_wait_s if self.longpoll is not None and self.longpoll() else 0.0
        self._now.clear()  # a slot that frees from here on ends the next back-off early
        asked = time.monotonic()
        try:
            polled = await (self._held_poll(wait_s) if wait_s > 0 else self.client.poll())
        except _Abandoned:
            return _Next.AGAIN
        except NotRegistered:
            await self.reregister("poll 500")
            return _Next.AGAIN
        except BadAnswer as exc:
            # It may have handed out a job, now RUNNING on the coordinator until it
            # expires; without a valid id there is nothing to report it with. More
            # work may wait, so this is not "no work", but it is paced like it.
            log.error("poll answer skipped (%s): %s", exc.problem.value, exc)
            if self.resync is not None:  # the coordinator counts it in our in-flight
                await self.resync()
            await self._idle(self.cfg.poll_interval_s)
            return _Next.AGAIN
        except CoordinatorError as exc:
            log.warning("poll failed: %s", exc)
            return _Next.IDLE
        if polled is None:
            held = wait_s > 0 and time.monotonic() - asked >= min(wait_s,
                                                                  self.cfg.poll_interval_s)
            return _Next.HELD if held else _Next.IDLE
        if polled.problem is not None:
            log.error("job %s: refused, the poll answer is unusable: %s", polled.job_id,
                      polled.problem)
        return polled

    async def _held_poll(self, wait_s: float) -> PolledJob | None:
        """A long-poll that :meth:`wake` abandons at once while draining or paused."""
        self._abandon.clear()
        if self._stop_asked():  # it came while before_poll ran
            raise _Abandoned
        call = asyncio.ensure_future(self.client.poll(max_wait_s=wait_s))
        abandon = asyncio.ensure_future(self._abandon.wait())
        self._no_held.clear()
        try:
            await asyncio.wait({call, abandon}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abandon.cancel()
            if not call.done():
                # Closing the connection is what tells the coordinator: it hands no job
                # to a poller that has gone (docs/protocol-extensions.md, "longpoll").
                call.cancel()
                await asyncio.wait({call})
            self._no_held.set()
        if call.cancelled():
            log.debug("held poll abandoned: the agent is draining or paused")
            raise _Abandoned
        return call.result()

    async def _idle(self, interval: float) -> None:
        """Wait about ``interval`` (jittered), or until :meth:`wake`."""
        jitter = self.cfg.poll_jitter
        await wait_event(self._now, interval * random.uniform(1 - jitter, 1 + jitter))
