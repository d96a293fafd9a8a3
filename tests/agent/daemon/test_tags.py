"""Node tags: config, the job model, dispatch by the reference coordinator, and the agent's
own refusal of a job whose tags it lacks (a coordinator that ignores them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import load_config
from agent.errors import ConfigError, InvalidJob
from agent.jobs import Job
from agent.reference import miner_api
from agent.reference.coordinator import ReferenceCoordinator
from agent.reference.model import matches
from tests.agent.daemon.helpers import CLIENT_KEY, AgentProcess, Client, start_coordinator

SLEEP = {"type": "sleep", "steps": 2, "step_s": 0.01}


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ReferenceCoordinator]:
    coord = start_coordinator(tmp_path, extensions=())
    yield coord
    coord.stop()


# -- config and the job model ---------------------------------------------------------

def test_tags_come_from_a_toml_table_or_name_value_pairs(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('[tags]\npool = "a"\nrack = 7\nnvlink = true\n')
    assert dict(load_config(toml, environ={}).tags) == {"pool": "a", "rack": "7",
                                                        "nvlink": "true"}
    env = {"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_TAGS": "pool=b, zone=eu-1"}
    assert dict(load_config(environ=env).tags) == {"pool": "b", "zone": "eu-1"}


@pytest.mark.parametrize("value", ["bad name=x", "pool"])
def test_a_malformed_tag_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="tags"):
        load_config(environ={"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_TAGS": value})


def test_a_job_asks_for_tags_as_text() -> None:
    job = Job.from_dict({"job_id": "j", "payload": SLEEP,
                         "constraints": {"tags": {"rack": 7, "pool": "a", "nvlink": True}}})
    assert job.constraints.tags == {"rack": "7", "pool": "a", "nvlink": "true"}
    assert job.constraints.tags_missing({"rack": "7", "pool": "a", "nvlink": "true"}) == {}
    assert job.constraints.tags_missing({"rack": "8", "pool": "a"}) == {"rack": "7",
                                                                        "nvlink": "true"}


@pytest.mark.parametrize("tags", [["pool"], {"pool": ["a"]}, {"": "a"}, {"a b": "c"},
                                  {"pool": None}, {"pool": "x" * 300}])
def test_malformed_job_tags_are_invalid(tags: Any) -> None:
    with pytest.raises(InvalidJob, match="constraints.tags"):
        Job.from_dict({"job_id": "j", "payload": SLEEP, "constraints": {"tags": tags}})


def test_dispatch_gives_a_job_only_to_miners_with_every_tag_it_asks() -> None:
    node = {"tags": {"pool": "a", "rack": "7"}}
    assert matches(node, SLEEP, {"tags": {"pool": "a"}})
    assert matches(node, SLEEP, {"tags": {"pool": "a", "rack": 7}})
    assert not matches(node, SLEEP, {"tags": {"pool": "b"}})
    assert not matches(node, SLEEP, {"tags": {"zone": "eu"}})
    assert not matches({}, SLEEP, {"tags": {"pool": "a"}})
    assert not matches(node, SLEEP, {"tags": ["pool"]})
    for caps in (node, {}):  # a job asking none goes anywhere
        assert matches(caps, SLEEP, {}) and matches(caps, SLEEP, {"tags": {}})


def test_the_reference_coordinator_refuses_malformed_tags(core: ReferenceCoordinator) -> None:
    with httpx.Client(base_url=core.base_url, headers={"X-Api-Key": CLIENT_KEY}) as http:
        resp = http.post("/v1/jobs", json={"payload": SLEEP,
                                           "constraints": {"tags": {"pool": ["a"]}}})
    assert resp.status_code == 422 and "constraints.tags" in resp.text


# -- the daemon -------------------------------------------------------------------------

@pytest.mark.slow
def test_jobs_go_only_to_a_node_with_their_tags(core: ReferenceCoordinator, tmp_path: Path,
                                               agents: list[AgentProcess]) -> None:
    # Given jobs asking for tags the node has, one it has with another value, and none
    client = Client(core)
    present = client.submit(SLEEP, tags={"pool": "a", "rack": 7})
    other = client.submit(SLEEP, tags={"pool": "b"})
    untagged = client.submit(SLEEP)
    # When a node tagged pool=a, rack=7 runs until the coordinator has nothing for it
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True, cpu_slots=1,
                         tags="pool=a,rack=7")
    agents.append(agent)
    assert agent.wait(90) == 0, agent.log()
    # Then it registered its tags, ran the matching jobs, and never got the other one
    miner = core.store.miner("miner-1")
    assert miner is not None and miner["capabilities"]["tags"] == {"pool": "a", "rack": "7"}
    assert client.job(present)["status"] == "completed"
    assert client.job(untagged)["status"] == "completed"
    assert client.job(other)["status"] == "pending"


@pytest.mark.slow
def test_the_agent_refuses_a_job_whose_tags_it_lacks(
        core: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a coordinator that ignores tags when it dispatches
    monkeypatch.setattr(miner_api, "matches", lambda caps, payload, constraints: True)
    client = Client(core)
    job_id = client.submit(SLEEP, tags={"pool": "b", "gpu-class": "h200"})
    # When a node tagged pool=a takes the job
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True, cpu_slots=1,
                         tags="pool=a")
    agents.append(agent)
    assert agent.wait(90) == 0, agent.log()
    # Then it fails unsupported_constraint, naming what was asked and what the node has
    error = client.job(job_id)["error"]
    assert error["code"] == "unsupported_constraint", error
    assert "gpu-class='h200', pool='b'" in error["message"]
    assert "pool='a'" in error["message"]
    assert not (tmp_path / "state" / "jobs" / f"job_{job_id}").exists()  # it never ran
