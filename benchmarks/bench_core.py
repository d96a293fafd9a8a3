"""Execution-core figures, each measured in pairs and repeated, each printing its method.

    python -m benchmarks.bench_core [--quick | --tiny]

Prints:
- job start latency (request to the job's first progress, torch imported) through the
  torch-preloaded fork server and through a plain spawn, in pairs;
- cancel latency (cancel request to the job's exit) over repeated runs of a step loop,
  against the target of one step plus 50 ms;
- log capture: a child printing short lines through the capture path versus the same
  child writing straight to a file, timed until every byte is in the file and checked
  byte for byte on disk (target >= 0.9x);
- the capture's own CPU for a job that flushes every line (print(flush=True),
  PYTHONUNBUFFERED): the hub as it runs, pausing 1 ms to let a chatty pipe gather,
  against the same hub with the pause off (set in this process only), in pairs;
- package hashing: the agent's hashing against a plain hashlib loop over the same
  files on one thread each (target >= 0.9x); the agent's threaded manifest and its full
  seal (zip and hash in one pass) are reported apart, never in that ratio;
- the execution side's CPU per tiny job: this process's CPU (every thread, not the
  job's own process) over tiny jobs run four at a time through the fork server.
Medians are of per-pair ratios with their spread (lowest-highest); a p95 is printed
only where there are at least 20 samples. Benchmarks never fail a build.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from agent.errors import CancelReason
from agent.execution import capture as capture_module
from agent.execution.capture import StreamCapture, make_pipe
from agent.execution.executor import ExecutorConfig, JobRun
from agent.execution.launcher import ForkServerLauncher, Launcher, SpawnLauncher
from agent.execution.package import build_manifest, sha256_file, write_package
from agent.jobs import Job

P95_MIN_SAMPLES = 20

# The child stamps the monotonic clock (system-wide) around its printing loop, so
# interpreter start-up is in neither arm and the parent can time the capture's end.
CHATTY = """import sys, time
t0 = time.monotonic()
w = sys.stdout.write
for i in range({n}):
    w(f"line {{i}} of output\\n")
sys.stdout.flush()
t1 = time.monotonic()
print(f"loop_start={{t0:.6f}} loop_end={{t1:.6f}}", file=sys.stderr)
"""


@dataclass
class Sizes:
    pairs: int
    start_pairs: int
    cancel_runs: int
    lines: int
    hash_mib: int
    hash_files: int
    tiny_jobs: int
    tiny_rounds: int
    torch: bool


SIZES = {"full": Sizes(7, 10, 20, 1_000_000, 1024, 8, 200, 5, True),
         "quick": Sizes(3, 4, 5, 200_000, 128, 8, 80, 4, True),
         "tiny": Sizes(1, 1, 2, 20_000, 8, 4, 8, 1, False)}


# -- figures ------------------------------------------------------------------------
def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def spread(values: list[float], unit: str = "", digits: int = 2) -> str:
    """``median X (lowest-highest, n=N)``, with the p95 where there are enough samples."""
    text = (f"median {statistics.median(values):.{digits}f}{unit} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f}, n={len(values)})")
    if len(values) >= P95_MIN_SAMPLES:
        text += f", p95 {p95(values):.{digits}f}{unit}"
    return text


def alternate(pair: int, arms: list[str]) -> list[str]:
    """Arms in turn: forward on even pairs, reversed on odd ones (no arm always first)."""
    return arms if pair % 2 == 0 else arms[::-1]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


# -- jobs ---------------------------------------------------------------------------------
async def _run_job(launcher: Launcher, root: Path, job: Job,
                   on_line: Callable[[str, bytes], None] | None = None,
                   cancel_after_s: float | None = None) -> JobRun:
    run = JobRun(job, ExecutorConfig(root, cancel_grace_s=5), launcher, on_line=on_line)
    task = asyncio.create_task(run.run())
    if cancel_after_s is not None:
        while not run.progress and not task.done():
            await asyncio.sleep(0.005)
        await asyncio.sleep(cancel_after_s)
        run.cancel(CancelReason.REQUESTED)
    await task
    return run


def _sleep_job(job_id: str, steps: int, step_s: float, torch: bool) -> Job:
    return Job.from_dict({"job_id": job_id, "payload": {
        "type": "sleep", "steps": steps, "step_s": step_s, "torch": torch}})


def start_latency(root: Path, pairs: int, torch: bool) -> dict[str, list[float]]:
    """Request to first progress via each launcher, one job of each per pair."""
    async def main() -> dict[str, list[float]]:
        forkserver = ForkServerLauncher()
        await forkserver.start()  # a daemon keeps it warm: its start is not a job's
        launchers: dict[str, Launcher] = {"forkserver": forkserver, "spawn": SpawnLauncher()}
        out: dict[str, list[float]] = {name: [] for name in launchers}
        try:
            for pair in range(pairs + 1):  # pair 0 warms the page cache; not counted
                for name in alternate(pair, list(launchers)):
                    run = await _run_job(launchers[name], root,
                                         _sleep_job(f"start-{name}-{pair}", 1, 0, torch))
                    if pair:
                        out[name].append(((run.mono.get("first_progress") or 0)
                                          - (run.mono.get("requested") or 0)) * 1000)
        finally:
            for launcher in launchers.values():
                await launcher.close()
        return out
    return asyncio.run(main())


def cancel_latency(root: Path, runs: int, step_s: float) -> list[float]:
    async def main() -> list[float]:
        launcher = ForkServerLauncher()
        latencies = []
        try:
            for i in range(runs):
                run = await _run_job(launcher, root, _sleep_job(f"cancel-{i}", 10**7, step_s,
                                                                False), cancel_after_s=0.2)
                requested, exited = run.mono.get("cancel_requested"), run.mono.get("finished")
                latencies.append(((exited or 0) - (requested or 0)) * 1000)
        finally:
            await launcher.close()
        return latencies
    return asyncio.run(main())


# -- log capture ---------------------------------------------------------------------------
def _stamps(stderr: str) -> tuple[float, float]:
    """The child's loop start and end (after its flush), monotonic seconds."""
    start, end = stderr.rsplit("loop_start=", 1)[1].split()[:2]
    return float(start), float(end.removeprefix("loop_end="))


