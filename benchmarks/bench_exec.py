"""`miner-agent exec` of one job against `python -c "import torch"`: paired, repeated.

    python -m benchmarks.bench_exec [--quick] [--repeat N] [--launcher auto,forkserver]
                                    [--sandbox on,off]

Each round runs, per exec variant, as fresh processes of this interpreter, side by side:

- bare: ``python -c "import torch"`` (start, import, interpreter teardown), the
  reference the target names; and ``python -c "import torch, os; os._exit(0)"``
  (no teardown: the import alone), since a job's process ends with ``os._exit`` and
  skips the ~0.3 s teardown torch costs, which flatters a ratio against the first;
- exec: ``python -m agent exec JOB --quiet`` of a trivial job that imports torch (the
  ``sleep`` runtime, one step of 0 s, ``torch: true``), for each launcher and sandbox
  mode asked, each writing its package (folder and zip) as an operator's run does.

The order flips every round, so a drift in the machine's load does not land on one
side. Two figures per exec run, each divided by the bare times run right beside it:

- total: the wall time of the whole ``exec`` command, from its start to its exit
  (agent start, sandbox, the job's process, torch import, package, exit) -- the
  figure the target (<= 1.1x ``python -c "import torch"``) is judged on, and printed
  against the import alone too;
- to code: from the ``exec`` command's start to the job's first progress report, sent
  by the runtime just after its ``import torch`` (output.json's ``created_at`` plus
  ``first_progress_ms``, millisecond timestamps).

Reported: the median of the per-round ratios, their quartiles and range (p95 only with
20 rounds or more), and the median of each phase of an exec (from output.json). One
warm-up round runs first and is not counted. Benchmarks never fail a build: a ratio
over target is printed, not raised; a run that fails makes the exit status non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

TARGET = 1.1
BARE = [sys.executable, "-c", "import torch"]
IMPORT_ONLY = [sys.executable, "-c", "import torch, os; os._exit(0)"]
JOB = {"job_id": "bench-exec", "payload": {"type": "sleep", "steps": 1, "step_s": 0,
                                           "torch": True}}
RUN_TIMEOUT_S = 300


@dataclass(frozen=True)
class Variant:
    """One way of running ``exec``: its launcher and whether the sandbox is on."""

    launcher: str
    sandbox: bool

    @property
    def name(self) -> str:
        return f"exec --launcher {self.launcher}, sandbox {'on' if self.sandbox else 'off'}"

    def argv(self, job_file: Path, out: Path) -> list[str]:
        argv = [sys.executable, "-m", "agent", "exec", str(job_file), "--out", str(out),
                "--quiet", "--launcher", self.launcher]
        return argv if self.sandbox else [*argv, "--no-sandbox"]


@dataclass
class Samples:
    """Per-round ratios against that round's bare run, and exec's phases (s)."""

    total: list[float] = field(default_factory=list)
    total_vs_import: list[float] = field(default_factory=list)
    to_code: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def add_phases(self, phases: dict[str, float]) -> None:
        for name, value in phases.items():
            self.phases.setdefault(name, []).append(value)


def timed(argv: list[str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Run ``argv``; its wall clock start (s since the epoch) and its duration (s)."""
    wall = time.time()
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    return wall, time.perf_counter() - t0, done


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def run_exec(variant: Variant, job_file: Path, out: Path) -> tuple[float, dict[str, float]]:
    """One ``exec``: its wall time and its phases, read from the package it wrote."""
    shutil.rmtree(out, ignore_errors=True)
    wall, took, done = timed(variant.argv(job_file, out))
    if done.returncode != 0:
        raise RuntimeError(f"{variant.name}: exit {done.returncode}\n{done.stderr[-2000:]}")
    output = json.loads((out / f"job_{JOB['job_id']}" / "output.json").read_text())
    created = _epoch(output["created_at"])
    first_code = created + output["metrics"]["first_progress_ms"] / 1000
    phases = {"agent start (to the job's record)": created - wall,
              "launch (to the job's `started`)": _epoch(output["started_at"]) - created,
              "to code (torch imported)": first_code - wall,
              "job end -> exec exit": wall + took - _epoch(output["finished_at"])}
    shutil.rmtree(out, ignore_errors=True)
    return took, phases


