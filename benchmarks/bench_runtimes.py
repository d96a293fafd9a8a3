"""Runtime throughput, bare versus as a job through the agent, side by side in one run.

    python -m benchmarks.bench_runtimes [--quick | --tiny] [--device cpu|cuda] [--repeat N]

For each workload (the ``training`` runtime on an MLP, the ``batch_inference``
runtime on a built-in MLP) it runs the runtime's own ``run(ctx)``:

- bare: in this process, with a :class:`runtimes.base.JobContext` whose events
  channel has no fd, so the code path is the job's, minus the process and pipes;
- as a job: through :class:`agent.execution.executor.JobRun` and a warm fork server, the way
  the daemon runs it, reading ``samples_per_s`` from the package's ``output.json``.

Both figures are the runtime's own ``samples_per_s`` metric, which times the loop
only (training: first to last step; batch inference: first batch to the last part
written), so start-up is left out of the ratio and reported on its own: request to
the first loop progress report (it includes that first step), with the runtime's
``startup_s`` and the process start beside it. Bare and job runs alternate and the
median of each is compared; the target is job >= 0.97x bare. The fork server's own
start is paid once per agent, not per job, and printed apart.

This process imports torch for the bare runs; the agent's side (JobRun, the
launcher) still never does, and the job processes come from the fork server.
Benchmarks never fail a build: a timing below target is printed, not raised; only a
run that does not complete makes the exit status non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from agent.errors import Outcome
from agent.execution.executor import ExecutorConfig, JobRun
from agent.execution.launcher import ForkServerLauncher
from agent.jobs import Job
from runtimes.base import EventChannel, JobContext
from runtimes.registry import load, resolve_path

TARGET = 0.97
WARMUP_STEPS = 20


@dataclass(frozen=True)
class Sizes:
    """One workload size per device and mode."""

    train_features: int
    train_hidden: list[int]
    train_samples: int
    train_batch: int
    train_steps: int
    infer_features: int
    infer_hidden: list[int]
    infer_batch: int
    infer_batches: int


# CPU: a step or a batch takes a few ms on two cores, a loop 1.5-6 s. CUDA: a model
# big enough that the GPU, not Python, sets the pace, with a checkpoint (training
# packages it: params x 12 bytes with AdamW) and an input file (inference reads it
# whole) kept to a few hundred MB.
SIZES: dict[tuple[str, str], Sizes] = {
    ("cpu", "full"): Sizes(256, [256, 256], 8192, 64, 1200, 64, [768, 768], 256, 1000),
    ("cpu", "quick"): Sizes(256, [256, 256], 8192, 64, 500, 64, [768, 768], 256, 400),
    ("cpu", "tiny"): Sizes(32, [64], 1024, 32, 60, 16, [64], 64, 40),
    ("cuda", "full"): Sizes(1024, [2048] * 4, 65536, 4096, 2000, 16, [8192] * 3, 4096, 1500),
    ("cuda", "quick"): Sizes(1024, [2048] * 4, 65536, 4096, 600, 16, [8192] * 3, 4096, 800),
    ("cuda", "tiny"): Sizes(64, [256], 4096, 256, 60, 16, [256], 256, 40),
}


@dataclass
class Workload:
    """One runtime with one payload, and what its loop's progress stage is called."""

    name: str
    describe: str
    payload: dict[str, Any]
    warmup_payload: dict[str, Any]
    loop_stage: str

    def clock(self) -> LoopClock:
        return LoopClock(self.loop_stage, int(self.payload["batch_size"]))


@dataclass
class Figures:
    """What one workload measured: samples/s per run, and start-up figures."""

    bare: list[float] = field(default_factory=list)
    job: list[float] = field(default_factory=list)
    bare_windows: list[float] = field(default_factory=list)  # pooled over the runs
    job_windows: list[float] = field(default_factory=list)
    bare_setup_s: list[float] = field(default_factory=list)
    job_startup_s: list[float] = field(default_factory=list)
    job_runtime_setup_s: list[float] = field(default_factory=list)
    job_process_start_ms: list[float] = field(default_factory=list)
    error: str | None = None


