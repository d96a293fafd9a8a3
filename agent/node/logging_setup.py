"""Agent logs: journald-friendly under systemd, JSON lines or plain text elsewhere.

Under systemd (``JOURNAL_STREAM`` set) each line carries a ``<N>`` syslog priority
prefix, which journald turns into the entry's level, and no timestamp, since the
journal adds its own. ``json`` writes one object a line for log shippers.

A message is one line whatever it quotes: strangers choose some of what the agent logs
(a job's error message, a coordinator's answer), and a newline in it would start a line
of its own, prefix and all, that reads as the agent's (``<6>agent.daemon.outbox: job ...
reported``); an escape sequence would act on the terminal that shows the log. Both show
as ``\\xNN`` (:func:`agent.text.printable`); a traceback keeps its lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from agent.text import printable

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """``<6>name: message``: the priority prefix journald understands, no timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = f"{record.name}: {printable(record.getMessage(), one_line=True)}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


class TextFormatter(logging.Formatter):
    """``time LEVEL name: message``, the message on one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message, one_line=True)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def resolve_format(fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "journal" if os.environ.get("JOURNAL_STREAM") else "text"


def setup_logging(fmt: str = "auto", level: str = "INFO") -> None:
    """Install one stderr handler with the chosen format (replacing earlier ones)."""
    handler = logging.StreamHandler(sys.stderr)
    chosen = resolve_format(fmt)
    if chosen == "journal":
        handler.setFormatter(JournalFormatter())
    elif chosen == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore"):  # a line per request (or per socket step) is noise
        logging.getLogger(noisy).setLevel(logging.WARNING)
