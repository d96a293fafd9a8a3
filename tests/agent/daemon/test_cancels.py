"""One cancel path: typed reasons, their public spellings, and the one report decision."""

from __future__ import annotations

import pytest

from agent.coordinator.capabilities import CORE, Capabilities
from agent.daemon.cancels import CancelInbox, Disposition, disposition
from agent.daemon.held import Active, HeldJobs
from agent.daemon.report import Report
from agent.errors import CancelReason, Outcome
from agent.execution.outcome import MAX_ERROR_CODE_CHARS, MAX_ERROR_MESSAGE_CHARS, classify

WITH_CANCEL = Capabilities(frozenset({"cancel", "lease"}))


@pytest.mark.parametrize(("reason", "recorded"), [
    (CancelReason.DELISTED, "coordinator"), (CancelReason.HEARTBEAT, "coordinator"),
    (CancelReason.PROGRESS, "coordinator"), (CancelReason.LEASE_LOST, "lease_lost"),
    (CancelReason.DRAIN, "shutdown"), (CancelReason.SIGNAL, "shutdown"),
    (CancelReason.TIMEOUT, "timeout"), (CancelReason.INTERRUPTED, "interrupted"),
])
def test_packages_keep_the_reason_spellings_clients_read(reason: CancelReason,
                                                          recorded: str) -> None:
    assert reason.recorded == recorded


def test_outcome_of_each_kind_of_cancel() -> None:
    killed = -15
    assert classify(killed, None, CancelReason.TIMEOUT).outcome is Outcome.TIMED_OUT
    for reason in (CancelReason.DRAIN, CancelReason.SIGNAL):
        verdict = classify(killed, None, reason)
        assert (verdict.outcome, verdict.error_code) == (Outcome.LOST, "agent_shutdown")
    verdict = classify(killed, None, CancelReason.DELISTED)
    assert verdict.outcome is Outcome.CANCELED
    assert verdict.error_message == "canceled (coordinator)"


def test_a_jobs_own_error_code_and_message_are_bounded_strings() -> None:
    # Given a runtime's last word, or a job's error event, naming codes of any JSON type
    # (a coordinator refused a non-string code: the job stayed running there)
    verdict = classify(1, {"outcome": "failed", "error_code": {"a": 1},
                           "error_message": ["x"]}, None)
    assert (verdict.error_code, verdict.error_message) == ("runtime_error", "['x']")
    verdict = classify(1, None, None, {"code": "c" * 500, "message": "m" * 10_000})
    assert verdict.error_code == "c" * MAX_ERROR_CODE_CHARS
    assert verdict.error_message == "m" * MAX_ERROR_MESSAGE_CHARS
    verdict = classify(1, None, None, {"code": "  ", "message": ""})
    assert (verdict.error_code, verdict.error_message) == ("runtime_error",
                                                           "exited with status 1")


@pytest.mark.parametrize(("outcome", "caps", "dropped", "expected"), [
    # Core: a job the coordinator let go of, or canceled, is never reported
    (Outcome.CANCELED, CORE, False, Disposition.DROP),
    (Outcome.COMPLETED, CORE, True, Disposition.DROP),
    (Outcome.FAILED, CORE, True, Disposition.DROP),
    (Outcome.COMPLETED, CORE, False, Disposition.SEND_IF_LISTED),
    (Outcome.LOST, CORE, False, Disposition.SEND_IF_LISTED),
    # The cancel extension wants the canceled result, even after the job was delisted
    (Outcome.CANCELED, WITH_CANCEL, False, Disposition.SEND),
    (Outcome.CANCELED, WITH_CANCEL, True, Disposition.SEND),
    (Outcome.COMPLETED, WITH_CANCEL, True, Disposition.SEND_IF_LISTED),
])
def test_one_decision_on_reporting(outcome: Outcome, caps: Capabilities, dropped: bool,
                                   expected: Disposition) -> None:
    assert disposition(outcome, caps, dropped) is expected


def test_the_inbox_cancels_held_jobs_and_marks_those_the_coordinator_let_go() -> None:
    held = HeldJobs()
    for job_id in ("a", "b", "c"):
        held.add(Active(job_id, lease_id=None))
    inbox = CancelInbox(held)
    assert inbox.cancel("a", CancelReason.HEARTBEAT)
    assert inbox.cancel("b", CancelReason.DELISTED)
    assert inbox.cancel("b", CancelReason.DRAIN)  # a later cancel keeps the first reason
    assert not inbox.cancel("zzz", CancelReason.LEASE_LOST)
    a, b, c = (held.get(j) for j in "abc")
    assert a is not None and b is not None and c is not None
    assert (a.cancel_reason, a.dropped) == (CancelReason.HEARTBEAT, False)
    assert (b.cancel_reason, b.dropped) == (CancelReason.DELISTED, True)
    assert c.cancel_reason is None


def test_a_stored_report_of_unknown_shape_is_never_taken_for_a_cancel() -> None:
    assert Report("result", {"result": {"status": "canceled"}}).outcome is Outcome.CANCELED
    assert Report("result", {"result": {"status": "bogus"}}).outcome is Outcome.FAILED
    assert Report("result", {}).outcome is Outcome.FAILED
    assert Report("fail", {"error_code": "x"}).outcome is Outcome.FAILED
