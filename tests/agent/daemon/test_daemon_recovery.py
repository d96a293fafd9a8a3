"""The daemon when the coordinator forgets it, leases lapse, or the agent dies mid-stream."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agent.execution.verify import verify
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.daemon.helpers import (
    CLIENT_KEY,
    MINER_KEY,
    AgentProcess,
    Client,
    start_coordinator,
    wait_until,
)

pytestmark = pytest.mark.slow


def test_forgotten_miner_registers_again(tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given an agent registered with a coordinator
    first = start_coordinator(tmp_path / "a")
    port = int(first.base_url.rsplit(":", 1)[1])
    agent = AgentProcess(first.base_url, tmp_path / "state")
    agents.append(agent)
    agent.wait_log("registered as")
    # When the coordinator is replaced by one that never heard of this miner
    first.stop()
    (tmp_path / "b").mkdir()
    second = ReferenceCoordinator(str(tmp_path / "b/coordinator.db"), port=port,
                                  api_keys={"miner": MINER_KEY, "client": CLIENT_KEY})
    second.start()
    try:
        # Then the heartbeat 404 (or poll 500) leads to a new registration, not a crash loop
        agent.wait_log("registering again", timeout=30)
        agent.wait_log("registered as", count=2, timeout=30)
        job_id = Client(second).submit({"type": "sleep", "steps": 2, "step_s": 0})
        Client(second).wait_status(job_id, "completed", timeout=30)
        assert agent.proc.poll() is None
    finally:
        agent.stop()
        second.stop()


def test_presigned_upload_url_in_the_payload(tmp_path: Path, agents: list[AgentProcess]) -> None:
    coord = start_coordinator(tmp_path, extensions=())
    try:
        client = Client(coord)
        url = coord.presign()
        job_id = client.submit({"type": "sleep", "steps": 2, "step_s": 0, "upload_url": url})
        agent = AgentProcess(coord.base_url, tmp_path / "state", burst=True)
        agents.append(agent)
        assert agent.wait(60) == 0, agent.log()
        stored = coord.presigned_object(url)
        zip_path = tmp_path / "state/jobs" / f"job_{job_id}.zip"
        assert stored is not None and stored == zip_path.read_bytes()
        location = client.job(job_id)["result"]["package"]["location"]
        assert location.startswith("http") and "?" not in location  # no signature leaked
    finally:
        coord.stop()


def test_sigkill_mid_job_resumes_log_shipping_without_gaps_or_repeats(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    coord = start_coordinator(tmp_path)
    try:
        client = Client(coord)
        job_id = client.submit({"type": "sleep", "steps": 100000, "step_s": 0.002,
                                "print_every": 1})
        agent = AgentProcess(coord.base_url, tmp_path / "state")
        agents.append(agent)
        wait_until(lambda: len(coord.store.read_log(job_id, "stdout")) > 2000, 60, agent.log)
        agent.kill()
        again = AgentProcess(coord.base_url, tmp_path / "state")
        agents.append(again)
        job = client.wait_status(job_id, "failed", timeout=60)
        assert job["error"]["code"] == "agent_restart"
        on_disk = (tmp_path / "state/jobs" / f"job_{job_id}/logs/stdout.log").read_bytes()
        wait_until(lambda: coord.store.read_log(job_id, "stdout") == on_disk, 30,
                   lambda: f"{len(coord.store.read_log(job_id, 'stdout'))} != {len(on_disk)}")
        # Both agents shipped binary chunks (the coordinator offers "logs-binary"), and the
        # second asked where the coordinator's copy ends before it resumed
        prefix = f"/v1/miners/{job_id}/logs"
        assert coord.faults.arrived(prefix + "/stdout") > 0
        assert coord.faults.arrived(prefix + "/offsets") >= 1
        assert coord.faults.arrived(prefix) == coord.faults.arrived(prefix + "/")
    finally:
        coord.stop()


def test_an_output_json_a_job_forged_is_not_reported_after_a_restart(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a job that writes an output.json of its own into its package (completed, a
    # day of GPU time) with a sidecar, and waits for the agent to die
    coord = start_coordinator(tmp_path)
    try:
        client = Client(coord)
        script = """
        cd $MINER_PACKAGE_DIR
        printf '{"job_id": "%s", "status": "completed", "partial": false, "files": [],
                 "metrics": {"duration_ms": 86400000}}' $MINER_JOB_ID > output.json
        echo forged > $MINER_RESULT_FILE
        sha256sum $MINER_RESULT_FILE > $MINER_PACKAGE_DIR/output.sha256
        echo planted; sleep 60
        """
        job_id = client.submit({"type": "command", "argv": ["sh", "-c", script]})
        agent = AgentProcess(coord.base_url, tmp_path / "state", allowed_job_types="command")
        agents.append(agent)
        wait_until(lambda: b"planted" in coord.store.read_log(job_id, "stdout"), 60, agent.log)
        agent.kill()
        # When the agent comes back
        again = AgentProcess(coord.base_url, tmp_path / "state", allowed_job_types="command")
        agents.append(again)
        # Then the job fails as agent_restart: the forged completion is not what is reported
        job = client.wait_status(job_id, "failed", "completed", timeout=60)
        assert job["status"] == "failed" and job["error"]["code"] == "agent_restart", job
        assert all(r["metrics"].get("duration_ms", 0) < 86400000
                   for r in client.receipts(job_id)), client.receipts(job_id)
        # And the package is the agent's seal, which verifies
        folder = tmp_path / "state/jobs" / f"job_{job_id}"
        output = json.loads((folder / "output.json").read_text())
        assert output["error"]["code"] == "agent_restart" and output["partial"] is True
        assert verify(folder).ok
    finally:
        coord.stop()


def test_leftovers_past_the_quota_are_left_out_of_the_seal_after_a_restart(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a job that made a 2 GiB sparse file (under the first agent's quota) and runs
    # on when the agent dies, and an agent that comes back with max_job_output_mb = 8
    coord = start_coordinator(tmp_path)
    try:
        client = Client(coord)
        script = """
        truncate -s 2G $MINER_ARTIFACTS_DIR/sparse
        echo partial > $MINER_RESULT_FILE
        echo made; sleep 60
        """
        job_id = client.submit({"type": "command", "argv": ["sh", "-c", script]})
        state = tmp_path / "state"
        agent = AgentProcess(coord.base_url, state, allowed_job_types="command",
                             max_job_output_mb=4096)
        agents.append(agent)
        wait_until(lambda: b"made" in coord.store.read_log(job_id, "stdout"), 60, agent.log)
        agent.kill()
        again = AgentProcess(coord.base_url, state, allowed_job_types="command",
                             max_job_output_mb=8)
        agents.append(again)
        # Then its leftovers are sealed without the sparse file (it was read and zipped
        # whole) and the job fails as agent_restart
        job = client.wait_status(job_id, "failed", "completed", timeout=60)
        assert job["error"]["code"] == "agent_restart", job
        folder = state / "jobs" / f"job_{job_id}"
        output = json.loads((folder / "output.json").read_text())
        assert {"path": "artifacts/sparse", "reason": "past max_job_output_mb: left out"} \
            in output["skipped"]
        assert "result.txt" in {f["path"] for f in output["files"]}
        assert folder.with_suffix(".zip").stat().st_size < 1 << 20
        assert verify(folder).ok
    finally:
        coord.stop()


def test_leases_are_renewed_in_time_and_a_lost_one_stops_its_attempt(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given 1.5 s leases and an agent whose own heartbeat interval is 5 s
    coord = start_coordinator(tmp_path, lease_ttl_s=1.5)
    try:
        client = Client(coord)
        job_id = client.submit({"type": "sleep", "steps": 200, "step_s": 0.05})
        agent = AgentProcess(coord.base_url, tmp_path / "state", heartbeat_interval_s=5,
                             progress_interval_s=5)
        agents.append(agent)
        agent.wait_log(f"job {job_id}: started")
        # Then it heartbeats faster while it holds the lease, and keeps it
        time.sleep(2.5)
        assert coord.store.job(job_id)["attempts"] == 1
        assert "lease lost" not in agent.log()
        # When the coordinator is unreachable for longer than the lease
        coord.faults.down()
        time.sleep(2.5)
        coord.faults.up()
        # Then the agent stops the attempt it lost and reports nothing for it; the
        # requeued attempt runs to completion and is reported once
        # (stopped while running, or, if it finished meanwhile, its report withheld)
        agent.wait_log(f"job {job_id}: (lease lost|no longer in the coordinator|the "
                       "coordinator no longer lists it)", timeout=30)
        job = client.wait_status(job_id, "completed", timeout=90)
        assert job["attempts"] >= 2
        assert len(client.receipts(job_id)) == 1
        assert list((tmp_path / "state/jobs/superseded").iterdir())
    finally:
        coord.stop()


def test_a_lease_that_comes_in_while_heartbeats_are_refused_is_renewed_once_they_answer(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given 3 s leases, an agent whose heartbeat interval is 30 s, and a coordinator that
    # refuses its heartbeats with "retry after 10 s": a beat is waiting out its retry
    coord = start_coordinator(tmp_path, lease_ttl_s=3.0)
    try:
        client = Client(coord)
        coord.faults.rate_limit(10.0, count=100_000, paths=("/v1/miners/heartbeat",))
        agent = AgentProcess(coord.base_url, tmp_path / "state", heartbeat_interval_s=30,
                             progress_interval_s=30)
        agents.append(agent)
        agent.wait_log("registered as")
        wait_until(lambda: coord.faults.arrived("/v1/miners/heartbeat") >= 1, 30)
        # When a job comes in (its lease lapses unless a beat carries it within 3 s)
        # and the heartbeats are answered again half a second after it started
        job_id = client.submit({"type": "sleep", "steps": 60, "step_s": 0.1})
        agent.wait_log(f"job {job_id}: started")
        time.sleep(0.5)
        coord.faults.clear()
        # Then a fresh beat, not the one waiting 10 s, renewed it: one attempt, one report
        job = client.wait_status(job_id, "completed", timeout=60)
        assert job["attempts"] == 1, agent.log()[-3000:]
        assert len(client.receipts(job_id)) == 1
        assert "lease lost" not in agent.log()
        assert "heartbeat: started over to carry a lease" in agent.log()
    finally:
        coord.stop()


def test_embedded_default_run_submit_status(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
    env.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_STATE_DIR": str(tmp_path),
                "MINER_AGENT_CACHE_DIR": str(tmp_path / "cache"),
                "MINER_AGENT_EMBEDDED_PORT": str(port), "MINER_AGENT_LAUNCHER": "spawn",
                "MINER_AGENT_POLL_MAX_INTERVAL_S": "0.5"})
    cli = [sys.executable, "-m", "agent"]
    log = open(tmp_path / "agent.log", "wb")
    agent = subprocess.Popen([*cli, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "registered as" in (tmp_path / "agent.log").read_text(), 60)
        job = tmp_path / "job.json"
        job.write_text('{"payload": {"type": "sleep", "steps": 3, "step_s": 0.01}}')
        submitted = subprocess.run([*cli, "submit", str(job)], env=env, capture_output=True,
                                   text=True, check=True)
        job_id = submitted.stdout.strip()
        status = subprocess.run([*cli, "status", job_id, "--wait"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "completed" in status.stdout and "3 of 3 steps" in status.stdout
        keys = tmp_path / "embedded.json"
        assert oct(keys.stat().st_mode & 0o777) == "0o600"
        folder = tmp_path / "jobs" / f"job_{job_id}"
        assert verify(folder).ok and (folder / "result.txt").read_text() == "3 of 3 steps\n"
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        log.close()


def test_malformed_job_from_the_coordinator_fails_cleanly(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a coordinator that hands out a job whose id would climb out of the jobs folder
    coord = start_coordinator(tmp_path / "coord", extensions=())
    try:
        client = Client(coord)
        bad = client.submit({"type": "sleep", "steps": 1, "step_s": 0})
        with coord.store.tx() as db:
            db.execute("UPDATE jobs SET job_id = ? WHERE job_id = ?", ("../../escape", bad))
        good = client.submit({"type": "sleep", "steps": 1, "step_s": 0})
        agent = AgentProcess(coord.base_url, tmp_path / "state", burst=True)
        agents.append(agent)
        # Then the agent skips it before any request names it (no usable id: nothing can be
        # reported for it), keeps serving, and writes nothing outside its folders
        assert agent.wait(60) == 0, agent.log()
        assert "poll answer skipped" in agent.log() and "../../escape" in agent.log()
        assert "job ../../escape refused" not in agent.log()
        assert client.job(good)["status"] == "completed"
        assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
        assert "Traceback" not in agent.log()
    finally:
        coord.stop()


def test_a_job_the_coordinator_lists_but_the_journal_lost_is_failed_at_start(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a core coordinator that handed miner-1 a job, and that job's folder with what
    # it wrote before a power loss took its record (the journal never had it flushed)
    coord = start_coordinator(tmp_path / "coord", extensions=())
    try:
        client = Client(coord)
        job_id = client.submit({"type": "sleep", "steps": 5, "step_s": 0})
        miner = httpx.Client(base_url=coord.base_url, timeout=10,
                             headers={"X-Api-Key": MINER_KEY, "X-Miner-ID": "miner-1"})
        with miner:
            miner.post("/v1/miners/register", json={"capabilities": {"gpus": []},
                                                    "concurrency": 1, "region": None}
                       ).raise_for_status()
            handed = miner.post("/v1/miners/poll", json={})
        assert handed.status_code == 200 and handed.json()["job_id"] == job_id
        folder = tmp_path / "state/jobs" / f"job_{job_id}"
        (folder / "artifacts").mkdir(parents=True)
        (folder / "artifacts/step-1.json").write_text('{"step": 1}')
        # When an agent starts on that node with no record of the job
        agent = AgentProcess(coord.base_url, tmp_path / "state")
        agents.append(agent)
        # Then the coordinator sees it failed as agent_restart, saying why
        job = client.wait_status(job_id, "failed", timeout=60)
        assert job["error"]["code"] == "agent_restart", job
        assert "no record of this job" in job["error"]["message"]
        agent.wait_log("has no record of it")
        # And its package holds what the job wrote, checksums and all
        assert (folder / "output.json").exists()
        assert verify(folder).ok
        output = json.loads((folder / "output.json").read_text())
        assert output["partial"] is True
        assert [f["path"] for f in output["files"]] == ["artifacts/step-1.json"]
        # And the agent goes on serving
        after = client.submit({"type": "sleep", "steps": 1, "step_s": 0})
        client.wait_status(after, "completed", timeout=60)
    finally:
        coord.stop()
