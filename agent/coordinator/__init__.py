"""The coordinator protocol, client side only: transport, retry, core calls, extensions.

``client`` speaks the core protocol and this project's extensions
(docs/protocol-extensions.md) for the daemon; ``capabilities`` is what a coordinator
offers, as one object; ``jobs_api`` is what the client verbs (`submit`, `status`,
`cancel`) call. The reference coordinator lives in :mod:`agent.reference`.
"""

from agent.coordinator.capabilities import SUPPORTED_EXTENSIONS, Capabilities
from agent.coordinator.client import (
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
    "SUPPORTED_EXTENSIONS", "AuthError", "BodyTooLarge", "CallStats", "Capabilities",
    "CoordinatorClient",
    "CoordinatorHTTPError", "CoordinatorUnavailable", "HeartbeatAnswer", "LeaseLost",
    "LogOffsetConflict", "LogOffsets", "NotRegistered", "PackageAnswer", "PolledJob",
    "RegisterAnswer", "RetriesStopped", "RetryPolicy",
]