def one_round(variants: list[Variant], job_file: Path, root: Path, flip: bool,
              results: dict[Variant, Samples] | None) -> None:
    """Per variant, both bare runs and its exec side by side (reversed when ``flip``);
    ``results`` None: a warm-up."""
    for variant in variants:
        order: list[Variant | list[str]] = [BARE, IMPORT_ONLY, variant]
        bare: dict[str, float] = {}
        total, phases = 0.0, dict[str, float]()
        for item in reversed(order) if flip else order:
            if isinstance(item, Variant):
                total, phases = run_exec(item, job_file, root / "out")
                continue
            _, bare[item[-1]], done = timed(item)
            if done.returncode != 0:
                raise RuntimeError(f"{item[-1]} failed:\n{done.stderr[-2000:]}")
        if results is None:
            continue
        bare_s, import_s = bare[BARE[-1]], bare[IMPORT_ONLY[-1]]
        samples = results[variant]
        samples.total.append(total / bare_s)
        samples.total_vs_import.append(total / import_s)
        samples.to_code.append(phases["to code (torch imported)"] / bare_s)
        samples.add_phases({"bare python -c 'import torch'": bare_s,
                            "bare import only (os._exit)": import_s, "exec total": total,
                            **phases})


def spread(ratios: list[float]) -> str:
    """Median, quartiles and range of per-round ratios; p95 from 20 rounds up."""
    ordered = sorted(ratios)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
        quartiles = f", quartiles {q1:.3f}-{q3:.3f}"
    else:
        quartiles = ""
    p95 = ""
    if len(ordered) >= 20:
        p95 = f", p95 {ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]:.3f}"
    return (f"median {statistics.median(ordered):.3f}x{quartiles}, range "
            f"{ordered[0]:.3f}-{ordered[-1]:.3f}{p95} (n={len(ordered)} pairs)")


def report(variant: Variant, samples: Samples) -> None:
    print(f"{variant.name}:")
    for name, values in samples.phases.items():
        print(f"  {name:38s} median {statistics.median(values) * 1000:7.0f} ms  "
              f"(range {min(values) * 1000:.0f}-{max(values) * 1000:.0f})")
    total = statistics.median(samples.total)
    verdict = "meets target" if total <= TARGET else "OVER target"
    print(f"  ratio total   exec/bare: {spread(samples.total)}: {verdict} (<= {TARGET}x)")
    print(f"  ratio to code exec/bare: {spread(samples.to_code)}")
    print(f"  ratio total exec/import only: {spread(samples.total_vs_import)}", flush=True)


def sandbox_modes(asked: str) -> list[bool]:
    modes = [m.strip() for m in asked.split(",") if m.strip()]
    if "on" in modes and shutil.which("bwrap") is None:
        print("sandbox on: skipped, bubblewrap (bwrap) is not installed here")
        modes.remove("on")
    return [m == "on" for m in modes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (pairs) to count")
    parser.add_argument("--launcher", default="auto",
                        help="launchers to compare, comma-separated (auto, spawn, forkserver; "
                        "forkserver shows how exec started a job before it went direct)")
    parser.add_argument("--sandbox", default="on,off", help="on, off, or both (default)")
    args = parser.parse_args(argv)
    repeat = max(1, args.repeat or (5 if args.quick else 15))
    variants = [Variant(launcher.strip(), sandbox)
                for launcher in args.launcher.split(",") if launcher.strip()
                for sandbox in sandbox_modes(args.sandbox)]
    print(f"== exec start-up: `miner-agent exec` of one torch job vs `python -c \"import "
          f"torch\"` ({repeat} paired rounds, order flipped each round, 1 warm-up) ==")
    print(f"job: {json.dumps(JOB['payload'])}; python {sys.executable}; "
          f"{os.cpu_count()} CPUs", flush=True)
    results = {v: Samples() for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-exec-") as tmp:
        root = Path(tmp)
        job_file = root / "job.json"
        job_file.write_text(json.dumps(JOB))
        try:
            one_round(variants, job_file, root, False, None)
            for i in range(repeat):
                one_round(variants, job_file, root, i % 2 == 1, results)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"FAILED: {exc}")
            return 1
    for variant in variants:
        report(variant, results[variant])
    return 0


if __name__ == "__main__":
    sys.exit(main())
