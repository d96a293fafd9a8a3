"""Runtime throughput: a job through the real daemon against a fresh bare process.

    python -m benchmarks.bench_runtimes [--quick | --tiny] [--device cpu|cuda] [--repeat N]

For each workload (the ``training`` runtime on an MLP, the ``batch_inference``
runtime on a built-in MLP over a safetensors input file), each pair runs:

- bare: a NEW ``python`` process (this interpreter, the environment a job gets: scrubbed,
  ``PYTHONHASHSEED=0``, the same GPU) that calls the runtime's ``run(ctx)`` on the same
  payload (model, data, steps), as the job's process does (after the same allocator
  set-up, ``runtimes.host.tune_allocator``), with an events channel that goes nowhere;
  no agent, no pipes, no sandbox;
- job: the same payload submitted over HTTP to the reference coordinator (a separate
  process), run by the real daemon (``miner-agent run``, a separate process: default
  config, fork server, sandbox on where bubblewrap exists, one slot), read back from
  the package's ``output.json``. While the job runs, the benchmark's client looks at
  its status every 0.25 s (``WAIT_POLL_S``): at a look every 20 ms, the client's and the
  coordinator's CPU for those calls came out of the job's share of a small host.

The figure on both sides is the runtime's own ``samples_per_s``, which times the loop
only (training: first to last step; batch inference: first batch to the last part
written): start-up (a fresh process imports torch, a forked job does not) is printed
apart, never in the ratio. Pairs alternate their order (bare first, then job first) so
that a drift in the machine's load does not land on one side; each pair gives one
ratio job/bare, and the median of those ratios is the figure (target >= 0.99x), with
quartiles and range; with 20 pairs or more, also the 5th percentile (the slow tail of
a ratio where higher is better). One bare run and one job run (the fork server's
first) go first and are not counted.

Both sides get the same torch thread count (``OMP_NUM_THREADS`` passes to jobs), but
the job runs in a cgroup of its own where the node has one, the bare process in the
benchmark's: on a busy machine with more torch threads than idle cores, CPU training
swung 10x either way between the two here (a 2-core machine shared with other work),
so judge the ratio on an otherwise idle machine. Benchmarks never fail a build: a
ratio below target is printed; only a run that does not complete makes the exit
status non-zero.
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
from typing import Any

import httpx

from agent.execution.environment import scrubbed_environ
from benchmarks.loopback import KEYS, Coordinator, stop

TARGET = 0.99
P95_MIN_PAIRS = 20
WARMUP_STEPS = 20
RUN_TIMEOUT_S = 1800
WAIT_POLL_S = 0.25  # how often the client looks at a running job's status

# The bare side, in a fresh interpreter: what runtimes.host.run_spec does, minus the agent.
BARE_CODE = """
import json, os, sys, time
from pathlib import Path
from runtimes.base import EventChannel, JobContext
from runtimes.host import tune_allocator
from runtimes.registry import load, resolve_path
spec = json.loads(Path(sys.argv[1]).read_text())
tune_allocator()
ctx = JobContext({"job_id": spec["job_id"], "payload": spec["payload"]},
                 Path(spec["package_dir"]), Path(spec["work_dir"]), EventChannel(None))
