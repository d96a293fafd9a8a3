"""CPU per coordinator call: the agent's transport against a plain httpx call, paired.

    python -m benchmarks.bench_transport [--quick] [--rounds N]

A reference coordinator runs in its own process on loopback (core protocol, no rate
limits). In this one process, two arms make the same calls, a heartbeat then an empty
poll, in blocks of 100 calls, alternating which arm goes first each round:

- agent: :class:`agent.coordinator.transport.Transport`, as the daemon uses it (answer
  limits, retry policy, call stats);
- httpx: a bare ``httpx.AsyncClient.post`` with the same headers and bodies, reading
  the answer and nothing more.

Figure: this process's CPU (``time.process_time``) per call, per block; the median of
each arm and of the per-round ratio agent/httpx, with the spread. Wall time is not the
figure: the coordinator's own work lands in its process, not in this one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from agent.coordinator.retry import CallStats, RetryPolicy
from agent.coordinator.transport import Transport
from benchmarks.loopback import KEYS, Coordinator

MINER_ID = "bench-transport"
HEARTBEAT = {"inflight": 0, "status": "ONLINE", "metadata": {}}
BLOCK = 50  # pairs of calls: 100 calls a block


async def _block(call: Callable[[str, dict[str, object]], Awaitable[object]]) -> float:
    """CPU seconds per call over one block."""
    started = time.process_time()
    for _ in range(BLOCK):
        await call("/v1/miners/heartbeat", HEARTBEAT)
        await call("/v1/miners/poll", {})
    return (time.process_time() - started) / (2 * BLOCK)


async def measure(url: str, rounds: int) -> dict[str, list[float]]:
    agent = Transport(url, KEYS["miner"], MINER_ID, connect_timeout_s=5, read_timeout_s=30,
                      policy=RetryPolicy(), stats=CallStats())
    bare = httpx.AsyncClient(base_url=url, timeout=30,
                             headers={"X-Api-Key": KEYS["miner"], "X-Miner-ID": MINER_ID})

    async def via_agent(path: str, body: dict[str, object]) -> object:
        return await agent.request(path.rsplit("/", 1)[1], "POST", path, json=body,
                                   deadline_s=10)

    async def via_httpx(path: str, body: dict[str, object]) -> object:
        resp = await bare.post(path, json=body)
        return resp.content

    arms = {"agent": via_agent, "httpx": via_httpx}
    try:
        await agent.request("register", "POST", "/v1/miners/register", deadline_s=10,
                            json={"capabilities": {"gpus": []}, "concurrency": 4,
                                  "region": None})
        for call in arms.values():  # warm-up: connections open, code paths warm
            await _block(call)
        figures: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(rounds):
            order = ("agent", "httpx") if r % 2 == 0 else ("httpx", "agent")
            for name in order:
                figures[name].append(await _block(arms[name]))
        return figures
    finally:
        await agent.aclose()
        await bare.aclose()


def _spread(values: list[float], scale: float, unit: str) -> str:
    return (f"median {statistics.median(values) * scale:.0f} {unit} "
            f"({min(values) * scale:.0f}-{max(values) * scale:.0f}, n={len(values)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 20")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (blocks per arm)")
    args = parser.parse_args(argv)
    rounds = max(1, args.rounds or (5 if args.quick else 20))
    print(f"== CPU per coordinator call: agent transport vs bare httpx ({rounds} rounds of "
          f"{2 * BLOCK} calls per arm, order alternating) ==")
    print("method: heartbeat + empty poll against the reference coordinator in its own "
          "process; this process's CPU per call; ratio agent/httpx per round")
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        coord = Coordinator(Path(tmp) / "coord", ())
        try:
            figures = asyncio.run(measure(coord.url, rounds))
        finally:
            coord.close()
    for name, values in figures.items():
        print(f"  {name:6}: {_spread(values, 1e6, 'us')} CPU per call")
    ratios = [a / b for a, b in zip(figures["agent"], figures["httpx"], strict=True)]
    print(f"  agent / httpx per round: median {statistics.median(ratios):.2f}x "
          f"({min(ratios):.2f}-{max(ratios):.2f}, n={len(ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
