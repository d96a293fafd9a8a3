"""The coordinator protocol: the miner-side client and a reference coordinator.

``client`` speaks the core protocol and this project's extensions
(docs/protocol-extensions.md); ``reference`` is a coordinator for tests and local runs.
"""

from agent.coordinator.client import (
    SUPPORTED_EXTENSIONS,
    CoordinatorClient,
    HeartbeatAnswer,
    LogOffsetConflict,
    LogOffsets,
    PackageAnswer,
    PolledJob,
    RegisterAnswer,
)
from agent.coordinator.retry import CallStats, RetryPolicy
from agent.coordinator.transport import (
    AuthError,
    BodyTooLarge,
    CoordinatorHTTPError,
    CoordinatorUnavailable,
    LeaseLost,
    NotRegistered,
    RetriesStopped,
)

__all__ = [
    "SUPPORTED_EXTENSIONS", "AuthError", "BodyTooLarge", "CallStats", "CoordinatorClient",
    "CoordinatorHTTPError", "CoordinatorUnavailable", "HeartbeatAnswer", "LeaseLost",
    "LogOffsetConflict", "LogOffsets", "NotRegistered", "PackageAnswer", "PolledJob",
    "RegisterAnswer", "RetriesStopped", "RetryPolicy",
]
