"""The contract a runtime sees inside the job's process.

A runtime is a function ``run(ctx: JobContext) -> None``. It reads
``ctx.payload``, reports progress with :meth:`JobContext.progress`, checks
``ctx.cancelled`` (or calls :meth:`JobContext.check_cancel`) at step boundaries,
writes files under ``ctx.artifacts_dir``, writes the main text result with
:meth:`JobContext.write_result`, and returns. To fail with a stable code it
raises :class:`JobFailed`. On cancel it saves what it has, calls
:meth:`JobContext.mark_partial` if it left partial results, and returns or raises
:class:`JobCancelled`.

Events go to the parent as JSON lines on the events channel (file descriptor
``$MINER_EVENTS_FD``, 3 by default), never on stdout or stderr. Any program can
use the channel; see docs/job-protocol.md. Lines stay under 4096 bytes so that
writes from several processes never interleave.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EVENT_LINE_MAX = 4000  # below PIPE_BUF (4096): one write() is atomic on a pipe
PROGRESS_MIN_INTERVAL_S = 0.25


class JobFailed(Exception):
    """Raised by a runtime to fail the job with a stable error code."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class JobCancelled(Exception):
    """Raised by :meth:`JobContext.check_cancel` once a cancel was asked for."""


class EventChannel:
    """Writes JSON-line events to the parent; never blocks the job for long."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        # Re-entrant: the SIGTERM handler sends "cancel_seen" on the main thread, maybe
        # while that thread is inside send(); a plain Lock would deadlock the job there.
        self._lock = threading.RLock()

    @classmethod
    def from_env(cls) -> EventChannel:
        raw = os.environ.get("MINER_EVENTS_FD", "")
        if not raw.isdigit():
            return cls(None)
        fd = int(raw)
        try:
            os.fstat(fd)
        except OSError:
            return cls(None)
        return cls(fd)

    def send(self, event: str, **fields: Any) -> None:
        if self._fd is None:
            return
        fields["event"] = event
        fields.setdefault("t", time.time())
        line = json.dumps(fields, separators=(",", ":"), default=str)
        if len(line) > EVENT_LINE_MAX:
            line = _shrink(fields)
        data = (line + "\n").encode()
        with self._lock:
            try:
                os.write(self._fd, data)
            except (BrokenPipeError, OSError):
                self._fd = None  # the parent is gone; the job carries on


def _shrink(fields: dict[str, Any]) -> str:
    """Cut long string fields so an event fits in one atomic pipe write."""
    cut = dict(fields)
    for key, value in cut.items():
        if isinstance(value, str) and len(value) > 512:
            cut[key] = value[:500] + "...[truncated]"
    if isinstance(cut.get("metrics"), dict) and len(json.dumps(cut, default=str)) > EVENT_LINE_MAX:
        cut["metrics"] = {"truncated": True}
    line = json.dumps(cut, separators=(",", ":"), default=str)
    return line[:EVENT_LINE_MAX] if len(line) <= EVENT_LINE_MAX else json.dumps(
        {"event": fields["event"], "t": fields.get("t"), "truncated": True})


class JobContext:
    """Everything a runtime may use: payload, paths, progress, cancel, results."""

    def __init__(self, job: dict[str, Any], package_dir: Path, work_dir: Path,
                 channel: EventChannel, deadline: float | None = None) -> None:
        self.job_id: str = job["job_id"]
        self.payload: dict[str, Any] = job["payload"]
        self.constraints: dict[str, Any] = job.get("constraints", {})
        self.package_dir = package_dir
        self.work_dir = work_dir
        self.artifacts_dir = package_dir / "artifacts"
        self.result_path = package_dir / "result.txt"
        self.deadline = deadline  # time.monotonic() value; the runtime's own timeout
        self.cancel_reason: str | None = None
        self.partial = False
        self._channel = channel
        self._cancel = threading.Event()
        self._cancel_callbacks: list[Callable[[], None]] = []
        self._last_progress = 0.0
        self._last_stage: str | None = None
        self._metrics: dict[str, Any] = {}
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)

    # -- cancel -----------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        """True once a cancel (or the job's own deadline) was reached."""
        if not self._cancel.is_set() and self.deadline is not None \
                and time.monotonic() >= self.deadline:
            self.request_cancel("timeout")
        return self._cancel.is_set()

    def check_cancel(self) -> None:
        """Raise :class:`JobCancelled` if a cancel was asked for; call at step boundaries."""
        if self.cancelled:
            raise JobCancelled(self.cancel_reason or "canceled")

    def wait_cancel(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking at once on cancel."""
        if self.deadline is not None:
            timeout = min(timeout, max(0.0, self.deadline - time.monotonic()))
        self._cancel.wait(timeout)
        return self.cancelled

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (in the signal-handling thread) as soon as a cancel arrives."""
        self._cancel_callbacks.append(callback)

    def request_cancel(self, reason: str = "canceled") -> None:
        if self._cancel.is_set():
            return
        self.cancel_reason = reason
        self._cancel.set()
        self._channel.send("cancel_seen", reason=reason)
        for callback in self._cancel_callbacks:
            try:
                callback()
            except Exception:  # a flush hook must not kill the cancel path
                pass

    # -- progress and metrics -----------------------------------------------------
    def progress(self, fraction: float | None = None, stage: str | None = None,
                 message: str | None = None, eta_s: float | None = None,
                 force: bool = False, **metrics: Any) -> bool:
        """Report progress; throttled by time, except on a stage change or ``force``.

        Returns True when the report was sent.
        """
        now = time.monotonic()
        stage_changed = stage is not None and stage != self._last_stage
        if not (force or stage_changed or fraction == 1.0) and \
                now - self._last_progress < PROGRESS_MIN_INTERVAL_S:
            return False
        self._last_progress = now
        if stage is not None:
            self._last_stage = stage
        fields: dict[str, Any] = {}
        if fraction is not None:
            fields["fraction"] = max(0.0, min(1.0, float(fraction)))
        if stage is not None:
            fields["stage"] = stage
        if message is not None:
            fields["message"] = message
        if eta_s is not None:
            fields["eta_s"] = round(float(eta_s), 3)
        if metrics:
            fields["metrics"] = metrics
        self._channel.send("progress", **fields)
        return True

    def set_metrics(self, **metrics: Any) -> None:
        """Record final metrics; they land in output.json's ``metrics``."""
        self._metrics.update(metrics)
        self._channel.send("metrics", metrics=metrics)

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self._metrics)

    def event(self, name: str, **fields: Any) -> None:
        """Send a free-form event (for example ``device`` or ``checkpoint``)."""
        self._channel.send(name, **fields)

    # -- results ----------------------------------------------------------------
    def artifact_path(self, name: str) -> Path:
        """A path under artifacts/ for ``name`` (sub-folders allowed, no escaping)."""
        path = (self.artifacts_dir / name).resolve()
        root = self.artifacts_dir.resolve()
        if path != root and root not in path.parents:
            raise JobFailed("invalid_job", f"artifact name {name!r} leaves artifacts/")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_artifact(self, name: str, data: bytes | str) -> Path:
        """Write an artifact atomically (temp file then rename)."""
        path = self.artifact_path(name)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
        return path

    def write_result(self, text: str) -> None:
        """Replace the main text result (result.txt)."""
        tmp = self.result_path.with_name(".result.txt.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.result_path)

    def append_result(self, text: str) -> None:
        """Append to result.txt; what was appended survives a kill."""
        with open(self.result_path, "a", encoding="utf-8") as fh:
            fh.write(text)

    def mark_partial(self) -> None:
        """Say the package holds partial results (set when flushing on cancel)."""
        self.partial = True
        self._channel.send("partial")


def install_cancel_handler(ctx: JobContext, forward: Callable[[int], None] | None = None) -> None:
    """Make SIGTERM and SIGINT request a cancel instead of killing the process."""

    def handler(signum: int, _frame: object) -> None:
        if forward is not None:
            forward(signum)
        ctx.request_cancel("canceled")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
