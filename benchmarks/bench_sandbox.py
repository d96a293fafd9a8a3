"""What the job sandbox costs: sandbox on versus off, side by side in one run.

    .venv/bin/python -m benchmarks.bench_sandbox [--quick | --tiny]

Two warm fork servers, one inside bubblewrap (each job forked into its own jail:
mount and PID namespaces, a cgroup) and one unconfined, both fed through the real
executor (`JobRun`) with the same cgroup tree, out roots and packaging (zip
included, as the daemon writes them), so the sandbox is the only difference. The
first job of each fork server is a warm-up and is not counted; the modes take turns
(on/off, then off/on, ...) so machine noise hits both alike. Prints:

- start latency, the request to the job's code (`start_latency_ms`: request to
  the job's `started` event), median and p95 over 30 jobs each (quick 10);
  target: at most 50 ms with the sandbox ready;
- tiny-job throughput, 4 jobs at a time (sleep, steps=1, step_s=0), 200 jobs
  each (quick 40) in interleaved rounds: jobs/s and the ratio on/off; target: not
  below about 50 jobs/s on 4 slots (the figure before the sandbox, on 2 cores);
- workload overhead: a CPU-bound torch job of about 3 s (a matmul loop, the
  `matmul_runtime` below, registered as an operator runtime), 5 pairs (quick 2):
  medians of the time the job measures itself and of its `duration_ms`, and the
  ratio on/off; target: at most 1 % overhead.

A missed target is a warning that says by how much; benchmarks never fail a build.
Exit 13 (and why) when the sandbox cannot be built here. The jobs import this
module (the runtime lives here), so it imports no torch at module level.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import Outcome
from agent.execution.environment import scrubbed_environ
from agent.execution.executor import ExecutorConfig, JobReport, JobRun
from agent.execution.isolation import Isolation, build_isolation
from agent.execution.launcher import Launcher, make_launcher
from agent.execution.sandbox import SandboxUnavailable
from agent.jobs import Job
from runtimes.base import JobContext

ROOT = Path(__file__).resolve().parents[1]
EXIT_NO_SANDBOX = 13
MODES = ("on", "off")
SLOTS = 4
LATENCY_TARGET_MS = 50.0
THROUGHPUT_TARGET = 50.0
OVERHEAD_TARGET = 0.01
TINY = {"type": "sleep", "steps": 1, "step_s": 0}
MATMUL_TYPE = "bench_matmul"
MATMUL_RUNTIME = "benchmarks.bench_sandbox:matmul_runtime"  # not __name__: that is __main__
MATMUL_SIZE = 512
CALIBRATION_PART = 3  # the sizing run lasts a third of the measured job


@dataclass(frozen=True)
class Sizes:
    latency_n: int
    tiny_jobs: int
    tiny_rounds: int
    pairs: int
    workload_s: float


SIZES = {"full": Sizes(30, 200, 5, 5, 3.0), "quick": Sizes(10, 40, 2, 2, 3.0),
         "tiny": Sizes(3, 8, 2, 1, 0.3)}


def matmul_runtime(ctx: JobContext) -> None:
    """A job's runtime: products of two ``size`` square matrices, self-timed.

    Payload: ``{"type": "bench_matmul", "iterations": N, "size": 512}``, or
    ``"seconds": S`` instead of ``iterations`` for as many products as fit in S.
    Reports ``compute_ms`` (the loop alone, its first products included),
    ``iterations`` done and torch's thread count in the job's metrics.
    """
    import torch  # in the job's process only, where the fork server preloaded it

    size = int(ctx.payload.get("size", MATMUL_SIZE))
    iterations = int(ctx.payload.get("iterations", 0))
    seconds = float(ctx.payload.get("seconds", 0))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen) / size ** 0.5
    out = torch.empty(size, size)
    done = 0
    t0 = time.perf_counter()
    while done < iterations or (not iterations and time.perf_counter() - t0 < seconds):
        torch.mm(a, b, out=out)
        done += 1
        fraction = done / iterations if iterations else (time.perf_counter() - t0) / seconds
        ctx.progress(fraction, stage="matmul")  # throttled, as real jobs report
    compute_ms = (time.perf_counter() - t0) * 1000
    ctx.set_metrics(compute_ms=round(compute_ms, 2), iterations=done, size=size,
                    threads=torch.get_num_threads())


@dataclass
class Mode:
    cfg: ExecutorConfig
    launcher: Launcher


class Bench:
    """Both modes, and one job (or a pool of them) through the real executor."""

    def __init__(self, iso: Isolation) -> None:
        assert iso.sandbox is not None
        env = scrubbed_environ(os.environ)
        # The fork server imports this module for the matmul jobs: the checkout on its path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self.modes: dict[str, Mode] = {}
        for name in MODES:
            sandbox = iso.sandbox if name == "on" else None
            cfg = ExecutorConfig(iso.sandbox.jobs_root, work_root=iso.sandbox.work_root,
                                 extra_runtimes={MATMUL_TYPE: MATMUL_RUNTIME},
                                 sandbox=sandbox, cgroups=iso.cgroups,
                                 cgroup_note=iso.cgroup_note, limits=iso.limits)
            self.modes[name] = Mode(cfg, make_launcher("forkserver", env=env, sandbox=sandbox))
        self._ids = itertools.count()

    async def run(self, mode: str, payload: dict[str, Any]) -> JobReport:
        job_id = f"{mode}-{payload['type']}-{next(self._ids)}"
        job = Job.from_dict({"job_id": job_id, "payload": payload})
        report = await JobRun(job, self.modes[mode].cfg, self.modes[mode].launcher).run()
        if report.outcome is not Outcome.COMPLETED:
            stderr = report.folder / "logs" / "stderr.log" if report.folder else None
            tail = stderr.read_text(errors="replace")[-2000:] if stderr else ""
            raise RuntimeError(f"job {job_id} (sandbox {mode}) {report.outcome.value}: "
                               f"{report.error_message}\n{tail}")
        return report

    async def run_pool(self, mode: str, payload: dict[str, Any], count: int) -> None:
        left = [count]

        async def slot() -> None:
            while left[0] > 0:
                left[0] -= 1
                await self.run(mode, payload)

        await asyncio.gather(*(slot() for _ in range(SLOTS)))

    async def close(self) -> None:
        for mode in self.modes.values():
            await mode.launcher.close()


def turns(i: int) -> tuple[str, ...]:
    """on/off, then off/on: neither mode always goes first."""
    return MODES if i % 2 == 0 else MODES[::-1]


async def warm_up(b: Bench) -> dict[str, float]:
    """Each fork server's start and first job (not counted), in seconds."""
    took = {}
    for mode in MODES:
        t0 = time.perf_counter()
        await b.run(mode, TINY)
        took[mode] = time.perf_counter() - t0
    return took