# -- workloads ----------------------------------------------------------------------

def training_workload(sizes: Sizes, device: str) -> Workload:
    payload: dict[str, Any] = {
        "type": "training", "device": device, "seed": 0,
        "model": {"arch": "mlp", "config": {"hidden": sizes.train_hidden}},
        "dataset": {"synthetic": {"kind": "classification", "samples": sizes.train_samples,
                                  "features": sizes.train_features, "classes": 10}},
        "batch_size": sizes.train_batch, "steps": sizes.train_steps}
    widths = "-".join(str(w) for w in [sizes.train_features, *sizes.train_hidden])
    return Workload("training", f"mlp {widths}->10, AdamW, batch {sizes.train_batch}, "
                    f"{sizes.train_steps} steps", payload,
                    {**payload, "steps": WARMUP_STEPS}, "train")


def inference_workload(sizes: Sizes, device: str, data: Path) -> Workload:
    """Writes the weights and the input tensor under ``data`` (local paths, no fetch)."""
    import torch
    from safetensors.torch import save_file

    from runtimes.models import build_model

    config = {"in_features": sizes.infer_features, "out_features": 10,
              "hidden": sizes.infer_hidden}
    torch.manual_seed(0)
    save_file(build_model("mlp", config).state_dict(), str(data / "weights.safetensors"))
    total = sizes.infer_batch * sizes.infer_batches
    inputs = torch.randn(total, sizes.infer_features)
    save_file({"inputs": inputs}, str(data / "inputs.safetensors"))
    warm = inputs[: sizes.infer_batch * WARMUP_STEPS].clone()
    save_file({"inputs": warm}, str(data / "warmup.safetensors"))
    payload: dict[str, Any] = {
        "type": "batch_inference", "device": device, "seed": 0,
        "model": {"format": "builtin", "arch": "mlp", "config": config,
                  "weights": {"uri": str(data / "weights.safetensors")}},
        "inputs": {"uri": str(data / "inputs.safetensors")},
        "batch_size": sizes.infer_batch, "batches_per_part": 32}
    widths = "-".join(str(w) for w in [sizes.infer_features, *sizes.infer_hidden])
    mib = inputs.nbytes / (1 << 20)
    return Workload("batch_inference", f"builtin mlp {widths}->10, batch {sizes.infer_batch}, "
                    f"{sizes.infer_batches} batches ({mib:.0f} MiB of inputs)", payload,
                    {**payload, "inputs": {"uri": str(data / "warmup.safetensors")}}, "batches")


# -- bare: the runtime's own run(ctx) in this process ----------------------------------

