"""The daemon as systemd and Prometheus see it: sd_notify on a real socket, /metrics."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.agent.daemon.helpers import (
    MINER_KEY,
    AgentProcess,
    Client,
    start_coordinator,
    wait_until,
)

pytestmark = pytest.mark.slow


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; records each message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def having(self, field: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if field in m.split("\n")
                or any(line.startswith(field) for line in m.split("\n"))]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sd_notify_ready_watchdog_status_stopping(tmp_path: Path, notify: NotifySocket,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a coordinator and an agent started the way systemd starts it
    coord = start_coordinator(tmp_path, extensions=())
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    agent = AgentProcess(coord.base_url, tmp_path / "state", log_format="auto")
    try:
        agent.wait_log(r"registered as")
        # Then READY comes once, after registration, with a STATUS line
        wait_until(lambda: bool(notify.having("READY=1")), 30)
        ready_at = notify.having("READY=1")[0][0]
        assert len(notify.having("READY=1")) == 1
        assert any("STATUS=serving" in m for _, m in notify.messages)
        # And the watchdog is pinged at half the WATCHDOG_USEC period
        time.sleep(3)
        pings = [t for t, _ in notify.having("WATCHDOG=1") if t >= ready_at]
        assert 3 <= len(pings) <= 12, len(pings)
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert max(gaps) < 1.0
        # And SIGTERM says STOPPING before the agent exits
        agent.signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        assert notify.having("STOPPING=1")
        # Under journald, log lines carry a syslog priority and no timestamp of their own
        first = agent.log().splitlines()[0]
        assert first.startswith("<6>") or first.startswith("<4>"), first
    finally:
        agent.stop()
        coord.stop()


def test_prometheus_endpoint_counts_jobs_and_calls(tmp_path: Path) -> None:
    coord = start_coordinator(tmp_path, extensions=())
    client = Client(coord)
    port = free_port()
    agent = AgentProcess(coord.base_url, tmp_path / "state", metrics_port=port)
    try:
        job_id = client.submit({"type": "sleep", "steps": 3, "step_s": 0})
        client.wait_status(job_id, "completed")
        agent.wait_log(f"job {job_id}: reported")
        wait_until(lambda: 'miner_agent_jobs_total{outcome="completed"} 1.0' in
                   httpx.get(f"http://127.0.0.1:{port}/metrics").text, 10)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'miner_agent_coordinator_request_duration_seconds_count{endpoint="poll"}' in text
        assert "miner_agent_job_duration_seconds_bucket" in text
    finally:
        agent.stop()
        client.close()
        coord.stop()
    # DEBUG logging of every call, and still no key in the log
    assert MINER_KEY not in agent.log()