load(resolve_path(spec["payload"]["type"]))(ctx)
Path(spec["result"]).write_text(json.dumps(ctx.metrics))
sys.stdout.flush()
os._exit(0)
"""


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
# big enough that the GPU, not Python, sets the pace, with a checkpoint and an input
# file kept to a few hundred MB.
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
    """One runtime with one payload (and a short one to warm up with)."""

    name: str
    describe: str
    payload: dict[str, Any]
    warmup_payload: dict[str, Any]


@dataclass
class Run:
    """One run's figures: the runtime's samples/s, its own set-up, and the wall time."""

    samples_per_s: float
    startup_s: float | None
    wall_s: float


@dataclass
class Figures:
    """Pairs of (bare, job) runs of one workload."""

    pairs: list[tuple[Run, Run]] = field(default_factory=list)
    error: str | None = None

    def ratios(self) -> list[float]:
        return [job.samples_per_s / bare.samples_per_s for bare, job in self.pairs]


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
                    f"{sizes.train_steps} steps", payload, {**payload, "steps": WARMUP_STEPS})


def inference_workload(sizes: Sizes, device: str, data: Path) -> Workload:
    """Writes the weights and inputs under ``data`` (in the agent's cache dir: jobs in
    the sandbox read it, read-only); a fresh process, so this one never imports torch."""
    data.mkdir(parents=True, exist_ok=True)
    config = {"in_features": sizes.infer_features, "out_features": 10,
              "hidden": sizes.infer_hidden}
    total = sizes.infer_batch * sizes.infer_batches
    subprocess.run([sys.executable, "-c", _WRITE_INFERENCE_DATA, str(data), json.dumps(config),
                    str(total), str(sizes.infer_batch * WARMUP_STEPS)], check=True)
    payload: dict[str, Any] = {
        "type": "batch_inference", "device": device, "seed": 0,
        "model": {"format": "builtin", "arch": "mlp", "config": config,
                  "weights": {"uri": str(data / "weights.safetensors")}},
        "inputs": {"uri": str(data / "inputs.safetensors")},
        "batch_size": sizes.infer_batch, "batches_per_part": 32}
    widths = "-".join(str(w) for w in [sizes.infer_features, *sizes.infer_hidden])
    mib = total * sizes.infer_features * 4 / (1 << 20)
    return Workload("batch_inference", f"builtin mlp {widths}->10, batch {sizes.infer_batch}, "
                    f"{sizes.infer_batches} batches ({mib:.0f} MiB of inputs)", payload,
                    {**payload, "inputs": {"uri": str(data / "warmup.safetensors")}})


_WRITE_INFERENCE_DATA = """
import json, sys, torch
from safetensors.torch import save_file
from runtimes.models import build_model
data, config, total, warm = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
save_file(build_model("mlp", config).state_dict(), f"{data}/weights.safetensors")
inputs = torch.randn(total, config["in_features"])
save_file({"inputs": inputs}, f"{data}/inputs.safetensors")
save_file({"inputs": inputs[:warm].clone()}, f"{data}/warmup.safetensors")
"""


# -- the two sides ------------------------------------------------------------------

class Daemon:
    """`miner-agent run` in its own process against ``coord``; one slot, default config."""

    def __init__(self, root: Path, coord: Coordinator, device: str, sandbox: str,
                 launcher: str = "auto") -> None:
        self.coord = coord
        self.device = device
        self.state = root / "state"
        self.cache = root / "cache"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
        env.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_STATE_DIR": str(self.state),
                    "MINER_AGENT_CACHE_DIR": str(self.cache),
                    "MINER_AGENT_API_KEY": KEYS["miner"], "MINER_AGENT_CPU_SLOTS": "1",
                    "MINER_AGENT_SANDBOX": sandbox, "MINER_AGENT_LAUNCHER": launcher,
                    # between pairs the agent idles while the bare run goes: come back soon
                    "MINER_AGENT_POLL_MAX_INTERVAL_S": "0.5"})
        if device == "cuda":
            env["MINER_AGENT_GPUS"] = "0"
        root.mkdir(parents=True)
        self.log_path = root / "agent.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--coordinator",
                                      coord.url], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def run(self, payload: dict[str, Any]) -> Run:
        constraints: dict[str, Any] = {"timeout_s": RUN_TIMEOUT_S}
        if self.device == "cuda":
            constraints["gpu_count"] = 1
        resp = self.coord.http.post("/v1/jobs", json={"payload": payload,
                                                      "constraints": constraints})
        resp.raise_for_status()
        job_id = str(resp.json()["job_id"])
        output = self._output(job_id, self._wait(job_id))
        metrics = output["metrics"]
        wall = _epoch(output["finished_at"]) - _epoch(output["started_at"])
        shutil.rmtree(self.state / "jobs" / f"job_{job_id}", ignore_errors=True)
        return Run(float(metrics["samples_per_s"]), metrics.get("startup_s"), wall)

    def _wait(self, job_id: str) -> str:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            status = self.coord.http.get(f"/v1/jobs/{job_id}").json()["status"]
            if status in ("completed", "failed", "canceled", "timed_out"):
                return str(status)
            # Seldom: each look costs the client and the coordinator CPU that the job,
            # on a small host, would otherwise have (the bare side is waited on for free).
            # The figure is the runtime's own samples/s, which the wait does not touch.
            time.sleep(WAIT_POLL_S)
        raise RuntimeError(f"job {job_id} did not finish; see {self.log_path}")

    def _output(self, job_id: str, status: str) -> dict[str, Any]:
        path = self.state / "jobs" / f"job_{job_id}" / "output.json"
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        output: dict[str, Any] = json.loads(path.read_text())
        if status != "completed":
            stderr = path.parent / "logs" / "stderr.log"
            tail = stderr.read_text(errors="replace")[-1500:] if stderr.exists() else ""
            raise RuntimeError(f"job {job_id} {status}: {output.get('error')}\n{tail}")
        return output

    def fork_server_note(self) -> str:
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "fork server ready in" in line:
                return line.split("agent.execution.launcher: ", 1)[-1]
        return "fork server: not started (yet)"

    def close(self) -> None:
        stop(self.proc, 60)
        self.log.close()


def run_bare(payload: dict[str, Any], root: Path, device: str) -> Run:
    """The runtime's loop in a fresh ``python`` process, no agent."""
    scratch = Path(tempfile.mkdtemp(prefix="bare-", dir=root))
    spec = {"job_id": "bare", "payload": payload, "package_dir": str(scratch / "package"),
            "work_dir": str(scratch / "work"), "result": str(scratch / "metrics.json")}
    for folder in ("package", "work"):
        (scratch / folder).mkdir()
    (scratch / "spec.json").write_text(json.dumps(spec))
    env = {**scrubbed_environ(os.environ), "PYTHONHASHSEED": "0"}
    env["CUDA_VISIBLE_DEVICES"] = "0" if device == "cuda" else ""
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # index 0 is the daemon's GPU 0 (NVML order)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BARE_CODE, str(scratch / "spec.json")],
                          cwd=scratch / "work", env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"bare run exit {done.returncode}:\n{done.stderr[-1500:]}")
    metrics = json.loads((scratch / "metrics.json").read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    return Run(float(metrics["samples_per_s"]), metrics.get("startup_s"), wall)


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


# -- measuring and reporting ----------------------------------------------------------

def measure(work: Workload, daemon: Daemon, root: Path, device: str, repeat: int) -> Figures:
    """One uncounted run of each side, then ``repeat`` pairs, alternating which goes first."""
    run_bare(work.warmup_payload, root, device)
    daemon.run(work.warmup_payload)
    figures = Figures()
    for i in range(repeat):
        if i % 2 == 0:
            bare = run_bare(work.payload, root, device)
            job = daemon.run(work.payload)
        else:
            job = daemon.run(work.payload)
            bare = run_bare(work.payload, root, device)
        figures.pairs.append((bare, job))
        print(f"  pair {i + 1}: bare {bare.samples_per_s:,.0f}  job {job.samples_per_s:,.0f} "
              f"samples/s  -> {job.samples_per_s / bare.samples_per_s:.3f}x", flush=True)
    return figures


def spread(values: list[float]) -> str:
    """Median, quartiles and range; p95 only from ``P95_MIN_PAIRS`` values."""
    ordered = sorted(values)
    text = f"median {statistics.median(ordered):.3f}x"
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
        text += f", quartiles {q1:.3f}-{q3:.3f}"
    text += f", range {ordered[0]:.3f}-{ordered[-1]:.3f}"
    if len(ordered) >= P95_MIN_PAIRS:
        text += f", 5th percentile {ordered[round(0.05 * (len(ordered) - 1))]:.3f}"
    return text + f" (n={len(ordered)} pairs)"


def _median(values: list[float | None], fmt: str = ".2f") -> str:
    known = [v for v in values if v is not None]
    return format(statistics.median(known), fmt) if known else "n/a"


def print_workload(work: Workload, fig: Figures) -> None:
    if fig.error is not None:
        print(f"  FAILED: {fig.error}")
        return
    for label, side in (("bare fresh process", 0), ("job via daemon    ", 1)):
        runs = [pair[side] for pair in fig.pairs]
        rates = "  ".join(f"{r.samples_per_s:,.0f}" for r in runs)
        print(f"  {label} samples/s: {rates}  -> median "
              f"{statistics.median(r.samples_per_s for r in runs):,.0f}")
    bare = [p[0] for p in fig.pairs]
    job = [p[1] for p in fig.pairs]
    print(f"  start-up, not in samples/s: runtime set-up (startup_s) bare "
          f"{_median([r.startup_s for r in bare])} s, job {_median([r.startup_s for r in job])} "
          f"s; wall: bare process {_median([r.wall_s for r in bare])} s (with torch's "
          f"import), job started->finished {_median([r.wall_s for r in job])} s", flush=True)


def ratio_line(work: Workload, fig: Figures) -> str:
    if fig.error is not None or not fig.pairs:
        return f"ratio {work.name:16s}: n/a (did not run)"
    ratios = fig.ratios()
    verdict = "meets target" if statistics.median(ratios) >= TARGET else "BELOW target"
    return (f"ratio {work.name:16s}: job/bare per pair {spread(ratios)}: {verdict} "
            f"(target >= {TARGET}x)")


def bench(device: str, mode: str, repeat: int, root: Path,
          sandbox: str, launcher: str = "auto") -> list[tuple[Workload, Figures]]:
    sizes = SIZES[(device, mode)]
    coord = Coordinator(root / "coord")
    daemon = Daemon(root / "agent", coord, device, sandbox, launcher)
    results = []
    try:
        works = [lambda: training_workload(sizes, device),
                 lambda: inference_workload(sizes, device, daemon.cache / "bench-data")]
        for make in works:
            work = make()
            print(f"{work.name}: {work.describe}", flush=True)
            try:
                fig = measure(work, daemon, root, device, repeat)
            except (RuntimeError, OSError, KeyError, ValueError, httpx.HTTPError,
                    subprocess.SubprocessError) as exc:
                fig = Figures(error=f"{type(exc).__name__}: {exc}")
            print_workload(work, fig)
            results.append((work, fig))
        print(daemon.fork_server_note())
    finally:
        daemon.close()
        coord.close()
    return results


def _device_note(device: str) -> str:
    """What the bare side will run on, asked of a fresh process (this one stays torch-free)."""
    code = ("import torch, json; c = torch.cuda.is_available(); print(json.dumps([c, "
            "torch.cuda.get_device_name(0) if c else '', torch.__version__, "
            "torch.version.cuda, torch.get_num_threads()]))")
    cuda, name, version, cuda_version, threads = json.loads(subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    if device == "cuda":
        if not cuda:
            raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
        return f"{name}, torch {version}, CUDA {cuda_version}, precision auto"
    return f"{threads} torch threads, torch {version}, fp32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter loops (a few minutes)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes, one pair each: a smoke test of the harness, "
                             "not a figure")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeat", type=int, default=None,
                        help="pairs per workload (default 5, 9 in full, 1 with --tiny)")
    parser.add_argument("--sandbox", choices=("on", "off"), default=None,
                        help="the daemon's sandbox (default: on where bubblewrap exists)")
    parser.add_argument("--launcher", choices=("auto", "forkserver", "spawn"), default="auto",
                        help="how the daemon starts jobs (spawn: a fresh interpreter per "
                             "job, to tell the fork server's share of a gap apart)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    repeat = max(1, args.repeat or {"tiny": 1, "quick": 5, "full": 9}[mode])
    sandbox = args.sandbox or ("on" if shutil.which("bwrap") else "off")
    print(f"== runtime throughput: job via the real daemon vs a fresh bare process "
          f"({args.device}, {mode}, {repeat} pairs, sandbox {sandbox}, "
          f"launcher {args.launcher}) ==")
    print("method: per pair, a fresh `python` running the runtime's run(ctx) (bare) and the "
          "same payload submitted to `miner-agent run` via the reference coordinator (job), "
          f"order alternating, the client looking at a running job every {WAIT_POLL_S} s; "
          "figure: the runtime's samples/s (loop only); ratio job/bare "
          f"per pair, median with quartiles and range; target >= {TARGET}x")
    if mode == "tiny":
        print("tiny: a check of the harness; the figures and ratios mean nothing at this size")
    print(f"device: {_device_note(args.device)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        results = bench(args.device, mode, repeat, Path(tmp), sandbox, args.launcher)
    print("-- summary --")
    for work, fig in results:
        print(ratio_line(work, fig))
    return 1 if any(fig.error is not None for _, fig in results) else 0


if __name__ == "__main__":
    sys.exit(main())