def _direct(root: Path, script: str, env: dict[str, str]) -> tuple[float, bytes]:
    path = root / "direct.log"
    with open(path, "wb") as fh:
        proc = subprocess.run([sys.executable, "-c", script], stdout=fh, stderr=subprocess.PIPE,
                              check=True, env=env, text=True)
    start, end = _stamps(proc.stderr)  # flushed at `end`: every byte is in the file
    return end - start, path.read_bytes()


def _captured(root: Path, script: str, tag: str, subscribe: bool) -> tuple[float, bytes, int]:
    """Loop start to the capture's last write, the log's bytes, and the bytes handed out
    as lines to a subscriber (0 without one)."""
    got = [0]

    def count(stream: str, line: bytes) -> None:
        if stream == "stdout":
            got[0] += len(line)

    job = Job.from_dict({"job_id": tag, "payload": {
        "type": "command", "argv": [sys.executable, "-c", script]}})
    run = asyncio.run(_run_job(SpawnLauncher(), root, job, on_line=count if subscribe else None))
    start, _end = _stamps((run.folder / "logs/stderr.log").read_text())
    written_at = run.captures["stdout"].written_at or start
    return written_at - start, (run.folder / "logs/stdout.log").read_bytes(), got[0]


@dataclass
class LogFigures:
    ratios: dict[str, list[float]]  # direct time / captured time, per pair
    exact: dict[str, bool]
    size: int


def log_capture(root: Path, lines: int, pairs: int) -> LogFigures:
    """Direct-to-file against capture and capture with a line subscriber, in pairs."""
    root.mkdir(parents=True, exist_ok=True)
    script = CHATTY.format(n=lines)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    ratios: dict[str, list[float]] = {"captured": [], "lines": []}
    exact = {"captured": True, "lines": True}
    for pair in range(pairs):
        times: dict[str, float] = {}
        kept: dict[str, bytes] = {}
        for arm in alternate(pair, ["direct", "captured", "lines"]):
            if arm == "direct":
                times[arm], kept[arm] = _direct(root, script, env)
                continue
            times[arm], kept[arm], handed = _captured(root, script, f"chatty-{arm}-{pair}",
                                                      arm == "lines")
            if arm == "lines":
                exact[arm] &= handed == len(kept[arm])
        for arm in ratios:
            ratios[arm].append(times["direct"] / times[arm])
            exact[arm] &= kept[arm] == kept["direct"]
    return LogFigures(ratios, exact, len(kept["direct"]))


FLUSHING = """for i in range({n}):
    print(f"line {{i}} of a chatty job", flush=True)
"""


def _count_read(box: list[int], _stream: str, _size: int) -> None:
    box[0] += 1


