"""Finished jobs' reports on their way out: sent, and retried while the agent runs.

A report enters the outbox once its job is packaged and the report is journaled
(phase ``finished``). Each try, in order:

1. the package uploads still pending (:mod:`agent.daemon.uploads`); an outage leaves
   the report waiting, a refused package ends the upload and the report goes on;
2. what :func:`~agent.daemon.cancels.disposition` says: a job the coordinator canceled
   or expired is never reported; in the core the running list is looked at first, as a
   ``/result`` for a job no longer RUNNING there would flip it back to COMPLETED. The
   list must have been fetched after the report came here (after its upload, after its
   last failed try) and at most LIST_FRESH_S ago: one such list covers every report
   pending then, whoever fetched it, the cancel check's loop included
   (:class:`~agent.daemon.cancel_check.RunningList`), so reports that wait together
   cost one call. Where a lease fences stale reports (the ``lease``
   extension, a report with its lease id) there is no look: the coordinator refuses a
   report of a job it no longer runs under that lease and answers a replay with its
   receipt;
3. the ``/result`` or ``/fail`` call, sent without blind retries: when an answer is lost
   after the request went out, the next try looks at the running list first and a job
   no longer listed there counts as delivered (a core ``/result`` is not idempotent).
   The race left: the coordinator canceling or expiring the job in the instant between
   a lost answer and that look; the report is then counted as delivered, not dropped.

A try ends the report (``reported``, ``dropped`` or ``rejected`` for a final 4xx), or
schedules the next one with capped, jittered back-off: an outage of any length delays a
report and never drops it. The journal keeps each report's tries and last error
(``delivery``), so a restart resumes where the agent stopped and ``miner-agent jobs``
shows it. The job's slot is free meanwhile. Before each poll the poll loop lets the
outbox try what it holds first, so a coordinator coming back hears of finished work
before it can hand a lapsed job out again.

Nothing leaves before the report's journal record is on disk (``Journal.durable``: one
flush for every report waiting then). A core ``/result`` frees the job's slot on the
coordinator; every other end (a ``/fail``, a drop, a refusal) leaves it counted there,
and so does a report whose first try failed: then ``on_uncounted`` asks for a heartbeat
with the true count, so the slot free here is free there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent.clock import wait_event, within
from agent.coordinator.capabilities import Capabilities
from agent.coordinator.client import CoordinatorClient
from agent.coordinator.retry import RetryPolicy
from agent.coordinator.transport import (
    AmbiguousSend,
    BadAnswer,
    BodyTooLarge,
    CoordinatorHTTPError,
    LeaseLost,
)
from agent.daemon.cancel_check import RunningList
from agent.daemon.cancels import Disposition, disposition
from agent.daemon.journal import Journal, Phase
from agent.daemon.report import Report, fit
from agent.daemon.session import Session
from agent.daemon.uploads import errors as upload_errors
from agent.daemon.uploads import location as upload_location
from agent.daemon.uploads import pending as upload_pending
from agent.errors import CoordinatorError

log = logging.getLogger(__name__)
TRY_DEADLINE_S = 30.0  # one try of a report: retries of refused connections and 5xx inside
CATCH_UP_SPACING_S = 1.0  # before a poll, a report is tried again at most this often
EXPECT_WAIT_S = 1.0  # before a poll, a report still being built is waited for this long
LIST_FRESH_S = 1.0  # a running list older than this guards no report
# After a /fail or a drop, polls wait this long at most for the heartbeat that frees the slot
UNCOUNTED_WAIT_S = 5.0


@dataclass
class Pending:
    """One report not acknowledged yet, as the journal holds it."""

    job_id: str
    report: Report
    lease_id: str | None
    delivery: dict[str, Any] = field(default_factory=dict)
    next_at: float = 0.0  # monotonic
    last_try: float = float("-inf")
    look_after: float = 0.0  # monotonic: a running list fetched since then may cover it

    @property
    def tries(self) -> int:
        return int(self.delivery.get("tries", 0))


class Outbox:
    """Holds and sends the reports of finished jobs; ``run()`` is its loop."""

    def __init__(self, *, journal: Journal, client: CoordinatorClient,
                 session: Callable[[], Session], policy: RetryPolicy,
                 on_settled: Callable[[], None] | None = None,
                 on_uncounted: Callable[[], Awaitable[None]] | None = None,
                 try_s: float = TRY_DEADLINE_S, running: RunningList | None = None) -> None:
        self.journal = journal
        self.try_s = try_s  # one try's deadline, retries of refused connections and 5xx in it
        self.client = client
        self.session = session
        self.policy = policy
        self.on_settled = on_settled  # a report ended: the poll may act now
        # A heartbeat now: a report ended without a /result, so the coordinator still
        # counts the job in flight until a heartbeat says otherwise.
        self.on_uncounted = on_uncounted
        self._beats: set[asyncio.Future[None]] = set()
        self.running = running or RunningList(client)  # shared with the cancel check
        self._pending: dict[str, Pending] = {}
        self._adopted: dict[str, str] = {}  # new leases of finished jobs not submitted yet
        self._expected: set[str] = set()  # jobs whose slot is free, report being built
        self._arrived = asyncio.Event()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._pending

    def leases(self) -> dict[str, str]:
        """job_id -> lease_id of the reports still owed (the heartbeat renews them)."""
        return {p.job_id: p.lease_id for p in self._pending.values() if p.lease_id}

    def submit(self, job_id: str, report: Report, lease_id: str | None,
               delivery: dict[str, Any] | None = None) -> None:
        """Take a journaled report (phase finished); the loop tries it at once."""
        self._expected.discard(job_id)
        self._arrived.set()
        self._pending[job_id] = Pending(job_id, report, lease_id, dict(delivery or {}),
                                        look_after=time.monotonic())
        if job_id in self._adopted:  # handed out again while its report was being built
            self.adopt_lease(job_id, self._adopted.pop(job_id))
        self._wake.set()

    def expect(self, job_id: str) -> None:
        """``job_id``'s slot frees now and its report follows (see :meth:`catch_up`)."""
        self._expected.add(job_id)

    def unexpect(self, job_id: str) -> None:
        """No report follows after all (dropped, or its task ended); idempotent."""
        self._expected.discard(job_id)
        self._arrived.set()

    def adopt_lease(self, job_id: str, lease_id: str | None) -> bool:
        """The coordinator handed a job out again while its report waits here (its lease
        lapsed during an outage): the report goes with the new lease. False: not held."""
        p = self._pending.get(job_id)
        if p is None:
            record = self.journal.get(job_id)
            if lease_id is None or record is None or record.phase is not Phase.FINISHED:
                return False
            self._adopted[job_id] = lease_id  # its report is on its way here: see submit()
            return True
        if lease_id is None or lease_id == p.lease_id:
            return True
        log.warning("job %s: handed out again (lease %s) while its report waits; the report "
                    "goes with the new lease, the job does not run again", job_id, lease_id)
        p.lease_id = lease_id
        p.look_after = time.monotonic()  # handed out again just now: an older list lacks it
        if "lease_id" in p.report.body:
            p.report.body["lease_id"] = lease_id
        self.journal.set_delivery(job_id, p.delivery, report=p.report.to_dict(),
                                  lease_id=lease_id)
        p.next_at = 0.0
        self._wake.set()
        return True

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            for p in [p for p in self._pending.values() if p.next_at <= now]:
                await self._try(p)
            upcoming = [p.next_at for p in self._pending.values()]
            wait = max(0.0, min(upcoming) - time.monotonic()) if upcoming else 3600.0
            await wait_event(self._wake, wait)

    async def catch_up(self) -> None:
        """Before a poll: try every held report not tried in the last second.

        A report still being built (its job ended a moment ago) is waited for first, up
        to EXPECT_WAIT_S: a core coordinator frees the job's slot only at its
        ``/result``, and a poll sent before that would come back empty.
        """
        deadline = time.monotonic() + EXPECT_WAIT_S
        while self._expected and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            await wait_event(self._arrived, left)
        now = time.monotonic()
        for p in [p for p in self._pending.values()
                  if now - p.last_try >= CATCH_UP_SPACING_S]:
            await self._try(p)

    async def flush(self, budget_s: float) -> None:
        """Try every held report once more, within ``budget_s`` (the drain's last step)."""
        if not self._pending:
            return
        try:
            async with asyncio.timeout(max(0.1, budget_s)):
                for p in list(self._pending.values()):
                    await self._try(p)
        except TimeoutError:
            log.warning("%d report(s) not delivered within the drain budget; the journal "
                        "keeps them for the next start", len(self._pending))

    # -- one try ----------------------------------------------------------------------
    async def _try(self, p: Pending) -> None:
        async with self._lock:
            if self._pending.get(p.job_id) is not p:
                return  # ended meanwhile
            p.last_try = time.monotonic()
            p.delivery["tries"] = p.tries + 1
            try:
                ended = await self._attempt(p)
            except LeaseLost:
                log.warning("job %s: lease lost; the coordinator gave it to another miner; "
                            "not reporting", p.job_id)
                ended = Phase.DROPPED
            except (CoordinatorHTTPError, BodyTooLarge) as exc:
                log.error("job %s: the coordinator refused the report (%s); kept in the "
                          "journal as rejected", p.job_id, exc)
                p.delivery["error"] = str(exc)[:500]
                ended = Phase.REJECTED
            except CoordinatorError as exc:
                self._retry_later(p, exc)
                return
            self._end(p, ended)
            if self.on_uncounted is not None and not (ended is Phase.REPORTED
                                                      and p.report.kind == "result"):
                # Before anyone polls (catch_up waits for this lock): the slot free here
                # is free there too, or a poll comes back empty. Bounded: in an outage the
                # beat goes on in the background rather than hold every poll up.
                await _at_most(self._beat(), UNCOUNTED_WAIT_S)
        if self.on_settled is not None:
            self.on_settled()

    async def _attempt(self, p: Pending) -> Phase:
        await self.journal.durable()  # its finished record, before anything leaves
        session = self.session()
        upload = p.delivery.get("upload")
        if upload is not None and upload_pending(upload):
            try:
                await session.uploads.attempt(p.job_id, upload, p.lease_id, self.try_s)
            finally:  # what it reached is kept, whatever comes next
                self._apply_upload(p)
                p.look_after = time.monotonic()  # a cancel during the upload must show
        decided = Disposition.DROP if p.report.kind == "none" else \
            disposition(p.report.outcome, session.caps)
        if decided is Disposition.DROP:
            log.info("job %s: canceled by the coordinator; nothing reported", p.job_id)
            return Phase.DROPPED
        fenced = decided is Disposition.SEND_IF_LISTED and _fenced(p, session.caps)
        checked = decided is Disposition.SEND_IF_LISTED and not fenced
        if checked and not await self._listed(p):
            if p.delivery.get("ambiguous"):
                log.info("job %s: the answer to the last send was lost and the coordinator "
                         "no longer runs the job: it was delivered", p.job_id)
                p.delivery["assumed"] = True
                return Phase.REPORTED
            log.info("job %s: the coordinator no longer lists it (canceled or expired); "
                     "not reporting", p.job_id)
            return Phase.DROPPED
        try:
            # Checked: one attempt, right after the look; a retry is the next try's, with
            # a fresh look (a cancel meanwhile must not be flipped back to COMPLETED).
            # Fenced: one attempt too, so a refused try soon tells the coordinator, by a
            # heartbeat, that the job's slot is free (see _retry_later).
            await self._send(p, 1 if checked or fenced else None)
        except AmbiguousSend:
            p.delivery["ambiguous"] = True
            raise
        except BadAnswer as exc:  # a 2xx whose body is past limits: the report arrived
            log.warning("job %s: the coordinator took the report but its answer was "
                        "unreadable (%s)", p.job_id, exc)
        return Phase.REPORTED

    async def _listed(self, p: Pending) -> bool:
        moment = max(p.look_after, time.monotonic() - LIST_FRESH_S)
        return p.job_id in await self.running.since(moment, deadline_s=self.try_s)

    async def _send(self, p: Pending, attempts: int | None) -> None:
        """Send the report; one an earlier agent journaled over the body limit is cut to
        fit (:func:`~agent.daemon.report.fit`) and sent at once (nothing went out)."""
        try:
            await self._send_as_is(p, attempts)
        except BodyTooLarge as exc:
            fitted = await asyncio.to_thread(fit, p.report)  # megabytes: off the loop
            if fitted is p.report:
                raise
            log.warning("job %s: %s; sent cut to fit", p.job_id, exc)
            p.report = fitted
            self.journal.set_delivery(p.job_id, p.delivery, report=p.report.to_dict())
            await self._send_as_is(p, attempts)

    async def _send_as_is(self, p: Pending, attempts: int | None) -> None:
        body = p.report.body
        if p.report.kind == "result":
            await self.client.result(p.job_id, body["result"], body.get("metrics"),
                                     body.get("lease_id"), deadline_s=self.try_s,
                                     retry_ambiguous=False, max_attempts=attempts)
        else:
            await self.client.fail(p.job_id, body["error_code"], body.get("error_message", ""),
                                   body.get("metrics"), body.get("lease_id"),
                                   deadline_s=self.try_s, retry_ambiguous=False,
                                   max_attempts=attempts)

    def _apply_upload(self, p: Pending) -> None:
        """Put the upload's state into the report's package block and the journal."""
        upload = p.delivery.get("upload")
        block = _package_block(p.report)
        if block is not None and not upload_pending(upload):
            where = upload_location(upload)
            if where:
                block["location"] = where
            failures = upload_errors(upload)
            if failures:
                block["upload_errors"] = failures
        self.journal.set_delivery(p.job_id, p.delivery, report=p.report.to_dict())

    def _retry_later(self, p: Pending, exc: CoordinatorError) -> None:
        wait = self.policy.backoff_s(min(p.tries - 1, 16))
        if isinstance(exc, AmbiguousSend):
            wait = min(wait, self.policy.base_s)  # look at the running list soon
        p.next_at = time.monotonic() + max(wait, 0.05 * random.random())
        p.look_after = time.monotonic()  # the next try looks again, after this one
        p.delivery["error"] = str(exc)[:500]
        level = logging.INFO if p.tries > 1 else logging.WARNING
        log.log(level, "job %s: report not delivered yet (try %d: %s); next try in %.1f s",
                p.job_id, p.tries, exc, wait)
        self.journal.set_delivery(p.job_id, p.delivery)
        if p.tries == 1 and self.on_uncounted is not None:
            # The coordinator counts the job in flight until its report lands: the slot,
            # free here, is only free there once a heartbeat says so. Not awaited: in an
            # outage it would hold every report up.
            self._beat()

    def _beat(self) -> asyncio.Future[None]:
        """Send the heartbeat that tells the coordinator a slot is free (kept alive in
        ``_beats`` whether or not anyone waits for it)."""
        assert self.on_uncounted is not None
        beat: asyncio.Future[None] = asyncio.ensure_future(self.on_uncounted())
        self._beats.add(beat)
        beat.add_done_callback(self._beats.discard)
        return beat

    def _end(self, p: Pending, phase: Phase) -> None:
        del self._pending[p.job_id]
        self.journal.set_phase(p.job_id, phase, delivery=p.delivery)
        if phase is Phase.REPORTED:
            log.info("job %s: reported (%s%s)", p.job_id, p.report.kind,
                     f", try {p.tries}" if p.tries > 1 else "")


async def _at_most(beat: asyncio.Future[None], wait_s: float) -> None:
    """Wait for ``beat`` up to ``wait_s``; it goes on past that."""
    with contextlib.suppress(TimeoutError):
        await within(asyncio.shield(beat), wait_s)


def _fenced(p: Pending, caps: Capabilities) -> bool:
    """The coordinator's lease check stands in for the running list's: a report that
    carries its lease is refused (409) once the job is no longer this lease's."""
    return caps.lease and p.lease_id is not None and \
        p.report.body.get("lease_id") == p.lease_id


def _package_block(report: Report) -> dict[str, Any] | None:
    holder = report.body.get("result") if report.kind == "result" else report.body.get("metrics")
    block = holder.get("package") if isinstance(holder, dict) else None
    return block if isinstance(block, dict) else None
