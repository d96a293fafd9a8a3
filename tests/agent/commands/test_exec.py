"""`miner-agent exec` as an operator runs it: real process, real signals."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from agent.cli import build_parser
from tests.agent.conftest import pid_alive

CLI = [sys.executable, "-m", "agent"]


def write_job(tmp_path: Path, job: object, name: str = "job.json") -> Path:
    path = tmp_path / name
    path.write_text(job if isinstance(job, str) else json.dumps(job))
    return path


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    (json.dumps({"job_id": "a"}), "payload must be a JSON object"),
    (json.dumps({"job_id": "../etc", "payload": {"type": "sleep"}}), "job_id must be"),
    (json.dumps({"job_id": "a", "payload": {"type": 7}}), "payload.type"),
    (json.dumps({"job_id": "a", "payload": {"type": "sleep"},
                 "constraints": {"timeout_s": -1}}), "timeout_s"),
    (json.dumps({"job_id": "a", "payload": {"type": "sleep"},
                 "constraints": {"gpu_count": "two"}}), "whole number"),
    (json.dumps([1, 2]), "JSON object"),
])
def test_malformed_job_files_are_refused_clearly(tmp_path: Path, text: str,
                                                 fragment: str) -> None:
    proc = subprocess.run([*CLI, "exec", str(write_job(tmp_path, text)), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7
    assert "invalid_job" in proc.stderr and fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_exec_completes_and_reports(tmp_path: Path) -> None:
    job = {"job_id": "ok", "payload": {"type": "sleep", "steps": 3, "step_s": 0.01,
                                       "print_every": 1}}
    proc = subprocess.run([*CLI, "exec", str(write_job(tmp_path, job)), "--out",
                           str(tmp_path / "out"), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "completed"
    assert "step 3/3" in proc.stderr


def test_ctrl_c_cancels_with_partial_flush(tmp_path: Path) -> None:
    # Given a long job running in the foreground
    job = {"job_id": "long", "payload": {"type": "sleep", "steps": 100000, "step_s": 0.01}}
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "exec", str(write_job(tmp_path, job)), "--out", str(out),
                             "--launcher", "spawn"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((out / ".work").glob("long")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    # When the operator presses Ctrl-C
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # Then the job is canceled, the package is partial and intact
    assert proc.returncode == 3, err
    output = json.loads((out / "job_long/output.json").read_text())
    assert output["status"] == "canceled" and output["partial"] is True
    assert output["cancel"]["reason"] == "interrupted"
    assert subprocess.run(["sha256sum", "-c", "output.sha256"], cwd=out / "job_long",
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("launcher", ["spawn", "forkserver"])
@pytest.mark.parametrize("sandbox", [[], ["--no-sandbox"]], ids=["sandbox", "no-sandbox"])
def test_job_dies_with_a_killed_agent(tmp_path: Path, sandbox: list[str], launcher: str) -> None:
    # Given an agent running a job that would take minutes (found by its unique argv: in
    # the sandbox its own pid and /tmp are not ours to read)
    marker = f"{300 + os.getpid() % 1000 / 1000:.3f}"
    job = {"job_id": "orphan", "payload": {"type": "command", "argv": [
        "sh", "-c", f"exec sleep {marker}"]}}
    proc = subprocess.Popen([*CLI, "exec", str(write_job(tmp_path, job)), "--out",
                             str(tmp_path / "out"), "--launcher", launcher, "--quiet", *sandbox])
    deadline = time.monotonic() + 60
    found: list[psutil.Process] = []
    while not found and time.monotonic() < deadline:
        found = [p for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] == ["sleep", marker]]
        time.sleep(0.05)
    assert found, "the job never started"
    # When the agent is SIGKILLed (no chance to clean up)
    proc.kill()
    proc.wait()
    # Then the job's process does not outlive it (the kernel's kill chain can take a few
    # seconds on this 2-core machine under the whole suite's load)
    deadline = time.monotonic() + 15
    while pid_alive(found[0].pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(found[0].pid)


def test_every_command_has_help() -> None:
    top = subprocess.run([*CLI, "--help"], capture_output=True, text=True)
    assert top.returncode == 0
    sub_action = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction))
    commands = list(sub_action.choices)
    assert {"exec", "verify"} <= set(commands)
    # All at once: one interpreter start each, which is most of this test's time
    procs = {command: subprocess.Popen([*CLI, command, "--help"], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "COLUMNS": "100"})
             for command in commands}
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "usage:" in out, (command, err)


def test_a_job_sees_its_gpus_by_uuid(tmp_path: Path) -> None:
    # Given GPUs named by UUID (as the daemon always names them; NVML and CUDA agree)
    job = {"job_id": "uuids", "payload": {"type": "command", "argv": [
        "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER" > $MINER_RESULT_FILE']}}
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "NCCL_DEBUG": "INFO"}
    done = subprocess.run([*CLI, "exec", str(write_job(tmp_path, job)), "--out",
                           str(tmp_path / "out"), "--quiet", "--gpus", "GPU-1a2b,GPU-3c4d"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    # Then the job sees exactly those, and the operator's CUDA_DEVICE_ORDER passes through
    seen = (tmp_path / "out" / "job_uuids" / "result.txt").read_text().split()
    assert seen == ["GPU-1a2b,GPU-3c4d", "PCI_BUS_ID"]


def test_any_signal_is_killed_with_its_number(tmp_path: Path) -> None:
    # Given a program killed by a real-time signal (no name in Python's Signals)
    job = {"job_id": "rt", "payload": {"type": "command", "argv": ["sh", "-c", "kill -40 $$"]}}
    done = subprocess.run([*CLI, "exec", str(write_job(tmp_path, job)), "--out",
                           str(tmp_path / "out"), "--quiet", "--json"],
                          capture_output=True, text=True, timeout=120)
    output = json.loads(done.stdout)
    # Then it is killed, with the signal's number and its real-time name
    assert output["error"]["code"] == "killed", output["error"]
    assert "SIGRTMIN+" in output["error"]["message"] and "(40)" in output["error"]["message"]


def test_billed_duration_is_the_agents_monotonic_span(tmp_path: Path) -> None:
    # Given a job that claims a negative duration (as a wall clock set back would give)
    script = ('echo \'{"event": "metrics", "metrics": {"duration_ms": -3588000}}\' >&3; '
              "sleep 0.3")
    job = {"job_id": "bill", "payload": {"type": "command", "argv": ["sh", "-c", script]}}
    done = subprocess.run([*CLI, "exec", str(write_job(tmp_path, job)), "--out",
                           str(tmp_path / "out"), "--quiet", "--json"],
                          capture_output=True, text=True, timeout=120)
    output = json.loads(done.stdout)
    # Then the duration is the agent's own monotonic span, not the job's word
    assert 300 <= output["metrics"]["duration_ms"] < 30_000, output["metrics"]
