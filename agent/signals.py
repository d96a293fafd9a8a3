"""Signal handlers that only set flags, installed for a while and then put back.

Like uvicorn's ``capture_signals``: while the block runs, the signals go to a callback on
the event loop; on the way out the handlers that were there before come back (asyncio's
``remove_signal_handler`` alone would leave the default ones), so a test or a program
that embeds the agent keeps its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterable, Iterator

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def capture_signals(on_signal: Callable[[int], None],
                    signals: Iterable[int] = DEFAULT_SIGNALS) -> Iterator[None]:
    """Route ``signals`` to ``on_signal(signum)`` on the running loop until the block ends."""
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in previous:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(sig, handler)