class LoopClock:
    """Times the loop from its progress reports: when it began, and its rate per window.

    Progress comes at most every 0.25 s (``runtimes.base``); each gap between two
    reports of the loop's stage is one window. Other processes on a shared machine
    only ever slow a window down, so a high percentile of the windows is the figure
    that noise moves least.
    """

    def __init__(self, stage: str, batch_size: int) -> None:
        self.stage = stage
        self.batch_size = batch_size
        self.first_loop: float | None = None
        self._marks: list[tuple[float, int]] = []

    def note(self, event: dict[str, Any]) -> None:
        if event.get("event") != "progress" or event.get("stage") != self.stage:
            return
        t = float(event.get("t") or time.time())
        metrics = event.get("metrics") or {}
        done = metrics.get("samples", int(metrics.get("step", 0)) * self.batch_size)
        if self.first_loop is None:
            self.first_loop = t
        self._marks.append((t, int(done)))

    def window_rates(self) -> list[float]:
        """Samples/s over each gap between two progress reports of the loop."""
        return [(n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in pairwise(self._marks)
                if t1 > t0]


class _ClockChannel(EventChannel):
    """No fd, like a bare context's channel; shows each event to a :class:`LoopClock`."""

    def __init__(self, clock: LoopClock) -> None:
        super().__init__(None)
        self.clock = clock

    def send(self, event: str, **fields: Any) -> None:
        self.clock.note({"event": event, "t": time.time(), **fields})


def run_bare(work: Workload, payload: dict[str, Any], root: Path,
             job_id: str) -> tuple[dict[str, Any], LoopClock, float]:
    """Run the workload's runtime here; returns its metrics, its clock and its set-up (s)."""
    fn = load(resolve_path(payload["type"]) or "")
    clock = work.clock()
    work_dir = root / ".work" / job_id
    work_dir.mkdir(parents=True)
    ctx = JobContext({"job_id": job_id, "payload": payload}, root / f"bare_{job_id}",
                     work_dir, _ClockChannel(clock))
    t0 = time.time()
    fn(ctx)
    setup_s = (clock.first_loop or t0) - t0
    shutil.rmtree(root / f"bare_{job_id}", ignore_errors=True)
    shutil.rmtree(work_dir, ignore_errors=True)
    _release_device_memory()
    return ctx.metrics, clock, setup_s


def _release_device_memory() -> None:
    """Hand cached CUDA memory back before a job runs beside this process."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# -- as a job: JobRun through the fork server -------------------------------------------

async def run_as_job(work: Workload, launcher: ForkServerLauncher, root: Path,
                     job_id: str) -> tuple[dict[str, Any], LoopClock, float]:
    """Run the workload as a job; returns output.json's metrics, its clock and its start-up.

    The start-up runs from the request to the loop's first progress report.
    """
    clock = work.clock()
    job = Job.from_dict({"job_id": job_id, "payload": work.payload,
                         "constraints": {"timeout_s": 1800}})
    cfg = ExecutorConfig(root, cancel_grace_s=10, make_zip=False)
    run = JobRun(job, cfg, launcher, on_event=clock.note)
    report = await run.run()
    if report.outcome != Outcome.COMPLETED:
        stderr = run.folder / "logs" / "stderr.log"
        tail = stderr.read_text(errors="replace")[-1500:] if stderr.exists() else ""
        raise RuntimeError(f"job {job_id} {report.outcome.value}: {report.error_code} "
                           f"{report.error_message}\n{tail}")
    requested = run.times["requested"] or 0.0
    shutil.rmtree(run.folder, ignore_errors=True)
    return dict(report.output["metrics"]), clock, (clock.first_loop or requested) - requested


async def measure(work: Workload, launcher: ForkServerLauncher, root: Path,
                  repeat: int) -> Figures:
    """Warm up bare once, then run bare and job ``repeat`` times each, alternating.

    The order flips every round (bare, job, job, bare, ...) so that a drift in the
    machine's load does not always land on the same side.
    """
    figures = Figures()
    run_bare(work, work.warmup_payload, root, f"{work.name}-warmup")
    for i in range(repeat):
        for side in ("bare", "job") if i % 2 == 0 else ("job", "bare"):
            if side == "bare":
                _one_bare(work, root, i, figures)
            else:
                await _one_job(work, launcher, root, i, figures)
    return figures


def _one_bare(work: Workload, root: Path, i: int, figures: Figures) -> None:
    metrics, clock, setup_s = run_bare(work, work.payload, root, f"{work.name}-bare-{i}")
    figures.bare.append(float(metrics["samples_per_s"]))
    figures.bare_windows.extend(clock.window_rates())
    figures.bare_setup_s.append(setup_s)


async def _one_job(work: Workload, launcher: ForkServerLauncher, root: Path, i: int,
                   figures: Figures) -> None:
    metrics, clock, startup_s = await run_as_job(work, launcher, root, f"{work.name}-job-{i}")
    figures.job.append(float(metrics["samples_per_s"]))
    figures.job_windows.extend(clock.window_rates())
    figures.job_startup_s.append(startup_s)
    if "startup_s" in metrics:
        figures.job_runtime_setup_s.append(float(metrics["startup_s"]))
    if "start_latency_ms" in metrics:
        figures.job_process_start_ms.append(float(metrics["start_latency_ms"]))


# -- report ---------------------------------------------------------------------------

def _rates(values: list[float]) -> str:
    return "  ".join(f"{v:>9,.0f}" for v in values)


def p90(values: list[float]) -> float:
    """The 90th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def _median(values: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    return format(statistics.median(values) * scale, fmt) if values else "n/a"


def print_workload(work: Workload, fig: Figures) -> None:
    print(f"{work.name}: {work.describe}")
    if fig.error is not None:
        print(f"  FAILED: {fig.error}")
        return
    for label, rates, windows in (("bare in-process", fig.bare, fig.bare_windows),
                                  ("job via agent  ", fig.job, fig.job_windows)):
        print(f"  {label} samples/s: {_rates(rates)}  -> median {statistics.median(rates):>9,.0f}"
              f"  | p90 of {len(windows):3d} windows {p90(windows):>9,.0f}")
    runtime_setup = (f", runtime set-up (startup_s) {_median(fig.job_runtime_setup_s)} s"
                     if fig.job_runtime_setup_s else "")
    print(f"  job start-up, not in samples/s: request -> first {work.loop_stage!r} progress "
          f"{_median(fig.job_startup_s)} s median (process start "
          f"{_median(fig.job_process_start_ms, fmt='.1f')} ms{runtime_setup}); "
          f"bare set-up {_median(fig.bare_setup_s)} s", flush=True)


def ratio_line(work: Workload, fig: Figures) -> str:
    """One line: job/bare on the runtime's samples/s and on the median window, vs target."""
    if fig.error is not None or not fig.bare or not fig.job:
        return f"ratio {work.name:16s}: n/a (did not run)"
    ratio = statistics.median(fig.job) / statistics.median(fig.bare)
    windowed = p90(fig.job_windows) / p90(fig.bare_windows)

    def verdict(value: float) -> str:
        return "meets target" if value >= TARGET else "BELOW target"

    return (f"ratio {work.name:16s}: job/bare {ratio:.3f}x on samples/s ({verdict(ratio)}), "
            f"{windowed:.3f}x on the p90 window ({verdict(windowed)}); "
            f"target >= {TARGET}x, median of {len(fig.job)} runs each")


async def bench(device: str, mode: str, repeat: int, root: Path) -> list[tuple[Workload,
                                                                                Figures]]:
    sizes = SIZES[(device, mode)]
    launcher = ForkServerLauncher()
    try:
        t0 = time.perf_counter()
        await launcher.start()  # a daemon keeps it warm; its start is not any job's
        print(f"fork server ready in {time.perf_counter() - t0:.2f} s (once per agent; "
              f"preload {launcher.info.get('preload_s')} s)", flush=True)
        (root / "data").mkdir()
        makers: list[Callable[[], Workload]] = [
            lambda: training_workload(sizes, device),
            lambda: inference_workload(sizes, device, root / "data")]
        results = []
        for make in makers:
            work = make()
            try:
                fig = await measure(work, launcher, root, repeat)
            except Exception as exc:  # report it and go on to the next workload
                fig = Figures(error=f"{type(exc).__name__}: {exc}")
            print_workload(work, fig)
            results.append((work, fig))
    finally:
        await launcher.close()
    return results


def _device_note(device: str) -> str:
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
        return (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}, precision auto (bf16 where supported)")
    return f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, fp32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter loops (about a minute)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes, one run each: a smoke test of the harness, "
                             "not a figure")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs of each kind (default 3, 5 in full, 1 with --tiny)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    repeat = max(1, args.repeat or {"tiny": 1, "quick": 3, "full": 5}[mode])
    print(f"== runtime throughput: bare in-process vs job via the agent "
          f"({args.device}, {mode}, median of {repeat}) ==")
    if mode == "tiny":
        print("tiny: a check of the harness; the figures and ratios mean nothing at this size")
    print(f"device: {_device_note(args.device)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        results = asyncio.run(bench(args.device, mode, repeat, Path(tmp)))
    print("-- summary --")
    for work, fig in results:
        print(ratio_line(work, fig))
    return 1 if any(fig.error is not None for _, fig in results) else 0


if __name__ == "__main__":
    sys.exit(main())
