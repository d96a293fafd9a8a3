"""The control socket's protocol and the drains, in process: bounds, refusals, file."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.control import (
    MAX_REQUEST_BYTES,
    AgentNotRunning,
    ControlServer,
    call,
    socket_path,
)
from agent.daemon.drains import DrainKind, Drains, drain_path
from agent.errors import AgentError


def raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def echo(request: dict[str, Any]) -> dict[str, Any]:
    return {"got": request.get("value"), "uid": request.get("uid")}


async def broken(_request: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom")


def test_the_protocol_answers_and_refuses_what_it_must(tmp_path: Path) -> None:
    async def main() -> None:
        server = ControlServer(socket_path(tmp_path), {"echo": echo, "broken": broken})
        assert await server.start()
        mode = os.stat(server.path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        try:
            def client_side() -> None:
                # One request, one answer, with the caller's uid
                assert call(tmp_path, "echo", value=7) == {"ok": True, "got": 7,
                                                           "uid": os.getuid()}
                # Unknown ops, bad JSON, an oversized line and a failing handler are refused
                with pytest.raises(AgentError, match="unknown op 'nope'; one of broken, echo"):
                    call(tmp_path, "nope")
                assert b"not one JSON object" in raw(server.path, b"{nope\n")
                big = b'{"op": "echo", "value": "' + b"x" * MAX_REQUEST_BYTES + b'"}\n'
                assert b"request longer than" in raw(server.path, big)
                with pytest.raises(AgentError, match="broken failed inside the agent"):
                    call(tmp_path, "broken")
                # and the socket still serves
                assert call(tmp_path, "echo", value=8)["got"] == 8

            await asyncio.to_thread(client_side)
        finally:
            await server.close()
        assert not server.path.exists()
        with pytest.raises(AgentNotRunning, match=f"no agent is running with state dir "
                                                  f"{tmp_path}"):
            call(tmp_path, "echo")

    asyncio.run(main())


def test_a_stale_socket_is_replaced_and_a_newer_one_is_left(tmp_path: Path) -> None:
    path = socket_path(tmp_path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # an agent killed with SIGKILL left this behind
    stale.close()
    with pytest.raises(AgentNotRunning):
        call(tmp_path, "ps")

    async def main() -> None:
        server = ControlServer(path, {"echo": echo})
        assert await server.start()
        assert (await asyncio.to_thread(call, tmp_path, "echo", value=1))["got"] == 1
        newer = ControlServer(path, {"echo": echo})  # a second agent took the path over
        assert await newer.start()
        await server.close()
        assert path.exists()
        await newer.close()
        assert not path.exists()

    asyncio.run(main())


def test_drains_order_persistence_and_every_gpu_held_back(tmp_path: Path) -> None:
    blocked: dict[int, str] = {}
    low: list[str | None] = [None]
    stopping: list[str | None] = [None]

    def drains() -> Drains:
        return Drains(drain_path(tmp_path), stopping=lambda: stopping[0],
                      low_disk=lambda: low[0], blocked=lambda: blocked, gpu_count=2)

    async def main() -> None:
        first = drains()
        assert first.node_drain() is None
        # One GPU held back: that slot only; both: the node
        blocked[0] = "GPU 0 still held"
        assert first.node_drain() is None and first.all()[0].gpu == 0
        blocked[1] = "GPU 1 still held"
        whole = first.node_drain()
        assert whole is not None and whole.reason.startswith("every GPU is held back")
        blocked.clear()
        # The operator's drain is kept, and read back by the next start
        await first.drain("maintenance", by="uid 0")
        low[0] = "low disk"
        assert [d.kind for d in first.all()] == [DrainKind.OPERATOR, DrainKind.LOW_DISK]
        stopping[0] = "shutdown (SIGTERM)"
        node = first.node_drain()
        assert node is not None and node.kind is DrainKind.SHUTDOWN
        second = drains()
        await second.load()
        assert second.operator is not None and second.operator.reason == "maintenance"
        assert second.operator.since == first.operator.since  # type: ignore[union-attr]
        assert await second.resume() is not None and not drain_path(tmp_path).exists()
        assert await second.resume() is None
        # An unreadable drain file keeps the node drained (the operator meant it out)
        drain_path(tmp_path).write_text("{not json")
        third = drains()
        await third.load()
        assert third.operator is not None and "unreadable" in third.operator.reason

    asyncio.run(main())
