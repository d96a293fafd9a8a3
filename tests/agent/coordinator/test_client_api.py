"""The reference coordinator's client API (what the CLI's client commands call)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from agent.reference.coordinator import ReferenceCoordinator, main
from agent.reference.model import client_status, coordinator_states
from tests.agent.coordinator.conftest import GPU_CAPS, MINER_KEY, client_http, miner, submit


@pytest.mark.parametrize(("state", "kwargs", "expected"), [
    ("QUEUED", {}, "pending"),
    ("RUNNING", {"started": False}, "assigned"),
    ("RUNNING", {}, "running"),
    ("RUNNING", {"cancel_requested": True}, "canceling"),
    ("COMPLETED", {}, "completed"),
    ("FAILED", {}, "failed"),
    ("CANCELED", {}, "canceled"),
    ("EXPIRED", {}, "failed"),
])
def test_one_mapping_from_states_to_client_names(state: str, kwargs: dict[str, bool],
                                                  expected: str) -> None:
    assert client_status(state, **kwargs) == expected
    assert state in coordinator_states(expected)


def test_submit_status_list_cancel(core: ReferenceCoordinator) -> None:
    queued = submit(core, {"type": "inference", "prompt": "hi", "model": "llama3.2:3b"},
                    {"min_vram_mb": 8000}, ttl_s=60)
    running = submit(core)

    async def take_one() -> None:
        async with miner(core) as client:
            await client.register({**GPU_CAPS, "models": []}, 1)
            polled = await client.poll()
            assert polled is not None and polled.job_id == running

    asyncio.run(take_one())
    with client_http(core) as http:
        view = http.get(f"/v1/jobs/{queued}").json()
        assert view["status"] == "pending" and view["payload"]["model"] == "llama3.2:3b"
        listed = http.get("/v1/jobs", params={"status": "running"}).json()["jobs"]
        assert [j["job_id"] for j in listed] == [running]
        assert len(http.get("/v1/jobs").json()["jobs"]) == 2
        assert http.get(f"/v1/jobs/{running}/result").status_code == 409
        # Cancel: a queued job at once; a running one at once in the core
        assert http.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "canceled"
        assert http.post(f"/v1/jobs/{running}/cancel").json()["status"] == "canceled"
        assert http.post(f"/v1/jobs/{running}/cancel").status_code == 200  # idempotent
        result = http.get(f"/v1/jobs/{running}/result").json()
        assert result["status"] == "canceled" and result["receipt"] is None
        assert http.get("/v1/jobs/nope").status_code == 404
        assert http.get(f"/v1/jobs/{queued}/package").status_code == 404
        assert http.post("/v1/jobs", json={"payload": {}}).status_code == 422


def test_client_endpoints_need_the_client_role(core: ReferenceCoordinator) -> None:
    with client_http(core) as http:
        assert http.get("/v1/jobs", headers={"X-Api-Key": "nope"}).json() == {
            "detail": "Invalid API key"}
        assert http.get("/v1/jobs", headers={"X-Api-Key": MINER_KEY}).status_code == 403


def test_standalone_help() -> None:
    out = subprocess.run([sys.executable, "-m", "agent.reference.coordinator", "--help"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "--extensions" in out and "--job-ttl" in out and "REFCOORD_MINER_KEY" in out
    with pytest.raises(SystemExit):
        main(["--bogus"])