def flushing_capture(root: Path, lines: int, pairs: int) -> dict[str, list[float]]:
    """This process's CPU (the capture hub's) per MiB of a line-flushing job, and its
    reads per MiB, with the hub's batching pause as shipped and with it off."""
    root.mkdir(parents=True, exist_ok=True)
    shipped = capture_module.BATCH_S
    figures: dict[str, list[float]] = {}
    try:
        for pair in range(pairs):
            for arm in alternate(pair, ["batched", "unbatched"]):
                capture_module.BATCH_S = shipped if arm == "batched" else 0.0
                reads = [0]
                read_fd, write_fd = make_pipe()
                capture = StreamCapture("stdout", read_fd, root / f"{arm}-{pair}.log",
                                        partial(_count_read, reads))
                c0 = cpu_s()
                capture.start()
                proc = subprocess.Popen([sys.executable, "-c", FLUSHING.format(n=lines)],
                                        stdout=write_fd)
                os.close(write_fd)
                proc.wait()
                capture.join(30)
                mib = capture.size / (1 << 20)
                figures.setdefault(f"{arm} cpu", []).append((cpu_s() - c0) * 1000 / mib)
                figures.setdefault(f"{arm} reads", []).append(reads[0] / mib)
    finally:
        capture_module.BATCH_S = shipped
    return figures


def _print_flushing(f: dict[str, list[float]], lines: int) -> None:
    print(f"\nlog capture of a job that flushes every line ({lines:,} lines): this "
          "process's CPU (the hub's) per MiB, the hub's 1 ms pause on and off, alternating")
    for arm in ("batched", "unbatched"):
        print(f"  {arm:<9}: {spread(f[f'{arm} cpu'], ' ms/MiB')}, "
              f"reads {statistics.median(f[f'{arm} reads']):,.0f}/MiB")
    ratios = [a / b for a, b in zip(f["batched cpu"], f["unbatched cpu"], strict=True)]
    print(f"  batched / unbatched CPU per pair: {spread(ratios, 'x')}")


# -- hashing ----------------------------------------------------------------------------------
def _hashlib_loop(paths: list[Path]) -> list[str]:
    digests = []
    for path in paths:
        with open(path, "rb") as fh:
            digests.append(hashlib.file_digest(fh, "sha256").hexdigest())
    return digests


def _agent_one_thread(paths: list[Path]) -> list[str]:
    return [sha256_file(path) for path in paths]  # the seal's read-and-hash, inline


@dataclass
class HashFigures:
    mib: float
    ratios: list[float]  # hashlib time / agent time, per pair
    speeds: dict[str, list[float]]
    threaded: float
    sealed: float
    threads: int


