"""Execution-core figures, measured side by side in one run.

    python -m benchmarks.bench_core [--quick]

Prints:
- job start latency ("start this job" to the job's code running) through the
  torch-preloaded fork server and through a plain spawn, for a runtime that
  imports torch as every real workload does;
- cancel latency (cancel request to the job's exit) over repeated runs of a step
  loop, median and p95, against the target of one step plus 50 ms;
- log capture: a child printing 1,000,000 short lines through the capture path
  versus the same child writing straight to a file (target >= 0.9x, every byte kept);
- package hashing throughput versus `sha256sum` on the same 1 GiB of files
  (target >= 0.9x).
Benchmarks never fail a build: they print figures and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.errors import CancelReason
from agent.execution.executor import ExecutorConfig, JobRun
from agent.execution.launcher import ForkServerLauncher, Launcher, SpawnLauncher
from agent.execution.package import sha256_many
from agent.jobs import Job

# The child times its own printing loop, so interpreter start-up is not in the ratio.
CHATTY = """import sys, time
t0 = time.perf_counter()
w = sys.stdout.write
for i in range({n}):
    w(f"line {{i}} of output\\n")
sys.stdout.flush()
print(f"loop_s={{time.perf_counter() - t0:.6f}}", file=sys.stderr)
"""


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


async def _run_jobs(launcher: Launcher, root: Path, jobs: list[Job],
                    cancel_after_s: float | None = None, on_line: bool = False) -> list[JobRun]:
    runs = []
    for job in jobs:
        sink: list[int] = []

        def count(_stream: str, line: bytes, sink: list[int] = sink) -> None:
            sink.append(len(line))

        run = JobRun(job, ExecutorConfig(root, cancel_grace_s=5), launcher,
                     on_line=count if on_line else None)
        task = asyncio.create_task(run.run())
        if cancel_after_s is not None:
            while not run.progress:
                await asyncio.sleep(0.005)
            await asyncio.sleep(cancel_after_s)
            run.cancel(CancelReason.REQUESTED)
        await task
        runs.append(run)
    return runs


def start_latency(root: Path, n: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}
    for name, launcher in (("forkserver", ForkServerLauncher()), ("spawn", SpawnLauncher())):
        async def main(launcher: Launcher = launcher, name: str = name) -> list[float]:
            if isinstance(launcher, ForkServerLauncher):
                await launcher.start()  # a daemon keeps it warm; its start is not per job
            jobs = [Job.from_dict({"job_id": f"start-{name}-{i}", "payload": {
                "type": "sleep", "steps": 1, "step_s": 0, "torch": True}})
                for i in range(n + 1)]  # the first one warms the caches and is not counted
            try:
                runs = await _run_jobs(launcher, root, jobs)
            finally:
                await launcher.close()
            # Time to the job's first progress report: its imports (torch) are done.
            return [((r.times["first_progress"] or 0) - (r.times["requested"] or 0)) * 1000
                    for r in runs[1:]]
        figures[name] = asyncio.run(main())
    return figures


def cancel_latency(root: Path, n: int, step_s: float) -> list[float]:
    async def main() -> list[float]:
        launcher = ForkServerLauncher()
        jobs = [Job.from_dict({"job_id": f"cancel-{i}", "payload": {
            "type": "sleep", "steps": 10**7, "step_s": step_s, "torch": True}})
            for i in range(n)]
        try:
            runs = await _run_jobs(launcher, root, jobs, cancel_after_s=0.2)
        finally:
            await launcher.close()
        return [((r.cancel_times["exited"] or 0) - (r.cancel_times["requested"] or 0)) * 1000
                for r in runs]
    return asyncio.run(main())


def log_throughput(root: Path, lines: int) -> dict[str, float]:
    script = CHATTY.format(n=lines)
    root.mkdir(parents=True, exist_ok=True)
    direct_file = root / "direct.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open(direct_file, "wb") as fh:
        proc = subprocess.run([sys.executable, "-c", script], stdout=fh, stderr=subprocess.PIPE,
                              check=True, env=env, text=True)
    direct = _loop_s(proc.stderr)
    expected = direct_file.read_bytes()
    out: dict[str, float] = {"direct_s": direct, "bytes": float(len(expected))}
    for label, subscribe in (("captured", False), ("captured_lines", True)):
        job = Job.from_dict({"job_id": f"chatty-{label}", "payload": {
            "type": "command", "argv": [sys.executable, "-c", script]}})
        runs = asyncio.run(_run_jobs(SpawnLauncher(), root, [job], on_line=subscribe))
        run = runs[0]
        out[f"{label}_s"] = _loop_s(run.folder.joinpath("logs/stderr.log").read_text())
        kept = (root / f"job_chatty-{label}/logs/stdout.log").read_bytes()
        out[f"{label}_exact"] = float(kept == expected)
    return out


def _loop_s(stderr: str) -> float:
    return float(stderr.rsplit("loop_s=", 1)[1].split()[0])


def hash_throughput(root: Path, total_mib: int, files: int) -> dict[str, float]:
    root.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(1 << 20)
    paths = []
    for i in range(files):
        path = root / f"blob{i}.bin"
        with open(path, "wb") as fh:
            for _ in range(total_mib // files):
                fh.write(chunk)
        paths.append(path)
    subprocess.run(["sha256sum", *map(str, paths)], capture_output=True, check=True)  # warm
    timings: dict[str, list[float]] = {"sha256sum": [], "agent": []}
    for _ in range(2):
        t0 = time.perf_counter()
        proc = subprocess.run(["sha256sum", *map(str, paths)], capture_output=True, text=True,
                              check=True)
        timings["sha256sum"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = sha256_many(paths)
        timings["agent"].append(time.perf_counter() - t0)
    theirs = [line.split()[0] for line in proc.stdout.splitlines()]
    assert ours == theirs, "hashes disagree"
    mib = total_mib
    return {"sha256sum_mib_s": mib / min(timings["sha256sum"]),
            "agent_mib_s": mib / min(timings["agent"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs, smaller data")
    args = parser.parse_args()
    runs = 5 if args.quick else 20
    lines = 200_000 if args.quick else 1_000_000
    mib = 256 if args.quick else 1024
    step_s = 0.05
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        root = Path(tmp)
        start = start_latency(root / "start", max(3, runs // 4))
        cancel = cancel_latency(root / "cancel", runs, step_s)
        logs = log_throughput(root / "logs", lines)
        hashing = hash_throughput(root / "hash", mib, 8)
    print("== execution core ==")
    for name, values in start.items():
        print(f"start latency via {name:10s}: median {statistics.median(values):8.1f} ms  "
              f"p95 {p95(values):8.1f} ms  (target <= 50 ms via fork server)")
    print(f"cancel latency (step {step_s * 1000:.0f} ms): median "
          f"{statistics.median(cancel):.1f} ms  p95 {p95(cancel):.1f} ms  "
          f"target <= {step_s * 1000 + 50:.0f} ms  over {len(cancel)} runs")
    ratio = logs["direct_s"] / logs["captured_s"]
    ratio_lines = logs["direct_s"] / logs["captured_lines_s"]
    print(f"log capture, {lines:,} lines ({logs['bytes'] / 1e6:.1f} MB): direct to file "
          f"{logs['direct_s']:.2f} s, captured {logs['captured_s']:.2f} s -> {ratio:.2f}x "
          f"(target >= 0.9x), every byte kept: {bool(logs['captured_exact'])}")
    print(f"log capture with a line subscriber: {logs['captured_lines_s']:.2f} s -> "
          f"{ratio_lines:.2f}x, every byte kept: {bool(logs['captured_lines_exact'])}")
    print(f"package hashing, {mib} MiB in 8 files: sha256sum {hashing['sha256sum_mib_s']:.0f} "
          f"MiB/s, agent {hashing['agent_mib_s']:.0f} MiB/s -> "
          f"{hashing['agent_mib_s'] / hashing['sha256sum_mib_s']:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
