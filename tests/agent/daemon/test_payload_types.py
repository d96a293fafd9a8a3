"""Payload types the node lacks, a payload without a model, and dispatch by price.

The daemon is real and so is the reference coordinator, on loopback: a type no runtime
handles fails ``unsupported_job_type`` however it is spelled, and only a payload whose
type is not a short printable string is ``invalid_job``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import InvalidJob
from agent.jobs import Job
from agent.reference.coordinator import ReferenceCoordinator
from agent.reference.model import matches
from tests.agent.daemon.helpers import AgentProcess, Client, start_coordinator

AITBC_TYPES = [{"type": "transcribe", "url": "http://example.invalid/a.wav"},
               {"type": "reencode", "url": "http://example.invalid/a.mp4"},
               {"type": "Re-Encode"}, {"type": "image/generate"}, {"type": "../inference"}]


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ReferenceCoordinator]:
    coord = start_coordinator(tmp_path, extensions=())
    yield coord
    coord.stop()


# -- the job model ------------------------------------------------------------------

@pytest.mark.parametrize("jtype", ["transcribe", "Re-Encode", "image/generate", "x" * 64,
                                   "ré encode"])
def test_any_short_printable_type_is_a_well_formed_job(jtype: str) -> None:
    assert Job.from_dict({"job_id": "a", "payload": {"type": jtype}}).type == jtype


@pytest.mark.parametrize("payload", [{}, {"type": None}, {"type": 7}, {"type": ["sleep"]},
                                     {"type": ""}, {"type": "x" * 65}, {"type": "re\nencode"},
                                     {"type": "sleep\x1b[2J"}, {"type": "a\u202eb"}])
def test_a_missing_or_unprintable_type_is_invalid(payload: dict[str, Any]) -> None:
    with pytest.raises(InvalidJob, match="payload.type") as info:
        Job.from_dict({"job_id": "a", "payload": payload})
    assert info.value.code == "invalid_job"


# -- the daemon ---------------------------------------------------------------------

@pytest.mark.slow
def test_types_the_node_lacks_fail_unsupported_job_type(core: ReferenceCoordinator,
                                                        tmp_path: Path,
                                                        agents: list[AgentProcess]) -> None:
    # Given AITBC's transcribe and reencode, and odd spellings no runtime has, queued
    # next to a type whose string cannot be shown on one line
    client = Client(core)
    lacking = [client.submit(payload) for payload in AITBC_TYPES]
    garbled = client.submit({"type": "re\nencode"})
    # When the agent runs until the coordinator has nothing left for it
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True, cpu_slots=1)
    agents.append(agent)
    assert agent.wait(90) == 0, agent.log()
    # Then every type the node lacks failed unsupported_job_type, naming the type safely
    for job_id, payload in zip(lacking, AITBC_TYPES, strict=True):
        job = client.job(job_id)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "unsupported_job_type", job["error"]
        assert repr(payload["type"]) in job["error"]["message"]
    # And only the unprintable type is invalid_job
    assert client.job(garbled)["error"]["code"] == "invalid_job"


@pytest.mark.slow
def test_a_type_never_splits_a_log_line(core: ReferenceCoordinator, tmp_path: Path,
                                        agents: list[AgentProcess]) -> None:
    # Given a type with a newline in it
    client = Client(core)
    job_id = client.submit({"type": "re\nencode"})
    # When the agent takes it
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True, cpu_slots=1)
    agents.append(agent)
    assert agent.wait(90) == 0, agent.log()
    # Then it is refused, and the raw newline reached no log line
    assert client.job(job_id)["error"]["code"] == "invalid_job"
    assert "re\nencode" not in agent.log()


@pytest.mark.slow
def test_a_lacking_type_that_asks_for_a_gpu_is_still_unsupported(
        core: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a transcribe job asking for a GPU this node may not have (AITBC sends one)
    client = Client(core)
    job_id = client.submit(AITBC_TYPES[0], gpu="H200", min_vram_gb=80)
    # When the agent runs until the coordinator has nothing left for it
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True, cpu_slots=1)
    agents.append(agent)
    assert agent.wait(90) == 0, agent.log()
    # Then the missing runtime is what it hears, not a capacity problem
    assert client.job(job_id)["error"]["code"] == "unsupported_job_type"


# -- dispatch by price (the reference coordinator) -----------------------------------

def test_max_price_goes_only_to_miners_priced_at_or_below_it() -> None:
    job: dict[str, Any] = {"type": "sleep"}
    cheap, dear, unpriced = {"price": 0.5}, {"price": 2}, {}
    # A job with a max_price: a price at or below it matches, a higher one or none does not
    assert matches(cheap, job, {"max_price": 1.0})
    assert matches({"price": 1.0}, job, {"max_price": 1})
    assert not matches(dear, job, {"max_price": 1.0})
    assert not matches(unpriced, job, {"max_price": 1.0})
    assert not matches({"price": None}, job, {"max_price": 1.0})
    assert not matches({"price": "0.1"}, job, {"max_price": 1.0})
    assert not matches({"price": True}, job, {"max_price": 1.0})
    # A job without one goes to any of them
    for caps in (cheap, dear, unpriced):
        assert matches(caps, job, {})
        assert matches(caps, job, {"max_price": None})
