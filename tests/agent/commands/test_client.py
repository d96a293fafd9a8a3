"""The client verbs through the real CLI, against a real reference coordinator and agent.

One coordinator and one agent daemon (a subprocess) serve the module; each test drives
`miner-agent submit/status/cancel/verify` as a user would and checks what it prints and
how it exits (README's exit-code table).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import ExitCode
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.daemon.helpers import CLIENT_KEY, AgentProcess, start_coordinator, wait_until

CLI = [sys.executable, "-m", "agent"]
# A job that reports 40 % and then completes: its last shipped progress is stale.
STALE = {"type": "command", "argv": ["sh", "-c", "echo '{\"event\":\"progress\","
                                     "\"fraction\":0.4}' >&3; sleep 1.5; echo done"]}

pytestmark = pytest.mark.slow


class Node:
    """The module's coordinator and agent, and the CLI aimed at them."""

    def __init__(self, coord: ReferenceCoordinator, agent: AgentProcess, home: Path) -> None:
        self.coord, self.agent, self.home = coord, agent, home

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
        env.update({"MINER_AGENT_CONFIG": "/dev/null",
                    "MINER_AGENT_STATE_DIR": str(self.home), **extra})
        return env

    def cli(self, *argv: str, remote: bool = True, key: str = CLIENT_KEY,
            **extra: str) -> subprocess.CompletedProcess[str]:
        where = ["--coordinator", self.coord.base_url, "--client-key", key] if remote else []
        return subprocess.run([*CLI, *argv, *where], capture_output=True, text=True,
                              timeout=90, env=self.env(**extra))

    def submit(self, tmp: Path, payload: dict[str, Any], **job: Any) -> str:
        path = tmp / f"job-{time.monotonic_ns()}.json"
        path.write_text(json.dumps({"payload": payload, **job}))
        proc = self.cli("submit", str(path))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("client")
    coord = start_coordinator(tmp / "coord")
    agent = AgentProcess(coord.base_url, tmp / "agent", allowed_job_types="sleep,command")
    try:
        agent.wait_log("registered as")
        yield Node(coord, agent, tmp / "home")
    finally:
        agent.stop()
        coord.stop()


def test_status_wait_prints_the_last_line_once_at_100_percent(node: Node,
                                                              tmp_path: Path) -> None:
    # Given a job whose miner last reported 40 % before it completed
    job_id = node.submit(tmp_path, STALE)
    # When the user follows it
    proc = node.cli("status", job_id, "--wait")
    # Then it exits 0, and the final line is printed once, on stdout, at 100 %
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"{job_id}: completed 100%")
    assert proc.stdout.count(": completed") == 1
    assert ": completed" not in proc.stderr
    assert f"{job_id}: running 40%" in proc.stderr
    # And plain status and --json say 100 for the completed job too
    assert node.cli("status", job_id).stdout.startswith(f"{job_id}: completed 100%")
    assert json.loads(node.cli("status", job_id, "--json").stdout)["progress"] == 100


def test_the_package_url_status_prints_is_fetchable_with_the_client_key(
        node: Node, tmp_path: Path) -> None:
    job_id = node.submit(tmp_path, {"type": "sleep", "steps": 2, "step_s": 0.01})
    proc = node.cli("status", job_id, "--wait")
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"^package: (\S+) \(sha256 (\w+)\)$", proc.stdout, re.M)
    assert found, proc.stdout
    url, sha = found.groups()
    # The line says to send the client key: the URL needs it (no key: 401)
    assert 'fetch: curl -fsS -H "X-Api-Key: $CLIENT_KEY"' in proc.stdout
    assert "--client-key" in proc.stdout
    assert httpx.get(url).status_code == 401
    resp = httpx.get(url, headers={"X-Api-Key": CLIENT_KEY})
    assert resp.status_code == 200 and resp.headers["X-Content-SHA256"] == sha


@pytest.mark.parametrize("payload, constraints, code", [
    ({"type": "sleep", "steps": 3, "step_s": 0.01, "fail_at": 2}, {}, ExitCode.FAILED),
    ({"type": "sleep", "steps": 1000, "step_s": 0.05}, {"timeout_s": 1}, ExitCode.TIMED_OUT),
])
def test_status_wait_exits_by_outcome_as_exec_does(node: Node, tmp_path: Path,
                                                   payload: dict[str, Any],
                                                   constraints: dict[str, Any],
                                                   code: ExitCode) -> None:
    job_id = node.submit(tmp_path, payload, constraints=constraints)
    proc = node.cli("status", job_id, "--wait")
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert f"{job_id}: failed" in proc.stdout


