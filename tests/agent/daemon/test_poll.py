"""The poll loop of the real daemon: long-polls where offered, a capped back-off where not."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.reference.model import EXTENSIONS
from tests.agent.conftest import EVENT_LOOPS, run_on_loop
from tests.agent.daemon.helpers import AgentProcess, Client, start_coordinator, wait_until

POLL = "/v1/miners/poll"
QUICK = {"type": "sleep", "steps": 1, "step_s": 0}


def stays(predicate: object, seconds: float) -> bool:
    """``predicate()`` holds for all of ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():  # type: ignore[operator]
            return False
        time.sleep(0.1)
    return True


def test_poll_settings_defaults_and_validation() -> None:
    cfg = load_config(Path("/dev/null"), environ={})
    assert cfg.poll_max_interval_s == 3.0 and cfg.poll_interval_s == 1.0
    assert 0 < cfg.poll_wait_s <= 30
    assert load_config(Path("/dev/null"), environ={"MINER_AGENT_POLL_WAIT_S": "0"}
                       ).poll_wait_s == 0
    for bad in ("-1", "nan", "301", "soon"):
        with pytest.raises(ConfigError, match="poll_wait_s"):
            load_config(Path("/dev/null"), environ={"MINER_AGENT_POLL_WAIT_S": bad})
    assert not math.isnan(cfg.poll_wait_s)


