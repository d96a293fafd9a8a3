"""`miner-agent exec` starts its one job directly: no fork server, in or out of the sandbox."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

CLI = [sys.executable, "-m", "agent"]
SANDBOX_MODES = [
    pytest.param([], id="sandbox", marks=pytest.mark.skipif(
        shutil.which("bwrap") is None,
        reason="bubblewrap is not installed (scripts/setup.sh does)")),
    pytest.param(["--no-sandbox"], id="no-sandbox"),
]
# What may stand between exec and its job's program: bubblewrap, and the job's own
# interpreter (runtimes.jail is the jailed spawn's keeper and, forked, the job itself).
DIRECT = ("bwrap", "runtimes.host", "runtimes.jail")


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _find(argv: list[str], deadline: float) -> psutil.Process | None:
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            if proc.info["cmdline"] == argv:
                return proc
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("sandbox", SANDBOX_MODES)
def test_exec_starts_its_job_without_a_fork_server(tmp_path: Path, sandbox: list[str]) -> None:
    # Given a job whose program is found by its unique argv (in the sandbox its pid and
    # /tmp are not ours to read), run by exec with its default launcher
    marker = f"{2 + os.getpid() % 1000 / 1000:.3f}"
    job = {"job_id": "direct", "payload": {"type": "command", "argv": [
        "sh", "-c", f"exec sleep {marker}"]}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = tmp_path / "out"
    agent = subprocess.Popen([*CLI, "exec", str(tmp_path / "job.json"), "--out", str(out),
                              "--quiet", "--json", *sandbox], stdout=subprocess.PIPE, text=True)
    try:
        program = _find(["sleep", marker], time.monotonic() + 60)
        assert program is not None, "the job never started"
        # When we walk up from the job's program to exec
        chain = []
        for parent in program.parents():
            if parent.pid == agent.pid:
                break
            chain.append(_cmdline(parent))
        else:
            pytest.fail(f"exec ({agent.pid}) is not an ancestor of its job: {chain}")
        # Then only bubblewrap and the job's own interpreter are in between
        assert chain and all(any(part in line for part in DIRECT) for line in chain), chain
        # and exec has no fork server, anywhere below it
        below = [_cmdline(p) for p in psutil.Process(agent.pid).children(recursive=True)]
        assert not [line for line in below if "runtimes.forkserver" in line], below
        stdout, _ = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    # and the job completed as before, its package saying how it started
    assert agent.returncode == 0
    output = json.loads(stdout)
    assert output["status"] == "completed" and output["exit"]["via"] == "spawn"
    sandboxed = output["environment"]["isolation"]["sandbox"]
    assert (sandboxed == "off") == bool(sandbox), sandboxed


def test_exec_can_still_use_the_fork_server_when_asked(tmp_path: Path) -> None:
    # Given a job and the daemon's launcher asked for by name
    job = {"job_id": "forked", "payload": {"type": "sleep", "steps": 1, "step_s": 0}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run([*CLI, "exec", str(tmp_path / "job.json"), "--out",
                           str(tmp_path / "out"), "--quiet", "--json", "--no-sandbox",
                           "--launcher", "forkserver"], capture_output=True, text=True,
                          timeout=120)
    # Then the job goes through the fork server, as the daemon's do
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["exit"]["via"] == "forkserver"


def test_exec_says_when_the_sandbox_cannot_be_built(tmp_path: Path) -> None:
    # Given a node whose bubblewrap cannot make namespaces (as where user namespaces are
    # off: the tool runs and refuses; the host's settings are left as they are)
    tools = tmp_path / "bin"
    tools.mkdir()
    bwrap = tools / "bwrap"
    bwrap.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                     "exit 1\n")
    bwrap.chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
    job = {"job_id": "nosandbox", "payload": {"type": "sleep", "steps": 1, "step_s": 0}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    # When exec runs a job in the sandbox (no probe ahead of the job: its start is the probe)
    done = subprocess.run([*CLI, "exec", str(tmp_path / "job.json"), "--out",
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True,
                          env=env, timeout=120)
    # Then it exits 13, says why and what to do, as before
    assert done.returncode == 13, done.stderr
    assert "No permissions to create new namespace" in done.stderr
    assert "--no-sandbox" in done.stderr and "Traceback" not in done.stderr
