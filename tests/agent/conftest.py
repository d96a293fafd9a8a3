"""Helpers for executor tests: run a job through the real executor and launcher."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.aio import new_event_loop
from agent.execution.executor import ExecutorConfig, JobReport, JobRun
from agent.execution.launcher import make_launcher
from agent.jobs import Job
from agent.layout import log_path
from tests.agent.daemon.helpers import AgentProcess, Client

PY = sys.executable
T = TypeVar("T")
# The daemon's event loops (agent.aio): the stdlib's, and uvloop where it is installed.
EVENT_LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"))]


def run_on_loop(kind: str, main: Coroutine[Any, Any, T]) -> T:
    """``main`` to its end on a fresh event loop of ``kind`` (as the daemon makes it)."""
    loop = new_event_loop(kind)
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


def make_job(payload: dict[str, Any], job_id: str = "t1", **constraints: Any) -> Job:
    return Job.from_dict({"job_id": job_id, "payload": payload, "constraints": constraints})


def run(job: Job, out: Path, launcher: str = "spawn", grace: float = 10.0,
        during: Callable[[JobRun], Any] | None = None,
        config: dict[str, Any] | None = None, **kwargs: Any) -> JobReport:
    """Run ``job``; ``during(run)`` is awaited alongside it (to cancel mid-run, say);
    ``config``: more ExecutorConfig fields."""

    async def main() -> JobReport:
        chosen = make_launcher(launcher)  # type: ignore[arg-type]
        cfg = ExecutorConfig(out, cancel_grace_s=grace, **(config or {}))
        job_run = JobRun(job, cfg, chosen, **kwargs)
        try:
            task = asyncio.create_task(job_run.run())
            if during is not None:
                await during(job_run)
            return await task
        finally:
            await chosen.close()

    return asyncio.run(main())


async def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def planted(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three job folders whose logs a job replaced: stdout.log by a link to a secret,
    the whole logs folder by a link to another job's, stderr.log by a FIFO."""
    secret = tmp_path / "api-key"
    secret.write_bytes(b"miner-key\n")
    other = tmp_path / "job_other"
    log_path(other, "stdout").parent.mkdir(parents=True)
    log_path(other, "stdout").write_bytes(b"another tenant's output\n")
    linked, moved = tmp_path / "job_linked", tmp_path / "job_moved"
    log_path(linked, "stdout").parent.mkdir(parents=True)
    log_path(linked, "stdout").symlink_to(secret)
    log_path(linked, "stderr").write_bytes(b"its own\n")
    moved.mkdir()
    (moved / "logs").symlink_to(other / "logs")
    fifo = tmp_path / "job_fifo"
    log_path(fifo, "stderr").parent.mkdir(parents=True)
    os.mkfifo(log_path(fifo, "stderr"))
    return linked, moved, fifo


def without_privileges(work: Callable[[], Any]) -> Any:
    """``work()`` as the agent's user runs it, modes holding: root reads and removes
    whatever a mode says, so as root it runs in a forked child that dropped every
    capability first (a job's folders are the agent's own either way); its JSON-able
    answer comes back, or its error fails the test."""
    if os.geteuid() != 0:
        return work()
    from runtimes import jail
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            jail.drop_privileges()
            answer = json.dumps({"ok": work()})
        except BaseException as exc:  # noqa: BLE001 - the parent says what failed
            answer = json.dumps({"error": repr(exc)})
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    answer = json.loads(data)
    assert "error" not in answer, answer["error"]
    return answer["ok"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Daemons a test starts; each is stopped (and clients closed) afterwards."""
    started: list[AgentProcess] = []
    yield started
    for a in started:
        a.stop()
    Client.close_all()
