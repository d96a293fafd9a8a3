"""`miner-agent ps`, `drain` and `resume` through the real CLI, against a real agent.

Each test runs the daemon as a subprocess (with a reference coordinator on loopback, or
its embedded one) and the commands as subprocesses with the same config and state dir,
as an operator on the node would.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ExitCode
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.commands.test_embedded_cli import _env, _free_port
from tests.agent.daemon.helpers import (
    MINER_KEY,
    AgentProcess,
    Client,
    start_coordinator,
    wait_until,
)

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "agent"]
LONG = {"type": "sleep", "steps": 40, "step_s": 0.1}
SHORT = {"type": "sleep", "steps": 2, "step_s": 0.01}


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ReferenceCoordinator]:
    coord = start_coordinator(tmp_path / "coord", extensions=())
    yield coord
    coord.stop()


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True, env=env, timeout=110)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def ps(env: dict[str, str], *argv: str) -> dict[str, Any]:
    done = cli(env, "ps", "--json", *argv)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def miner(coord: ReferenceCoordinator) -> dict[str, Any]:
    return coord.store.miner("miner-1") or {}


def stays(predicate: Any, seconds: float) -> bool:
    """``predicate()`` holds for all of ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.1)
    return True


def test_ps_drain_wait_restart_resume_on_a_core_coordinator(
        core: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given an agent running a job that takes a few seconds
    client = Client(core)
    first = client.submit(LONG)
    state = tmp_path / "state"
    agent = AgentProcess(core.base_url, state)
    agents.append(agent)
    agent.wait_log(f"job {first}: started")
    # ps shows the slot with its job, and the agent running
    view = ps(agent.env)
    assert view["state"] == "running" and view["drains"] == []
    [slot] = view["slots"]
    assert slot["job"]["id"] == first and slot["job"]["type"] == "sleep"
    assert slot["job"]["state"] == "running" and slot["job"]["elapsed_s"] >= 0
    assert view["reports_pending"] == 0 and view["miner_id"] == "miner-1"
    text = cli(agent.env, "ps")
    assert first in text.stdout and "running" in text.stdout, text.stdout
    # and its control socket is 0660, in the agent's group
    sock = os.stat(state / "control.sock")
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o660
    assert sock.st_gid == os.getegid()

    # When the operator drains it, with a reason
    drained = cli(agent.env, "drain", "--reason", "kernel update")
    assert drained.returncode == 0, drained.stderr
    assert "draining: kernel update" in drained.stdout
    # Then the coordinator sees DRAINING and why, and a new job is not taken
    wait_until(lambda: miner(core).get("status") == "DRAINING", 10)
    assert miner(core)["metadata"]["drain_reason"] == "kernel update"
    second = client.submit(SHORT)
    # drain --wait gives up at its timeout with 4, naming what still runs
    early = cli(agent.env, "drain", "--reason", "kernel update", "--wait", "--timeout", "0.3")
    assert early.returncode == ExitCode.TIMED_OUT, early.stderr
    assert first in early.stderr and "still running" in early.stderr
    # and returns 0 once the running job has finished, which it did
    waited = cli(agent.env, "drain", "--reason", "kernel update", "--wait", "--timeout", "60")
    assert waited.returncode == 0, waited.stderr
    assert client.job(first)["status"] == "completed"
    assert stays(lambda: client.job(second)["status"] == "pending", 1.5)
    assert ps(agent.env)["state"] == "draining"

    # When the agent restarts, the drain holds
    agent.signal(signal.SIGTERM)
    assert agent.wait(60) == 0, agent.log()
    assert not (state / "control.sock").exists()
    again = AgentProcess(core.base_url, state)
    agents.append(again)
    again.wait_log("registered")
    wait_until(lambda: miner(core).get("status") == "DRAINING", 10)
    assert miner(core)["metadata"]["drain_reason"] == "kernel update"
    assert stays(lambda: client.job(second)["status"] == "pending", 1.5)
    [drain] = ps(again.env)["drains"]
    assert drain["kind"] == "operator" and drain["reason"] == "kernel update"

    # When the operator resumes, it takes work again and says ONLINE
    resumed = cli(again.env, "resume")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr
    assert client.wait_status(second, "completed", timeout=30)["status"] == "completed"
    wait_until(lambda: miner(core).get("status") == "ONLINE", 10)
    assert "drain_reason" not in miner(core)["metadata"]
    assert not (state / "drain.json").exists()


def test_sigterm_during_an_operator_drain_still_drains_then_exits(
        core: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a drained agent whose job still runs
    client = Client(core)
    job_id = client.submit(LONG)
    agent = AgentProcess(core.base_url, tmp_path / "state")
    agents.append(agent)
    agent.wait_log(f"job {job_id}: started")
    assert cli(agent.env, "drain").returncode == 0
    # When SIGTERM comes, ps says stopping, the job completes and the agent exits
    agent.signal(signal.SIGTERM)
    wait_until(lambda: miner(core).get("metadata", {}).get("drain_reason")
               == "shutdown (SIGTERM)", 10)
    assert agent.wait(60) == 0, agent.log()
    assert client.job(job_id)["status"] == "completed"


def test_embedded_mode_drain_resume_and_no_agent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = _env(state, embedded_port=str(_free_port()))
    # With no agent, the commands say so and exit 10
    for argv in (["ps"], ["drain"], ["resume"]):
        gone = cli(env, *argv)
        assert gone.returncode == ExitCode.UNAVAILABLE, gone.stderr
        assert f"no agent is running with state dir {state}: start it with `miner-agent run` " \
               "or `systemctl start miner-agent`" in gone.stderr
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen([*CLI, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "registered as" in log_path.read_text(), 60, log_path.read_text)
        # Given a drained node, a submitted job waits
        assert cli(env, "drain", "--reason", "swap a fan").returncode == 0
        job = tmp_path / "job.json"
        job.write_text(json.dumps({"payload": SHORT}))
        job_id = cli(env, "submit", str(job)).stdout.split()[-1]
        assert stays(lambda: json.loads(cli(env, "status", job_id, "--json").stdout)
                     ["status"] == "pending", 1.5)
        view = ps(env)
        assert view["state"] == "draining" and view["drains"][0]["reason"] == "swap a fan"
        # When resumed, it runs
        assert cli(env, "resume").returncode == 0
        done = cli(env, "status", job_id, "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
    assert not (state / "control.sock").exists()


def test_sighup_reloads_allowed_job_types_and_refuses_a_bad_config(
        core: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given an agent whose config allows sleep only
    config = tmp_path / "agent.toml"
    config.write_text('allowed_job_types = ["sleep"]\n')
    client = Client(core)
    agent = AgentProcess(core.base_url, tmp_path / "state", config=config)
    agents.append(agent)
    agent.wait_log("registered")
    command = {"type": "command", "argv": ["sh", "-c", "echo ran > $MINER_RESULT_FILE"]}
    refused = client.wait_status(client.submit(command), "failed", "completed")
    assert refused["error"]["code"] == "job_type_not_allowed", refused
    # When the config allows command too and SIGHUP comes
    config.write_text('allowed_job_types = ["sleep", "command"]\nprice = 0.5\n')
    agent.signal(signal.SIGHUP)
    agent.wait_log("config reload: allowed_job_types")
    # Then it registers the new types, ps shows them, and a command job runs
    wait_until(lambda: "command" in miner(core)["capabilities"]["runtimes"], 10)
    view = ps(agent.env)
    assert view["allowed_job_types"] == ["sleep", "command"] and view["price"] == 0.5
    ran = client.wait_status(client.submit(command), "failed", "completed")
    assert ran["status"] == "completed", ran
    # When the config turns bad, a SIGHUP is refused and the running config stays
    config.write_text('allowed_job_types = ["sleep", "command"\n')
    agent.signal(signal.SIGHUP)
    agent.wait_log("config reload refused, the running config stays")
    # (ps reads the config for the state dir; --state-dir skips it)
    assert cli(agent.env, "ps").returncode == ExitCode.CONFIG
    view = ps(agent.env, "--state-dir", str(tmp_path / "state"))
    assert view["allowed_job_types"] == ["sleep", "command"]
    assert agent.proc.poll() is None


def test_a_rotated_key_is_read_again_on_401_and_on_sighup(
        core: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given an agent that reads its key from a file
    key_file = tmp_path / "api-key"
    key_file.write_text(MINER_KEY + "\n")
    client = Client(core)
    agent = AgentProcess(core.base_url, tmp_path / "state", api_key_file=str(key_file))
    agents.append(agent)
    agent.wait_log("registered")
    # When the key is rotated in the file and at the coordinator, with no signal
    key_file.write_text("rotated-key-1\n")
    core.api_keys["miner"] = frozenset({"rotated-key-1"})
    # Then the first 401 reads the file again and the agent goes on with the new key
    agent.wait_log("the API key file holds a new key")
    assert client.wait_status(client.submit(SHORT), "completed", "failed")["status"] == \
        "completed"
    # When the file changes first and SIGHUP comes, the new key is in use before any 401
    # (the coordinator takes both keys during the rotation, as a real rotation does: a
    # request the agent sends between its reload and the coordinator's switch is not 401)
    core.api_keys["miner"] = frozenset({"rotated-key-1", "rotated-key-2"})
    key_file.write_text("rotated-key-2\n")
    agent.signal(signal.SIGHUP)
    agent.wait_log("config reload: the API key changed")
    core.api_keys["miner"] = frozenset({"rotated-key-2"})
    assert client.wait_status(client.submit(SHORT), "completed", "failed")["status"] == \
        "completed"
    after = agent.log().split("config reload: the API key changed")[1]
    assert "holds a new key" not in after and "refused the miner's credentials" not in after
    assert "rotated-key" not in agent.log()
