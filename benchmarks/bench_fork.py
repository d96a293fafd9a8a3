"""A forked job's first full collection: the fork server's objects frozen or not.

    python -m benchmarks.bench_fork [--quick] [--pairs N]

This process imports what the fork server preloads (``runtimes.forkserver.preload``:
torch and the runtimes), collects once, then forks jobs in pairs, one per arm, the
arms' order alternating pair by pair:

- frozen: the preloaded objects moved to the collector's permanent generation
  (``gc.freeze()``, what the fork server does since 2026-12-02);
- unfrozen: the same objects left in the collector's generations (``gc.unfreeze()``).

Each forked job runs one ``gc.collect()``, as any job that allocates enough soon does
on its own, and reports the CPU of that collection (``time.process_time``) and how
much of the server's memory it copied to do it (``Private_Dirty`` of
``/proc/self/smaps_rollup``, after minus before); this process reads the job's whole
CPU from ``wait4``. Figures: the median of each arm with the spread (lowest-highest),
and the per-pair ratio frozen/unfrozen of the collection's CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass

from benchmarks.bench_core import alternate, spread

ARMS = ["frozen", "unfrozen"]


@dataclass
class Sample:
    collect_ms: float
    copied_mb: float
    job_cpu_ms: float


def _private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    return 0


def fork_one() -> Sample:
    """Fork a job that runs one full collection; what it cost the job."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the job
        try:
            os.close(read_end)
            before = _private_dirty_kb()
            started = time.process_time()
            gc.collect()
            spent = time.process_time() - started
            os.write(write_end, json.dumps([spent, _private_dirty_kb() - before]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        spent, copied_kb = json.loads(fh.read())
    _, _, usage = os.wait4(pid, 0)
    return Sample(spent * 1000, copied_kb / 1024, (usage.ru_utime + usage.ru_stime) * 1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs (says so)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs of jobs (20; --quick: 6)")
    args = parser.parse_args(argv)
    pairs = args.pairs or (6 if args.quick else 20)

    from runtimes.forkserver import preload

    print("== a forked job's first full collection: the server's objects frozen vs not ==")
    print((__doc__ or "").split("\n\n", 2)[2].strip())
    info = preload()
    gc.collect()
    gc.freeze()
    print(f"\npreloaded in {info['preload_s']} s: {gc.get_freeze_count():,} objects left "
          f"alive; {pairs} pairs{' (--quick)' if args.quick else ''}", flush=True)
    samples: dict[str, list[Sample]] = {arm: [] for arm in ARMS}
    ratios = []
    for pair in range(pairs):
        for arm in alternate(pair, ARMS):
            if arm == "frozen":
                gc.freeze()
            else:
                gc.unfreeze()
            samples[arm].append(fork_one())
        ratios.append(samples["frozen"][-1].collect_ms
                      / max(samples["unfrozen"][-1].collect_ms, 1e-6))
    gc.freeze()
    for arm in ARMS:
        got = samples[arm]
        print(f"{arm:9s}: the collection {spread([s.collect_ms for s in got], ' ms')}; "
              f"copied {spread([s.copied_mb for s in got], ' MB', 1)}; the job's whole CPU "
              f"{spread([s.job_cpu_ms for s in got], ' ms', 1)}")
    print(f"collection CPU frozen/unfrozen per pair: {spread(ratios, 'x', 4)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
