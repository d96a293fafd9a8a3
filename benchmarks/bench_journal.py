"""CPU per durable journal write: the journal's own flushing thread against an executor.

    python -m benchmarks.bench_journal [--quick] [--rounds N] [--dir DIR]

Every job waits twice for the journal (its record before its process starts, its
report before it is sent): one write, then one ``fdatasync`` in another thread, the
event loop waiting. In one process and one journal, two arms do exactly that, in
blocks of 200, alternating which arm goes first each round:

- journal: ``Journal.durable()`` as the daemon calls it (a queue to the journal's
  thread, the answer by ``call_soon_threadsafe``);
- executor: the same flush (``Journal._locked_flush``) through
  ``loop.run_in_executor`` on a one-thread pool behind a shared task, as the journal
  did before 2026-12-02.

Figures: this process's CPU (``resource.getrusage``: all its threads, kernel time
included) and the loop thread's own CPU (``time.thread_time``) per durable write, per
block; the median of each arm and of the per-round ratio journal/executor, with the
spread. Wall time is mostly the disk's and is printed apart. The file system under
``--dir`` decides what an ``fdatasync`` costs: a journaled ext4 is what nodes run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.daemon.journal import Journal, Phase
from benchmarks.bench_core import alternate, spread

BLOCK = 200  # durable writes a block


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, time.thread_time()


async def _block(journal: Journal, flush: Callable[[], Awaitable[None]]) -> tuple[float, ...]:
    """(process CPU, loop thread CPU, wall) seconds per durable write over one block."""
    (cpu0, thread0), wall0 = _cpu(), time.perf_counter()
    for _ in range(BLOCK):
        journal.set_phase("job-0", Phase.RUNNING, package_dir="/bench")
        await flush()
    (cpu1, thread1), wall1 = _cpu(), time.perf_counter()
    return (cpu1 - cpu0) / BLOCK, (thread1 - thread0) / BLOCK, (wall1 - wall0) / BLOCK


async def measure(journal: Journal, rounds: int) -> dict[str, list[tuple[float, ...]]]:
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-flush")
    shared: dict[str, asyncio.Task[None]] = {}

    async def executor_flush() -> None:  # the journal's flush as it was: a shared task
        async def run() -> None:
            try:
                await asyncio.get_running_loop().run_in_executor(pool, journal._locked_flush)
            finally:
                shared.pop("task", None)
        if "task" not in shared:
            shared["task"] = asyncio.create_task(run())
        await asyncio.shield(shared["task"])

    arms = {"journal": journal.durable, "executor": executor_flush}
    assert journal.accept("job-0", {"job_id": "job-0"}, None)
    try:
        for flush in arms.values():  # warm-up: threads started, code paths warm
            await _block(journal, flush)
        figures: dict[str, list[tuple[float, ...]]] = {name: [] for name in arms}
        for r in range(rounds):
            for name in alternate(r, list(arms)):
                figures[name].append(await _block(journal, arms[name]))
        return figures
    finally:
        pool.shutdown()


def _us(values: list[float]) -> str:
    return spread([v * 1e6 for v in values], " us", 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (blocks per arm)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the journal goes (default: the system's temporary "
                             "folder); pick a journaled file system like the nodes'")
    args = parser.parse_args(argv)
    rounds = max(1, args.rounds or (5 if args.quick else 15))
    print(f"== CPU per durable journal write: the journal's thread vs an executor "
          f"({rounds} rounds of {BLOCK} per arm, order alternating) ==")
    print("method: one set_phase then one awaited flush, the same journal for both arms; "
          "process CPU (all threads) and the loop thread's CPU per write; ratio per round")
    with tempfile.TemporaryDirectory(prefix="bench-journal-", dir=args.dir) as tmp:
        journal = Journal(Path(tmp) / "journal.db")
        try:
            figures = asyncio.run(measure(journal, rounds))
        finally:
            journal.close()
    for name, values in figures.items():
        process, thread, wall = (list(v) for v in zip(*values, strict=True))
        print(f"  {name:8}: process CPU {_us(process)}; loop thread {_us(thread)}; "
              f"wall {_us(wall)}")
    for i, label in ((0, "process CPU"), (1, "loop thread CPU")):
        ratios = [a[i] / b[i] for a, b in zip(figures["journal"], figures["executor"],
                                              strict=True)]
        print(f"  journal / executor, {label}, per round: {spread(ratios, 'x')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
