"""What a job writing events flat out costs the agent, with the events pace and without.

    python -m benchmarks.bench_events [--seconds S] [--pairs N] [--size BYTES]

Any program a job runs may write to its events channel (fd 3), and the agent parses
each line on its event loop, the loop that also supervises every other job, sends
heartbeats and polls. This runs one ``command`` job through the real executor
(``JobRun``, the spawn launcher, packaging included) that writes progress events of
``--size`` bytes of message as fast as its pipe takes them for ``--seconds``, once
with the executor's pace (``EVENTS_PER_S`` a second, bursts of ``EVENTS_BURST``) and
once unpaced, the order alternating pair by pair. Alongside, a ticker on the same loop
sleeps 5 ms at a time and records how late each wake-up came: what every other job
and timer of the agent would feel. Figures per arm: the agent process's CPU over the
run (``getrusage``; the job is a child, not counted), the events the agent parsed,
and the ticker's median and longest lateness; medians with the spread, and the
per-pair ratio paced/unpaced of the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_core import alternate, cpu_s, spread

ARMS = ["paced", "unpaced"]
TICK_S = 0.005

FLOOD = r"""
import json, os, sys, time
fd = int(os.environ["MINER_EVENTS_FD"])
line = (json.dumps({"event": "progress", "fraction": 0.5,
                    "message": "x" * int(sys.argv[2])}) + "\n").encode()
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    os.write(fd, line * 16)
"""


async def _ticker(lateness: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        await asyncio.sleep(TICK_S)
        lateness.append(time.monotonic() - t0 - TICK_S)


async def run_once(root: Path, paced: bool, seconds: float, size: int) -> dict[str, float]:
    from agent.execution.executor import EVENTS_PER_S, ExecutorConfig, JobRun
    from agent.execution.launcher import make_launcher
    from agent.jobs import Job

    job = Job.from_dict({"job_id": f"flood{time.monotonic_ns()}", "payload": {
        "type": "command", "argv": [sys.executable, "-c", FLOOD, str(seconds), str(size)]}})
    cfg = ExecutorConfig(root, events_per_s=EVENTS_PER_S if paced else None)
    launcher = make_launcher("spawn")
    events: list[Any] = []
    lateness: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lateness, stop))
    try:
        before = cpu_s()
        report = await JobRun(job, cfg, launcher, on_event=events.append).run()
        used = cpu_s() - before
    finally:
        stop.set()
        await ticker
        await launcher.close()
    assert report.outcome.value == "completed", report.output
    return {"cpu_s": used, "events": len(events),
            "late_ms": statistics.median(lateness) * 1000, "worst_ms": max(lateness) * 1000}


def main(argv: list[str] | None = None) -> int:
    from agent.execution.executor import EVENTS_BURST, EVENTS_PER_S
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="how long the job writes events (default 3)")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of runs (default 3)")
    parser.add_argument("--size", type=int, default=10,
                        help="bytes of message in each event (default 10)")
    args = parser.parse_args(argv)
    print(__doc__.split("\n\n", 2)[2].strip(), end="\n\n")
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        for pair in range(args.pairs):
            for arm in alternate(pair, ARMS):
                results[arm].append(asyncio.run(run_once(Path(tmp), arm == "paced",
                                                         args.seconds, args.size)))
    print(f"a job writing events of {args.size} bytes of message for {args.seconds:g} s; "
          f"pace {EVENTS_PER_S:g}/s, bursts of {EVENTS_BURST:g}")
    for arm in ARMS:
        rows = results[arm]
        print(f"  {arm:8}: agent CPU {spread([r['cpu_s'] for r in rows], ' s')}; "
              f"events parsed {spread([r['events'] for r in rows], '', 0)}; "
              f"loop lateness, each run's median: {spread([r['late_ms'] for r in rows], ' ms')}"
              f", each run's longest: {spread([r['worst_ms'] for r in rows], ' ms', 1)}")
    ratios = [p["cpu_s"] / max(u["cpu_s"], 1e-9)
              for p, u in zip(results["paced"], results["unpaced"], strict=True)]
    print(f"  agent CPU, paced/unpaced per pair: {spread(ratios, 'x')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
