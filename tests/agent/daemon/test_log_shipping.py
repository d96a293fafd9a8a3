"""Log shipping: chunks as they go on the wire, a tick's time budget, and the real
daemon shipping through either body the coordinator speaks."""

from __future__ import annotations

import asyncio
import gzip
import os
from pathlib import Path

import pytest

from agent.clock import within
from agent.coordinator.client import CoordinatorClient
from agent.coordinator.retry import RetryPolicy
from agent.daemon.journal import Journal
from agent.daemon.shippers import ChunkReader, LogShipper, Shipped
from agent.layout import log_path
from tests.agent.conftest import planted
from tests.agent.daemon.helpers import (
    MINER_KEY,
    AgentProcess,
    Client,
    start_coordinator,
    wait_until,
)

TEXT = b"".join(b"step %6d | loss %.6f | lr 3e-4\n" % (i, 1 / (i + 1)) for i in range(40000))


def test_chunks_are_gzipped_where_that_shrinks_them_and_sent_raw_where_not(
        tmp_path: Path) -> None:
    text, noise = tmp_path / "text.log", tmp_path / "noise.log"
    text.write_bytes(TEXT)
    noise.write_bytes(os.urandom(200_000))
    reader = ChunkReader(64 * 1024, compress=True)

    async def read() -> None:
        # Text shrinks: gzip'd, and inflates back to the exact bytes from the offset
        chunk = await reader.read(("j", "stdout"), text, 1000)
        assert chunk is not None and chunk.encoding == "gzip" and chunk.length == 64 * 1024
        assert len(chunk.body) < chunk.length // 3
        assert gzip.decompress(chunk.body) == TEXT[1000:1000 + 64 * 1024]
        # Random bytes do not: sent as they are, and the stream stops trying for a while
        for offset in (0, 64 * 1024):
            chunk = await reader.read(("j", "stderr"), noise, offset)
            assert chunk is not None and chunk.encoding is None
            assert chunk.body == noise.read_bytes()[offset:offset + 64 * 1024]
        # The last, short chunk; then nothing new; then no file at all
        chunk = await reader.read(("j", "stdout"), text, len(TEXT) - 10)
        assert chunk is not None and chunk.length == 10
        assert await reader.read(("j", "stdout"), text, len(TEXT)) is None
        assert await reader.read(("j", "stdout"), tmp_path / "missing.log", 0) is None
        # Without the binary extension nothing is compressed
        plain = await ChunkReader(4096, compress=False).read(("j", "stdout"), text, 0)
        assert plain is not None and plain.encoding is None and plain.body == TEXT[:4096]

    asyncio.run(read())


def test_a_log_swapped_for_a_link_or_a_fifo_is_not_shipped(tmp_path: Path) -> None:
    # Given logs a job swapped for a link to a secret, a link to another job's logs
    # folder, and a FIFO (the jail makes logs read-only; this holds without it too)
    linked, moved, fifo = planted(tmp_path)
    reader = ChunkReader(64 * 1024, compress=False)

    async def read(folder: Path, stream: str) -> bytes | None:
        chunk = await reader.read((folder.name, stream), log_path(folder, stream), 0)
        return None if chunk is None else chunk.body

    async def reads() -> None:
        # Then none is read, the FIFO without blocking, and the other stream still is
        assert await read(linked, "stdout") is None
        assert await read(moved, "stdout") is None
        assert await within(read(fifo, "stderr"), 5) is None
        assert await read(linked, "stderr") == b"its own\n"

    asyncio.run(reads())


