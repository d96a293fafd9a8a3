"""Binary log chunks (extension "logs-binary") against the reference coordinator: the
raw and gzip'd bodies, offsets, retries, gaps, zip bombs, and the JSON body beside them."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from agent.coordinator.client import LogOffsetConflict, LogOffsets
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.coordinator.conftest import (
    GPU_CAPS,
    MINER_KEY,
    client_http,
    miner,
    submit,
)

TEXT = b"".join(b"step %d loss %.4f\n" % (i, 1 / (i + 1)) for i in range(5000))


def stored(coord: ReferenceCoordinator, job_id: str, stream: str = "stdout") -> bytes:
    with client_http(coord) as http:
        return http.get(f"/v1/jobs/{job_id}/logs", params={"stream": stream}).content


def leased(coord: ReferenceCoordinator) -> str:
    """A job submitted and polled by miner-1 (registered with every extension)."""
    job_id = submit(coord)

    async def take() -> None:
        async with miner(coord) as client:
            answer = await client.register(GPU_CAPS, 1)
            assert answer.capabilities.logs_binary
            assert (await client.poll()) is not None

    asyncio.run(take())
    return job_id


def post(coord: ReferenceCoordinator, job_id: str, body: bytes, offset: Any,
         stream: str = "stdout", **headers: str) -> httpx.Response:
    """A raw binary chunk, as any miner's HTTP client would send it."""
    with httpx.Client(base_url=coord.base_url, timeout=5.0) as http:
        return http.post(f"/v1/miners/{job_id}/logs/{stream}", params={"offset": offset},
                         content=body, headers={"X-Api-Key": MINER_KEY,
                                                "X-Miner-ID": "miner-1",
                                                "Content-Type": "application/octet-stream",
                                                **headers})


def test_binary_chunks_round_trip_by_offset_and_a_retry_adds_nothing(
        coordinator: ReferenceCoordinator) -> None:
    job_id = leased(coordinator)
    gz = gzip.compress(TEXT[1000:60000], compresslevel=1)

    async def flow() -> None:
        async with miner(coordinator) as client:
            # A raw chunk, then a gzip'd one that continues it, then stderr
            ends = await client.ship_log_chunk(job_id, "stdout", 0, TEXT[:1000])
            assert ends == LogOffsets(1000, 0)
            ends = await client.ship_log_chunk(job_id, "stdout", 1000, gz, encoding="gzip")
            assert ends == LogOffsets(60000, 0)
            # The same gzip'd chunk again (a retry after a lost answer) and one that
            # overlaps the end add only the bytes past the end
            assert await client.ship_log_chunk(job_id, "stdout", 1000, gz,
                                               encoding="gzip") == LogOffsets(60000, 0)
            ends = await client.ship_log_chunk(job_id, "stdout", 50000, TEXT[50000:])
            assert ends == LogOffsets(len(TEXT), 0)
            await client.ship_log_chunk(job_id, "stderr", 0, zlib.compress(b"warn\n"),
                                        encoding="deflate")
            assert await client.log_offsets(job_id) == LogOffsets(len(TEXT), 5)

    asyncio.run(flow())
    assert stored(coordinator, job_id) == TEXT
    assert stored(coordinator, job_id, "stderr") == b"warn\n"


def test_a_chunk_past_the_end_is_refused_with_the_ends_to_resend_from(
        coordinator: ReferenceCoordinator) -> None:
    job_id = leased(coordinator)

    async def flow() -> None:
        async with miner(coordinator) as client:
            await client.ship_log_chunk(job_id, "stdout", 0, TEXT[:100])
            with pytest.raises(LogOffsetConflict) as err:
                await client.ship_log_chunk(job_id, "stdout", 200, TEXT[200:300])
            assert err.value.offsets == LogOffsets(100, 0)

    asyncio.run(flow())
    assert stored(coordinator, job_id) == TEXT[:100]


def test_the_json_body_still_works_and_shares_the_offsets(
        coordinator: ReferenceCoordinator) -> None:
    job_id = leased(coordinator)

    async def flow() -> None:
        async with miner(coordinator) as client:
            assert await client.ship_logs(job_id, "stdout", 0, TEXT[:500]) \
                == LogOffsets(500, 0)
            gz = gzip.compress(TEXT[300:2000])
            assert await client.ship_log_chunk(job_id, "stdout", 300, gz, encoding="gzip") \
                == LogOffsets(2000, 0)
            assert await client.ship_logs(job_id, "stdout", 2000, TEXT[2000:]) \
                == LogOffsets(len(TEXT), 0)

    asyncio.run(flow())
    assert stored(coordinator, job_id) == TEXT


def test_a_gzip_body_that_inflates_past_the_limit_is_refused_unstored(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    # Given a coordinator whose body limit is 64 KiB, and 1 KiB of gzip that inflates
    # to 16 MiB of zeros (a zip bomb)
    coord = make_coordinator(max_body_bytes=64 * 1024)
    job_id = leased(coord)
    bomb = gzip.compress(bytes(16 << 20), compresslevel=9)
    assert len(bomb) < 64 * 1024
    # Then it is refused 413 without being inflated whole or stored
    resp = post(coord, job_id, bomb, 0, **{"Content-Encoding": "gzip"})
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"] == "chunk_too_large"
    assert resp.json()["max_bytes"] == 64 * 1024
    # while one that inflates to exactly the limit is taken
    exact = gzip.compress(bytes(64 * 1024))
    resp = post(coord, job_id, exact, 0, **{"Content-Encoding": "gzip"})
    assert resp.status_code == 200 and resp.json()["stdout"] == 64 * 1024
    assert stored(coord, job_id) == bytes(64 * 1024)


@pytest.mark.parametrize(("offset", "headers", "status", "error"), [
    (-1, {}, 422, None),
    ("12abc", {}, 422, None),
    (2**53 + 1, {}, 422, None),
    ("", {}, 422, None),
    (0, {"Content-Encoding": "br"}, 415, "unsupported_encoding"),
    (0, {"Content-Encoding": "gzip"}, 422, "bad_encoding"),  # the body is not gzip
])
def test_bad_offsets_and_encodings_are_refused(
        coordinator: ReferenceCoordinator, offset: Any, headers: dict[str, str], status: int,
        error: str | None) -> None:
    job_id = leased(coordinator)
    resp = post(coordinator, job_id, b"not gzip at all\n", offset, **headers)
    assert resp.status_code == status, resp.text
    assert resp.json().get("error") == error
    assert post(coordinator, job_id, b"x\n", 0, stream="stdin").status_code == 422
    # A gzip stream cut short, or with bytes after its end, is not one whole chunk
    whole = gzip.compress(b"line\n" * 100)
    for body in (whole[:-6], whole + b"trailing"):
        resp = post(coordinator, job_id, body, 0, **{"Content-Encoding": "gzip"})
        assert resp.status_code == 422 and resp.json()["error"] == "bad_encoding"
    assert stored(coordinator, job_id) == b""


def test_a_coordinator_without_logs_binary_answers_404_and_the_agent_does_not_use_it(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    coord = make_coordinator(extensions=("lease", "logs"))
    job_id = submit(coord)

    async def flow() -> None:
        async with miner(coord) as client:
            answer = await client.register(GPU_CAPS, 1)
            assert answer.capabilities.logs and not answer.capabilities.logs_binary
            assert (await client.poll()) is not None

    asyncio.run(flow())
    assert post(coord, job_id, b"x\n", 0).status_code == 404
