"""Every exit of a job's process maps to one outcome, here and nowhere else."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

from agent.errors import CancelReason, Outcome

DISK_FULL_MARGIN_BYTES = 1 << 20  # less free than this at the end: the job ran out of room
# A job's own error code and message (its events) go into the /fail body as they are:
# a coordinator stores a code as an identifier, and refused a non-string one (422), which
# left the job running there until it expired.
MAX_ERROR_CODE_CHARS = 64
MAX_ERROR_MESSAGE_CHARS = 4000
UNCHANGED_BY_DISK = (Outcome.CANCELED, Outcome.TIMED_OUT, Outcome.LOST)


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    error_code: str | None
    error_message: str | None


# A job stopped for passing a quota (the executor's walks), by the quota it passed.
QUOTA_VERDICTS = {
    CancelReason.OUTPUT_TOO_LARGE: Verdict(
        Outcome.FAILED, "output_too_large",
        "the job wrote more than max_job_output_mb into its package; the files that fit "
        "are kept, the rest listed under skipped"),
    CancelReason.TOO_MANY_FILES: Verdict(
        Outcome.FAILED, "output_too_large",
        "the job wrote more than max_job_files files (folders and links count too) into its "
        "package; the first ones are kept, the rest listed under skipped"),
    CancelReason.WORK_TOO_LARGE: Verdict(
        Outcome.FAILED, "work_too_large",
        "the job wrote more than max_job_work_mb into its work folder (scratch, HOME, "
        "caches); its package is kept"),
    CancelReason.WORK_TOO_MANY_FILES: Verdict(
        Outcome.FAILED, "work_too_large",
        "the job made more than max_job_work_files files (folders and links count too) in "
        "its work folder (scratch, HOME, caches); its package is kept"),
}


def signal_name(number: int) -> str:
    """``SIGKILL``; ``SIGRTMIN+6`` for a real-time signal; ``signal 99`` for anything else."""
    try:
        return signal.Signals(number).name
    except ValueError:
        pass
    if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
        return f"SIGRTMIN+{number - signal.SIGRTMIN}"
    return f"signal {number}"


def classify(status: int | None, finished: dict[str, Any] | None,
             cancel_reason: CancelReason | None,
             last_error: dict[str, Any] | None = None) -> Verdict:
    """Decide the outcome from the exit status, the runtime's last word and the cancel state.

    ``status`` is the exit status as subprocess reports it (minus the signal number
    for a signal death; None when the process never started).
    """
    fin = finished or {}
    said = fin.get("outcome")
    if status == 0 and said == "completed":
        return Verdict(Outcome.COMPLETED, None, None)  # finished before a late cancel landed
    if cancel_reason is CancelReason.TIMEOUT or said == "timed_out":
        return Verdict(Outcome.TIMED_OUT, "timeout", "the job ran past its timeout")
    if cancel_reason in QUOTA_VERDICTS:
        return QUOTA_VERDICTS[cancel_reason]
    if cancel_reason is not None and cancel_reason.is_shutdown:
        return Verdict(Outcome.LOST, "agent_shutdown",
                       "the agent shut down while the job was running")
    if cancel_reason is not None:
        return Verdict(Outcome.CANCELED, "canceled", f"canceled ({cancel_reason.recorded})")
    if said == "failed" and status != 0:
        return Verdict(Outcome.FAILED, _code(fin.get("error_code"), "runtime_error"),
                       _message(fin.get("error_message"), None))
    if status is not None and status < 0:
        name = signal_name(-status)
        hint = " (out of memory? see the kernel log)" if -status == signal.SIGKILL else ""
        return Verdict(Outcome.KILLED, "killed", f"the job's process was killed by {name}{hint}")
    if status == 0:
        return Verdict(Outcome.COMPLETED, None, None)
    if last_error is not None:
        return Verdict(Outcome.FAILED, _code(last_error.get("code"), "runtime_error"),
                       _message(last_error.get("message"), f"exited with status {status}"))
    return Verdict(Outcome.FAILED, "nonzero_exit", f"the job exited with status {status}")


def _code(value: Any, default: str) -> str:
    """A job's error code as a coordinator takes it: a non-empty string, bounded."""
    text = value.strip() if isinstance(value, str) else ""
    return text[:MAX_ERROR_CODE_CHARS] or default


def _message(value: Any, default: str | None) -> str | None:
    if value is None or value == "":
        return default
    return (value if isinstance(value, str) else str(value))[:MAX_ERROR_MESSAGE_CHARS]


def disk_full(verdict: Verdict, cancel_reason: CancelReason | None, free_bytes: int | None,
              capture_full: bool) -> Verdict:
    """``failed``/``disk_full`` for a run that ran out of room, else ``verdict`` unchanged.

    Out of room: a log capture hit ENOSPC, or the package folder's filesystem has less
    than ``DISK_FULL_MARGIN_BYTES`` free once the job is gone (a job whose own writes
    failed usually exits with some runtime error, or even 0). A cancel, a timeout and
    the agent's shutdown keep their own outcome.
    """
    if cancel_reason is not None or verdict.outcome in UNCHANGED_BY_DISK:
        return verdict
    low = free_bytes is not None and free_bytes < DISK_FULL_MARGIN_BYTES
    if not (capture_full or low):
        return verdict
    free = "?" if free_bytes is None else str(free_bytes >> 20)
    return Verdict(Outcome.FAILED, "disk_full",
                   f"the disk holding the job's folder is full: {free} MiB free; "
                   "what the logs had is kept")
