"""Reports under faults: retried while the agent runs, uploads that end once, recovery.

The real daemon against the real reference coordinator on loopback; faults are real
refused connections, resets and HTTP answers.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.journal import Journal, Phase
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.daemon.helpers import AgentProcess, Client, start_coordinator, wait_until

pytestmark = pytest.mark.slow
SHORT = {"type": "sleep", "steps": 3, "step_s": 0.02, "print_every": 1}


@pytest.fixture
def coordinators(tmp_path: Path) -> Iterator[Callable[..., ReferenceCoordinator]]:
    """Start reference coordinators (state under tmp_path); all stopped afterwards."""
    started: list[ReferenceCoordinator] = []

    def start(**kwargs: Any) -> ReferenceCoordinator:
        started.append(start_coordinator(tmp_path / f"coord{len(started)}", **kwargs))
        return started[-1]

    yield start
    for coord in started:
        coord.stop()


def journal_row(state: Path, job_id: str) -> dict[str, Any]:
    with sqlite3.connect(state / "journal.db") as db:
        phase, delivery = db.execute("SELECT phase, delivery_json FROM jobs WHERE job_id = ?",
                                     (job_id,)).fetchone()
    return {"phase": phase, "delivery": json.loads(delivery) if delivery else {}}


def test_an_outage_during_the_report_delays_it_and_never_drops_it(
        tmp_path: Path, agents: list[AgentProcess],
        coordinators: Callable[..., ReferenceCoordinator]) -> None:
    coord = coordinators(extensions=())
    client = Client(coord)
    job_id = client.submit({"type": "sleep", "steps": 10, "step_s": 0.1})
    state = tmp_path / "state"
    # One try of a report lasts read_timeout_s: an outage here outlasts several tries
    agent = AgentProcess(coord.base_url, state, read_timeout_s=1)
    agents.append(agent)
    agent.wait_log(f"job {job_id}: started")
    # When the coordinator goes away while the job runs, and stays away past it
    coord.faults.down()
    agent.wait_log(f"job {job_id}: completed", timeout=30)
    agent.wait_log(f"job {job_id}: report not delivered yet", timeout=30, count=3)
    assert journal_row(state, job_id)["phase"] == "finished"
    # Then, once it is back, the same agent (no restart) delivers it exactly once
    coord.faults.up()
    client.wait_status(job_id, "completed", timeout=30)
    assert len(client.receipts(job_id)) == 1
    assert agent.proc.poll() is None and "next start" not in agent.log()
    wait_until(lambda: journal_row(state, job_id)["phase"] == "reported", 10)
    assert journal_row(state, job_id)["delivery"]["tries"] >= 3
    # and the slot serves new work
    second = client.submit(SHORT)
    client.wait_status(second, "completed", timeout=30)
    assert len(client.receipts(second)) == 1


def test_a_report_for_a_job_canceled_during_the_outage_is_never_sent(
        tmp_path: Path, agents: list[AgentProcess],
        coordinators: Callable[..., ReferenceCoordinator]) -> None:
    coord = coordinators(extensions=())
    client = Client(coord)
    job_id = client.submit({"type": "sleep", "steps": 4, "step_s": 0.1})
    state = tmp_path / "state"
    agent = AgentProcess(coord.base_url, state, read_timeout_s=1)
    agents.append(agent)
    agent.wait_log(f"job {job_id}: started")
    # The report waits behind a /result that keeps failing; meanwhile the client cancels
    coord.faults.set(status=503, count=10_000, paths=(f"/v1/miners/{job_id}/result",))
    agent.wait_log(f"job {job_id}: report not delivered yet", timeout=30)
    client.cancel(job_id)
    time.sleep(0.3)  # a try that looked before the cancel has sent (and met a 503) by now
    coord.faults.clear()
    # Then the next try finds the job gone from the running list and sends nothing
    wait_until(lambda: journal_row(state, job_id)["phase"] == "dropped", 30, agent.log)
    assert client.job(job_id)["status"] == "canceled"
    assert client.receipts(job_id) == []


def _package_errors(client: Client, job_id: str) -> list[dict[str, Any]]:
    errors = client.job(job_id)["result"]["package"].get("upload_errors")
    assert isinstance(errors, list)
    return errors


@pytest.mark.parametrize("announce", [True, False], ids=["announced-limit", "413"])
def test_a_package_over_the_upload_limit_ends_once_as_package_too_large(
        tmp_path: Path, agents: list[AgentProcess],
        coordinators: Callable[..., ReferenceCoordinator], announce: bool) -> None:
    coord = coordinators(max_package_bytes=512, announce_limits=announce)
    client = Client(coord)
    job_id = client.submit(SHORT)
    agent = AgentProcess(coord.base_url, tmp_path / "state", burst=True)
    agents.append(agent)
    assert agent.wait(60) == 0, agent.log()
    # The job completed once, and its report went out with the manifest and hash
    assert client.job(job_id)["status"] == "completed"
    assert len(client.receipts(job_id)) == 1
    assert agent.log().count(f"job {job_id}: started") == 1
    package = client.job(job_id)["result"]["package"]
    assert package["result_hash"] and package["manifest"]
    assert package["location"].startswith("file://")
    [error] = _package_errors(client, job_id)
    assert error["error_code"] == "package_too_large"
    assert error["limit_bytes"] == 512 and error["size_bytes"] > 512
    # Announced: not even tried; a 413: tried once
    uploads = coord.faults.arrived(f"/v1/miners/{job_id}/package")
    assert uploads == (0 if announce else 1)


def test_resets_on_every_upload_end_as_package_too_large(
        tmp_path: Path, agents: list[AgentProcess],
        coordinators: Callable[..., ReferenceCoordinator]) -> None:
    # A server that refuses a large body by cutting the connection before reading it,
    # while it answers every other call (the real coordinator past its drain limit)
    coord = coordinators(announce_limits=False)
    client = Client(coord)
    job_id = client.submit(SHORT)
    coord.faults.reset(count=1000, paths=(f"/v1/miners/{job_id}/package",))
    agent = AgentProcess(coord.base_url, tmp_path / "state", burst=True)
    agents.append(agent)
    assert agent.wait(60) == 0, agent.log()
    assert client.job(job_id)["status"] == "completed"
    assert len(client.receipts(job_id)) == 1
    [error] = _package_errors(client, job_id)
    assert error["error_code"] == "package_too_large"
    assert error["limit_bytes"] is None and "reset" in error["message"]
    assert coord.faults.arrived(f"/v1/miners/{job_id}/package") == 2
    assert agent.log().count(f"job {job_id}: started") == 1


def test_sigkill_during_the_upload_then_restart_uploads_and_reports_once(
        tmp_path: Path, agents: list[AgentProcess],
        coordinators: Callable[..., ReferenceCoordinator]) -> None:
    coord = coordinators()
    client = Client(coord)
    job_id = client.submit(SHORT)
    state = tmp_path / "state"
    # The upload hangs: the agent is killed with the report journaled, upload pending
    coord.faults.set(status=503, count=10_000, paths=(f"/v1/miners/{job_id}/package",))
    agent = AgentProcess(coord.base_url, state, read_timeout_s=1)
    agents.append(agent)
    agent.wait_log(f"job {job_id}: report not delivered yet", timeout=30)
    row = journal_row(state, job_id)
    assert row["phase"] == "finished"
    assert row["delivery"]["upload"]["targets"][0]["state"] == "pending"
    agent.kill()
    coord.faults.clear()
    # When it starts again, the package is uploaded and the report points at it
    again = AgentProcess(coord.base_url, state, burst=True)
    agents.append(again)
    assert again.wait(60) == 0, again.log()
    assert client.job(job_id)["status"] == "completed"
    assert len(client.receipts(job_id)) == 1
    assert coord.store.package_data(job_id) is not None
    location = client.job(job_id)["result"]["package"]["location"]
    assert location.startswith("http") and job_id in location
    assert journal_row(state, job_id)["phase"] == "reported"


def test_sigkill_while_the_job_ran_then_restart_uploads_the_leftovers(
        tmp_path: Path, agents: list[AgentProcess],
        coordinators: Callable[..., ReferenceCoordinator]) -> None:
    coord = coordinators()
    client = Client(coord)
    job_id = client.submit({"type": "sleep", "steps": 100, "step_s": 0.05,
                            "print_every": 1})
    state = tmp_path / "state"
    agent = AgentProcess(coord.base_url, state)
    agents.append(agent)
    agent.wait_log(f"job {job_id}: started")
    time.sleep(0.5)
    agent.kill()
    again = AgentProcess(coord.base_url, state, burst=True)
    agents.append(again)
    assert again.wait(60) == 0, again.log()
    job = client.job(job_id)
    assert job["status"] == "failed"
    # The leftovers' package is on the coordinator, not only on the node
    assert coord.store.package_data(job_id) is not None


def test_sigterm_is_honoured_within_the_drain_budget_while_an_upload_hangs(
        tmp_path: Path, agents: list[AgentProcess],
        coordinators: Callable[..., ReferenceCoordinator]) -> None:
    coord = coordinators()
    client = Client(coord)
    job_id = client.submit(SHORT)
    state = tmp_path / "state"
    # The coordinator takes the upload's request and answers nothing for a minute
    coord.faults.set(status=None, delay_s=60, count=1,
                     paths=(f"/v1/miners/{job_id}/package",))
    agent = AgentProcess(coord.base_url, state, read_timeout_s=120, drain_timeout_s=2)
    agents.append(agent)
    wait_until(lambda: coord.faults.arrived(f"/v1/miners/{job_id}/package") == 1, 30,
               agent.log)
    # When SIGTERM comes with the upload in flight
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    # Then the agent exits 0 within the drain budget plus the outbox's last try (5 s)
    assert agent.wait(30) == 0, agent.log()
    assert time.monotonic() - started < 15, agent.log()
    # and the report stays journaled for the next start, nothing lost
    row = journal_row(state, job_id)
    assert row["phase"] == "finished"
    assert "1 report(s) not delivered within the drain budget" in agent.log()


def test_a_manifest_of_long_names_is_cut_to_fit_the_report(
        tmp_path: Path, agents: list[AgentProcess],
        coordinators: Callable[..., ReferenceCoordinator]) -> None:
    # Given a job that leaves 400 files 60 folders down, every name 80 three-byte
    # characters long: each path is 30 KiB of JSON, the manifest 12 MiB, past the
    # coordinator's 10 MiB body limit (the report was retried for ever, never sent)
    coord = coordinators(extensions=())
    client = Client(coord)
    script = """if True:
        import os
        name = "\\u20ac" * 80
        os.chdir(os.environ["MINER_ARTIFACTS_DIR"])
        for _ in range(60):  # one folder at a time: the path is past PATH_MAX
            os.mkdir(name)
            os.chdir(name)
        for i in range(400):
            open(f"{name}{i}", "w").close()
        with open(os.environ["MINER_RESULT_FILE"], "w") as fh:
            fh.write("made\\n")
        """
    job_id = client.submit({"type": "command", "argv": ["python3", "-c", script]})
    agent = AgentProcess(coord.base_url, tmp_path / "state", allowed_job_types="command")
    agents.append(agent)
    # Then the job is reported completed, its text whole and its manifest cut
    job = client.wait_status(job_id, "completed", "failed", timeout=60)
    assert job["status"] == "completed", (job, agent.log()[-3000:])
    result = job["result"]
    assert result["output"] == "made\n"
    package = result["package"]
    assert package["manifest_truncated"] is True
    assert 0 < len(package["manifest"]) < 400
    assert len(json.dumps(result)) < 10 << 20
    # And what the report lists is the package's own manifest, from its start
    output = json.loads((tmp_path / "state/jobs" / f"job_{job_id}/output.json").read_text())
    assert len(output["files"]) == 400 + 3
    assert package["manifest"] == output["files"][:len(package["manifest"])]
    assert package["result_hash"] == output["result_hash"]


def test_a_report_journaled_over_the_limit_by_an_older_agent_is_cut_and_sent(
        tmp_path: Path, agents: list[AgentProcess],
        coordinators: Callable[..., ReferenceCoordinator]) -> None:
    # Given a job that ran here when the agent was killed, and its report journaled at
    # 12 MiB (a manifest of long names), as agents before the cut wrote them
    coord = coordinators(extensions=())
    client = Client(coord)
    job_id = client.submit({"type": "sleep", "steps": 1000, "step_s": 0.05})
    state = tmp_path / "state"
    agent = AgentProcess(coord.base_url, state)
    agents.append(agent)
    agent.wait_log(f"job {job_id}: started")
    agent.kill()
    manifest = [{"path": "\u20ac" * 4000 + str(i), "size": 0, "sha256": "0" * 64}
                for i in range(500)]
    result = {"status": "completed", "partial": False, "output": "done\n",
              "output_truncated": False, "logs": {"stdout_tail": "", "stderr_tail": ""},
              "package": {"result_hash": "0" * 64, "manifest": manifest,
                          "manifest_truncated": False}, "metrics": {}}
    report = {"kind": "result", "body": {"result": result, "metrics": {"duration_ms": 1.0}}}
    assert len(json.dumps(report)) > 10 << 20
    journal = Journal(state / "journal.db")
    journal.set_phase(job_id, Phase.FINISHED, outcome="completed", report=report)
    journal.close()
    # When the agent starts again
    again = AgentProcess(coord.base_url, state)
    agents.append(again)
    # Then the report is cut to fit and sent, once: text whole, manifest from its start
    job = client.wait_status(job_id, "completed", "failed", timeout=60)
    assert job["status"] == "completed", (job, again.log()[-3000:])
    assert job["result"]["output"] == "done\n"
    package = job["result"]["package"]
    assert package["manifest_truncated"] is True
    assert 0 < len(package["manifest"]) < 500
    assert package["manifest"] == manifest[:len(package["manifest"])]
    wait_until(lambda: journal_row(state, job_id)["phase"] == "reported", 10)
    assert len(client.receipts(job_id)) == 1
    assert journal_row(state, job_id)["delivery"]["tries"] == 1
    assert "sent cut to fit" in again.log()
