"""The CLI on one machine: the embedded coordinator, doctor, install-service and exec's bar.

Each test runs `miner-agent ...` as a subprocess, as a user would; the embedded test
starts the real daemon with no coordinator_url, so it serves its own coordinator.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ExitCode
from tests.agent.daemon.helpers import FAST, wait_until

CLI = [sys.executable, "-m", "agent"]
COORDINATOR_CHECKS = ("config", "credential", "coordinator", "api key")


def _env(state: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
    env.update({"MINER_AGENT_" + k.upper(): v for k, v in {**FAST, **settings}.items()})
    env.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_STATE_DIR": str(state),
                "MINER_AGENT_CACHE_DIR": str(state / "cache")})
    return env


def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, env=env, timeout=110)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _doctor_lines(env: dict[str, str]) -> dict[str, str]:
    proc = _cli(env, "doctor", "--timeout-s", "5")
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = {}
    for line in proc.stdout.splitlines():
        found = re.match(r"^(OK|WARN|FAIL)\s+(.+?)\s{2,}(.*)$", line)
        if found:
            lines[found[2]] = f"{found[1]} {found[3]}"
    return lines


@pytest.mark.slow
def test_embedded_mode_doctor_status_and_agent_not_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    env = _env(state, embedded_port=str(_free_port()))
    # Before the agent runs, doctor has no FAIL for the coordinator checks
    before = _doctor_lines(env)
    assert all(not before[name].startswith("FAIL") for name in COORDINATOR_CHECKS[:3]), before
    assert "embedded coordinator" in before["config"] and "not running now" in \
        before["coordinator"]
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen([*CLI, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _while_running(tmp_path, env)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
    # Once it has stopped, a client verb says the agent is not running, with 10
    gone = _cli(env, "status", "anything")
    assert gone.returncode == ExitCode.UNAVAILABLE
    assert "is `miner-agent run` running?" in gone.stderr and "Traceback" not in gone.stderr


def _while_running(tmp_path: Path, env: dict[str, str]) -> None:
    wait_until(lambda: "registered as" in (tmp_path / "agent.log").read_text(), 60,
               lambda: (tmp_path / "agent.log").read_text())
    # While it runs, doctor finds the embedded coordinator and its key accepted
    during = _doctor_lines(env)
    for name in COORDINATOR_CHECKS:
        assert during[name].startswith("OK"), during
    assert "embedded coordinator" in during["coordinator"]
    # The client verbs find it on their own; the fetch hint names the key's file
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"payload": {"type": "sleep", "steps": 2}}))
    done = _cli(env, "submit", str(job), "--wait")
    assert done.returncode == 0, done.stderr
    assert f"client_key in {tmp_path / 'state' / 'embedded.json'}" in done.stdout


def test_install_service_writes_the_url_it_was_given(tmp_path: Path) -> None:
    env = _env(tmp_path)
    proc = _cli(env, "install-service", "--prefix", str(tmp_path), "--coordinator-url",
                "https://coord.example:8443", "--miner-id", "m-7")
    assert proc.returncode == 0, proc.stderr
    config = (tmp_path / "etc/miner-agent/agent.toml").read_text()
    assert 'coordinator_url = "https://coord.example:8443"' in config
    # On the system (a dry run: nothing written), the next steps do not ask for the URL
    dry = _cli(env, "install-service", "--dry-run", "--coordinator-url",
               "https://coord.example:8443", "--miner-id", "m-7")
    assert dry.returncode == 0, dry.stderr
    assert "set coordinator_url" not in dry.stdout and "set miner_id" not in dry.stdout
    assert "names the coordinator https://coord.example:8443" in dry.stdout
    # Without one, the placeholder is written and the step to set it stays
    bare = _cli(env, "install-service", "--dry-run")
    assert "set coordinator_url and miner_id" in bare.stdout


def test_exec_progress_ends_at_100_percent_on_completion(tmp_path: Path) -> None:
    # Given a job whose last progress report is 40 %, then completes
    script = "echo '{\"event\":\"progress\",\"fraction\":0.4}' >&3; sleep 0.3"
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "bar", "payload": {"type": "command",
                                                             "argv": ["sh", "-c", script]}}))
    proc = _cli(_env(tmp_path), "exec", str(job), "--out", str(tmp_path / "out"),
                "--launcher", "spawn")
    assert proc.returncode == 0, proc.stderr
    bars = [line for line in proc.stderr.splitlines() if line.startswith("[bar] [")]
    # Then the last bar line is full, before the outcome line
    assert bars and "100.0%" in bars[-1] and "#" * 24 in bars[-1], proc.stderr
    assert proc.stderr.index(bars[-1]) < proc.stderr.index("bar: completed")
