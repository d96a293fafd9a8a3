"""The job stream, ``/v1/jobs/{job_id}/stream``: a real WebSocket client on loopback.

The miner side is the hand-held miner of the client-query tests (real miner API calls),
so each change the stream should push is made at a known moment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.coordinator.conftest import CLIENT_KEY, MINER_KEY, submit
from tests.agent.coordinator.test_client_queries import HandMiner


@pytest.fixture
def hand(coordinator: ReferenceCoordinator) -> Iterator[HandMiner]:
    m = HandMiner(coordinator)
    yield m
    m.http.close()


def stream(coord: ReferenceCoordinator, job_id: str, key: str = CLIENT_KEY,
           after: int | None = None) -> ClientConnection:
    url = coord.base_url.replace("http://", "ws://") + f"/v1/jobs/{job_id}/stream"
    if after is not None:
        url += f"?after={after}"
    return connect(url, additional_headers={"X-Api-Key": key}, proxy=None, open_timeout=5)


def next_event(ws: ClientConnection) -> dict[str, Any]:
    return dict(json.loads(ws.recv(timeout=5)))


def rest(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every event until the server closes the stream (it must close it cleanly)."""
    events = []
    with pytest.raises(ConnectionClosedOK):
        while True:
            events.append(next_event(ws))
    return events


def test_a_job_streams_its_states_and_logs_and_the_stream_closes_when_it_ends(
        coordinator: ReferenceCoordinator, hand: HandMiner) -> None:
    # Given a queued job and a client watching it
    job_id = submit(coordinator)
    with stream(coordinator, job_id) as ws:
        first = next_event(ws)
        assert first["type"] == "state" and first["status"] == "pending"
        # When a miner takes it, reports progress, logs a line and completes it
        assert hand.take() == job_id
        assert next_event(ws)["status"] == "assigned"
        hand.progress(job_id, 0.5)
        running = next_event(ws)
        assert (running["status"], running["progress"], running["stage"]) == \
            ("running", 50.0, "steps")
        hand.log(job_id, b"hello\n")
        log = next_event(ws)
        assert (log["type"], log["stream"], log["offset"], log["data"]) == \
            ("log", "stdout", 0, "hello\n")
        hand.complete(job_id)
        # Then the last event is the completed state, and the server closes with 1000
        last = rest(ws)[-1]
        assert (last["status"], last["progress"]) == ("completed", 100.0)
        assert ws.close_code == 1000
    assert first["seq"] < running["seq"] < log["seq"] < last["seq"]


def test_a_stream_resumes_after_a_seq_and_an_ended_job_closes_at_once(
        coordinator: ReferenceCoordinator, hand: HandMiner) -> None:
    job_id = submit(coordinator)
    hand.take()
    hand.log(job_id, b"one\n")
    hand.log(job_id, b"two\n", offset=4)
    hand.complete(job_id)
    with stream(coordinator, job_id) as ws:
        everything = rest(ws)
    assert [e["data"] for e in everything if e["type"] == "log"] == ["one\n", "two\n"]
    first_log = next(e for e in everything if e["type"] == "log")
    with stream(coordinator, job_id, after=first_log["seq"]) as ws:
        resumed = rest(ws)
    assert [e["data"] for e in resumed if e["type"] == "log"] == ["two\n"]
    assert resumed[-1]["status"] == "completed"
    with stream(coordinator, job_id, after=everything[-1]["seq"]) as ws:
        assert rest(ws) == []
        assert ws.close_code == 1000


@pytest.mark.parametrize(("key", "job", "status", "detail"), [
    ("wrong-key", "known", 401, "Invalid API key"),
    (MINER_KEY, "known", 403, "API key does not have the client role"),
    (CLIENT_KEY, "nope", 404, "Job not found"),
], ids=["bad-key", "miner-key", "unknown-job"])
def test_a_refused_stream_is_a_json_answer_before_the_upgrade(
        coordinator: ReferenceCoordinator, key: str, job: str, status: int,
        detail: str) -> None:
    job_id = submit(coordinator) if job == "known" else job
    with pytest.raises(InvalidStatus) as refused:
        stream(coordinator, job_id, key=key)
    assert refused.value.response.status_code == status
    assert json.loads(refused.value.response.body or b"{}")["detail"] == detail


def test_a_coordinator_going_down_cuts_the_stream(coordinator: ReferenceCoordinator) -> None:
    job_id = submit(coordinator)
    with stream(coordinator, job_id) as ws:
        assert next_event(ws)["status"] == "pending"
        coordinator.faults.down()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    coordinator.faults.up()
    with stream(coordinator, job_id) as ws:
        assert next_event(ws)["status"] == "pending"
