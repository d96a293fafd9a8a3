"""What one registration settled: the coordinator's capabilities and the helpers using them.

The agent opens a new session each time it registers (a coordinator that forgot it may
come back with other extensions); the flow and the loops ask for the current one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.coordinator.capabilities import CORE, Capabilities
from agent.coordinator.client import CoordinatorClient
from agent.daemon.journal import Journal
from agent.daemon.shippers import LogShipper, ProgressSender
from agent.daemon.uploads import Uploads


@dataclass(frozen=True)
class Session:
    """The capabilities in force, the package uploader, and the shippers they allow."""

    caps: Capabilities
    uploads: Uploads
    shipper: LogShipper | None = None
    progress: ProgressSender | None = None

    @classmethod
    def open(cls, caps: Capabilities, *, client: CoordinatorClient, journal: Journal,
             base_url: str, max_log_chunk_bytes: int, progress_interval_s: float,
             on_log_bytes: Callable[[int], None] | None = None) -> Session:
        shipper = LogShipper(client, journal, max_log_chunk_bytes, on_log_bytes,
                             binary=caps.logs_binary) if caps.logs else None
        progress = ProgressSender(client, progress_interval_s) if caps.progress else None
        return cls(caps, Uploads(client, caps, base_url), shipper, progress)

    @classmethod
    def core(cls, client: CoordinatorClient, base_url: str) -> Session:
        """Before the first registration: the core protocol only."""
        return cls(CORE, Uploads(client, CORE, base_url))

    def forget(self, job_id: str) -> None:
        """A job has left the node: drop what the shippers kept for it."""
        if self.shipper is not None:
            self.shipper.forget(job_id)
        if self.progress is not None:
            self.progress.forget(job_id)
