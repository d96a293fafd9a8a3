"""What a job costs the agent: calls to the coordinator, journal flushes (issue 13).

Counts, never timings: how many heartbeats, running-list looks and disk flushes a run
of jobs takes, against a real coordinator on loopback and a real journal on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.coordinator.client import CoordinatorClient
from agent.daemon.cancel_check import RunningList
from agent.daemon.journal import Journal, Phase
from tests.agent.daemon.helpers import (
    MINER_KEY,
    AgentProcess,
    Client,
    start_coordinator,
    wait_until,
)

TINY = {"type": "sleep", "steps": 1, "step_s": 0}
HEARTBEAT = "/v1/miners/heartbeat"
RUNNING = "/v1/miners/miner-1/jobs"


def test_jobs_wake_no_heartbeat_but_a_fail_frees_the_slot_at_once(
        tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a core coordinator and a one-slot agent whose heartbeat timer is 60 s away
    coord = start_coordinator(tmp_path / "coord", extensions=())
    try:
        client = Client(coord)
        agent = AgentProcess(coord.base_url, tmp_path / "state", cpu_slots=1,
                             heartbeat_interval_s=60, cancel_check_interval_s=60,
                             poll_max_interval_s=0.3)
        agents.append(agent)
        agent.wait_log("registered as")
        wait_until(lambda: coord.faults.arrived(HEARTBEAT) >= 1, 30)
        beats = coord.faults.arrived(HEARTBEAT)
        looks = coord.faults.arrived(RUNNING)  # the start's (Recovery._fail_unrecorded)
        # When jobs run and are reported one after another
        ok = [client.submit(TINY) for _ in range(4)]
        for job_id in ok:
            client.wait_status(job_id, "completed", timeout=60)
        # Then no accept, conclusion or delivery woke a heartbeat (each /result freed the
        # slot on the coordinator), and each report was guarded by one running-list look
        assert coord.faults.arrived(HEARTBEAT) == beats
        assert coord.faults.arrived(RUNNING) - looks <= len(ok)
        assert all(len(client.receipts(j)) == 1 for j in ok)
        # When a job fails (a /fail leaves its slot counted on the coordinator)
        bad = client.submit({"type": "no-such-type"})
        client.wait_status(bad, "failed", timeout=60)
        after = client.submit(TINY)
        # Then a heartbeat tells the true count at once, and the next job runs long
        # before the 60 s timer would have
        client.wait_status(after, "completed", timeout=20)
        assert coord.faults.arrived(HEARTBEAT) == beats + 1
    finally:
        coord.stop()


def test_concurrent_looks_share_one_running_list_fetched_after_their_moment(
        tmp_path: Path) -> None:
    # Given a registered miner and the list its reports are checked against
    coord = start_coordinator(tmp_path / "coord", extensions=())

    async def scenario() -> None:
        async with CoordinatorClient(coord.base_url, MINER_KEY, "miner-1") as client:
            await client.register({}, 4, None)
            running = RunningList(client)
            # When four reports pending at one moment look at the same time
            moment = time.monotonic()
            looks = await asyncio.gather(*(running.since(moment) for _ in range(4)))
            # Then one call answers them all
            assert running.fetches == 1 and coord.faults.arrived(RUNNING) == 1
            assert all(look == looks[0] for look in looks)
            # And a look for a moment it already covers costs nothing more
            await running.since(moment)
            assert coord.faults.arrived(RUNNING) == 1
            # But a report that concluded after that fetch gets a fresh one
            await running.since(time.monotonic())
            assert coord.faults.arrived(RUNNING) == 2

    try:
        asyncio.run(scenario())
    finally:
        coord.stop()


def test_writes_waiting_together_are_flushed_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        flushes = journal.flushes

        async def scenario() -> None:
            # Given three jobs' records written while nobody waits
            for n in range(3):
                assert journal.accept(f"job-{n}", {"job_id": f"job-{n}"}, None)
                journal.set_phase(f"job-{n}", Phase.RUNNING, package_dir="/x")
            # When five callers need them on disk at once
            await asyncio.gather(*(journal.durable() for _ in range(5)))
            # Then one flush served them all, and nothing new costs no flush at all
            assert journal.flushes == flushes + 1
            await journal.durable()
            assert journal.flushes == flushes + 1

        asyncio.run(scenario())
    finally:
        journal.close()


def test_a_started_job_s_record_is_flushed_within_its_delay_or_with_an_earlier_flush(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")

    async def scenario() -> None:
        # Given a job's records written and asked to be on disk within 0.2 s
        flushes = journal.flushes
        assert journal.accept("job-0", {"job_id": "job-0"}, None)
        journal.set_phase("job-0", Phase.RUNNING, package_dir="/x")
        journal.durable_within(0.2)
        # Then nothing is flushed at once (the job's start waits for no disk)
        await asyncio.sleep(0.05)
        assert journal.flushes == flushes and journal._flushed < journal._written
        # And they are on disk once the delay is up, with one flush
        await wait_for_flush(journal, 5)
        assert journal.flushes == flushes + 1
        # When another job's records are asked for within 0.2 s and a report's flush,
        # awaited, comes first
        assert journal.accept("job-1", {"job_id": "job-1"}, None)
        journal.durable_within(0.2)
        journal.set_phase("job-0", Phase.FINISHED, outcome="completed",
                          report={"kind": "result", "body": {}})
        await journal.durable()
        # Then that one flush covered both, and the timer finds nothing left to do
        await asyncio.sleep(0.3)
        assert journal.flushes == flushes + 2 and journal._flushed >= journal._written

    try:
        asyncio.run(scenario())
    finally:
        journal.close()


async def wait_for_flush(journal: Journal, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while journal._flushed < journal._written:
        assert time.monotonic() < deadline, "the timed flush never came"
        await asyncio.sleep(0.01)


def test_a_canceled_waiter_leaves_the_flush_to_the_others(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")

    async def scenario() -> None:
        # Given a record and a flush held up in the flushing thread (its lock taken)
        assert journal.accept("job-0", {"job_id": "job-0"}, None)
        journal._flushing.acquire()
        try:
            first = asyncio.create_task(journal.durable())
            second = asyncio.create_task(journal.durable())
            await asyncio.sleep(0.05)
            # When one waiter is canceled while the flush is under way
            first.cancel()
            await asyncio.sleep(0.05)
            assert not second.done()
        finally:
            journal._flushing.release()
        # Then the other still gets the flush they shared, and the canceled one is canceled
        await asyncio.wait_for(second, 10)
        assert first.cancelled()
        assert journal.flushes >= 2  # the one at open, and this one

    try:
        asyncio.run(scenario())
    finally:
        journal.close()


def test_a_flush_left_behind_by_a_closed_loop_holds_up_no_later_caller(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        # Given a caller whose loop ends while its flush waits in the flushing thread
        journal._flushing.acquire()

        async def gives_up() -> None:
            assert journal.accept("job-0", {"job_id": "job-0"}, None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(journal.durable(), 0.05)

        asyncio.run(gives_up())

        async def later() -> None:
            # When another loop writes and waits while that old flush is still held up
            assert journal.accept("job-1", {"job_id": "job-1"}, None)
            asyncio.get_running_loop().call_later(0.05, journal._flushing.release)
            await asyncio.wait_for(journal.durable(), 10)

        # Then it gets its own flush once the thread is free (the old loop's answer is
        # dropped, not raised in the thread), and the records are on disk
        asyncio.run(later())
        assert journal._flushed >= journal._written
        assert journal._flusher is not None and journal._flusher.is_alive()
    finally:
        journal.close()


def test_a_flush_that_raises_fails_its_waiters_and_the_next_one_works(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    real = journal._locked_flush
    calls = []

    def broken_once() -> None:  # fault injection: _flush_log itself only logs errors
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("flush broke")
        real()

    journal._locked_flush = broken_once  # type: ignore[method-assign]

    async def scenario() -> None:
        # Given a flush that raises in the flushing thread
        assert journal.accept("job-0", {"job_id": "job-0"}, None)
        waiters = [asyncio.create_task(journal.durable()) for _ in range(2)]
        # Then each waiter sees the error (the record is not taken as durable)
        for waiter in waiters:
            try:
                await asyncio.wait_for(waiter, 10)
            except RuntimeError as exc:
                assert str(exc) == "flush broke"
            else:
                raise AssertionError("a failed flush was taken as done")
        assert journal._flushed < journal._written
        # And the next caller gets a working flush from the same thread
        await asyncio.wait_for(journal.durable(), 10)
        assert journal._flushed >= journal._written and len(calls) == 2

    try:
        asyncio.run(scenario())
    finally:
        journal.close()


def test_the_log_is_flushed_through_one_descriptor_and_checkpointed_past_its_bound(
        tmp_path: Path) -> None:
    # Given a journal whose log is copied into the database past 64 KiB
    journal = Journal(tmp_path / "journal.db", checkpoint_bytes=64 << 10)
    big = {"job_id": "x", "payload": {"blob": "y" * 4000}}

    async def scenario() -> None:
        # When hundreds of jobs' records are written, each awaited as durable
        for n in range(300):
            assert journal.accept(f"job-{n}", big, None)
            await journal.durable()
            if n == 0:
                fd = journal._wal_fd
        # Then every flush went through the one descriptor opened at the first
        assert fd is not None and journal._wal_fd == fd
        assert os.path.samestat(os.fstat(fd), os.stat(journal.wal_path))

    try:
        asyncio.run(scenario())
        # And the log was checkpointed and started over rather than growing to ~1.2 MB
        # of records (a look at its size every SIZE_EVERY flushes)
        assert journal.wal_path.stat().st_size < 400 << 10
    finally:
        journal.close()
    # And what was written is all there after a reopen
    reopened = Journal(tmp_path / "journal.db")
    try:
        assert reopened.get("job-299") is not None and reopened.get("job-0") is not None
    finally:
        reopened.close()


def test_a_flush_asked_after_close_returns_and_the_record_is_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        # Given a record written while the flush thread has already run once
        journal = Journal(tmp_path / "journal.db")
        assert journal.accept("job-0", {"job_id": "job-0"}, None)
        await journal.durable()
        assert journal.accept("job-1", {"job_id": "job-1"}, None)
        # When the journal closes (shutdown) before a late caller asks for its flush
        journal.close()
        # Then that caller returns (close flushed everything), and the record is there
        await journal.durable()
        reopened = Journal(tmp_path / "journal.db")
        try:
            assert reopened.get("job-1") is not None
        finally:
            reopened.close()

    asyncio.run(scenario())


def _write_then_die(path: str, ready: Any) -> None:
    journal = Journal(Path(path))
    journal.accept("job-1", {"job_id": "job-1"}, "lease-1")
    journal.set_phase("job-1", Phase.FINISHED, outcome="completed",
                      report={"kind": "result", "body": {"result": {}}})
    asyncio.run(journal.durable())
    ready.set()
    signal.pause()  # killed here, the journal never closed


def test_a_record_awaited_as_durable_survives_a_sigkill(tmp_path: Path) -> None:
    # Given a process that journals a finished job, awaits its flush, and is SIGKILLed
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_write_then_die, args=(str(tmp_path / "journal.db"), ready))
    proc.start()
    try:
        assert ready.wait(30), "the writer never got its flush"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    # When the journal is opened again
    journal = Journal(tmp_path / "journal.db")
    try:
        # Then the record and its report are there, as written
        record = journal.get("job-1")
        assert record is not None and record.phase is Phase.FINISHED
        assert record.report == {"kind": "result", "body": {"result": {}}}
        assert record.lease_id == "lease-1"
    finally:
        journal.close()


def test_a_flush_still_queued_at_close_opens_nothing_after_it(tmp_path: Path) -> None:
    # Given a journal whose flushing thread has run, and a reader (such as `miner-agent
    # status`) that keeps the log file there past the journal's close
    journal = Journal(tmp_path / "journal.db")
    reader = sqlite3.connect(tmp_path / "journal.db")
    try:
        reader.execute("SELECT count(*) FROM jobs").fetchall()
        assert journal.accept("job-0", {"job_id": "job-0"}, None)
        asyncio.run(journal.durable())
        # When the journal closes, and a flush asked for before then runs after it
        journal.close()
        assert journal.wal_path.exists()
        journal._locked_flush()  # what the thread does with a request still queued
        # Then it opens nothing (close flushed everything), and the record is there
        assert journal._wal_fd is None
    finally:
        reader.close()
    reopened = Journal(tmp_path / "journal.db")
    try:
        assert reopened.get("job-0") is not None
    finally:
        reopened.close()
