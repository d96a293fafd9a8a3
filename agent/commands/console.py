"""The terminal view of a foreground job: a live progress bar and a log tail.

What a job wrote (its output, its progress's stage and message) is a stranger's bytes:
on a terminal, the view shows every control character in them as ``\\xNN``
(:func:`agent.text.printable`), so no escape sequence is acted on; job lines written to
a file or a pipe stay as they are.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, TextIO

from agent.text import printable

BAR_WIDTH = 24
REDRAW_S = 0.1


class JobConsole:
    """Prints the job's output lines and keeps one progress line at the bottom."""

    def __init__(self, job_id: str, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.job_id = job_id
        self.out = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.out.isatty()
        self.progress: dict[str, Any] = {}
        self._bar_shown = False
        self._last_draw = 0.0
        self._last_plain = 0.0
        self._plain_full = False  # the last plain progress line said 100 %
        self.t0 = time.monotonic()

    def line(self, stream: str, data: bytes) -> None:
        if self.quiet:
            return
        text = data.decode("utf-8", errors="replace").rstrip("\n")
        if self.tty:
            text = printable(text, one_line=True, overwrite=True)
        self._clear_bar()
        prefix = "" if stream == "stdout" else "! "
        self.out.write(f"{prefix}{text}\n")
        self._draw(force=True)

    def event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "progress":
            self.progress = event
            self._draw()
        elif event.get("event") == "cancel_seen" and not self.quiet:
            self._clear_bar()
            self.out.write(f"[{self.job_id}] the job saw the cancel; saving partial results\n")

    def note(self, text: str) -> None:
        self._clear_bar()
        self.out.write(f"[{self.job_id}] {printable(text)}\n")
        self.out.flush()

    def complete(self) -> None:
        """The run completed: the bar ends at 100 %, whatever the job last reported
        (a runtime reports every few steps, so its last word is often short of the end)."""
        if self.quiet:
            return
        if self.progress.get("fraction") == 1.0 and self._plain_full:
            return  # a plain stream already has its 100 % line
        self.progress = {k: v for k, v in self.progress.items() if k != "eta_s"}
        self.progress["fraction"] = 1.0
        self._draw(force=True)
        if self._bar_shown:  # keep the full bar on screen above the outcome line
            self.out.write("\n")
            self._bar_shown = False
            self.out.flush()

    def _render(self) -> str:
        p = self.progress
        frac = p.get("fraction")
        parts = []
        if isinstance(frac, (int, float)):
            filled = int(frac * BAR_WIDTH)
            parts.append(f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac * 100:5.1f}%")
        if p.get("stage"):
            parts.append(str(p["stage"]))
        metrics = p.get("metrics")
        metrics = metrics if isinstance(metrics, dict) else {}
        parts.extend(f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:4])
        if p.get("message"):
            parts.append(str(p["message"]))
        if isinstance(p.get("eta_s"), (int, float)):
            parts.append(f"eta {p['eta_s']:.0f}s")
        parts.append(f"{time.monotonic() - self.t0:.0f}s")
        return printable(" ".join(parts), one_line=True)

    def _draw(self, force: bool = False) -> None:
        if self.quiet or not self.progress:
            return
        now = time.monotonic()
        if self.tty:
            if not force and now - self._last_draw < REDRAW_S:
                return
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.out.write("\r\x1b[K" + self._render()[:width])
            self._bar_shown = True
            self._last_draw = now
        elif now - self._last_plain >= 5 or self.progress.get("fraction") == 1.0:
            self.out.write(f"[{self.job_id}] {self._render()}\n")
            self._last_plain = now
            self._plain_full = self.progress.get("fraction") == 1.0
        self.out.flush()

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.out.write("\r\x1b[K")
            self._bar_shown = False

    def close(self) -> None:
        self._clear_bar()
        self.out.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
