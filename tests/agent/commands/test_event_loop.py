"""The daemon's event loop: uvloop where installed ("auto"), the stdlib's otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from agent.aio import new_event_loop, write_or_reset
from agent.commands.run import run_bounded
from agent.errors import ConfigError, ExitCode
from tests.agent.conftest import EVENT_LOOPS, run_on_loop

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


def loop_module(loop: asyncio.AbstractEventLoop) -> str:
    return type(loop).__module__.split(".")[0]


async def answer() -> int:
    await asyncio.sleep(0.01)
    return 7


def test_asyncio_is_the_stdlib_loop_and_runs_a_coroutine() -> None:
    loop = new_event_loop("asyncio")
    assert loop_module(loop) == "asyncio"
    assert run_bounded(answer(), loop) == 7
    assert loop.is_closed()


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed")
@pytest.mark.parametrize("kind", ["auto", "uvloop"])
def test_auto_and_uvloop_take_uvloop_where_installed(kind: str) -> None:
    loop = new_event_loop(kind)
    assert loop_module(loop) == "uvloop"
    assert run_bounded(answer(), loop) == 7


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    loop = new_event_loop("auto")
    assert loop_module(loop) == "asyncio"
    loop.close()
    with pytest.raises(ConfigError, match="pip install uvloop.*event_loop"):
        new_event_loop("uvloop")


def test_the_daemon_refuses_uvloop_it_cannot_import(tmp_path: Path) -> None:
    # A uvloop that does not import, ahead of the installed one on the path
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow/uvloop.py").write_text("raise ImportError('broken on purpose')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
    env.update({"PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), os.getcwd()]),
                "MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_EVENT_LOOP": "uvloop",
                "MINER_AGENT_STATE_DIR": str(tmp_path / "state"),
                "MINER_AGENT_CACHE_DIR": str(tmp_path / "cache"),
                "MINER_AGENT_API_KEY": "k", "MINER_AGENT_SANDBOX": "off"})
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--coordinator",
                           "http://127.0.0.1:9"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert "broken on purpose" in done.stderr and "pip install uvloop" in done.stderr


def test_a_loop_kind_not_known_is_a_config_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
    env.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_EVENT_LOOP": "trio"})
    done = subprocess.run([sys.executable, "-m", "agent", "config", "show"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert "event_loop" in done.stderr


@pytest.mark.parametrize("kind", EVENT_LOOPS)
def test_a_write_to_a_connection_the_peer_reset_is_a_connection_reset(kind: str) -> None:
    async def main() -> BaseException | None:
        # A peer that accepts and resets at once; the loop sees the connection go
        async def reset(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()

        server = await asyncio.start_server(reset, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionResetError):  # or b"": the peer is gone
            await reader.read()
        for _ in range(100):
            if writer.is_closing():
                break
            await asyncio.sleep(0.01)
        try:
            write_or_reset(writer, b"late", "test peer")
        except BaseException as exc:  # noqa: BLE001 - the type is what is asserted
            return exc
        finally:
            writer.close()
            server.close()
            await server.wait_closed()
        return None

    failure = run_on_loop(kind, main())
    # Then either loop says ConnectionResetError (uvloop's own write raises RuntimeError)
    assert isinstance(failure, ConnectionResetError), repr(failure)
    assert "test peer closed the connection" in str(failure)
