"""The daemon's event loop, and the one place where the two loops it may run on differ.

The daemon runs on uvloop where it imports (``event_loop = "auto"``), else on asyncio's
own loop. Nothing in the agent depends on which: where their behaviour differs, the
difference is met here.
"""

from __future__ import annotations

import asyncio
import logging

from agent.errors import ConfigError

log = logging.getLogger(__name__)


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """The daemon's event loop: ``uvloop`` where it imports (``auto``) or is asked for,
    else the stdlib's.

    The agent's own CPU per job is mostly event-loop work (wake-ups, callbacks,
    transports); uvloop does it in C on libuv and took 0.92x of the stdlib loop's CPU
    per tiny job side by side (docs/performance.md, "The event loop").
    """
    if kind == "asyncio":
        log.info("event loop: asyncio (event_loop = \"asyncio\")")
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError as exc:
        if kind == "uvloop":
            raise ConfigError(f"event_loop = \"uvloop\" but uvloop does not import ({exc}): "
                              "pip install uvloop, or set event_loop = \"auto\" or "
                              "\"asyncio\"") from None
        log.info("event loop: asyncio (uvloop does not import: %s)", exc)
        return asyncio.new_event_loop()
    log.info("event loop: uvloop %s", uvloop.__version__)
    return uvloop.new_event_loop()


def write_or_reset(writer: asyncio.StreamWriter, data: bytes, peer: str) -> None:
    """``data`` to ``writer``'s connection; one the peer has closed is a reset.

    asyncio's transport drops a write after the connection is lost (the next drain says
    so); uvloop's raises ``RuntimeError``. Both end here as ``ConnectionResetError``,
    which the callers already treat as the peer leaving.
    """
    if writer.is_closing():
        raise ConnectionResetError(f"the {peer} closed the connection")
    writer.write(data)
