"""What a fork of the torch-preloaded server costs: huge pages, and frozen objects.

    python -m benchmarks.bench_fork [--quick] [--pairs N]

(1) The fork itself. Two servers (``--server huge`` and ``--server small``, started by
this process) each import what the fork server preloads and freeze it; ``huge`` then
backs its anonymous memory with 2 MiB pages (``collapse_to_huge_pages``, what the
fork server does since 2026-12-02), ``small`` keeps 4 KiB pages. Asked in turn, the
order alternating pair by pair, each forks a tiny job (a few thousand small objects,
some JSON, a torch tensor: the writes a tiny job makes to memory it shares with the
server) and waits for it. Figures: the server's CPU for the fork (``process_time``
around ``fork()``), the job's whole CPU (``wait4``: its writes' copies and its exit),
medians with the spread, and the per-pair ratio huge/small of both added up.

(2) A job's first full collection. This process imports what the fork server
preloads (``runtimes.forkserver.preload``: torch and the runtimes), collects once,
then forks jobs in pairs, one per arm, the arms' order alternating pair by pair:

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
import subprocess
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


def private_dirty_kb() -> int:
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
            before = private_dirty_kb()
            started = time.process_time()
            gc.collect()
            spent = time.process_time() - started
            os.write(write_end, json.dumps([spent, private_dirty_kb() - before]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        spent, copied_kb = json.loads(fh.read())
    _, _, usage = os.wait4(pid, 0)
    return Sample(spent * 1000, copied_kb / 1024, (usage.ru_utime + usage.ru_stime) * 1000)


def tiny_job() -> None:
    """What a tiny job writes to memory it shares with the server, then its exit."""
    import torch

    rows = [{"step": i, "name": str(i) * 3} for i in range(3000)]
    json.dumps(rows[:100])
    torch.zeros(10).add_(1)
    os._exit(0)


def serve(kind: str) -> None:
    """``--server``: preload, freeze, maybe collapse; fork a tiny job per line asked."""
    from runtimes.forkserver import collapse_to_huge_pages, freeze_preloaded, preload

    preload()
    freeze_preloaded()
    info = collapse_to_huge_pages() if kind == "huge" else {"huge_pages_mb": 0}
    print(json.dumps(info), flush=True)
    for _ in sys.stdin:
        started = time.process_time()
        pid = os.fork()
        if pid == 0:
            tiny_job()
        forked = time.process_time() - started
        _, _, usage = os.wait4(pid, 0)
        print(json.dumps([forked * 1000, (usage.ru_utime + usage.ru_stime) * 1000]),
              flush=True)


def fork_costs(pairs: int) -> None:
    servers = {kind: subprocess.Popen([sys.executable, "-m", "benchmarks.bench_fork",
                                       "--server", kind], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
               for kind in ("huge", "small")}
    try:
        for kind, proc in servers.items():
            assert proc.stdout is not None
            print(f"server {kind}: {proc.stdout.readline().strip()}")
        got: dict[str, list[tuple[float, float]]] = {kind: [] for kind in servers}
        ratios = []
        for pair in range(pairs + 1):  # the first pair warms up and is not counted
            for kind in alternate(pair, list(servers)):
                proc = servers[kind]
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("fork\n")
                proc.stdin.flush()
                forked, job = json.loads(proc.stdout.readline())
                if pair:
                    got[kind].append((forked, job))
            if pair:
                ratios.append(sum(got["huge"][-1]) / max(sum(got["small"][-1]), 1e-6))
        for kind, runs in got.items():
            print(f"{kind:5s}: the server's fork {spread([r[0] for r in runs], ' ms')}; "
                  f"the job's whole CPU {spread([r[1] for r in runs], ' ms')}")
        print(f"fork + job CPU huge/small per pair: {spread(ratios, 'x', 3)}")
    finally:
        for proc in servers.values():
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs (says so)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs of jobs (20; --quick: 6)")
    parser.add_argument("--server", choices=["huge", "small"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.server:
        serve(args.server)
        return 0
    pairs = args.pairs or (6 if args.quick else 20)

    from runtimes.forkserver import preload

    print("== what a fork of the torch-preloaded server costs ==")
    print((__doc__ or "").split("\n\n", 2)[2].strip())
    print(f"\n-- (1) the fork: 2 MiB pages vs 4 KiB pages, {pairs} pairs"
          f"{' (--quick)' if args.quick else ''} --", flush=True)
    fork_costs(pairs)
    print("\n-- (2) a job's first full collection: the server's objects frozen vs not --")
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
