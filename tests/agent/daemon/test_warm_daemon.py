"""Warm model workers through the real daemon, against the real reference coordinator."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.daemon.helpers import AgentProcess, Client, start_coordinator, wait_until
from tests.agent.execution.test_warm import build_gpt2

pytestmark = pytest.mark.slow


def inference(**payload: Any) -> dict[str, Any]:
    return {"type": "inference", "model": "tiny", "prompt": "the quick brown fox",
            "max_new_tokens": 8, **payload}


@pytest.fixture
def coord(tmp_path: Path) -> Iterator[ReferenceCoordinator]:
    coord = start_coordinator(tmp_path / "coord")
    yield coord
    coord.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("models") / "tiny")


def output(state: Path, job_id: str) -> dict[str, Any]:
    return dict(json.loads((state / "jobs" / f"job_{job_id}/output.json").read_text()))


def worker_pid(agent: AgentProcess) -> int:
    """The warm worker's python (inside bubblewrap when the sandbox is on)."""
    found = [p for p in psutil.Process(agent.proc.pid).children(recursive=True)
             if "runtimes.warm" in p.cmdline() and "python" in p.name()]
    assert len(found) == 1, found
    return found[0].pid


def test_jobs_share_the_warm_model_and_a_dead_worker_fails_only_its_job(
        coord: ReferenceCoordinator, tmp_path: Path, tiny: Path,
        agents: list[AgentProcess]) -> None:
    # Given an agent with one model, in its sandbox, and two jobs on that model
    client = Client(coord)
    state = tmp_path / "state"
    agent = AgentProcess(coord.base_url, state, models=json.dumps({"tiny": str(tiny)}))
    agents.append(agent)
    first, second = client.submit(inference()), client.submit(inference())
    for job_id in (first, second):
        client.wait_status(job_id, "completed", timeout=90)
    # Then the second found the model loaded in the worker the first loaded it in
    cold, warm = output(state, first), output(state, second)
    assert cold["metrics"]["model_cached"] is False
    assert warm["metrics"]["model_cached"] is True and warm["metrics"]["model_load_ms"] == 0
    assert warm["exit"]["via"] == "warm"
    assert warm["environment"]["isolation"]["sandbox"] == "bwrap"
    assert client.job(second)["result"]["output"] == (
        state / "jobs" / f"job_{second}/result.txt").read_text()
    # When the worker dies in the middle of a job
    doomed = client.submit(inference(max_new_tokens=5000))
    wait_until(lambda: (client.job(doomed).get("progress") or 0) > 0, 60, agent.log)
    os.kill(worker_pid(agent), signal.SIGKILL)
    # Then that job fails with worker_died, and the next one runs on a fresh worker
    job = client.wait_status(doomed, "failed", timeout=60)
    assert "worker_died" in json.dumps(job), job
    after = client.submit(inference())
    client.wait_status(after, "completed", timeout=90)
    assert output(state, after)["metrics"]["model_cached"] is False
    assert len(agent.log().split("warm model worker cpu ready")) == 3


def test_warm_models_off_runs_inference_in_a_process_of_its_own(
        coord: ReferenceCoordinator, tmp_path: Path, tiny: Path,
        agents: list[AgentProcess]) -> None:
    client = Client(coord)
    state = tmp_path / "state"
    agent = AgentProcess(coord.base_url, state, models=json.dumps({"tiny": str(tiny)}),
                         warm_models="false", burst=True)
    agents.append(agent)
    job_id = client.submit(inference())
    assert agent.wait(90) == 0, agent.log()
    done = output(state, job_id)
    assert done["status"] == "completed" and done["exit"]["via"] != "warm"
    assert "model_cached" not in done["metrics"] and "warm model worker" not in agent.log()