async def start_latency(b: Bench, n: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(n):
        for mode in turns(i):
            report = await b.run(mode, TINY)
            figures[mode].append(float(report.output["metrics"]["start_latency_ms"]))
    return figures


async def throughput(b: Bench, total: int, rounds: int) -> dict[str, float]:
    per_round = max(SLOTS, total // rounds)
    busy = {mode: 0.0 for mode in MODES}
    for i in range(rounds):
        for mode in turns(i):
            t0 = time.perf_counter()
            await b.run_pool(mode, TINY, per_round)
            busy[mode] += time.perf_counter() - t0
    return {mode: per_round * rounds / busy[mode] for mode in MODES}


async def workload(b: Bench, pairs: int, target_s: float) -> dict[str, Any]:
    """Size the matmul job to ``target_s`` unconfined, then time pairs of it."""
    rate = {}
    for mode in MODES:  # also each mode's first job of this kind: not counted
        report = await b.run(mode, {"type": MATMUL_TYPE, "seconds": target_s / CALIBRATION_PART})
        metrics = report.output["metrics"]
        rate[mode] = metrics["iterations"] / metrics["compute_ms"]
    iterations = max(1, round(target_s * 1000 * rate["off"]))
    payload = {"type": MATMUL_TYPE, "iterations": iterations}
    compute: dict[str, list[float]] = {mode: [] for mode in MODES}
    duration: dict[str, list[float]] = {mode: [] for mode in MODES}
    threads = 0
    for i in range(pairs):
        for mode in turns(i):
            metrics = (await b.run(mode, payload)).output["metrics"]
            compute[mode].append(float(metrics["compute_ms"]))
            duration[mode].append(float(metrics["duration_ms"]))
            threads = int(metrics["threads"])
    return {"iterations": iterations, "threads": threads, "compute": compute,
            "duration": duration}


async def measure(iso: Isolation, sizes: Sizes) -> dict[str, Any]:
    b = Bench(iso)
    try:
        warm = await warm_up(b)
        latency = await start_latency(b, sizes.latency_n)
        jobs_s = await throughput(b, sizes.tiny_jobs, sizes.tiny_rounds)
        work = await workload(b, sizes.pairs, sizes.workload_s)
    finally:
        await b.close()
    return {"warm": warm, "latency": latency, "jobs_s": jobs_s, "work": work}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def print_latency(latency: dict[str, list[float]], warnings: list[str]) -> None:
    n = len(latency["on"])
    print(f"start latency, request to the job's code (start_latency_ms), n={n} each:")
    for mode in MODES:
        values = latency[mode]
        print(f"  sandbox {mode:3s}: median {statistics.median(values):7.1f} ms  "
              f"p95 {p95(values):7.1f} ms")
    on, off = latency["on"], latency["off"]
    print(f"  on/off     : median {statistics.median(on) / statistics.median(off):.2f}x  "
          f"p95 {p95(on) / p95(off):.2f}x  (target: on <= {LATENCY_TARGET_MS:.0f} ms)")
    for label, value in (("median", statistics.median(on)), ("p95", p95(on))):
        if value > LATENCY_TARGET_MS:
            warnings.append(f"start latency with the sandbox, {label} {value:.2f} ms: "
                            f"{value - LATENCY_TARGET_MS:.2f} ms over the "
                            f"{LATENCY_TARGET_MS:.0f} ms target")


def print_throughput(jobs_s: dict[str, float], sizes: Sizes, warnings: list[str]) -> None:
    print(f"tiny jobs (sleep, steps=1, step_s=0), {sizes.tiny_jobs} each on {SLOTS} slots, "
          f"{sizes.tiny_rounds} interleaved rounds:")
    for mode in MODES:
        print(f"  sandbox {mode:3s}: {jobs_s[mode]:6.1f} jobs/s  "
              f"({1000 / jobs_s[mode]:.1f} ms a job)")
    print(f"  on/off     : {jobs_s['on'] / jobs_s['off']:.2f}x  "
          f"(target: on >= about {THROUGHPUT_TARGET:.0f} jobs/s)")
    if jobs_s["on"] < THROUGHPUT_TARGET:
        short = THROUGHPUT_TARGET - jobs_s["on"]
        warnings.append(f"tiny-job throughput with the sandbox, {jobs_s['on']:.1f} jobs/s: "
                        f"{short:.1f} jobs/s ({short / THROUGHPUT_TARGET:.0%}) under the "
                        f"{THROUGHPUT_TARGET:.0f} jobs/s target")


def overhead(work: dict[str, Any], key: str) -> float:
    return float(statistics.median(work[key]["on"]) / statistics.median(work[key]["off"]) - 1)


def print_workload(work: dict[str, Any], warnings: list[str]) -> None:
    compute = work["compute"]
    pairs = len(compute["on"])
    print(f"torch matmul job ({MATMUL_SIZE}x{MATMUL_SIZE}, {work['iterations']} products, "
          f"{work['threads']} threads), {pairs} pair{'s' if pairs != 1 else ''}, medians:")
    for mode in MODES:
        print(f"  sandbox {mode:3s}: measured by the job "
              f"{statistics.median(compute[mode]):8.1f} ms  duration_ms "
              f"{statistics.median(work['duration'][mode]):8.1f} ms  (runs "
              f"{min(compute[mode]):.0f}..{max(compute[mode]):.0f} ms)")
    ratios = [on / off - 1 for on, off in zip(compute["on"], compute["off"], strict=True)]
    print(f"  on/off     : measured {1 + overhead(work, 'compute'):.4f}x "
          f"({overhead(work, 'compute'):+.2%})  duration "
          f"{1 + overhead(work, 'duration'):.4f}x ({overhead(work, 'duration'):+.2%})  "
          f"(target: <= {OVERHEAD_TARGET:.0%} overhead)")
    print(f"  pair by pair: {', '.join(f'{r:+.1%}' for r in ratios)} (median "
          f"{statistics.median(ratios):+.2%})")
    spread = max(ratios) - min(ratios)
    if spread > 2 * OVERHEAD_TARGET:
        print(f"  note: the pairs spread over {spread:.1%}: run to run noise on this machine "
              f"is larger than the {OVERHEAD_TARGET:.0%} target, so read the medians with it")
    for key, label in (("compute", "measured by the job"), ("duration", "duration_ms")):
        extra = overhead(work, key)
        if extra > OVERHEAD_TARGET:
            warnings.append(f"workload overhead of the sandbox ({label}) {extra:+.2%}: "
                            f"{(extra - OVERHEAD_TARGET) * 100:.2f} points over the "
                            f"{OVERHEAD_TARGET:.0%} target")


def print_summary(figures: dict[str, Any], iso: Isolation, warnings: list[str]) -> None:
    latency, jobs_s, work = figures["latency"], figures["jobs_s"], figures["work"]
    print(f"\n== summary: job sandbox on vs off ({os.cpu_count()} CPUs, {iso.bwrap_version}, "
          f"fork server) ==")
    print(f"start latency, median / p95: on {statistics.median(latency['on']):.1f} / "
          f"{p95(latency['on']):.1f} ms, off {statistics.median(latency['off']):.1f} / "
          f"{p95(latency['off']):.1f} ms (target <= {LATENCY_TARGET_MS:.0f} ms)")
    print(f"tiny jobs on {SLOTS} slots: on {jobs_s['on']:.1f} jobs/s, off {jobs_s['off']:.1f} "
          f"jobs/s -> {jobs_s['on'] / jobs_s['off']:.2f}x (target >= about "
          f"{THROUGHPUT_TARGET:.0f} jobs/s)")
    print(f"~{statistics.median(work['compute']['off']) / 1000:.1f} s torch job, measured by "
          f"the job: on {statistics.median(work['compute']['on']):.0f} ms, off "
          f"{statistics.median(work['compute']['off']):.0f} ms -> "
          f"{overhead(work, 'compute'):+.2%}; duration_ms {overhead(work, 'duration'):+.2%} "
          f"(target <= {OVERHEAD_TARGET:.0%})")
    print(f"targets: {'all met' if not warnings else f'{len(warnings)} missed (see above)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer jobs and pairs")
    parser.add_argument("--tiny", action="store_true",
                        help="a few jobs, one short pair: a smoke test of the harness")
    args = parser.parse_args()
    size_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = SIZES[size_name]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        root = Path(tmp)
        try:
            iso = build_isolation(sandbox_on=True, jobs_root=root / "jobs",
                                  work_root=root / "work", hidden=[])
        except SandboxUnavailable as exc:
            print(f"the job sandbox cannot be built here, nothing to measure: {exc}")
            sys.exit(EXIT_NO_SANDBOX)
        try:
            figures = asyncio.run(measure(iso, sizes))
        finally:
            iso.close()
    print(f"== job sandbox: on vs off ({size_name}; fork server; job cgroups: "
          f"{iso.cgroup_note if iso.cgroups is None else 'yes, both modes'}) ==")
    if args.tiny:
        print("tiny: a check of the harness; the figures and ratios mean nothing at this size")
    print(f"fork server start and first job (not counted): on {figures['warm']['on']:.2f} s, "
          f"off {figures['warm']['off']:.2f} s")
    warnings: list[str] = []
    print_latency(figures["latency"], warnings)
    print_throughput(figures["jobs_s"], sizes, warnings)
    print_workload(figures["work"], warnings)
    for warning in warnings:
        print(f"WARNING: target missed: {warning}")
    print_summary(figures, iso, warnings)
    print(f"wall time of the run: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
