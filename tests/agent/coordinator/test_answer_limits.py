"""Coordinator answers past a limit or malformed: read bounded, refused by id, never fatal.

A tiny stdlib HTTP server on loopback plays the coordinator: each poll takes the next
scripted answer, and every request path is recorded, so a test can say which job was
failed and that no request ever named a bad id.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.coordinator.client import BadJobId, CoordinatorClient
from agent.coordinator.retry import RetryPolicy
from agent.coordinator.transport import AnswerProblem, BadAnswer, decode_json, path_segment
from agent.jobs import valid_job_id

FAST = RetryPolicy(base_s=0.01, cap_s=0.05)
TWENTY_MB = 20 * 1024 * 1024
DEEP = "[" * 10_000 + "]" * 10_000
HUGE = "9" * 400
BAD_IDS: list[Any] = [None, "", ".", "..", "a/b", "a\x00b", "bad\nid", "x" * 129, 7, "-lead"]


def _job(job_id: Any, **extra: Any) -> bytes:
    body = {"job_id": job_id, "payload": {"type": "sleep", "steps": 1}, "constraints": {}}
    return json.dumps({**body, **extra}).encode()


class FakeCoordinator:
    """Answers the core miner calls; poll answers come from ``script`` (then 204)."""

    def __init__(self) -> None:
        self.script: list[tuple[bytes, dict[str, str]]] = []
        self.paths: list[str] = []
        # What the miner's running-jobs list says, of the jobs a poll has handed out (a
        # real coordinator lists no job before it is handed out)
        self.running: set[str] = set()
        self.handed: list[bytes] = []
        self.claimed: set[str] = set()  # listed whether handed out or not (it lies)
        self.bodies: dict[str, Any] = {}
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                owner.answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        sent = req.rfile.read(length)
        with self.lock:
            self.paths.append(req.path)
            self.bodies[req.path] = json.loads(sent or b"null")
            scripted = self.script.pop(0) if req.path == "/v1/miners/poll" and self.script \
                else None
            if scripted is not None:
                self.handed.append(scripted[0])
            listed = [{"job_id": j} for j in sorted(self.running)
                      if any(f'"job_id": "{j}"'.encode() in body for body in self.handed)]
            listed += [{"job_id": j} for j in sorted(self.claimed)]
        if req.path == "/v1/miners/poll" and scripted is None:
            req.send_response(204)
            req.end_headers()
            return
        body, headers = scripted or (json.dumps({"status": "ok", "jobs": listed}).encode(), {})
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            if name != "X-Unsized":
                req.send_header(name, value)
        if "X-Unsized" not in headers:  # without: the body ends when the connection does
            req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        try:
            req.wfile.write(body)
        except OSError:  # the agent hung up past its limit, as it should
            pass

    def answer_all_with(self, body_for: Callable[[str], bytes]) -> None:
        """From now on, answer every call 200 with ``body_for(its path)``, nothing else."""
        def fixed(req: BaseHTTPRequestHandler) -> None:
            req.rfile.read(int(req.headers.get("Content-Length") or 0))
            body = body_for(req.path)
            req.send_response(200)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)

        self.answer = fixed  # type: ignore[method-assign]

    def poll_with(self, body: bytes, **headers: str) -> None:
        self.script.append((body, headers))

    def job_paths(self) -> list[str]:
        return [p for p in self.paths if p.startswith("/v1/miners/")
                and p.split("/")[3] not in ("poll", "register", "heartbeat")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeCoordinator]:
    server = FakeCoordinator()
    yield server
    server.close()


def _client(fake: FakeCoordinator, **kwargs: Any) -> CoordinatorClient:
    return CoordinatorClient(fake.base_url, "key", "miner-1", retry=FAST, **kwargs)


async def _poll(fake: FakeCoordinator, **kwargs: Any) -> Any:
    async with _client(fake, **kwargs) as client:
        return await client.poll()


# -- decoding -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "problem"), [
    (DEEP, AnswerProblem.TOO_DEEP),
    ("[" * 70 + "]" * 70, AnswerProblem.TOO_DEEP),
    ('{"ttl_s": ' + HUGE + "}", AnswerProblem.BAD_NUMBER),
    ('{"ttl_s": 1e400}', AnswerProblem.BAD_NUMBER),
    ('{"ttl_s": NaN}', AnswerProblem.BAD_NUMBER),
    ('{"ttl_s": -Infinity}', AnswerProblem.BAD_NUMBER),
    ('{"a": ', AnswerProblem.NOT_JSON),
    (b"\xff\xfe{", AnswerProblem.NOT_JSON),
])
def test_decode_refuses_what_would_crash_later(text: str | bytes, problem: AnswerProblem) -> None:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(BadAnswer) as err:
        decode_json(data)
    assert err.value.problem is problem


def test_decode_keeps_ordinary_answers() -> None:
    assert decode_json(b'{"a": [1, 2.5, 9007199254740993, {"b": null}]}') == \
        {"a": [1, 2.5, 9007199254740993, {"b": None}]}
    assert decode_json(("[" * 64 + "]" * 64).encode()) is not None


@pytest.mark.parametrize("bad", ["", ".", ".."])
def test_path_segment_refuses_dot_segments(bad: str) -> None:
    with pytest.raises(ValueError):
        path_segment(bad)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_not_valid(bad: Any) -> None:
    assert not valid_job_id(bad)


# -- the client ---------------------------------------------------------------------


def test_oversized_poll_answer_is_not_read_whole(fake: FakeCoordinator) -> None:
    # Given a 20 MB poll answer whose first key names a valid job
    filler = json.dumps({"job_id": "big-1", "payload": {"type": "sleep", "pad": ""}})
    body = filler[:-2].encode() + b"x" * TWENTY_MB + b'"}}'
    fake.poll_with(body)
    fake.poll_with(body, **{"X-Unsized": "1"})  # no declared length: streamed to the cap
    # When the agent polls with a 1 MiB cap, twice
    tracemalloc.start()
    try:
        first = asyncio.run(_poll(fake, max_answer_bytes=1 << 20))
        second = asyncio.run(_poll(fake, max_answer_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Then each comes back as that job, refused, and memory stayed near the cap
    for polled in (first, second):
        assert polled.job_id == "big-1" and polled.payload is None
        assert "max_answer_bytes" in polled.problem
    assert peak < 6 * (1 << 20), peak


def test_gzip_bomb_is_capped_after_decoding(fake: FakeCoordinator) -> None:
    fake.poll_with(gzip.compress(_job("gz-1")[:-1] + b', "pad": "' + b"0" * TWENTY_MB + b'"}'),
                   **{"Content-Encoding": "gzip"})
    polled = asyncio.run(_poll(fake, max_answer_bytes=1 << 20))
    assert polled.job_id == "gz-1" and polled.problem is not None


@pytest.mark.parametrize(("body", "job_id"), [
    (b'{"job_id": "deep-1", "payload": ' + DEEP.encode() + b"}", "deep-1"),
    (b'{"job_id": "ttl-1", "lease": {"id": "l1", "ttl_s": ' + HUGE.encode() + b"}}", "ttl-1"),
    (b'{"job_id": "nan-1", "payload": {"type": "sleep", "x": NaN}}', "nan-1"),
    (b'{"job_id": "cut-1", "payload": {"type"', "cut-1"),
    (_job("lease-1", lease={"id": {"not": "a string"}}), "lease-1"),
])
def test_broken_answer_with_a_valid_id_becomes_a_refused_job(
        fake: FakeCoordinator, body: bytes, job_id: str) -> None:
    fake.poll_with(body)
    polled = asyncio.run(_poll(fake))
    assert polled.job_id == job_id and polled.payload is None and polled.problem
    assert polled.job_dict()["answer_problem"] == polled.problem


@pytest.mark.parametrize("bad", BAD_IDS)
def test_answer_with_a_bad_id_raises_and_names_nothing(fake: FakeCoordinator, bad: Any) -> None:
    fake.poll_with(_job(bad))
    with pytest.raises(BadAnswer) as err:
        asyncio.run(_poll(fake))
    assert err.value.problem is AnswerProblem.BAD_FIELD
    assert "\n" not in str(err.value) and "\x00" not in str(err.value)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"job"', DEEP.encode(), b'{"payload": {}}'])
def test_answer_without_an_id_raises(fake: FakeCoordinator, body: bytes) -> None:
    fake.poll_with(body)
    with pytest.raises(BadAnswer):
        asyncio.run(_poll(fake))


def test_huge_lease_ttl_inside_range_is_not_believed(fake: FakeCoordinator) -> None:
    fake.poll_with(_job("ttl-2", lease={"id": "l2", "ttl_s": 1e300}))
    polled = asyncio.run(_poll(fake))
    assert polled.problem is None and polled.lease_id == "l2" and polled.lease_ttl_s is None


@pytest.mark.slow
def test_a_lease_of_a_millisecond_does_not_make_the_agent_beat_flat_out(
        fake: FakeCoordinator, tmp_path: Path) -> None:
    from tests.agent.daemon.helpers import AgentProcess, wait_until

    # Given a coordinator that hands out a 2 s job under a lease of a millisecond
    fake.poll_with(_job("tiny-lease", payload={"type": "sleep", "steps": 20, "step_s": 0.1},
                        lease={"id": "l1", "ttl_s": 0.001}))
    fake.running = {"tiny-lease"}
    agent = AgentProcess(fake.base_url, tmp_path / "state", heartbeat_interval_s=30)
    try:
        agent.wait_log("job tiny-lease: started")
        beats = fake.paths.count("/v1/miners/heartbeat")
        time.sleep(1.5)
        # Then it beats at most every quarter second while it holds the lease
        beats = fake.paths.count("/v1/miners/heartbeat") - beats
        assert 1 <= beats <= 1.5 / 0.25 + 2, beats
        wait_until(lambda: any(p.endswith("/tiny-lease/result") for p in fake.paths), 30)
    finally:
        agent.stop()


@pytest.mark.parametrize("bad", BAD_IDS)
def test_no_request_carries_a_bad_job_id(fake: FakeCoordinator, bad: Any) -> None:
    async def calls() -> None:
        async with _client(fake) as client:
            for call in (client.fail(bad, "invalid_job"), client.result(bad, {}),
                         client.progress(bad), client.log_offsets(bad)):
                with pytest.raises(BadJobId):
                    await call

    asyncio.run(calls())
    assert fake.paths == []


def test_heartbeat_and_list_answers_of_the_wrong_shape_are_typed_errors(
        fake: FakeCoordinator) -> None:
    async def calls() -> None:
        async with _client(fake) as client:
            with pytest.raises(BadAnswer):
                await client.heartbeat(0)
            with pytest.raises(BadAnswer):
                await client.running_jobs()

    # Given answers of the right syntax but the wrong shape
    fake.answer_all_with(lambda path: b'{"cancel": 5}' if path.endswith("heartbeat")
                         else b'{"jobs": 5}')
    asyncio.run(calls())


# -- the daemon ---------------------------------------------------------------------


@pytest.mark.slow
def test_daemon_fails_broken_jobs_by_id_and_skips_the_rest(fake: FakeCoordinator,
                                                           tmp_path: Path) -> None:
    from tests.agent.daemon.helpers import AgentProcess

    # Given a coordinator whose poll answers are, in turn, broken in every way we know
    filler = json.dumps({"job_id": "big-1", "payload": {"type": "sleep", "pad": ""}})
    fake.poll_with(filler[:-2].encode() + b"x" * TWENTY_MB + b'"}}')
    fake.poll_with(b'{"job_id": "deep-1", "payload": ' + DEEP.encode() + b"}")
    fake.poll_with(b'{"job_id": "ttl-1", "payload": {"type": "sleep"}, '
                   b'"constraints": {"timeout_s": ' + HUGE.encode() + b"}}")
    for bad in (None, "..", "a/b", ".", "", "a\nb", "x" * 200):
        fake.poll_with(_job(bad))
    fake.poll_with(b'{"job_id": "body-1", "payload": 5}')
    fake.running = {"big-1", "deep-1", "ttl-1", "body-1"}
    # When the agent runs until there is no work left
    agent = AgentProcess(fake.base_url, tmp_path / "state", burst=True)
    try:
        code = agent.wait(90)
    finally:
        agent.stop()
    # Then it went through every answer and exited cleanly
    assert code == 0, agent.log()[-4000:]
    assert fake.script == []
    # ... every job with a usable id was failed through /fail with invalid_job
    failed = {p.split("/")[3] for p in fake.job_paths() if p.endswith("/fail")}
    assert failed == {"big-1", "deep-1", "ttl-1", "body-1"}, fake.paths
    for job_id in failed:
        assert fake.bodies[f"/v1/miners/{job_id}/fail"]["error_code"] == "invalid_job"
    # ... and no request named any other job: only /v1/miners/<valid id>/... or the core
    assert all(valid_job_id(p.split("/")[3]) for p in fake.job_paths()), fake.paths
    assert not [p for p in fake.paths if not p.startswith("/v1/miners/")], fake.paths
    assert agent.log().count("poll answer skipped") == 7


def test_running_list_entries_without_a_usable_id_name_no_job(fake: FakeCoordinator) -> None:
    # Given a running list whose entries carry ids of every shape, or none
    body = (b'{"jobs": [{"job_id": "a-1"}, {"id": 7}, {}, {"job_id": null}, '
            b'{"job_id": true}, {"job_id": ["x"]}, 5, "b-2"]}')

    fake.answer_all_with(lambda _path: body)

    async def call() -> set[str]:
        async with _client(fake) as client:
            return await client.running_jobs()

    # When the agent reads it, Then only the string and integer ids name jobs (a start's
    # look would otherwise fail a job called "None")
    assert asyncio.run(call()) == {"a-1", "7"}


@pytest.mark.slow
def test_a_start_fails_at_most_what_it_asked_for_of_the_jobs_a_coordinator_claims(
        fake: FakeCoordinator, tmp_path: Path) -> None:
    from tests.agent.daemon.helpers import AgentProcess

    # Given a coordinator that claims 150 jobs run on this node (it was asked for 100),
    # none ever handed out, and ids that name no folder or path
    fake.claimed = {f"claim-{n:03d}" for n in range(150)} | {"../evil", "a/b", "x" * 200}
    # When a fresh agent starts there and runs until there is no work
    agent = AgentProcess(fake.base_url, tmp_path / "state", burst=True)
    try:
        code = agent.wait(120)
    finally:
        agent.stop()
    # Then it failed the first 100 it asked for as agent_restart, and no more
    assert code == 0, agent.log()[-4000:]
    failed = sorted(p.split("/")[3] for p in fake.job_paths() if p.endswith("/fail"))
    assert failed == [f"claim-{n:03d}" for n in range(100)]
    assert {fake.bodies[f"/v1/miners/{j}/fail"]["error_code"] for j in failed} == {
        "agent_restart"}
    # ... no request and no folder named a bad id, and it said why in its log
    assert all(valid_job_id(p.split("/")[3]) for p in fake.job_paths()), fake.paths
    assert sorted(p.name for p in (tmp_path / "state/jobs").iterdir()
                  if p.is_dir()) == [f"job_claim-{n:03d}" for n in range(100)]
    assert "no job can have" in agent.log() and "past the 100 asked for" in agent.log()
