"""The one ISO-8601 time helper: every timestamp the agent writes or serves is UTC."""

from __future__ import annotations

import datetime as dt


def iso(ts: float | None, *, timespec: str = "milliseconds", zulu: bool = False) -> str | None:
    """``ts`` (seconds since the epoch) as UTC ISO-8601, or None for None.

    Packages write milliseconds and ``+00:00`` (the default); the reference coordinator's
    wire format is Python's ``auto`` precision with a ``Z`` (``timespec="auto", zulu=True``).
    """
    if ts is None:
        return None
    text = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec=timespec)
    return text.replace("+00:00", "Z") if zulu else text