def test_an_idle_agent_holds_one_poll_and_gets_a_job_the_moment_it_comes(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    coord = start_coordinator(tmp_path / "coord")
    client = Client(coord)
    # Given an idle agent against a coordinator that offers longpoll (and a short back-off
    # it would use without it: 0.1 s up to 0.5 s)
    agent = AgentProcess(coord.base_url, tmp_path / "state", poll_wait_s="20")
    agents.append(agent)
    agent.wait_log("registered as .* extensions: .*longpoll")
    wait_until(lambda: coord.faults.arrived(POLL) >= 1, 30)
    before = coord.faults.arrived(POLL)
    # When nothing comes for a while, one poll is held (a core agent would poll ~4 times)
    time.sleep(1.5)
    assert coord.faults.arrived(POLL) - before <= 1
    # When a job is submitted, the held poll hands it over and it runs
    job_id = client.submit(QUICK)
    client.wait_status(job_id, "completed", timeout=60)
    # Then the agent still holds polls as it goes on idling
    coord.stop()


def test_drain_pause_and_stop_abandon_a_held_poll(tmp_path: Path,
                                                  agents: list[AgentProcess]) -> None:
    coord = start_coordinator(tmp_path / "coord")
    client = Client(coord)
    agent = AgentProcess(coord.base_url, tmp_path / "state", poll_wait_s="30", cpu_slots="2")
    agents.append(agent)
    agent.wait_log("registered as")
    wait_until(lambda: coord.faults.arrived(POLL) >= 1, 30)
    time.sleep(0.3)  # its poll is held now
    cli = [sys.executable, "-m", "agent"]
    # When the operator drains the node, the held poll is dropped: a job that comes stays
    done = subprocess.run([*cli, "drain", "--reason", "test"], env=agent.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job_id = client.submit(QUICK)
    assert stays(lambda: client.job(job_id)["status"] == "pending", 1.0)
    # and resuming takes it at once
    done = subprocess.run([*cli, "resume"], env=agent.env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    client.wait_status(job_id, "completed", timeout=60)
    # When the agent is stopped while one slot runs a job and the other holds a poll
    running = client.submit({"type": "sleep", "steps": 6, "step_s": 0.5})
    client.wait_status(running, "running", timeout=60)
    time.sleep(0.3)
    agent.signal(signal.SIGTERM)
    # (the drain's own line, logged once its held poll is gone; the signal's line,
    # "SIGTERM: draining", comes before the drain has begun)
    agent.wait_log(r"draining: 1 job\(s\) running")
    # Then the held poll is dropped at once: a job that comes during the drain stays queued
    late = client.submit(QUICK)
    assert stays(lambda: client.job(late)["status"] == "pending", 1.0)
    # and the agent exits once the running job is done, without waiting out the poll
    assert agent.wait(25) == 0, agent.log()
    assert client.job(running)["status"] == "completed"
    assert client.job(late)["status"] == "pending"
    coord.stop()


def test_without_longpoll_the_back_off_is_capped_and_resets_when_a_slot_frees(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a coordinator with the extension switched off, and an agent whose back-off
    # grows from 0.2 s to its default cap (3 s), with two slots (and heartbeats, which
    # poll at once when a slot is free, far apart)
    coord = start_coordinator(tmp_path / "coord",
                              extensions=tuple(e for e in EXTENSIONS if e != "longpoll"))
    client = Client(coord)
    cfg = load_config(Path("/dev/null"), environ={})
    agent = AgentProcess(coord.base_url, tmp_path / "state", poll_interval_s="0.2",
                         poll_max_interval_s=str(cfg.poll_max_interval_s), poll_jitter="0",
                         cpu_slots="2", heartbeat_interval_s="10")
    agents.append(agent)
    agent.wait_log("registered as")
    # When one job runs 5 s while the other slot idles, the back-off grows (x1.5 a poll)
    job_id = client.submit({"type": "sleep", "steps": 10, "step_s": 0.5})
    client.wait_status(job_id, "running", timeout=60)
    time.sleep(3.0)
    start = coord.faults.arrived(POLL)
    time.sleep(1.3)
    assert coord.faults.arrived(POLL) - start <= 1  # intervals of 1.5 s and more by now
    # Then, when the job ends and its slot frees, polling starts again from 0.2 s
    client.wait_status(job_id, "completed", timeout=60)
    start = coord.faults.arrived(POLL)
    time.sleep(3.0)
    # (0.2, 0.3, 0.45, 0.68, 1.01 s: five polls, where a 3 s interval would make one)
    assert coord.faults.arrived(POLL) - start >= 3
    # And a job submitted to this core-mode agent still runs
    other = client.submit(QUICK)
    client.wait_status(other, "completed", timeout=60)
    coord.stop()


@pytest.mark.parametrize("kind", EVENT_LOOPS)
def test_released_returns_once_the_held_polls_connection_is_closed(kind: str) -> None:
    # Given a poll loop whose poll a stand-in coordinator holds (a real loopback socket
    # that reads the request and never answers)
    import asyncio
    import socket
    import threading

    from agent.coordinator.client import CoordinatorClient
    from agent.daemon.held import HeldJobs
    from agent.daemon.poll import PollLoop

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    arrived = threading.Event()

    def hold() -> None:
        conn, _ = listener.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        held.append(conn)
        arrived.set()

    threading.Thread(target=hold, daemon=True).start()
    cfg = load_config(Path("/dev/null"), environ={"MINER_AGENT_POLL_WAIT_S": "30"})
    stopping = False

    async def main() -> tuple[bool, bytes | None]:
        port = listener.getsockname()[1]
        async with CoordinatorClient(f"http://127.0.0.1:{port}", "key", "miner-1") as client:
            polls = PollLoop(cfg=cfg, client=client, held=HeldJobs(), capacity=1,
                             accept=lambda _job: None, reregister=lambda _why: asyncio.sleep(0),
                             draining=lambda: stopping, on_empty=lambda: False,
                             longpoll=lambda: True)
            task = asyncio.create_task(polls.run())
            while not arrived.is_set():
                await asyncio.sleep(0.01)
            assert await polls.released(0.2) is False  # held: not released
            # When the agent stops and wakes the loop
            nonlocal stopping
            stopping = True
            polls.wake()
            released = await polls.released()
            # Then by the time released() returns, the coordinator's side sees the end
            # of the connection (no loop turn of ours needed after it)
            held[0].setblocking(False)
            try:
                seen: bytes | None = held[0].recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                seen = None  # still open
            await task
            return released, seen

    try:
        released, seen = run_on_loop(kind, main())
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert released is True
    assert seen == b""
