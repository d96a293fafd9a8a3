"""The error tree, outcome enum and named exit codes, in one place."""

from __future__ import annotations

import enum


class AgentError(Exception):
    """Raised when the agent cannot do what was asked; carries a stable code."""

    code = "agent_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InvalidJob(AgentError):
    """Raised when a job description is malformed or violates a limit."""

    code = "invalid_job"


class ConfigError(AgentError):
    """Raised when the agent's configuration is invalid or unreadable."""

    code = "config_error"


class LaunchError(AgentError):
    """Raised when a job's process could not be started."""

    code = "launch_failed"


class UnsupportedConstraint(AgentError):
    """Raised when a job asks for something of the node that config says it is not (tags)."""

    code = "unsupported_constraint"


class PackageError(AgentError):
    """Raised when a result package cannot be written or does not verify."""

    code = "package_error"


class CoordinatorError(AgentError):
    """Raised when the coordinator answers with an error that retrying won't fix."""

    code = "coordinator_error"


class Outcome(enum.StrEnum):
    """How a job's run ended. Every exit maps to exactly one of these."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"
    KILLED = "killed"  # killed by a signal nobody in the agent sent
    LOST = "lost"  # interrupted by the agent's own shutdown or crash


class CancelReason(enum.StrEnum):
    """Why a job was stopped before it ended by itself: one member per cancel source.

    :attr:`recorded` is what the package's ``cancel.reason`` and the error message say;
    those spellings are public (clients read them) and older than this enum.
    """

    DELISTED = "delisted"  # gone from the coordinator's running list (the core's cancel)
    HEARTBEAT = "heartbeat"  # a heartbeat answer listed it (cancel extension)
    PROGRESS = "progress"  # a progress answer said cancel (progress extension)
    LEASE_LOST = "lease_lost"  # the lease lapsed: the coordinator gave the job to another
    DRAIN = "drain"  # still running when the agent's drain timeout passed
    SIGNAL = "signal"  # a second SIGTERM/SIGINT to the agent: stop jobs now
    TIMEOUT = "timeout"  # ran past its timeout (the executor's backstop)
    INTERRUPTED = "interrupted"  # Ctrl-C under `miner-agent exec`
    REQUESTED = "requested"  # asked through the executor's API with no named source
    OUTPUT_TOO_LARGE = "output_too_large"  # the package grew past max_job_output_mb
    WORK_TOO_LARGE = "work_too_large"  # the work folder grew past max_job_work_mb
    TOO_MANY_FILES = "too_many_files"  # the package held more than max_job_files entries
    WORK_TOO_MANY_FILES = "work_too_many_files"  # the work folder: max_job_work_files

    @property
    def recorded(self) -> str:
        return _RECORDED.get(self, self.value)

    @property
    def is_shutdown(self) -> bool:
        """The agent itself is going away: the job is lost, not the job's failure."""
        return self in (CancelReason.DRAIN, CancelReason.SIGNAL)


_RECORDED = {CancelReason.DELISTED: "coordinator", CancelReason.HEARTBEAT: "coordinator",
             CancelReason.PROGRESS: "coordinator", CancelReason.DRAIN: "shutdown",
             CancelReason.SIGNAL: "shutdown"}


class ExitCode(enum.IntEnum):
    """Exit codes of the `miner-agent` command (and of `exec`, by outcome)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    CANCELED = 3
    TIMED_OUT = 4
    KILLED = 5
    LOST = 6
    INVALID_JOB = 7
    VERIFY_FAILED = 8
    CONFIG = 9
    UNAVAILABLE = 10
    NOT_FOUND = 11
    REFUSED = 12
    SANDBOX_UNAVAILABLE = 13


OUTCOME_EXIT = {
    Outcome.COMPLETED: ExitCode.OK,
    Outcome.FAILED: ExitCode.FAILED,
    Outcome.CANCELED: ExitCode.CANCELED,
    Outcome.TIMED_OUT: ExitCode.TIMED_OUT,
    Outcome.KILLED: ExitCode.KILLED,
    Outcome.LOST: ExitCode.LOST,
}