def test_a_tick_stops_at_its_budget_and_a_later_ship_catches_up_without_repeats(
        tmp_path: Path) -> None:
    coordinator = start_coordinator(tmp_path / "coord")
    client_view = Client(coordinator)
    job_id = client_view.submit({"type": "sleep"})
    folder = tmp_path / "job"
    log_path(folder, "stdout").parent.mkdir(parents=True)
    log_path(folder, "stdout").write_bytes(TEXT)
    log_path(folder, "stderr").write_bytes(os.urandom(100_000))
    journal = Journal(tmp_path / "journal.db")

    async def flow() -> list[Shipped]:
        async with CoordinatorClient(coordinator.base_url, MINER_KEY, "miner-1",
                                     retry=RetryPolicy(0.01, 0.05)) as client:
            answer = await client.register({}, 1)
            assert await client.poll() is not None
            shipper = LogShipper(client, journal, 64 * 1024,
                                 binary=answer.capabilities.logs_binary)
            # A tick with no time left sends one chunk per stream and says it is behind
            first = await shipper.ship_for(job_id, folder, budget_s=0.0)
            assert journal.shipped(job_id, "stdout") == 64 * 1024
            rest = await shipper.ship_for(job_id, folder)
            # The job logs more: caught up again, busy (a chunk or more was new)
            with open(log_path(folder, "stdout"), "ab") as fh:
                fh.write(TEXT[:100_000])
            more = await shipper.ship_for(job_id, folder, budget_s=5.0)
            again = await shipper.ship_for(job_id, folder, budget_s=5.0)
            return [first, rest, more, again]

    try:
        states = asyncio.run(flow())
        assert states == [Shipped.BEHIND, Shipped.BUSY, Shipped.BUSY, Shipped.CAUGHT_UP]
        for stream in ("stdout", "stderr"):
            on_disk = log_path(folder, stream).read_bytes()
            assert coordinator.store.read_log(job_id, stream) == on_disk
            assert journal.shipped(job_id, stream) == len(on_disk)
        # Every chunk went as a binary body: the JSON route was never called
        prefix = f"/v1/miners/{job_id}/logs"
        assert coordinator.faults.arrived(prefix + "/stdout") > 0
        assert coordinator.faults.arrived(prefix) == coordinator.faults.arrived(prefix + "/")
    finally:
        journal.close()
        coordinator.stop()


@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False], ids=["logs-binary", "json"])
def test_the_daemon_ships_a_chatty_job_through_the_body_the_coordinator_speaks(
        tmp_path: Path, agents: list[AgentProcess], binary: bool) -> None:
    # Given a coordinator with or without "logs-binary", and a job that prints 3 MiB of
    # text on stdout and 1 MiB of random bytes on stderr as fast as it can
    extensions = ("lease", "progress", "logs", "package", "cancel")
    coord = start_coordinator(tmp_path, extensions + (("logs-binary",) if binary else ()))
    try:
        client = Client(coord)
        script = ("import os, sys\n"
                  "for i in range(100000): print(f'step {i} loss {1 / (i + 1):.6f}')\n"
                  "sys.stdout.flush(); os.write(2, os.urandom(1 << 20))\n")
        job_id = client.submit({"type": "command", "argv": ["python3", "-c", script]})
        agent = AgentProcess(coord.base_url, tmp_path / "state", burst=True,
                             allowed_job_types="command", max_log_chunk_bytes=256 * 1024)
        agents.append(agent)
        # Then the coordinator's copy of both streams is the bytes on disk
        assert agent.wait(60) == 0, agent.log()
        assert client.job(job_id)["status"] == "completed"
        logs = tmp_path / "state/jobs" / f"job_{job_id}/logs"
        for stream in ("stdout", "stderr"):
            on_disk = (logs / f"{stream}.log").read_bytes()
            assert len(on_disk) >= 1 << 20
            wait_until(lambda s=stream, d=on_disk: coord.store.read_log(job_id, s) == d, 10)
        # through the binary route where the coordinator offers it, JSON where not
        prefix = f"/v1/miners/{job_id}/logs"
        binary_calls = coord.faults.arrived(prefix + "/stdout") + \
            coord.faults.arrived(prefix + "/stderr")
        json_calls = coord.faults.arrived(prefix) - coord.faults.arrived(prefix + "/")
        assert (binary_calls > 0, json_calls > 0) == (binary, not binary)
    finally:
        coord.stop()
