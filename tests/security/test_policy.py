"""What the operator decides: which payload types run, and never without the sandbox
unless asked. Real daemon, real coordinator on loopback, real cgroupfs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import DEFAULT_ALLOWED_JOB_TYPES, load_config
from agent.errors import ConfigError, ExitCode
from agent.execution.cgroups import CgroupTree, JobCgroup, Limits
from agent.execution.sandbox import SandboxPolicy, job_tmp_bytes
from runtimes.jail import JailRequest
from tests.agent.daemon.helpers import (
    CLIENT_KEY,
    AgentProcess,
    Client,
    make_agent,
    start_coordinator,
)

CLI = [sys.executable, "-m", "agent"]
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap is not installed (scripts/setup.sh does)")


def without_bwrap() -> dict[str, str]:
    """An environment where the sandbox tool cannot be found (the host is left as it is)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
    env["PATH"] = "/nonexistent"
    return env


@needs_bwrap
def test_a_type_the_operator_did_not_allow_fails_at_once(tmp_path: Path) -> None:
    # Given an agent with the default allowed types, and a coordinator client
    coord = start_coordinator(tmp_path / "coord")
    agent = AgentProcess(coord.base_url, tmp_path / "state")
    client = Client(coord)
    try:
        agent.wait_log("registered", timeout=120)
        # When someone submits a `command` job (not allowed by default)
        job_id = client.submit({"type": "command", "argv": ["sh", "-c", "echo ran > /dev/stderr"]})
        job = client.wait_status(job_id, "failed", "completed", timeout=60)
        # Then it fails with job_type_not_allowed, naming the config field, and never ran
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "job_type_not_allowed", job["error"]
        assert "allowed_job_types" in job["error"]["message"]
        # refused before any device, folder or process was given to it
        assert not (tmp_path / "state" / "jobs" / f"job_{job_id}").exists()
        assert "started pid" not in agent.log()
        # and `miner-agent status` shows the code and message to the client
        shown = subprocess.run([*CLI, "status", job_id, "--coordinator", coord.base_url,
                                "--client-key", CLIENT_KEY], capture_output=True, text=True,
                               env={**os.environ, "MINER_AGENT_CONFIG": "/dev/null"})
        assert "job_type_not_allowed" in shown.stdout, shown.stdout + shown.stderr
        assert "allowed_job_types" in shown.stdout
        # and registration offered only the allowed types
        miner = coord.store.miner("miner-1")
        assert miner is not None
        assert sorted(miner["capabilities"]["runtimes"]) == sorted(DEFAULT_ALLOWED_JOB_TYPES)
        assert miner["capabilities"]["sandbox"] == "bwrap"
        # and an allowed type still runs
        ok = client.submit({"type": "sleep", "steps": 1, "step_s": 0})
        assert client.wait_status(ok, "completed", "failed", timeout=60)["status"] == "completed"
    finally:
        agent.stop()
        Client.close_all()
        coord.stop()