def hashing(root: Path, total_mib: int, files: int, pairs: int) -> HashFigures:
    folder = root / "job_hash"
    (folder / "artifacts").mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(1 << 20)
    paths = []
    for i in range(files):
        path = folder / "artifacts" / f"blob{i}.bin"
        with open(path, "wb") as fh:
            for _ in range(max(1, total_mib // files)):
                fh.write(chunk)
        paths.append(path)
    mib = sum(p.stat().st_size for p in paths) / (1 << 20)
    reference = _hashlib_loop(paths)  # also warms the page cache for both arms
    ratios: list[float] = []
    speeds: dict[str, list[float]] = {"hashlib": [], "agent": []}
    arms: dict[str, Callable[[list[Path]], list[str]]] = {"hashlib": _hashlib_loop,
                                                          "agent": _agent_one_thread}
    for pair in range(pairs):
        took = {}
        for name in alternate(pair, list(arms)):
            t0 = time.perf_counter()
            assert arms[name](paths) == reference, f"{name} hashes disagree"
            took[name] = time.perf_counter() - t0
            speeds[name].append(mib / took[name])
        ratios.append(took["hashlib"] / took["agent"])
    t0 = time.perf_counter()
    manifest, _ = build_manifest(folder)
    threaded = mib / (time.perf_counter() - t0)
    assert [m["sha256"] for m in manifest] == reference
    t0 = time.perf_counter()
    write_package(folder, {"job_id": "hash", "status": "completed"})
    sealed = mib / (time.perf_counter() - t0)
    return HashFigures(mib, ratios, speeds, threaded, sealed, min(8, os.cpu_count() or 1))


# -- CPU per tiny job -------------------------------------------------------------------------
def cpu_per_tiny_job(root: Path, jobs: int, rounds: int, lanes: int = 4) -> list[float]:
    """This process's CPU per tiny job, one figure per round of ``jobs / rounds`` jobs."""
    async def main() -> list[float]:
        launcher = ForkServerLauncher()
        await launcher.start()
        per_round = max(1, jobs // rounds)
        counter = iter(range(10**9))

        async def lane(count: int) -> None:
            for _ in range(count):
                await _run_job(launcher, root, _sleep_job(f"tiny-{next(counter)}", 1, 0, False))

        figures = []
        try:
            await lane(lanes)  # warm: first imports, first cgroup, first package
            for _ in range(rounds):
                c0 = cpu_s()
                await asyncio.gather(*(lane(per_round // lanes + (i < per_round % lanes))
                                       for i in range(lanes)))
                figures.append((cpu_s() - c0) * 1000 / per_round)
        finally:
            await launcher.close()
        return figures
    return asyncio.run(main())


# -- report ---------------------------------------------------------------------------------
def _print_method(size: str, s: Sizes) -> None:
    print(f"== execution core ({size}; {os.cpu_count()} CPUs) ==")
    print("method: arms alternate in every pair (forward, then reversed); a ratio is taken "
          "per pair and its median and lowest-highest are printed; p95 only where "
          f"n >= {P95_MIN_SAMPLES}.")


def _print_start_cancel(start: dict[str, list[float]], cancel: list[float], step_s: float,
                        torch: bool) -> None:
    what = "torch imported" if torch else "no torch (--tiny)"
    print(f"\nstart latency, request to first progress ({what}), one job per launcher "
          "per pair, the fork server kept warm:")
    for name, values in start.items():
        print(f"  via {name:10s}: {spread(values, ' ms', 1)}")
    ratio = [s / f for s, f in zip(start["spawn"], start["forkserver"], strict=True)]
    print(f"  spawn / fork server per pair: {spread(ratio, 'x')}  (target: fork server "
          "<= 50 ms)")
    print(f"\ncancel latency, cancel request to exit, fork server, step {step_s * 1000:.0f} "
          f"ms: {spread(cancel, ' ms', 1)}, max {max(cancel):.1f} ms  "
          f"(target <= {step_s * 1000 + 50:.0f} ms)")


def _print_logs(logs: LogFigures, lines: int) -> None:
    print(f"\nlog capture, {lines:,} lines ({logs.size / 1e6:.1f} MB) per run. Time: the "
          "child's loop start to its last byte in the file (direct: after its flush; "
          "captured: the capture's last write). Every byte of stdout.log compared with the "
          "direct file; the subscriber's lines summed to the same bytes.")
    print(f"  captured / direct          : {spread(logs.ratios['captured'], 'x')}  "
          f"every byte on disk: {logs.exact['captured']}  (target >= 0.9x)")
    print(f"  with a line subscriber     : {spread(logs.ratios['lines'], 'x')}  "
          f"every byte on disk and in lines: {logs.exact['lines']}")


def _print_hashing(h: HashFigures) -> None:
    print(f"\npackage hashing, {h.mib:.0f} MiB in files of the same size, page cache warm, "
          "ONE thread each: hashlib's own file_digest against the agent's "
          "sha256_file (the seal's own read-and-hash)")
    print(f"  hashlib     : {spread(h.speeds['hashlib'], ' MiB/s', 0)}")
    print(f"  agent       : {spread(h.speeds['agent'], ' MiB/s', 0)}")
    print(f"  agent / hashlib per pair: {spread(h.ratios, 'x')}  (target >= 0.9x)")
    print(f"  apart, not in the ratio: the agent's manifest with up to {h.threads} threads "
          f"{h.threaded:.0f} MiB/s; its full seal (zip, hashes, sidecar, fsync) "
          f"{h.sealed:.0f} MiB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer pairs, smaller data")
    group.add_argument("--tiny", action="store_true",
                       help="smoke-test size: one pair each, no torch; figures mean little")
    args = parser.parse_args()
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    s = SIZES[size]
    step_s = 0.05
    _print_method(size, s)
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        root = Path(tmp)
        start = start_latency(root / "start", s.start_pairs, s.torch)
        cancel = cancel_latency(root / "cancel", s.cancel_runs, step_s)
        _print_start_cancel(start, cancel, step_s, s.torch)
        _print_logs(log_capture(root / "logs", s.lines, s.pairs), s.lines)
        flush_lines = max(1000, s.lines // 4)
        _print_flushing(flushing_capture(root / "flushing", flush_lines, s.pairs), flush_lines)
        _print_hashing(hashing(root / "hash", s.hash_mib, s.hash_files, max(3, s.pairs)))
        tiny = cpu_per_tiny_job(root / "tiny", s.tiny_jobs, s.tiny_rounds)
    print(f"\nexecution-side CPU per tiny job (sleep, 1 step, no torch; {s.tiny_jobs} jobs in "
          f"{s.tiny_rounds} rounds, 4 at a time, fork server): this process's user+system "
          f"CPU, every thread, not the job's process: {spread(tiny, ' ms')}")


if __name__ == "__main__":
    main()
