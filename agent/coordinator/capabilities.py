"""What a coordinator offers beyond the core protocol, as one object the daemon asks.

Registration settles it: the agent declares the extensions it speaks, the coordinator
announces its own, and both sides use what they share. Every "may I use this
extension?" question in the agent goes through :class:`Capabilities`; a new protocol
variant is a new property here, not a string test in the daemon.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SUPPORTED_EXTENSIONS = frozenset({"lease", "progress", "logs", "package", "cancel",
                                  "longpoll", "logs-binary"})


@dataclass(frozen=True)
class Capabilities:
    """The extensions both sides speak; empty for a core-only coordinator."""

    extensions: frozenset[str] = frozenset()
    max_package_bytes: int | None = None  # announced with the package extension, if at all

    @classmethod
    def agreed(cls, announced: Iterable[str], declared: Iterable[str]) -> Capabilities:
        """What both sides speak: the coordinator's announcement ∩ the agent's declaration."""
        return cls(frozenset(announced) & frozenset(declared))

    @property
    def lease(self) -> bool:
        """Jobs come with a lease that heartbeats renew and reports carry."""
        return "lease" in self.extensions

    @property
    def progress(self) -> bool:
        """Progress is posted while a job runs; the answer may say cancel."""
        return "progress" in self.extensions

    @property
    def logs(self) -> bool:
        """Log bytes are shipped by offset while a job runs."""
        return "logs" in self.extensions

    @property
    def package(self) -> bool:
        """The result zip is uploaded to the coordinator."""
        return "package" in self.extensions

    @property
    def cancel(self) -> bool:
        """Cancels arrive in heartbeat answers, and a canceled job's result is reported."""
        return "cancel" in self.extensions

    @property
    def longpoll(self) -> bool:
        """An empty poll may be held up to the ``max_wait_seconds`` it names."""
        return "longpoll" in self.extensions

    @property
    def logs_binary(self) -> bool:
        """Log chunks go as raw (optionally gzip'd) bytes, not base64 in JSON."""
        return self.logs and "logs-binary" in self.extensions

    def describe(self) -> str:
        """For logs: the extensions in use, or that this is the core protocol."""
        return ", ".join(sorted(self.extensions)) or "none (core protocol)"


CORE = Capabilities()