def test_the_agent_refuses_to_start_without_a_sandbox(tmp_path: Path) -> None:
    # Given a node where bubblewrap cannot be found
    env = {**without_bwrap(), "MINER_AGENT_CONFIG": "/dev/null",
           "MINER_AGENT_STATE_DIR": str(tmp_path / "state")}
    # When the agent starts with the default sandbox = "on"
    done = subprocess.run([*CLI, "run", "--burst"], capture_output=True, text=True, env=env,
                          timeout=120)
    # Then it exits 13 and says why and what to do
    assert done.returncode == ExitCode.SANDBOX_UNAVAILABLE == 13, done.stderr
    assert "bubblewrap" in done.stderr and 'sandbox = "off"' in done.stderr
    # and `doctor` names the same problem
    doc = subprocess.run([*CLI, "doctor", "--config", "/dev/null", "--timeout-s", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert "FAIL  sandbox" in doc.stdout and "bubblewrap" in doc.stdout, doc.stdout


def test_sandbox_off_is_the_operators_explicit_choice(tmp_path: Path) -> None:
    coord = start_coordinator(tmp_path / "coord")
    try:
        state = tmp_path / "state"
        agent = AgentProcess(coord.base_url, state, burst=True, sandbox="off")
        assert agent.wait(60) == 0, agent.log()[-2000:]
        assert "job sandbox is OFF" in agent.log()
    finally:
        coord.stop()


def test_exec_refuses_without_a_sandbox_unless_told(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "x1", "payload": {"type": "sleep", "steps": 1,
                                                            "step_s": 0}}))
    env = without_bwrap()
    refused = subprocess.run([*CLI, "exec", str(job), "--out", str(tmp_path / "out"),
                              "--quiet", "--launcher", "spawn"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 13, refused.stderr
    assert "--no-sandbox" in refused.stderr
    ran = subprocess.run([*CLI, "exec", str(job), "--out", str(tmp_path / "out"), "--quiet",
                          "--launcher", "spawn", "--no-sandbox"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    output = json.loads((tmp_path / "out" / "job_x1" / "output.json").read_text())
    assert output["environment"]["isolation"]["sandbox"] == "off"


def test_sandbox_config_fields() -> None:
    cfg = load_config(Path("/dev/null"), environ={
        "MINER_AGENT_ALLOWED_JOB_TYPES": "sleep,command",
        "MINER_AGENT_SANDBOX_NETWORK": "training=false,command=true",
        "MINER_AGENT_MAX_JOB_OUTPUT_MB": "10"})
    assert cfg.allowed_job_types == ("sleep", "command")
    assert cfg.sandbox_network == {"training": False, "command": True}
    assert cfg.max_job_output_mb == 10 and cfg.sandbox == "on"
    assert load_config(Path("/dev/null"), environ={}).allowed_job_types == (
        "inference", "batch_inference", "training", "sleep")
    with pytest.raises(ConfigError, match="sandbox"):
        load_config(Path("/dev/null"), environ={"MINER_AGENT_SANDBOX": "maybe"})
    with pytest.raises(ConfigError, match="sandbox_network"):
        load_config(Path("/dev/null"), environ={"MINER_AGENT_SANDBOX_NETWORK": "nonsense"})
    with pytest.raises(ConfigError, match="job_cpu_weight"):
        load_config(Path("/dev/null"), environ={"MINER_AGENT_JOB_CPU_WEIGHT": "0"})
    with pytest.raises(ConfigError, match="job_tmp_mb"):
        load_config(Path("/dev/null"), environ={"MINER_AGENT_JOB_TMP_MB": "-1"})
    with pytest.raises(ConfigError, match="max_job_log_mb must not be negative"):
        load_config(Path("/dev/null"), environ={"MINER_AGENT_MAX_JOB_LOG_MB": "-1"})


def test_each_jobs_tmp_is_sized_from_the_config_or_the_ram() -> None:
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # Given job_tmp_mb: that, whatever the memory limit
    assert job_tmp_bytes(100, memory_mb=50) == 100 << 20
    # Else a quarter of the RAM, at most the job's memory limit, never under 64 MiB
    assert job_tmp_bytes(0) == max(ram // 4, 64 << 20)
    assert job_tmp_bytes(0, memory_mb=512) == min(ram // 4, 512 << 20)
    assert job_tmp_bytes(0, memory_mb=8) == 64 << 20
    # And that quarter is shared among the jobs the node runs at once
    assert job_tmp_bytes(0, slots=8) == max(ram // 32, 64 << 20)
    assert job_tmp_bytes(100, slots=8) == 100 << 20
    # And the daemon's jail request carries it (the config's, through the env)
    cfg = load_config(Path("/dev/null"), environ={"MINER_AGENT_JOB_TMP_MB": "16"})
    policy = SandboxPolicy(jobs_root=Path("/j"), work_root=Path("/w"),
                           tmp_bytes=job_tmp_bytes(cfg.job_tmp_mb, cfg.job_memory_max_mb))
    request = JailRequest.from_dict(policy.jail(Path("/j/a"), Path("/w/a"), "sleep", None))
    assert request.tmp_size == 16 << 20
    assert JailRequest.from_dict({"package_dir": "p", "work_dir": "w"}).tmp_size is None


@needs_bwrap
@pytest.mark.parametrize(("slots", "tmp_mb"), [(1, 0), (4, 0), (4, 16)])
def test_the_daemon_shares_the_default_tmp_among_its_slots(
        tmp_path: Path, slots: int, tmp_mb: int) -> None:
    # Given a daemon of `slots` CPU slots (no GPU here), job_tmp_mb left to it or set
    agent = make_agent(tmp_path, gpus="", cpu_slots=slots, job_tmp_mb=tmp_mb)
    try:
        # Then each job's /tmp and /dev/shm hold a quarter of the RAM shared by them all
        # (every job's two together at most half the RAM), or what the config says
        assert agent.scheduler.capacity == slots
        sandbox = agent.isolation.sandbox
        assert sandbox is not None
        assert sandbox.tmp_bytes == (tmp_mb << 20 if tmp_mb else job_tmp_bytes(0, 0, slots))
        request = JailRequest.from_dict(sandbox.jail(Path("/j/a"), Path("/w/a"), "sleep",
                                                     None))
        assert request.tmp_size == sandbox.tmp_bytes
    finally:
        asyncio.run(agent.shutdown())


@pytest.fixture
def tree() -> CgroupTree:
    found, why = CgroupTree.discover()
    if found is None:
        pytest.skip(f"no writable cgroup v2 here: {why}")
    yield found
    found.close()


def test_a_job_cgroup_kills_a_setsid_grandchild(tree: CgroupTree) -> None:
    # Given a process in a job cgroup whose grandchild left its session
    cgroup = tree.create("kill-test", Limits(pids=64))
    fd = cgroup.open_fd()
    script = (f"echo 0 > /proc/self/fd/{fd}/cgroup.procs; "
              "setsid sh -c 'sleep 77.7' & exec sleep 77.8")
    proc = subprocess.Popen(["sh", "-c", script], pass_fds=(fd,))
    os.close(fd)
    deadline = time.monotonic() + 10
    while len((cgroup.path / "cgroup.procs").read_text().split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # When the job ends through cgroup.kill
    assert asyncio.run(cgroup.kill_and_wait(5))
    proc.wait(5)
    # Then nothing is left in it, and it can be removed
    assert not cgroup.populated()
    assert (cgroup.path / "cgroup.procs").read_text() == ""
    cgroup.remove()
    assert not cgroup.path.exists()
    if "pids" in tree.controllers:
        assert cgroup.applied["pids.max"] == "64"


def test_leftovers_of_a_dead_agent_are_killed_and_removed(tree: CgroupTree) -> None:
    if tree.delegated:
        pytest.skip("shared-mode sweep only")
    base = tree.parent.parent
    stale = base / "miner-agent.999999999"  # no such pid
    (stale / "job.1").mkdir(parents=True)
    leftover = JobCgroup(stale / "job.1")
    fd = leftover.open_fd()
    proc = subprocess.Popen(["sh", "-c", f"echo 0 > /proc/self/fd/{fd}/cgroup.procs; "
                             "exec sleep 66.6"], pass_fds=(fd,))
    os.close(fd)
    deadline = time.monotonic() + 10
    while not leftover.populated():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    again, _ = CgroupTree.discover()
    assert again is not None
    again.close()
    assert proc.wait(10) == -9
    assert not stale.exists()
