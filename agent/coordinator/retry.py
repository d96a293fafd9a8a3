"""Retry policy, per-call deadlines, Retry-After parsing and per-endpoint call stats.

Kept apart from the HTTP code so the arithmetic (full-jitter backoff with a cap,
a deadline that bounds every wait and every attempt) is testable on its own.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# A Retry-After beyond this is treated as this: a coordinator asking for an hour's
# silence is more likely misconfigured than right, and we still honour the deadline.
MAX_RETRY_AFTER_S = 300.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: sleep ~ U(0, min(cap, base * 2**attempt))."""

    base_s: float = 0.5
    cap_s: float = 30.0

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The sleep before retry number ``attempt`` (0 for the first retry)."""
        ceiling = min(self.cap_s, self.base_s * math.pow(2.0, min(attempt, 62)))
        return (rng or random).uniform(0.0, ceiling)


class Deadline:
    """A point in monotonic time after which a call stops retrying; None means never."""

    def __init__(self, seconds: float | None) -> None:
        self._at = None if seconds is None else time.monotonic() + max(0.0, seconds)

    @property
    def unbounded(self) -> bool:
        return self._at is None

    def remaining_s(self) -> float:
        """Seconds left (``math.inf`` when unbounded, never negative)."""
        if self._at is None:
            return math.inf
        return max(0.0, self._at - time.monotonic())

    def expired(self) -> bool:
        return self.remaining_s() <= 0.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None.

    Garbage yields None (the caller falls back to its own backoff); the result is
    clamped to ``[0, MAX_RETRY_AFTER_S]``.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


@dataclass
class EndpointStats:
    """Counters for one endpoint: calls made, attempts, errors by kind, latency."""

    calls: int = 0
    attempts: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_total_s: float = 0.0
    latency_max_s: float = 0.0

    def as_dict(self) -> dict[str, object]:
        mean = self.latency_total_s / self.attempts if self.attempts else 0.0
        return {
            "calls": self.calls, "attempts": self.attempts, "ok": self.ok,
            "failed": self.failed, "retries": self.retries, "errors": dict(self.errors),
            "latency_mean_s": round(mean, 6), "latency_max_s": round(self.latency_max_s, 6),
        }


class CallStats:
    """Per-endpoint call counts, latency and errors; read by the agent's metrics endpoint.

    Thread-safe: the metrics endpoint may read it from another thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_endpoint: dict[str, EndpointStats] = {}
        # Called per attempt as (endpoint, latency_s, ok): the agent's Prometheus metrics.
        self.observer: Callable[[str, float, bool], None] | None = None

    def _get(self, endpoint: str) -> EndpointStats:
        return self._by_endpoint.setdefault(endpoint, EndpointStats())

    def call_started(self, endpoint: str) -> None:
        with self._lock:
            self._get(endpoint).calls += 1

    def attempt(self, endpoint: str, latency_s: float, error: str | None) -> None:
        """Record one HTTP attempt; ``error`` is e.g. ``"http_503"`` or ``"connect"``."""
        with self._lock:
            stats = self._get(endpoint)
            stats.attempts += 1
            stats.latency_total_s += latency_s
            stats.latency_max_s = max(stats.latency_max_s, latency_s)
            if error is not None:
                stats.errors[error] = stats.errors.get(error, 0) + 1
        if self.observer is not None:
            self.observer(endpoint, latency_s, error is None)

    def call_finished(self, endpoint: str, ok: bool, retries: int) -> None:
        with self._lock:
            stats = self._get(endpoint)
            stats.retries += retries
            if ok:
                stats.ok += 1
            else:
                stats.failed += 1

    def snapshot(self) -> dict[str, dict[str, object]]:
        """A JSON-ready copy: ``{endpoint: {calls, attempts, ok, failed, ...}}``."""
        with self._lock:
            return {name: s.as_dict() for name, s in sorted(self._by_endpoint.items())}

    def get(self, endpoint: str) -> EndpointStats:
        """A copy of one endpoint's counters (zeros when never called)."""
        with self._lock:
            s = self._by_endpoint.get(endpoint, EndpointStats())
            return EndpointStats(s.calls, s.attempts, s.ok, s.failed, s.retries,
                                 dict(s.errors), s.latency_total_s, s.latency_max_s)
