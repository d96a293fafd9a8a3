"""The daemon embedded in a test's own process: it gives back what it borrowed.

The other daemon tests run `miner-agent run` as a subprocess; this one awaits
``Agent.serve()`` in the test's event loop against a real reference coordinator with
every extension, as a program embedding the agent would.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from types import FrameType

import pytest

from agent.config import load_config
from agent.daemon.journal import Journal, Phase
from agent.daemon.lifecycle import Agent
from agent.execution.executor import JobRun
from tests.agent.daemon.helpers import FAST, MINER_KEY, Client, start_coordinator

pytestmark = pytest.mark.slow


def test_served_in_process_restores_signal_handlers_and_forgets_finished_jobs(
        tmp_path: Path) -> None:
    coord = start_coordinator(tmp_path / "coordinator")
    client = Client(coord)
    job_id = client.submit({"type": "sleep", "steps": 5, "step_s": 0.05, "print_every": 1})
    settings = {k: v for k, v in FAST.items() if k not in ("log_level", "log_format")}
    cfg = load_config(Path("/dev/null"), environ={}, overrides={
        **settings, "coordinator_url": coord.base_url, "miner_id": "embedded-1",
        "state_dir": tmp_path / "state", "cache_dir": tmp_path / "cache"})

    def previous(signum: int, frame: FrameType | None) -> None:
        raise AssertionError("the agent's handler should have had this signal")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        # Given an agent in burst mode, When it serves until the coordinator has no work
        agent = Agent(cfg, MINER_KEY, burst=True)
        assert asyncio.run(agent.serve()) == 0
        # Then the job was reported through the extensions
        assert client.job(job_id)["status"] == "completed"
        assert coord.store.read_log(job_id, "stdout")
        assert agent.session.caps.logs and agent.session.caps.progress
        # And the shippers kept nothing for a job that left the node
        assert agent.session.shipper is not None and agent.session.progress is not None
        assert agent.session.shipper._offsets == {}
        assert agent.session.progress._last == {}
        # And the SIGTERM handler from before the agent is back
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
        client.close()
        coord.stop()
    # The journal says reported (read after the agent closed it)
    journal = Journal(tmp_path / "state" / "journal.db")
    record = journal.get(job_id)
    journal.close()
    assert record is not None and record.phase is Phase.REPORTED


def test_a_job_the_agent_fails_on_is_reported_as_agent_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a fault of the agent's own while it finishes a job (a bug, injected here:
    # a job task raised, and its job stayed running on the coordinator until it expired)
    coord = start_coordinator(tmp_path / "coordinator", extensions=())
    client = Client(coord)
    broken = client.submit({"type": "sleep", "steps": 1, "step_s": 0})
    settings = {k: v for k, v in FAST.items() if k not in ("log_level", "log_format")}
    cfg = load_config(Path("/dev/null"), environ={}, overrides={
        **settings, "coordinator_url": coord.base_url, "miner_id": "embedded-2",
        "state_dir": tmp_path / "state", "cache_dir": tmp_path / "cache", "cpu_slots": 1})
    finish = JobRun._finish

    async def failing_once(run: JobRun, *args: object) -> object:
        if run.job.job_id == broken:
            raise RuntimeError("an injected fault")
        return await finish(run, *args)

    monkeypatch.setattr(JobRun, "_finish", failing_once)
    try:
        agent = Agent(cfg, MINER_KEY, burst=True)
        # When it serves until the coordinator has no work, another job behind it
        after = client.submit({"type": "sleep", "steps": 1, "step_s": 0})
        assert asyncio.run(agent.serve()) == 0
        # Then the coordinator heard of the fault, and the agent went on to the next job
        job = client.job(broken)
        assert job["status"] == "failed" and job["error"]["code"] == "agent_error", job
        assert "an injected fault" in job["error"]["message"]
        assert client.job(after)["status"] == "completed"
    finally:
        client.close()
        coord.stop()
