"""The agent's end of the warm worker's wire against frames a broken or hostile worker
sends: its jobs end as worker_died, never hang (a real socket pair, a real reader thread)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from agent.execution.warmworker import HEADER, WarmJob, WarmSettings, Worker


def nested(depth: int) -> bytes:
    return b'{"op":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("body", [nested(200_000), b"\xff\xfe not json", b"[1, 2]"],
                         ids=["nested past the parser's depth", "not json", "not an object"])
def test_an_unusable_frame_fails_the_workers_jobs_instead_of_hanging_them(
        tmp_path: Path, body: bytes) -> None:
    async def scenario() -> tuple[int, str]:
        # Given a worker's wire with one job in it, its events pipe read by us
        worker = Worker("cpu", WarmSettings(tmp_path), {}, None, None)
        ours, theirs = socket.socketpair()
        events_r, events_w = os.pipe()
        job = WarmJob(worker, "j1", {"events": events_w}, tmp_path, asyncio.get_running_loop())
        worker.jobs["j1"] = job
        reader = threading.Thread(target=worker._read, args=(ours, worker._outbox, 0),
                                  daemon=True)
        reader.start()
        # When the worker sends a frame that cannot be used
        theirs.sendall(HEADER.pack(len(body)) + body)
        # Then the job ends at once, failed as worker_died with the reason
        status = await asyncio.wait_for(job.wait(), 10)
        reader.join(10)
        theirs.close()
        ours.close()  # the writer thread closes it in the agent; none runs here
        with os.fdopen(events_r, "rb") as events:
            return status, events.read().decode()

    status, events = asyncio.run(scenario())
    finished = json.loads(events.splitlines()[-1])
    assert status == 1 and finished["error_code"] == "worker_died"
    assert "warm model worker" in finished["error_message"]