def test_a_canceled_job_exits_3_under_status_wait(node: Node, tmp_path: Path) -> None:
    # Given a long job being followed
    job_id = node.submit(tmp_path, {"type": "sleep", "steps": 100000, "step_s": 0.01})
    follow = subprocess.Popen([*CLI, "status", job_id, "--wait", "--coordinator",
                               node.coord.base_url, "--client-key", CLIENT_KEY],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=node.env())
    wait_until(lambda: node.coord.store.job(job_id)["started_at"] is not None, 60)
    # When it is canceled
    assert node.cli("cancel", job_id).returncode == 0
    out, err = follow.communicate(timeout=60)
    # Then the follower exits 3, as exec does for a canceled job
    assert follow.returncode == ExitCode.CANCELED, out + err
    assert f"{job_id}: canceled" in out


def test_a_closed_pipe_ends_quietly(node: Node, tmp_path: Path) -> None:
    # Given `status --wait` whose reader goes away before the job ends (`| head -1`)
    job_id = node.submit(tmp_path, {"type": "sleep", "steps": 20, "step_s": 0.05})
    proc = subprocess.Popen([*CLI, "status", job_id, "--wait", "--coordinator",
                             node.coord.base_url, "--client-key", CLIENT_KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=node.env())
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    # Then it exits as a SIGPIPE'd tool does, without a traceback
    assert proc.returncode == 141, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_client_errors_have_their_own_exit_codes(node: Node, tmp_path: Path) -> None:
    assert node.cli("status", "no-such-job").returncode == ExitCode.NOT_FOUND
    assert node.cli("cancel", "no-such-job").returncode == ExitCode.NOT_FOUND
    refused = node.cli("status", "x", key="not-a-key")
    assert refused.returncode == ExitCode.REFUSED and "--client-key" in refused.stderr
    down = subprocess.run([*CLI, "status", "x", "--coordinator", "http://127.0.0.1:9",
                           "--client-key", "k"], capture_output=True, text=True,
                          env=node.env(), timeout=60)
    assert down.returncode == ExitCode.UNAVAILABLE and "cannot reach" in down.stderr
    # No agent has run with this state dir: "agent not running", not a config error
    local = node.cli("status", "x", remote=False)
    assert local.returncode == ExitCode.UNAVAILABLE and "miner-agent run" in local.stderr
    # Only a bad config exits 9
    bad = tmp_path / "agent.toml"
    bad.write_text("coordinator_url = [unclosed\n")
    broken = node.cli("status", "x", remote=False, MINER_AGENT_CONFIG=str(bad))
    assert broken.returncode == ExitCode.CONFIG
    for proc in (refused, down, local, broken):
        assert "Traceback" not in proc.stderr


def test_submit_keeps_the_files_job_id_and_refuses_a_taken_one(
        node: Node, tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"job_id": "mine-1", "payload": {"type": "sleep", "steps": 1}}))
    proc = node.cli("submit", str(path), "--wait")
    assert proc.returncode == 0, proc.stderr
    # The coordinator took the file's id: status and cancel work with it
    assert proc.stdout.splitlines()[0] == "mine-1" and "note:" not in proc.stderr
    assert node.coord.store.job("mine-1") is not None
    # The same file again: the id is taken, so the job gets a fresh one, and says so
    again = node.cli("submit", str(path))
    assert again.returncode == 0, again.stderr
    fresh = again.stdout.splitlines()[0]
    assert fresh != "mine-1" and node.coord.store.job(fresh) is not None
    assert f"assigned the id {fresh}" in again.stderr and "is taken" in again.stderr
    # An id that cannot be one is refused before anything runs
    path.write_text(json.dumps({"job_id": "../x", "payload": {"type": "sleep"}}))
    assert node.cli("submit", str(path)).returncode in (ExitCode.INVALID_JOB,
                                                        ExitCode.REFUSED)


def test_verify_job_id_checks_the_agents_package(node: Node, tmp_path: Path) -> None:
    job_id = node.submit(tmp_path, {"type": "sleep", "steps": 2, "step_s": 0.01})
    assert node.cli("status", job_id, "--wait").returncode == 0
    state = {"MINER_AGENT_STATE_DIR": str(node.agent.state)}
    # A job id finds job_<ID>/ and job_<ID>.zip in the agent's state dir
    ok = node.cli("verify", job_id, remote=False, **state)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("OK ") == 2 and f"job_{job_id}.zip" in ok.stdout
    # An unknown id says there is no package, with 11 (not "was changed")
    missing = node.cli("verify", "no-such-job", remote=False, **state)
    assert missing.returncode == ExitCode.NOT_FOUND
    assert "no package for job no-such-job" in missing.stderr
    assert "was changed" not in missing.stdout + missing.stderr
    # A changed file is still a verify failure
    (node.agent.state / "jobs" / f"job_{job_id}" / "result.txt").write_text("forged\n")
    changed = node.cli("verify", job_id, remote=False, **state)
    assert changed.returncode == ExitCode.VERIFY_FAILED
    assert "FAIL result.txt: checksum mismatch" in changed.stdout
