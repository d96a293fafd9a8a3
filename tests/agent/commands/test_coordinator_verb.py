"""`miner-agent coordinator`: the reference coordinator served by the real CLI.

Started as a user would (a subprocess, any free port), a job submitted through it with
`miner-agent submit --coordinator URL --client-key KEY`, then stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.errors import ExitCode

CLI = [sys.executable, "-m", "agent"]
KEY = "verb-client-key"


def env(state: Path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("MINER_AGENT_", "REFCOORD_"))}
    out.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_STATE_DIR": str(state),
                "REFCOORD_CLIENT_KEY": KEY, "REFCOORD_MINER_KEY": "verb-miner-key"})
    return out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`miner-agent coordinator --port 0` on the test's state dir, and its URL."""
    proc = subprocess.Popen([*CLI, "coordinator", "--port", "0"], env=env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("reference coordinator on http://127.0.0.1:"), (
            line + (proc.stderr.read() if proc.stderr else ""))
        yield proc, line.split()[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_serves_a_submit_from_the_cli_and_stops_on_sigterm(
        served: tuple[subprocess.Popen[str], str], tmp_path: Path) -> None:
    proc, url = served
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"payload": {"type": "sleep", "steps": 1}}))
    submitted = subprocess.run([*CLI, "submit", str(job), "--coordinator", url,
                                "--client-key", KEY], env=env(tmp_path / "client"),
                               capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    shown = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"X-Api-Key": KEY}).json()
    assert shown["status"] == "pending"
    # The database is the state dir's, by default
    assert (tmp_path / "coordinator.db").is_file()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_a_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*CLI, "coordinator", "--port", str(port)], env=env(tmp_path),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == ExitCode.CONFIG
    assert f"cannot serve on 127.0.0.1:{port}" in proc.stderr


def test_help_names_every_flag_of_the_module() -> None:
    out = subprocess.run([*CLI, "coordinator", "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for flag in ("--host", "--port", "--db", "--extensions", "--job-ttl", "--lease-ttl",
                 "--cancel-grace", "--no-rate-limits", "--retain-days",
                 "--retain-bytes", "8731", "REFCOORD_CLIENT_KEY"):
        assert flag in out
