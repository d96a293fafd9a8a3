"""Every cancel of a held job comes in here; one function decides what is reported after.

Sources (each a :class:`~agent.errors.CancelReason`): the coordinator's running list
(core), a heartbeat answer or a progress answer (the cancel extension), a lost lease,
the drain timeout, a second signal; the executor's own timeout and `exec`'s Ctrl-C
reach :meth:`JobRun.cancel` directly, with reasons from the same enum. All sources run
on the event loop, so the inbox is a method, not a queue: it finds the job, logs one
stable line and stops it.

After the job's package is written, :func:`disposition` says whether and how it is
reported. In the core protocol a ``/result`` for a job the coordinator canceled or
expired flips it back to COMPLETED, so such a job is never reported; the cancel
extension wants the canceled job's result instead.
"""

from __future__ import annotations

import enum
import logging

from agent.coordinator.capabilities import Capabilities
from agent.daemon.held import HeldJobs
from agent.errors import CancelReason, Outcome

log = logging.getLogger(__name__)

# The coordinator has already let go of these jobs: a core report would be wrong.
DROPS_REPORT = frozenset({CancelReason.DELISTED, CancelReason.LEASE_LOST})

_SAID = {
    CancelReason.DELISTED: "no longer in the coordinator's running list; canceling it",
    CancelReason.HEARTBEAT: "cancel received in a heartbeat answer",
    CancelReason.PROGRESS: "cancel received in a progress answer",
    CancelReason.LEASE_LOST: "lease lost; stopping it",
    CancelReason.DRAIN: "still running at the drain timeout; canceling it",
    CancelReason.SIGNAL: "canceling it on a second stop signal",
}


class CancelInbox:
    """The one way in for a cancel of a job this node holds."""

    def __init__(self, held: HeldJobs) -> None:
        self.held = held

    def cancel(self, job_id: str, reason: CancelReason, force: bool = False) -> bool:
        """Stop ``job_id`` for ``reason``; False when this node does not hold it.

        ``force`` (a client's `cancel --force`): no grace period, SIGKILL at once; the
        partial results are packaged all the same.
        """
        active = self.held.get(job_id)
        if active is None:
            return False
        if force and active.run is not None:
            log.warning("job %s: cancel forced by the client: killing it now", job_id)
            active.cancel(reason, dropped=reason in DROPS_REPORT)
            active.run.kill_now()
            return True
        level = logging.WARNING if reason is CancelReason.LEASE_LOST else logging.INFO
        log.log(level, "job %s: %s", job_id, _SAID.get(reason, f"canceling it ({reason})"))
        active.cancel(reason, dropped=reason in DROPS_REPORT)
        self.held.wake_slot_waiters()  # a job still waiting for devices gives up now
        return True

    def cancel_all(self, reason: CancelReason) -> None:
        for active in self.held:
            self.cancel(active.job_id, reason)

    def kill_all(self) -> None:
        """Skip the grace period of every running job (a third stop signal)."""
        for active in self.held.running():
            assert active.run is not None
            active.run.kill_now()


class Disposition(enum.Enum):
    """What happens to a finished job's report."""

    DROP = "drop"  # send nothing; the journal keeps the package's record
    SEND = "send"  # send it as it is
    SEND_IF_LISTED = "send_if_listed"  # send it while the running list still has the job


def disposition(outcome: Outcome, caps: Capabilities, dropped: bool = False) -> Disposition:
    """Whether and how a job that ended with ``outcome`` is reported.

    ``dropped`` says the coordinator let go of the job while it ran (see DROPS_REPORT).
    """
    if caps.cancel:
        # The cancel extension wants the canceled result, and fences stale ones itself.
        return Disposition.SEND if outcome is Outcome.CANCELED else Disposition.SEND_IF_LISTED
    if dropped or outcome is Outcome.CANCELED:
        return Disposition.DROP
    return Disposition.SEND_IF_LISTED
