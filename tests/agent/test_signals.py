"""Signal handlers are borrowed for a while and given back, as uvicorn's capture_signals."""

from __future__ import annotations

import asyncio
import os
import signal
from types import FrameType

from agent.signals import capture_signals


def test_capture_routes_signals_then_restores_the_previous_handler() -> None:
    seen: list[str] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        seen.append("previous")

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        async def main() -> None:
            got = asyncio.Event()

            def on_signal(signum: int) -> None:
                seen.append(f"captured {signal.Signals(signum).name}")
                got.set()

            with capture_signals(on_signal, [signal.SIGUSR1]):
                os.kill(os.getpid(), signal.SIGUSR1)
                await asyncio.wait_for(got.wait(), 5)
            # Given the block is over, Then the handler from before is back, not SIG_DFL
            assert signal.getsignal(signal.SIGUSR1) is previous

        asyncio.run(main())
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == ["captured SIGUSR1", "previous"]
    finally:
        signal.signal(signal.SIGUSR1, old)
