"""What the coordinator is told about this node: its price, and a status that tells the truth.

ONLINE while serving, DRAINING (with the reason) while it drains, and OFFLINE plus a
deregistration on the way out, so a stopped agent never stays ONLINE with free capacity.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.daemon.helpers import (
    MINER_KEY,
    AgentProcess,
    Client,
    start_coordinator,
    wait_until,
)

LONG = {"type": "sleep", "steps": 40, "step_s": 0.1}
SHORT = {"type": "sleep", "steps": 2, "step_s": 0.01}


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ReferenceCoordinator]:
    coord = start_coordinator(tmp_path, extensions=())
    yield coord
    coord.stop()


def miner(coord: ReferenceCoordinator) -> dict[str, Any]:
    return coord.store.miner("miner-1") or {}


@pytest.mark.slow
def test_online_then_draining_with_reason_then_offline(core: ReferenceCoordinator,
                                                        tmp_path: Path,
                                                        agents: list[AgentProcess]) -> None:
    # Given an agent serving a job that runs for a few seconds
    client = Client(core)
    job_id = client.submit(LONG)
    agent = AgentProcess(core.base_url, tmp_path / "state")
    agents.append(agent)
    agent.wait_log(f"job {job_id}: started")
    wait_until(lambda: miner(core).get("metadata", {}).get("jobs", {}).get(job_id) is not None,
               10)
    assert miner(core)["status"] == "ONLINE"
    assert "drain_reason" not in miner(core)["metadata"]
    # When it is told to stop, it says DRAINING, and why, while the job still runs
    agent.signal(signal.SIGTERM)
    wait_until(lambda: miner(core).get("status") == "DRAINING", 10,
               lambda: f"stored status is {miner(core).get('status')}")
    assert miner(core)["metadata"]["drain_reason"] == "shutdown (SIGTERM)"
    assert miner(core)["metadata"]["draining"] is True
    assert client.job(job_id)["status"] == "running"
    # Then, once the job is reported, it leaves: OFFLINE, nothing in flight, deregistered
    assert agent.wait(60) == 0, agent.log()
    assert client.job(job_id)["status"] == "completed"
    assert miner(core)["status"] == "OFFLINE"
    assert miner(core)["inflight"] == 0
    assert "left the coordinator: OFFLINE and deregistered" in agent.log()


@pytest.mark.slow
def test_price_is_advertised_and_max_price_dispatches_on_it(core: ReferenceCoordinator,
                                                            tmp_path: Path,
                                                            agents: list[AgentProcess]) -> None:
    # Given one job this miner's price fits and one it is too dear for
    client = Client(core)
    fits = client.submit(SHORT, max_price=1.0)
    too_dear = client.submit(SHORT, max_price=0.1)
    # When an agent priced 0.5 runs until the coordinator has nothing for it
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True, price="0.5")
    agents.append(agent)
    assert agent.wait(60) == 0, agent.log()
    # Then its price is in its capabilities and only the job that allows it came here
    assert miner(core)["capabilities"]["price"] == 0.5
    assert client.job(fits)["status"] == "completed"
    assert client.job(too_dear)["status"] == "pending"
    assert miner(core)["status"] == "OFFLINE"


@pytest.mark.slow
def test_leaving_an_unreachable_coordinator_does_not_hold_up_exit(
        core: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a registered agent whose coordinator then goes away
    agent = AgentProcess(core.base_url, tmp_path / "state")
    agents.append(agent)
    agent.wait_log("registered as miner-1")
    assert "price" not in miner(core)["capabilities"]
    time.sleep(1.0)  # past start-up: a SIGTERM racing start-up is another test's subject
    core.faults.down()
    # When it is stopped, its last heartbeat and deregistration fail
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait(30) == 0, agent.log()
    # Then it exits anyway, about 2 s per call at most, and says what it could not send
    assert time.monotonic() - started < 12, agent.log()
    assert "last heartbeat not sent" in agent.log()
    assert "deregistration not sent" in agent.log()


def test_deregister_marks_the_miner_offline_and_register_brings_it_back(
        core: ReferenceCoordinator) -> None:
    headers = {"X-Api-Key": MINER_KEY, "X-Miner-ID": "miner-1"}
    with httpx.Client(base_url=core.base_url, headers=headers, timeout=10) as http:
        assert http.delete("/v1/miners/miner-1").status_code == 404
        http.post("/v1/miners/register", json={"capabilities": {}, "concurrency": 1}
                  ).raise_for_status()
        gone = http.delete("/v1/miners/miner-1")
        assert gone.json() == {"miner_id": "miner-1", "status": "deregistered"}
        assert miner(core)["status"] == "OFFLINE"
        http.post("/v1/miners/register", json={"capabilities": {}, "concurrency": 1}
                  ).raise_for_status()
        assert miner(core)["status"] == "ONLINE"


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "cheap"])
def test_a_bad_price_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="price"):
        load_config(Path("/dev/null"), environ={"MINER_AGENT_PRICE": value})


def test_price_is_unset_by_default_and_read_as_a_number() -> None:
    assert load_config(Path("/dev/null"), environ={}).price is None
    assert load_config(Path("/dev/null"), environ={"MINER_AGENT_PRICE": "0"}).price == 0.0
