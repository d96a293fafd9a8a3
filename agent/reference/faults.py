"""Fault injection and per-IP rate limits for the reference coordinator.

Faults are real HTTP answers (or real connection resets, or a closed listening
socket), so tests exercise the client's actual network code, not a mock:

    coord.faults.set(status=503, count=20, paths=("/v1/miners/poll",))
    coord.faults.rate_limit(retry_after_s=1, count=5)
    coord.faults.reset(count=2)           # RST instead of an answer
    coord.faults.set(delay_s=2.0)         # answer normally, but late
    coord.faults.down(); coord.faults.up()

Every request that reaches the server is counted by path, so a test can tell how many
reports arrived, and how many went on to the routes (not replaced by a fault)::

    coord.faults.arrived(f"/v1/miners/{job_id}/result")   # tries, faulted or not
    coord.faults.answered(f"/v1/miners/{job_id}/result")  # tries the routes handled
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.reference.model import Problem

RESET = -1  # a Problem with this status means: cut the connection, answer nothing


@dataclass
class Rule:
    """One queued fault: what to answer, how many times, for which paths, how late."""

    status: int | None
    count: int
    paths: tuple[str, ...] | None
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0

    def applies(self, path: str) -> bool:
        return self.count > 0 and (self.paths is None
                                   or any(path.startswith(p) for p in self.paths))


class Faults:
    """Queued fault rules, consumed first-match by requests whose path starts with a prefix."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self.injected = 0
        self._arrived: Counter[str] = Counter()
        self._answered: Counter[str] = Counter()
        self._down: Callable[[], None] = lambda: None
        self._up: Callable[[], None] = lambda: None

    def bind(self, down: Callable[[], None], up: Callable[[], None]) -> None:
        """Called by the server owner: how to close and reopen the listening socket."""
        self._down, self._up = down, up

    def set(self, status: int | None = 503, count: int = 1,
            paths: Iterable[str] | None = None, body: Any = None,
            headers: Mapping[str, str] | None = None, delay_s: float = 0.0) -> None:
        """Answer the next ``count`` matching requests with ``status`` (after ``delay_s``).

        ``status=None`` with a delay serves the request normally, only late.
        """
        if body is None and status is not None:
            body = {"detail": f"injected fault {status}"}
        with self._lock:
            self._rules.append(Rule(status, count, tuple(paths) if paths else None, body,
                                     dict(headers or {}), delay_s))

    def rate_limit(self, retry_after_s: float = 1.0, count: int = 1,
                   paths: Iterable[str] | None = None, http_date: bool = False) -> None:
        """Answer 429 with Retry-After (delta seconds, or an HTTP date when ``http_date``)."""
        if http_date:
            value = email.utils.formatdate(time.time() + retry_after_s, usegmt=True)
        else:
            value = f"{retry_after_s:g}"
        self.set(429, count, paths, {"detail": "Rate limit exceeded"}, {"Retry-After": value})

    def reset(self, count: int = 1, paths: Iterable[str] | None = None) -> None:
        """Cut the connection (TCP RST) instead of answering the next ``count`` requests."""
        self.set(RESET, count, paths, body={})

    def down(self) -> None:
        """Close the listening socket and cut open connections: connects are refused."""
        self._down()

    def up(self) -> None:
        """Listen again on the same port."""
        self._up()

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def pending(self) -> int:
        """How many injected answers are still queued."""
        with self._lock:
            return sum(r.count for r in self._rules)

    def arrived(self, prefix: str = "") -> int:
        """Requests whose path starts with ``prefix`` that reached the server."""
        with self._lock:
            return sum(n for path, n in self._arrived.items() if path.startswith(prefix))

    def answered(self, prefix: str = "") -> int:
        """Of those, the ones passed on to the routes (no injected answer or reset)."""
        with self._lock:
            return sum(n for path, n in self._answered.items() if path.startswith(prefix))

    def take(self, path: str) -> Problem | None:
        """The fault for this request, if any (sleeping its delay first)."""
        rule = self.claim(path)
        if rule is not None and rule.delay_s:
            time.sleep(rule.delay_s)
        return self.resolve(path, rule)

    def claim(self, path: str) -> Rule | None:
        """:meth:`take` without the sleep, for an event loop: count the arrival and
        consume the first matching rule; sleep its ``delay_s``, then :meth:`resolve`."""
        with self._lock:
            self._arrived[path] += 1
            rule = next((r for r in self._rules if r.applies(path)), None)
            if rule is None:
                self._answered[path] += 1
                return None
            rule.count -= 1
            self.injected += 1
            self._rules = [r for r in self._rules if r.count > 0]
        return rule

    def resolve(self, path: str, rule: Rule | None) -> Problem | None:
        """The injected answer for a claimed rule (None: serve the request normally)."""
        if rule is None:
            return None
        if rule.status is None:
            with self._lock:
                self._answered[path] += 1
            return None
        problem = Problem(rule.status, "")
        problem.body = rule.body
        problem.headers = dict(rule.headers)
        return problem


class RateLimiter:
    """Fixed one-minute windows per (group, client IP); ``None`` limits mean off."""

    def __init__(self, per_minute: Mapping[str, int] | None = None) -> None:
        self._limits = dict(per_minute or {})
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}

    def check(self, group: str, ip: str) -> None:
        """Count one request; raise a 429 Problem with Retry-After when over the limit."""
        limit = self._limits.get(group)
        if not limit:
            return
        now = time.monotonic()
        with self._lock:
            start, used = self._windows.get((group, ip), (now, 0))
            if now - start >= 60.0:
                start, used = now, 0
            used += 1
            self._windows[(group, ip)] = (start, used)
        if used > limit:
            problem = Problem(429, "Rate limit exceeded")
            problem.headers["Retry-After"] = str(max(1, int(60.0 - (now - start)) + 1))
            raise problem
