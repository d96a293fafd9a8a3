"""The real daemon against the real reference coordinator on loopback."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.conftest import EVENT_LOOPS
from tests.agent.daemon.helpers import AgentProcess, Client, start_coordinator, wait_until

pytestmark = pytest.mark.slow
# The daemon runs on uvloop where installed ("auto"); the stdlib loop is its fallback, and
# both must serve a job, its report and the signals end to end (EVENT_LOOPS).
SLEEP = {"type": "sleep", "steps": 5, "step_s": 0.02, "print_every": 1}


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ReferenceCoordinator]:
    coord = start_coordinator(tmp_path, extensions=())
    yield coord
    coord.stop()


@pytest.fixture
def ext(tmp_path: Path) -> Iterator[ReferenceCoordinator]:
    coord = start_coordinator(tmp_path)
    yield coord
    coord.stop()


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_core_job_end_to_end(core: ReferenceCoordinator, tmp_path: Path,
                             agents: list[AgentProcess], event_loop: str) -> None:
    # Given a core-only coordinator with one job queued
    client = Client(core)
    job_id = client.submit(SLEEP)
    # When the agent runs on the event loop asked for until there is no work left
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True, event_loop=event_loop)
    agents.append(agent)
    assert agent.wait(90) == 0, agent.log()
    assert f"event loop: {event_loop}" in agent.log()
    # Then the coordinator holds one completed result with the package's manifest
    job = client.job(job_id)
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["status"] == "completed" and result["output"] == "5 of 5 steps\n"
    folder = tmp_path / "state/jobs" / f"job_{job_id}"
    output = json.loads((folder / "output.json").read_text())
    assert result["package"]["result_hash"] == output["result_hash"]
    assert {m["path"] for m in result["package"]["manifest"]} >= {"logs/stdout.log",
                                                                  "result.txt"}
    assert "step 5/5" in result["logs"]["stdout_tail"]
    receipts = client.receipts(job_id)
    assert len(receipts) == 1
    assert subprocess.run(["sha256sum", "-c", "output.sha256"], cwd=folder,
                          capture_output=True).returncode == 0
    # The receipt is built from the metrics the agent sent: duration and GPU-seconds
    receipt = receipts[0]
    assert receipt["unit_type"] == "gpu_seconds" and receipt["duration_ms"] > 0
    assert receipt["units"] == pytest.approx(receipt["duration_ms"] / 1000, abs=0.002)
    # And the coordinator's in-flight count for the miner went back to zero
    assert core.store.miner("miner-1")["inflight"] == 0


def test_extensions_ship_logs_progress_and_package(ext: ReferenceCoordinator, tmp_path: Path,
                                                  agents: list[AgentProcess]) -> None:
    client = Client(ext)
    job_id = client.submit({"type": "sleep", "steps": 20, "step_s": 0.05, "print_every": 1})
    agent = AgentProcess(ext.base_url, tmp_path / "state", burst=True)
    agents.append(agent)
    seen_progress = []
    wait_until(lambda: seen_progress.append(client.job(job_id).get("progress")) or
               client.job(job_id)["status"] == "completed", 90, agent.log)
    assert agent.wait(60) == 0
    folder = tmp_path / "state/jobs" / f"job_{job_id}"
    # Logs: the coordinator's copy is byte for byte the file on disk
    assert ext.store.read_log(job_id, "stdout") == (folder / "logs/stdout.log").read_bytes()
    # Progress was visible while the job ran
    assert any(p is not None and 0 < p < 100 for p in seen_progress)
    # Package: uploaded, and the bytes match the zip's own sha256
    data = ext.store.package_data(job_id)
    zip_sha = (folder.with_name(folder.name + ".zip.sha256")).read_text().split()[0]
    assert data is not None and hashlib.sha256(data).hexdigest() == zip_sha
    assert "package" in client.job(job_id)["result"]["package"]["location"]


def test_core_cancel_stops_the_job_and_posts_no_result(core: ReferenceCoordinator,
                                                       tmp_path: Path,
                                                       agents: list[AgentProcess]) -> None:
    client = Client(core)
    job_id = client.submit({"type": "sleep", "steps": 100000, "step_s": 0.01})
    agent = AgentProcess(core.base_url, tmp_path / "state")
    agents.append(agent)
    client.wait_status(job_id, "running")
    agent.wait_log(f"job {job_id}: started")
    t0 = time.monotonic()
    client.cancel(job_id)
    agent.wait_log(f"job {job_id}: canceled", timeout=30)
    # Then the job stopped within the check interval plus a step, and nothing was reported
    assert time.monotonic() - t0 < 5
    time.sleep(1)
    assert client.job(job_id)["status"] == "canceled"
    assert client.receipts(job_id) == []
    output = json.loads((tmp_path / "state/jobs" / f"job_{job_id}/output.json").read_text())
    assert output["status"] == "canceled" and output["partial"] is True


def test_extension_cancel_reports_partial(ext: ReferenceCoordinator, tmp_path: Path,
                                          agents: list[AgentProcess]) -> None:
    client = Client(ext)
    job_id = client.submit({"type": "sleep", "steps": 100000, "step_s": 0.01})
    agent = AgentProcess(ext.base_url, tmp_path / "state", cancel_check_interval_s=60)
    agents.append(agent)
    agent.wait_log(f"job {job_id}: started")
    client.cancel(job_id)
    job = client.wait_status(job_id, "canceled", timeout=30)
    agent.wait_log(f"job {job_id}: reported")
    assert "cancel received" in agent.log()
    assert job["partial"] is True or (job.get("result") or {}).get("partial") is True


def test_a_forced_cancel_kills_at_once_without_the_grace_period(
        ext: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # A job that ignores SIGTERM, on an agent that would give it 60 s to stop
    client = Client(ext)
    job_id = client.submit({"type": "command",
                            "argv": ["sh", "-c", "trap '' TERM; echo up; sleep 120"]})
    agent = AgentProcess(ext.base_url, tmp_path / "state", cancel_grace_s=60,
                         allowed_job_types="command")
    agents.append(agent)
    agent.wait_log(f"job {job_id}: started")
    time.sleep(0.3)
    # When the client forces the cancel
    started = time.monotonic()
    resp = client.http.post(f"/v1/jobs/{job_id}/cancel", json={"force": True})
    assert resp.status_code == 200, resp.text
    # Then the client sees it canceled at once, the agent kills it without the grace
    # period, and its partial results are still packaged on the node
    assert resp.json()["status"] == "canceled"
    agent.wait_log(f"job {job_id}: cancel forced by the client", timeout=10)
    folder = tmp_path / "state/jobs" / f"job_{job_id}"
    wait_until(lambda: (folder / "output.json").is_file(), 15, agent.log)
    assert time.monotonic() - started < 15
    output = json.loads((folder / "output.json").read_text())
    assert output["status"] == "canceled"
    assert b"up" in (folder / "logs/stdout.log").read_bytes()


def test_failure_is_reported_and_the_slot_released(core: ReferenceCoordinator,
                                                   tmp_path: Path,
                                                   agents: list[AgentProcess]) -> None:
    # Given one slot, a job that fails, an unknown type, and a good job after them
    client = Client(core)
    bad = client.submit({"type": "sleep", "steps": 5, "step_s": 0, "fail_at": 2})
    unknown = client.submit({"type": "transcribe", "url": "http://example.invalid/a.wav"})
    good = client.submit(SLEEP)
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True, cpu_slots=1)
    agents.append(agent)
    assert agent.wait(90) == 0, agent.log()
    # Then both failures carry stable codes and the good job still ran
    assert client.job(bad)["error"]["code"] == "runtime_error"
    assert client.job(unknown)["error"]["code"] == "unsupported_job_type"
    assert client.job(good)["status"] == "completed"
    assert core.store.miner("miner-1")["inflight"] == 0


def test_a_nan_in_a_jobs_metrics_is_reported_as_null(ext: ReferenceCoordinator,
                                                     tmp_path: Path,
                                                     agents: list[AgentProcess]) -> None:
    # Given a job whose loss diverged: NaN and Infinity in its metrics and progress
    # (JSON has neither; the outbox refused to encode the report and crashed every
    # second, and the job stayed running on the coordinator)
    client = Client(ext)
    script = """
    echo '{"event": "metrics", "metrics": {"loss": NaN, "grad": -Infinity, "lr": 1e999}}' >&3
    echo '{"event": "progress", "fraction": 0.5, "eta_s": Infinity, "metrics": {"l": NaN}}' >&3
    echo trained > $MINER_RESULT_FILE
    """
    job_id = client.submit({"type": "command", "argv": ["sh", "-c", script]})
    agent = AgentProcess(ext.base_url, tmp_path / "state", burst=True,
                         allowed_job_types="command")
    agents.append(agent)
    assert agent.wait(60) == 0, agent.log()
    # Then it is reported completed, the non-numbers as null
    job = client.wait_status(job_id, "completed", timeout=30)
    metrics = job["result"]["metrics"]
    assert metrics["loss"] is None and metrics["grad"] is None and metrics["lr"] is None
    # And its output.json is strict JSON, the job's own fields kept as null
    text = (tmp_path / "state" / "jobs" / f"job_{job_id}" / "output.json").read_text()
    output = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in output"))
    assert output["metrics"]["loss"] is None
    assert "Outbox.run failed" not in agent.log()


def test_progress_goes_out_as_the_protocol_says_whatever_the_job_sent(
        ext: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a job whose progress holds a 20,000-character stage and message and metrics
    # that are not numbers (the protocol's progress metrics are a flat object of numbers)
    client = Client(ext)
    stage, message = "s" * 20_000, "m" * 20_000
    metrics = {"loss": 0.5, "step": 7, "name": "x", "nested": {"a": 1}, "ok": True,
               "k" * 100: 1.0, **{f"m{i:02}": i for i in range(40)}}
    event = json.dumps({"event": "progress", "fraction": 0.5, "stage": stage,
                        "message": message, "metrics": metrics})
    script = f"echo '{event}' >&3; sleep 1.5; echo done > $MINER_RESULT_FILE"
    job_id = client.submit({"type": "command", "argv": ["sh", "-c", script]})
    agent = AgentProcess(ext.base_url, tmp_path / "state", allowed_job_types="command")
    agents.append(agent)
    # Then the coordinator hears it bounded: stage and message cut, only numbers kept
    wait_until(lambda: (client.job(job_id).get("progress_detail") or {}).get("stage"), 60,
               agent.log)
    detail = client.job(job_id)["progress_detail"]
    assert detail["stage"] == "s" * 200 and detail["message"] == "m" * 1000
    sent = detail["metrics"]
    assert sent["loss"] == 0.5 and sent["step"] == 7
    assert not {"name", "nested", "ok", "k" * 100} & set(sent)
    assert len(sent) == 32 and all(isinstance(v, (int, float)) for v in sent.values())
    # And the job's own record keeps what it sent
    assert client.wait_status(job_id, "completed")["status"] == "completed"
    output = json.loads((tmp_path / "state/jobs" / f"job_{job_id}/output.json").read_text())
    assert output["progress"]["stage"] == stage and output["progress"]["metrics"] == metrics


def test_a_coordinators_words_cannot_write_a_line_into_the_agents_log(
        core: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a coordinator that refuses a report with a detail holding a newline, a line
    # forged in the agent's own format, and an escape sequence (the agent logs it)
    client = Client(core)
    job_id = client.submit(SLEEP)
    forged = "2026-01-01 00:00:00,000 INFO agent.daemon.outbox: job FORGED: reported"
    core.faults.set(400, paths=(f"/v1/miners/{job_id}/result",),
                    body={"detail": f"no\n{forged}\x1b]0;t\x07"})
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True)
    agents.append(agent)
    assert agent.wait(60) == 0, agent.log()
    # Then the agent's log has the detail inline, shown, and no line of its making
    log = agent.log()
    assert f"no\\x0a{forged}\\x1b]0;t\\x07" in log, log[-2000:]
    assert not any(line.startswith(forged) for line in log.splitlines())
    assert "\x1b" not in log


def test_two_jobs_run_side_by_side_on_two_slots(core: ReferenceCoordinator, tmp_path: Path,
                                                agents: list[AgentProcess]) -> None:
    client = Client(core)
    jobs = [client.submit({"type": "sleep", "steps": 30, "step_s": 0.05}) for _ in range(2)]
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True, cpu_slots=2)
    agents.append(agent)
    assert agent.wait(90) == 0, agent.log()
    outputs = [json.loads((tmp_path / "state/jobs" / f"job_{j}/output.json").read_text())
               for j in jobs]
    assert all(o["status"] == "completed" for o in outputs)
    # The second started before the first finished: they overlapped.
    first, second = sorted(outputs, key=lambda o: o["started_at"])
    assert second["started_at"] < first["finished_at"]


def test_coordinator_down_then_back_loses_nothing(core: ReferenceCoordinator, tmp_path: Path,
                                                  agents: list[AgentProcess]) -> None:
    client = Client(core)
    job_id = client.submit({"type": "sleep", "steps": 20, "step_s": 0.05})
    agent = AgentProcess(core.base_url, tmp_path / "state")
    agents.append(agent)
    agent.wait_log(f"job {job_id}: started")
    # When the coordinator goes away while the job runs and finishes
    core.faults.down()
    agent.wait_log(f"job {job_id}: completed", timeout=30)
    time.sleep(1.5)
    assert agent.proc.poll() is None
    # Then, once it is back, the result arrives exactly once
    core.faults.up()
    client.wait_status(job_id, "completed", timeout=30)
    assert len(client.receipts(job_id)) == 1


def test_429_and_5xx_storms_are_ridden_out(core: ReferenceCoordinator, tmp_path: Path,
                                           agents: list[AgentProcess]) -> None:
    client = Client(core)
    job_id = client.submit(SLEEP)
    core.faults.rate_limit(retry_after_s=0.3, count=5)
    core.faults.set(status=503, count=15)
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True)
    agents.append(agent)
    assert agent.wait(100) == 0, agent.log()
    assert client.job(job_id)["status"] == "completed"
    assert len(client.receipts(job_id)) == 1
    assert "Traceback" not in agent.log()


def test_sigkill_mid_job_then_restart_reports_agent_restart(core: ReferenceCoordinator,
                                                           tmp_path: Path,
                                                           agents: list[AgentProcess]) -> None:
    client = Client(core)
    job_id = client.submit({"type": "sleep", "steps": 100000, "step_s": 0.01,
                            "print_every": 10})
    agent = AgentProcess(core.base_url, tmp_path / "state")
    agents.append(agent)
    agent.wait_log(f"job {job_id}: started")
    time.sleep(0.5)
    agent.kill()
    # When a new agent starts on the same state directory
    again = AgentProcess(core.base_url, tmp_path / "state")
    agents.append(again)
    job = client.wait_status(job_id, "failed", timeout=60)
    # Then the job is reported once as failed with agent_restart, its logs packaged
    assert job["error"]["code"] == "agent_restart"
    folder = tmp_path / "state/jobs" / f"job_{job_id}"
    assert b"step 10/100000" in (folder / "logs/stdout.log").read_bytes()
    assert subprocess.run(["sha256sum", "-c", "output.sha256"], cwd=folder,
                          capture_output=True).returncode == 0
    time.sleep(1)
    assert client.receipts(job_id) == []


def test_sigkill_mid_report_then_restart_reports_once(core: ReferenceCoordinator,
                                                      tmp_path: Path,
                                                      agents: list[AgentProcess]) -> None:
    # Given a coordinator whose /result keeps failing, so the agent is stuck reporting
    client = Client(core)
    job_id = client.submit(SLEEP)
    core.faults.set(status=503, count=10_000, paths=(f"/v1/miners/{job_id}/result",))
    agent = AgentProcess(core.base_url, tmp_path / "state")
    agents.append(agent)
    agent.wait_log(f"job {job_id}: completed")
    time.sleep(1)
    # When the agent is SIGKILLed mid-report and restarted after the coordinator recovers
    agent.kill()
    core.faults.clear()
    again = AgentProcess(core.base_url, tmp_path / "state")
    agents.append(again)
    client.wait_status(job_id, "completed", timeout=60)
    again.wait_log(f"job {job_id}: reported")
    time.sleep(1)
    # Then exactly one result landed
    assert len(client.receipts(job_id)) == 1


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_sigterm_drains_then_second_sigterm_cancels(core: ReferenceCoordinator,
                                                    tmp_path: Path,
                                                    agents: list[AgentProcess],
                                                    event_loop: str) -> None:
    client = Client(core)
    short = client.submit({"type": "sleep", "steps": 40, "step_s": 0.1})
    agent = AgentProcess(core.base_url, tmp_path / "state", event_loop=event_loop)
    agents.append(agent)
    agent.wait_log(f"job {short}: started")
    agent.signal(signal.SIGTERM)
    # Heartbeats go on during the drain (they say so), while the job still runs
    later = client.submit(SLEEP)
    wait_until(lambda: (core.store.miner("miner-1") or {}).get("metadata", {})
               .get("draining") is True, 10)
    assert client.job(short)["status"] == "running"
    # The running job finishes and is reported during the drain; nothing new is polled
    assert agent.wait(60) == 0, agent.log()
    assert client.job(short)["status"] == "completed"
    assert client.job(later)["status"] == "pending"
    # A second agent: two SIGTERMs cancel the running job at once, reported as shutdown
    long = client.submit({"type": "sleep", "steps": 100000, "step_s": 0.01})
    again = AgentProcess(core.base_url, tmp_path / "state2", event_loop=event_loop)
    agents.append(again)
    client.wait_status(later, "completed")
    again.wait_log(f"job {long}: started")
    again.signal(signal.SIGTERM)
    time.sleep(0.3)
    again.signal(signal.SIGTERM)
    assert again.wait(60) == 0, again.log()
    assert client.job(long)["error"]["code"] == "agent_shutdown"
