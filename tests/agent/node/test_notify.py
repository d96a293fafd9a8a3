"""sd_notify over a real AF_UNIX datagram socket, as systemd would listen."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.node.notify import Notifier, watchdog_interval_s


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_lifecycle_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as n:
        assert n.enabled
        assert n.ready(status="serving\n2 GPUs")
        assert _recv(sock) == "READY=1\nSTATUS=serving 2 GPUs"
        n.status("running 3 jobs")
        assert _recv(sock) == "STATUS=running 3 jobs"
        n.watchdog()
        assert _recv(sock) == "WATCHDOG=1"
        n.reloading()
        assert _recv(sock) == "RELOADING=1"
        n.extend_timeout(2.5)
        assert _recv(sock) == "EXTEND_TIMEOUT_USEC=2500000"
        n.stopping("draining")
        assert _recv(sock) == "STOPPING=1\nSTATUS=draining"


def test_abstract_socket_name() -> None:
    name = f"miner-agent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        with Notifier.from_env({"NOTIFY_SOCKET": "@" + name}) as n:
            assert n.ready()
        assert _recv(sock) == "READY=1"
    finally:
        sock.close()


def test_no_socket_means_no_op() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    assert Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


def test_listener_gone_is_logged_not_raised(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.enabled and n.watchdog() is False
    n.close()


def test_unset_hides_the_socket_from_children(listener: tuple[socket.socket, str]) -> None:
    # Given the agent run by systemd with NOTIFY_SOCKET set
    sock, path = listener
    code = (
        "import os, subprocess, sys\n"
        "from agent.node.notify import Notifier\n"
        "n = Notifier.from_env(unset=True)\n"
        "n.ready()\n"
        "child = 'import os; print(os.environ.get(\"NOTIFY_SOCKET\", \"-\"))'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True,"
        " text=True).stdout.strip())\n"
    )
    env = dict(os.environ, NOTIFY_SOCKET=path, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=30, check=True)
    # Then the agent could still notify, and its child never saw the socket
    assert _recv(sock) == "READY=1"
    assert out.stdout.strip() == "-"


def test_watchdog_interval() -> None:
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    me = str(os.getpid())
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None
