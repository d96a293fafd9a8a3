"""The log shipper against a real reference coordinator: concurrent ships and forget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from agent.coordinator.client import CoordinatorClient
from agent.coordinator.retry import RetryPolicy
from agent.daemon.journal import Journal
from agent.daemon.shippers import LogShipper
from agent.layout import log_path
from tests.agent.daemon.helpers import CLIENT_KEY, MINER_KEY, Client, start_coordinator


def test_two_ships_of_one_job_and_a_forget_between_them_lose_and_repeat_nothing(
        tmp_path: Path) -> None:
    # The ship loop's tick and the flow's final ship run at once, and the flow forgets
    # the job while the tick is mid-chunk (CI: KeyError in ShipLoop.run).
    coordinator = start_coordinator(tmp_path / "coord")
    job_id = Client(coordinator).submit({"type": "sleep"})
    folder = tmp_path / "job"
    for stream, text in (("stdout", b"out %d\n"), ("stderr", b"err %d\n")):
        path = log_path(folder, stream)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(text % i for i in range(3000)))
    journal = Journal(tmp_path / "journal.db")

    async def flow() -> list[bool]:
        async with CoordinatorClient(coordinator.base_url, MINER_KEY, "miner-1",
                                     retry=RetryPolicy(0.01, 0.05)) as client:
            await client.register({}, 1)
            assert await client.poll() is not None
            shipper = LogShipper(client, journal, max_chunk_bytes=1024)
            ships = [asyncio.create_task(shipper.ship(job_id, folder)) for _ in range(2)]
            while not all(t.done() for t in ships):  # the job leaves the node at every
                shipper.forget(job_id)                # step of the ships' awaits
                await asyncio.sleep(0)
            return list(await asyncio.gather(*ships))

    try:
        results = asyncio.run(flow())
        journal.close()
        assert all(isinstance(r, bool) for r in results)
        # Whatever reached the coordinator is a prefix of the file, never a repeat
        for stream in ("stdout", "stderr"):
            got = httpx.get(f"{coordinator.base_url}/v1/jobs/{job_id}/logs",
                            params={"stream": stream}, headers={"X-Api-Key": CLIENT_KEY}).content
            assert log_path(folder, stream).read_bytes().startswith(got)
    finally:
        coordinator.stop()
