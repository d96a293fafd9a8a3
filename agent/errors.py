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


class UnsupportedJobType(InvalidJob):
    """Raised when a job's payload type has no runtime on this node."""

    code = "unsupported_job_type"


class ConfigError(AgentError):
    """Raised when the agent's configuration is invalid or unreadable."""

    code = "config_error"


class LaunchError(AgentError):
    """Raised when a job's process could not be started."""

    code = "launch_failed"


class PackageError(AgentError):
    """Raised when a result package cannot be written or does not verify."""

    code = "package_error"


class CoordinatorError(AgentError):
    """Raised when the coordinator answers with an error that retrying won't fix."""

    code = "coordinator_error"


class ShutdownRequested(BaseException):
    """Raised to unwind on agent shutdown; a BaseException so `except Exception` can't eat it."""


class Outcome(enum.StrEnum):
    """How a job's run ended. Every exit maps to exactly one of these."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"
    KILLED = "killed"  # killed by a signal nobody in the agent sent
    LOST = "lost"  # interrupted by the agent's own shutdown or crash


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


OUTCOME_EXIT = {
    Outcome.COMPLETED: ExitCode.OK,
    Outcome.FAILED: ExitCode.FAILED,
    Outcome.CANCELED: ExitCode.CANCELED,
    Outcome.TIMED_OUT: ExitCode.TIMED_OUT,
    Outcome.KILLED: ExitCode.KILLED,
    Outcome.LOST: ExitCode.LOST,
}

# Stable error codes reported to coordinators (`/fail` error_code, output.json).
ERROR_CODES = {
    "invalid_job": "the job description is malformed",
    "unsupported_job_type": "no runtime on this node handles the payload type",
    "launch_failed": "the job's process could not be started",
    "runtime_error": "the job's code raised an exception",
    "nonzero_exit": "the job's program exited with a non-zero status",
    "timeout": "the job ran past its timeout",
    "canceled": "the job was canceled",
    "killed": "the job's process was killed by a signal",
    "cuda_oom": "the job ran out of GPU memory",
    "model_not_found": "the named model is not on this node",
    "input_error": "an input could not be fetched or failed its checksum",
    "no_capacity": "the node has no GPU that meets the job's constraints",
    "agent_restart": "the agent restarted while the job was running",
    "agent_shutdown": "the agent shut down while the job was running",
    "lease_lost": "the coordinator gave the job to another miner",
    "package_error": "the result package could not be written",
}
