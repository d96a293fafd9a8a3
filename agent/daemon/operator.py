"""The control socket's ops: `ps` reads the node's view; `drain` and `resume` change the
operator's drain and wake whoever must act on it (the poll loop, the heartbeat)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from agent.daemon.control import Handler
from agent.daemon.drains import Drains
from agent.daemon.view import NodeView

MAX_REASON_CHARS = 500


class OperatorControls:
    """What `miner-agent ps`, `drain` and `resume` do inside the agent."""

    def __init__(self, view: NodeView, drains: Drains, on_change: Callable[[], None],
                 settled: Callable[[], Awaitable[None]] | None = None) -> None:
        self.view = view
        self.drains = drains
        self.on_change = on_change
        self.settled = settled  # until a held poll the drain abandoned is closed

    def handlers(self) -> dict[str, Handler]:
        return {"ps": self.ps, "drain": self.drain, "resume": self.resume}

    async def ps(self, _request: dict[str, Any]) -> dict[str, Any]:
        return self.view.ps()

    async def drain(self, request: dict[str, Any]) -> dict[str, Any]:
        """Take no new work until resumed; running jobs finish. The view after it."""
        reason = str(request.get("reason") or "operator drain")[:MAX_REASON_CHARS]
        await self.drains.drain(reason, by=_who(request))
        self.on_change()  # the heartbeat says DRAINING, with the reason, now
        if self.settled is not None:  # `drain` returns once no job can come to us
            await self.settled()
        return self.view.ps()

    async def resume(self, request: dict[str, Any]) -> dict[str, Any]:
        """Take work again; ``resumed`` says whether there was a drain to end."""
        ended = await self.drains.resume(by=_who(request))
        self.on_change()  # poll now, and say ONLINE
        return {**self.view.ps(), "resumed": ended is not None}


def _who(request: dict[str, Any]) -> str | None:
    uid = request.get("uid")
    return f"uid {uid}" if uid is not None else None
