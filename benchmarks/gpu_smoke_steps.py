"""The steps of ``benchmarks/gpu_smoke.sh`` that need more than a one-liner, one function each.

    python -m benchmarks.gpu_smoke_steps STEP --out DIR --work DIR [--device cuda|cpu]

Each step prints one ``PASS``/``FAIL`` line per check (``NOTE`` for what is worth
knowing but proves nothing), a last ``FIGURE:`` line for the summary table, writes its
figures to ``OUT/figures/NAME.json``, and exits 0 when every check passed, 1 when one
failed and 77 when the step does not apply here (SKIP). ``figures`` merges them all.

This process plays the agent: it never imports torch and never touches CUDA (NVML makes
no CUDA context); a CPU-only child makes the input files of the inference job.
``--device cpu`` runs the job steps on the CPU, to try the harness on a machine without
a GPU: the GPU-only checks then say what they would have checked.

One file on purpose (the smoke's one helper), past the usual 500 lines: a section per
step, each reading top to bottom. Split the job steps (2, 5, 7, 8) out if it grows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.errors import CancelReason, Outcome
from agent.execution.environment import scrubbed_environ
from agent.execution.executor import ExecutorConfig, JobReport, JobRun
from agent.execution.isolation import build_isolation
from agent.execution.launcher import ForkServerLauncher
from agent.jobs import Job
from agent.layout import log_path

ROOT = Path(__file__).resolve().parents[1]
EXIT_SKIP = 77
MIB, GIB = 1 << 20, 1 << 30
BF16_COMPILE: dict[str, Any] = {
    "type": "training", "precision": "bf16", "compile": True, "seed": 1, "steps": 300,
    "model": {"arch": "mlp", "config": {"hidden": [1024, 1024]}}, "batch_size": 256,
    "dataset": {"synthetic": {"kind": "classification", "samples": 8192, "features": 256,
                              "classes": 10}}}
FP16_SCALER: dict[str, Any] = {
    "type": "training", "precision": "fp16", "seed": 2, "steps": 300, "batch_size": 128,
    "model": {"arch": "cnn", "config": {"channels": [32, 64]}},
    "dataset": {"synthetic": {"kind": "images", "samples": 4096, "channels": 3, "size": 32,
                              "classes": 10}}}
INFER_MLP = {"in_features": 512, "out_features": 16, "hidden": [2048, 2048]}
INFER_SAMPLES = 32768
# Compile fell back to eager, or a kernel build failed: the job still completes, so look.
COMPILE_TROUBLE = re.compile(r"torch\.compile failed|Backend compiler failed|WON'T CONVERT|"
                             r"Traceback|CalledProcessError")


class Checks:
    """The PASS/FAIL lines and the figures of one step."""

    def __init__(self) -> None:
        self.failed = 0
        self.figures: dict[str, Any] = {}
        self.headline = ""
        self._noted: set[str] = set()

    def __call__(self, ok: bool, what: str) -> bool:
        self.failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {what}", flush=True)
        return ok

    def note(self, what: str) -> None:
        if what not in self._noted:  # once per step, however many jobs show it
            self._noted.add(what)
            print(f"  NOTE  {what}", flush=True)


@dataclass(frozen=True)
class Options:
    out: Path
    work: Path
    device: str  # "cuda", or "cpu" to try the harness without a GPU
    sandbox: str  # "on" or "off" (forkserver)
    limit_s: float  # what the step may spend on its slowest wait

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML names it."""

    index: int
    uuid: str
    name: str
    minor: int | None
    memory_bytes: int


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def list_gpus() -> list[Gpu]:
    import pynvml

    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            try:
                minor: int | None = int(pynvml.nvmlDeviceGetMinorNumber(h))
            except pynvml.NVMLError:
                minor = None
            gpus.append(Gpu(i, _text(pynvml.nvmlDeviceGetUUID(h)),
                            _text(pynvml.nvmlDeviceGetName(h)), minor,
                            int(pynvml.nvmlDeviceGetMemoryInfo(h).total)))
        return gpus
    finally:
        pynvml.nvmlShutdown()


# -- 1. NVML ------------------------------------------------------------------------------

def step_nvml(opts: Options, c: Checks) -> int | None:
    """NVML's raw units are sane, the agent's telemetry agrees, nvidia-smi agrees."""
    if not opts.cuda:
        print("SKIP: NVML has no GPU to read on the CPU")
        return EXIT_SKIP
    import pynvml

    from agent.node.telemetry import Telemetry

    pynvml.nvmlInit()
    try:
        raw = [_nvml_raw(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
        c.figures["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        c.figures["cuda_driver"] = pynvml.nvmlSystemGetCudaDriverVersion()
    finally:
        pynvml.nvmlShutdown()
    c.figures["gpus"] = raw
    c(bool(raw), f"NVML sees {len(raw)} GPU(s), driver {c.figures['driver']}")
    for g in raw:
        _check_units(c, g)
    _compare_smi(c, raw)
    with Telemetry() as telemetry:
        inventory, sample = telemetry.inventory(), telemetry.sample()
    c.figures["telemetry"] = sample["gpus"]
    c([i.uuid for i in inventory] == [g["uuid"] for g in raw],
      "the agent's telemetry lists the same GPUs in the same order")
    for info, g, s in zip(inventory, raw, sample["gpus"], strict=False):
        c(info.memory_total_mb == (g["memory_total_bytes"] or 0) // MIB
          and info.minor == g["minor"],
          f"gpu{g['index']} telemetry: {info.memory_total_mb} MiB, /dev/nvidia{info.minor}")
        power, raw_w = s.get("power_w"), (g["power_mw"] or 0) / 1000
        c(_within(power, 10, 1500) and abs(power - raw_w) < 150,
          f"gpu{g['index']} telemetry power_w {power} W (raw {g['power_mw']} mW)")
    first = raw[0] if raw else {}
    c.headline = (f"{len(raw)}x {first.get('name')}, "
                  f"{(first.get('memory_total_bytes') or 0) / GIB:.0f} GiB, "
                  f"{(first.get('power_mw') or 0) / 1000:.0f} W, {first.get('temp_c')} C")
    return None


def _nvml_raw(nvml: Any, index: int) -> dict[str, Any]:
    h = nvml.nvmlDeviceGetHandleByIndex(index)

    def read(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(h, *args)
        except nvml.NVMLError:  # not supported here: the check on it fails, not the step
            return None

    mem, util = read(nvml.nvmlDeviceGetMemoryInfo), read(nvml.nvmlDeviceGetUtilizationRates)
    return {"index": index, "uuid": _text(nvml.nvmlDeviceGetUUID(h)),
            "name": _text(nvml.nvmlDeviceGetName(h)),
            "minor": read(nvml.nvmlDeviceGetMinorNumber),
            "memory_total_bytes": mem.total if mem else None,
            "memory_used_bytes": mem.used if mem else None,
            "power_mw": read(nvml.nvmlDeviceGetPowerUsage),
            "power_limit_mw": read(nvml.nvmlDeviceGetEnforcedPowerLimit),
            "temp_c": read(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
            "util_gpu_pct": util.gpu if util else None,
            "util_mem_pct": util.memory if util else None}


def _within(value: Any, lo: float, hi: float) -> bool:
    return isinstance(value, (int, float)) and lo <= value <= hi


def _check_units(c: Checks, g: dict[str, Any]) -> None:
    i, total, used = g["index"], g["memory_total_bytes"], g["memory_used_bytes"]
    c(_within(total, GIB + 1, 200 * GIB - 1) and _within(used, 0, total or 0),
      f"gpu{i} memory {(total or 0) / GIB:.1f} GiB total, {(used or 0) / GIB:.2f} used "
      "(NVML bytes: 1 < total < 200 GiB)")
    power, limit = g["power_mw"], g["power_limit_mw"]
    c(_within(power, 10_000, 1_500_000) and _within(limit, 10_000, 1_500_000),
      f"gpu{i} power {power} mW, limit {limit} mW (NVML mW: 10-1500 W)")
    c(_within(g["temp_c"], 10, 100), f"gpu{i} temperature {g['temp_c']} C (10-100)")
    c(_within(g["util_gpu_pct"], 0, 100) and _within(g["util_mem_pct"], 0, 100),
      f"gpu{i} utilisation {g['util_gpu_pct']} % gpu, {g['util_mem_pct']} % memory (0-100)")


def _compare_smi(c: Checks, raw: list[dict[str, Any]]) -> None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        c(False, f"nvidia-smi --query-gpu answered: {exc}")
        return
    rows = [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]
    c.figures["nvidia_smi"] = rows
    c(len(rows) == len(raw), f"nvidia-smi lists {len(rows)} GPU(s), NVML {len(raw)}")
    for row, g in zip(rows, raw, strict=False):
        mib = float(row[3]) if len(row) > 3 and row[3].replace(".", "").isdigit() else -1.0
        nvml_mib = (g["memory_total_bytes"] or 0) / MIB
        c(row[:3] == [str(g["index"]), g["uuid"], g["name"]] and abs(mib - nvml_mib) <= 0.02 *
          nvml_mib, f"gpu{g['index']} nvidia-smi {row} matches NVML ({nvml_mib:.0f} MiB)")


# -- running jobs as the agent does --------------------------------------------------------

class Runner:
    """Jobs through the agent's executor and fork server, the node sandbox on or off."""

    def __init__(self, root: Path, sandbox_on: bool) -> None:
        self.iso = build_isolation(sandbox_on=sandbox_on, jobs_root=root / "jobs",
                                   work_root=root / "work", hidden=[])
        self.root = root
        self.cfg = ExecutorConfig(root / "jobs", work_root=root / "work", cancel_grace_s=60,
                                  make_zip=False, keep_work_dir=True, sandbox=self.iso.sandbox,
                                  cgroups=self.iso.cgroups, cgroup_note=self.iso.cgroup_note,
                                  limits=self.iso.limits)
        env = scrubbed_environ(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self.launcher = ForkServerLauncher(env, sandbox=self.iso.sandbox)

    def work_dir(self, job_id: str) -> Path:
        return self.root / "work" / job_id

    def job(self, job_id: str, payload: dict[str, Any], gpus: list[Gpu],
            timeout_s: float = 300) -> JobRun:
        job = Job.from_dict({"job_id": job_id, "payload": payload,
                             "constraints": {"timeout_s": timeout_s, "gpu_count": len(gpus)}})
        nodes = [f"/dev/nvidia{g.minor}" for g in gpus if g.minor is not None]
        return JobRun(job, self.cfg, self.launcher, gpu_ids=[g.uuid for g in gpus] or None,
                      gpu_names=[g.name for g in gpus],
                      gpu_devices=nodes if gpus and len(nodes) == len(gpus) else None)

    async def close(self) -> None:
        await self.launcher.close()
        self.iso.close()


def job_gpus(opts: Options, count: int) -> list[Gpu]:
    return list_gpus()[:count] if opts.cuda else []


def for_device(payload: dict[str, Any], opts: Options) -> dict[str, Any]:
    """The payload on this step's device (short and eager on the CPU: a harness check)."""
    if opts.cuda:
        return {**payload, "device": "cuda"}
    steps = min(int(payload.get("steps", 20)), 20)
    return {**payload, "device": "cpu", "steps": steps, "compile_backend": "eager"}


def check_job(c: Checks, name: str, report: JobReport, opts: Options,
              precision: str | None = None) -> dict[str, Any]:
    """Completed, on the expected device (and precision); its figures."""
    out = report.output
    metrics, env = out.get("metrics") or {}, out.get("environment") or {}
    device = metrics.get("device") or {}
    duration = metrics.get("duration_ms")
    figures = {"outcome": report.outcome.value, "error": out.get("error"),
               "device": device.get("kind"), "names": device.get("names"),
               "precision": device.get("precision"), "notes": device.get("notes"),
               "duration_s": round(duration / 1000, 2) if duration else None,
               "samples_per_s": metrics.get("samples_per_s"),
               "peak_cuda_allocated_mb": metrics.get("peak_cuda_allocated_mb"),
               "start_latency_ms": metrics.get("start_latency_ms"),
               "environment_device": env.get("device"),
               "cuda_visible_devices": env.get("cuda_visible_devices"),
               "isolation": (env.get("isolation") or {}).get("sandbox")}
    c.figures[name] = figures
    if not c(report.outcome is Outcome.COMPLETED,
             f"{name}: {figures['outcome']} in {figures['duration_s']} s {out.get('error') or ''}"):
        _print_tail(report)
    want = "cuda" if opts.cuda else "cpu"
    c(figures["device"] == want, f"{name}: ran on {figures['device']} {figures['names']} "
                                 f"(sandbox {figures['isolation']})")
    if precision and opts.cuda:
        c(figures["precision"] == precision, f"{name}: precision {figures['precision']}")
    if figures["environment_device"] is None:
        c.note("output.json environment.device is null although the runtime sent a "
               "device event (executor.py reads its flat fields): a regression to look at")
    return figures


def _print_tail(report: JobReport) -> None:
    if report.folder is None:
        return
    for stream in ("stderr", "stdout"):
        path = log_path(report.folder, stream)
        if path.is_file():
            tail = path.read_text(errors="replace")[-3000:]
            print(f"  --- {report.job_id} {stream} (tail) ---\n{tail}", flush=True)


# -- 2. the fork server never initialises CUDA --------------------------------------------

@dataclass
class ProcView:
    libcuda: bool
    nvidia_fds: list[str]

    @property
    def uvm(self) -> bool:
        return any(f.startswith("/dev/nvidia-uvm") for f in self.nvidia_fds)


def proc_view(pid: int) -> ProcView | None:
    """Whether ``pid`` maps libcuda and which /dev/nvidia* it holds; None if unreadable."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    fds = []
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("/dev/nvidia"):
            fds.append(target)
    return ProcView("libcuda.so" in maps, sorted(set(fds)))


def find_fork_server() -> int | None:
    """The fork server among our descendants: not bubblewrap, and not one of its jobs."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = proc.cmdline()
            if "runtimes.forkserver" in cmd and Path(cmd[0]).name != "bwrap":
                found[proc.pid] = proc.ppid()
        except psutil.Error:
            continue
    roots = [pid for pid, parent in found.items() if parent not in found]
    return roots[0] if len(roots) == 1 else None


def step_forkserver(opts: Options, c: Checks) -> int | None:
    """bf16 + compile and fp16 + GradScaler jobs; the server never maps libcuda."""
    asyncio.run(_forkserver(opts, c))
    jobs = [c.figures.get(k) or {} for k in ("bf16_compile", "fp16_scaler")]
    c.headline = (f"sandbox {opts.sandbox}: bf16+compile {jobs[0].get('duration_s')} s, "
                  f"fp16 {jobs[1].get('duration_s')} s, server libcuda "
                  f"{c.figures.get('server_libcuda')}")
    return None


async def _forkserver(opts: Options, c: Checks) -> None:
    gpus = job_gpus(opts, 1)
    runner = Runner(opts.work / f"forkserver-{opts.sandbox}", sandbox_on=opts.sandbox == "on")
    try:
        t0 = time.monotonic()
        await runner.launcher.start()
        c.figures["server_start_s"] = round(time.monotonic() - t0, 2)
        c.figures["server_info"] = runner.launcher.info
        server = find_fork_server()
        if not c(server is not None, f"fork server ready in {c.figures['server_start_s']} s "
                                     f"(pid {server}, sandbox {opts.sandbox})"):
            return
        assert server is not None
        _check_server(c, "after its preload", proc_view(server))
        payloads = {"bf16_compile": BF16_COMPILE, "fp16_scaler": FP16_SCALER}
        runs = {}
        for name, payload in payloads.items():
            job_id = f"{opts.sandbox}-{name}"
            cache = runner.work_dir(job_id) / ".cache"  # the sandbox sets these itself
            env = {"TRITON_CACHE_DIR": str(cache / "triton"),
                   "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
            runs[name] = runner.job(job_id, {**for_device(payload, opts), "env": env}, gpus)
        tasks = [asyncio.create_task(r.run()) for r in runs.values()]
        seen = await _watch(server, list(runs.values()), tasks)
        reports = dict(zip(runs, await asyncio.gather(*tasks), strict=True))
        after = proc_view(server)
        _check_watch(c, seen, opts)
        _check_server(c, "after both jobs", after)
        _check_training(c, runs, reports, opts)
    finally:
        await runner.close()


def _check_server(c: Checks, when: str, view: ProcView | None) -> None:
    if not c(view is not None, f"the fork server's /proc maps and fds are readable ({when})"):
        return
    assert view is not None
    c(not view.libcuda, f"the fork server maps no libcuda.so ({when})")
    c(not view.uvm and not view.nvidia_fds,
      f"the fork server holds no /dev/nvidia-uvm nor other NVIDIA fds ({when}: "
      f"{view.nvidia_fds or 'none'})")


async def _watch(server: int, runs: list[JobRun], tasks: list[asyncio.Task[JobReport]]
                 ) -> dict[str, Any]:
    """Sample the server (and, as a control, the jobs) every 0.1 s while the jobs run."""
    seen: dict[str, Any] = {"samples": 0, "unreadable": 0, "server_libcuda": False,
                            "server_fds": set(), "jobs_libcuda": set(), "jobs_uvm": set()}
    while not all(t.done() for t in tasks):
        view = proc_view(server)
        if view is None:
            seen["unreadable"] += 1
        else:
            seen["samples"] += 1
            seen["server_libcuda"] |= view.libcuda
            seen["server_fds"].update(view.nvidia_fds)
        for run in runs:
            job = proc_view(run.pid) if run.pid else None
            if job is not None and job.libcuda:
                seen["jobs_libcuda"].add(run.job.job_id)
            if job is not None and job.uvm:
                seen["jobs_uvm"].add(run.job.job_id)
        await asyncio.sleep(0.1)
    return seen


def _check_watch(c: Checks, seen: dict[str, Any], opts: Options) -> None:
    c.figures.update(server_samples=seen["samples"], server_libcuda=seen["server_libcuda"],
                     server_nvidia_fds=sorted(seen["server_fds"]),
                     jobs_libcuda=sorted(seen["jobs_libcuda"]), jobs_uvm=sorted(seen["jobs_uvm"]))
    c(seen["samples"] > 0 and not seen["server_libcuda"] and not seen["server_fds"],
      f"while the jobs trained: the fork server never mapped libcuda nor held an NVIDIA fd "
      f"({seen['samples']} samples, {seen['unreadable']} unreadable)")
    if opts.cuda:  # the control: the same reading does see CUDA where it is
        c(bool(seen["jobs_libcuda"]) and bool(seen["jobs_uvm"]),
          f"control: the jobs themselves mapped libcuda {sorted(seen['jobs_libcuda'])} and "
          f"held /dev/nvidia-uvm {sorted(seen['jobs_uvm'])}")
    else:
        c.note("control skipped on the CPU: on a GPU the jobs must map libcuda")


def _check_training(c: Checks, runs: dict[str, JobRun], reports: dict[str, JobReport],
                    opts: Options) -> None:
    check_job(c, "bf16_compile", reports["bf16_compile"], opts, "bf16")
    check_job(c, "fp16_scaler", reports["fp16_scaler"], opts, "fp16")
    work = runs["bf16_compile"].work_dir / ".cache"
    kernels = len(list(work.rglob("*.cubin"))) if work.is_dir() else 0
    c.figures["bf16_compile"]["cubins"] = kernels
    folder = reports["bf16_compile"].folder
    stderr = log_path(folder, "stderr").read_text(errors="replace") if folder else ""
    trouble = sorted(set(COMPILE_TROUBLE.findall(stderr)))
    c(not trouble, f"bf16_compile: no compile fallback or error in its stderr ({trouble})")
    if opts.cuda:
        c(kernels > 0, f"bf16_compile: torch.compile built {kernels} Triton kernel(s) (.cubin)")
        ckpt = reports["fp16_scaler"].folder
        meta = ckpt / "artifacts/checkpoints/step-000300/meta.json" if ckpt else None
        scale = _read_json(meta).get("scaler", {}).get("scale") if meta else None
        c.figures["fp16_scaler"]["grad_scale"] = scale
        c(isinstance(scale, (int, float)) and scale > 0,
          f"fp16_scaler: the GradScaler's scale is saved in the checkpoint ({scale})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- 5. inference on CUDA ---------------------------------------------------------------------

MAKE_INPUTS = """
import sys, numpy as np, torch
from safetensors.torch import save_file
from runtimes.models import build_model
torch.manual_seed(0)
save_file(build_model("mlp", {config!r}).state_dict(), sys.argv[1] + "/weights.safetensors")
x = np.random.default_rng(0).standard_normal(({samples}, {features})).astype("float32")
np.savez(sys.argv[1] + "/inputs.npz", inputs=x)
"""


def step_inference(opts: Options, c: Checks) -> int | None:
    """A batch_inference job over a builtin MLP, in the sandbox."""
    report = asyncio.run(_inference(opts, c))
    if report is None:
        return None
    figures = check_job(c, "inference", report, opts, "bf16")
    samples = (report.output.get("metrics") or {}).get("samples")
    c(samples == INFER_SAMPLES, f"inference: {samples} of {INFER_SAMPLES} samples, "
                                f"{figures['samples_per_s']} samples/s")
    c.headline = f"{figures['samples_per_s']} samples/s, {figures['duration_s']} s"
    return None


async def _inference(opts: Options, c: Checks) -> JobReport | None:
    runner = Runner(opts.work / "inference", sandbox_on=True)
    try:
        # In the job's own work dir, which its jail always shows it.
        data = runner.work_dir("inference") / "inputs"
        data.mkdir(parents=True, exist_ok=True)
        script = MAKE_INPUTS.format(config=INFER_MLP, samples=INFER_SAMPLES,
                                    features=INFER_MLP["in_features"])
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
        made = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", script, str(data)], env=env, timeout=120,
            capture_output=True, text=True)
        if not c(made.returncode == 0, f"inputs made on the CPU {made.stderr[-500:]}"):
            return None
        payload = {"type": "batch_inference", "batch_size": 1024, "precision": "bf16",
                   "inputs": {"uri": str(data / "inputs.npz")},
                   "model": {"format": "builtin", "arch": "mlp", "config": INFER_MLP,
                             "weights": {"uri": str(data / "weights.safetensors")}}}
        run = runner.job("inference", for_device(payload, opts), job_gpus(opts, 1))
        return await run.run()
    finally:
        await runner.close()


# -- 6. the daemon path ------------------------------------------------------------------------

def step_daemon(opts: Options, c: Checks) -> int | None:
    """`agent run` on its embedded coordinator; a coordinator-shaped job lands on the GPU."""
    state = opts.work / "daemon"
    state.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
    env.update(MINER_AGENT_CONFIG="/dev/null", MINER_AGENT_STATE_DIR=str(state),
               MINER_AGENT_CACHE_DIR=str(state / "cache"), MINER_AGENT_POLL_INTERVAL_S="0.2",
               MINER_AGENT_EMBEDDED_PORT=str(_free_port()),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    agent_log = opts.out / "logs" / "daemon-agent.log"
    agent_log.parent.mkdir(parents=True, exist_ok=True)
    with open(agent_log, "wb") as log_file:
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run"], env=env, cwd=ROOT,
                                 stdout=log_file, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            _daemon_job(opts, c, env, state, agent, agent_log)
        finally:
            _stop(c, agent)
    return None


def _daemon_job(opts: Options, c: Checks, env: dict[str, str], state: Path,
                agent: subprocess.Popen[bytes], agent_log: Path) -> None:
    t0 = time.monotonic()
    while "registered as" not in agent_log.read_text(errors="replace"):
        if agent.poll() is not None or time.monotonic() - t0 > 90:
            c(False, f"the agent registered (exit {agent.poll()}); log tail:\n"
                     f"{agent_log.read_text(errors='replace')[-3000:]}")
            return
        time.sleep(0.2)
    line = next(ln for ln in agent_log.read_text().splitlines() if "registered as" in ln)
    c(True, f"the agent registered in {time.monotonic() - t0:.1f} s: "
            f"{line[line.index('registered as'):][:140]}")
    gpus = list_gpus() if opts.cuda else []
    constraints = _coordinator_constraints(gpus)
    payload = {k: v for k, v in BF16_COMPILE.items() if k not in ("compile", "precision")}
    job_file = opts.work / "daemon-job.json"
    job_file.write_text(json.dumps({"payload": {**payload, "steps": 200 if opts.cuda else 10},
                                    "constraints": constraints}))
    print(f"  submitting a training job with constraints {constraints} (no gpu_count)")
    t1 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "agent", "submit", str(job_file), "--wait"],
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=max(30.0, opts.limit_s - (t1 - t0) - 40))
    c.figures["submit_to_end_s"] = round(time.monotonic() - t1, 2)
    job_id = (done.stdout.splitlines() or ["?"])[0].strip()
    c(done.returncode == 0, f"submit --wait: exit {done.returncode} after "
                            f"{c.figures['submit_to_end_s']} s (job {job_id})\n{done.stdout[-800:]}"
                            f"{done.stderr[-800:] if done.returncode else ''}")
    output = _read_json(state / "jobs" / f"job_{job_id}" / "output.json")
    _check_daemon_output(c, output, opts)


def _coordinator_constraints(gpus: list[Gpu]) -> dict[str, Any]:
    """What the real coordinator sends: a GPU model, VRAM in GB and a CUDA major; no count."""
    import pynvml

    if not gpus:
        return {"timeout_s": 120}
    pynvml.nvmlInit()
    try:
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion()) // 1000  # 12080 is CUDA 12.8
    finally:
        pynvml.nvmlShutdown()
    # A substring of the name NVML gives (the scheduler's rule, spaces and case aside):
    # "H200" of "NVIDIA H200". The spec table's key ("H200 SXM") is no substring of it.
    return {"gpu": gpus[0].name.removeprefix("NVIDIA ").strip() or gpus[0].name,
            "min_vram_gb": 16, "cuda": str(cuda), "timeout_s": 300}


def _check_daemon_output(c: Checks, output: dict[str, Any], opts: Options) -> None:
    env, metrics = output.get("environment") or {}, output.get("metrics") or {}
    device = env.get("device") or metrics.get("device") or {}
    visible = env.get("cuda_visible_devices")
    duration = metrics.get("duration_ms")
    c.figures.update(status=output.get("status"), cuda_visible_devices=visible,
                     device=device.get("kind"), gpus=env.get("gpus"),
                     duration_s=round(duration / 1000, 2) if duration else None,
                     isolation=env.get("isolation"))
    c(output.get("status") == "completed", f"output.json status {output.get('status')} "
                                           f"{output.get('error') or ''}")
    if opts.cuda:
        c(bool(visible), f"environment.cuda_visible_devices {visible!r} is not empty")
        c(device.get("kind") == "cuda", f"the job ran on {device.get('kind')} "
                                        f"({device.get('names')}, {device.get('reason')})")
    if env.get("device") is None:
        c.note("output.json environment.device is null although the runtime sent a "
               "device event (executor.py reads its flat fields): a regression to look at")
    c.headline = (f"{c.figures['device']} via CUDA_VISIBLE_DEVICES={visible}, "
                  f"{c.figures['submit_to_end_s']} s submit to end")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(c: Checks, agent: subprocess.Popen[bytes]) -> None:
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
    try:
        code = agent.wait(30)
        c(code == 0, f"the agent stopped on SIGTERM (exit {code})")
    except subprocess.TimeoutExpired:
        c(False, "the agent did not stop within 30 s of SIGTERM; killed")
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()


# -- 7. cancel frees VRAM ------------------------------------------------------------------------

def step_cancel(opts: Options, c: Checks) -> int | None:
    """Cancel a job holding GiBs of VRAM; NVML shows them released, and how soon."""
    if not opts.cuda:
        print("SKIP: the cancel check reads device memory through NVML")
        return EXIT_SKIP
    asyncio.run(_cancel(opts, c))
    c.headline = (f"released {c.figures.get('cancel_to_release_s')} s after the cancel "
                  f"({c.figures.get('exit_to_release_s')} s after exit), "
                  f"peak {c.figures.get('peak_mib')} MiB")
    return None


async def _cancel(opts: Options, c: Checks) -> None:
    from benchmarks.gpu_cancel_check import MARGIN_MIB, PAYLOAD, wait_mid_run
    from benchmarks.gpu_cancel_check import Gpu as NvmlGpu

    nvml = NvmlGpu(0)
    runner = Runner(opts.work / "cancel", sandbox_on=True)
    try:
        await runner.launcher.start()
        baseline = nvml.used_mib()
        run = runner.job("cancel-vram", PAYLOAD, job_gpus(opts, 1), timeout_s=600)
        task = asyncio.create_task(run.run())
        peak = await wait_mid_run(run, task, nvml, baseline, min(180, opts.limit_s / 2))
        c.figures.update(baseline_mib=round(baseline), peak_mib=round(peak))
        if not c(peak >= 1024 and not task.done(), f"the job trains holding {peak:,.0f} MiB "
                                                   f"over the baseline {baseline:,.0f} MiB"):
            run.cancel(CancelReason.REQUESTED)
            _print_tail(await task)
            return
        t_cancel = time.monotonic()
        run.cancel(CancelReason.REQUESTED)
        released, report = await asyncio.gather(
            _released_after(nvml, baseline + MARGIN_MIB, 60), task)
        t_exit = (run.cancel_times.get("exited") or 0) - (run.cancel_times.get("requested") or 0)
        c.figures.update(outcome=report.outcome.value, forced_kill=run.forced_kill,
                         cancel_to_exit_s=round(t_exit, 2),
                         cancel_to_release_s=None if released is None
                         else round(released - t_cancel, 2),
                         exit_to_release_s=None if released is None
                         else round(released - t_cancel - t_exit, 2))
        c(report.outcome is Outcome.CANCELED, f"outcome {report.outcome.value} "
                                              f"(cancel to exit {t_exit:.2f} s)")
        c(released is not None and released - t_cancel - t_exit <= 5,
          f"NVML shows the memory back within {MARGIN_MIB} MiB of the baseline "
          f"{c.figures['cancel_to_release_s']} s after the cancel, "
          f"{c.figures['exit_to_release_s']} s after the job exited (<= 5 s)")
    finally:
        await runner.close()
        nvml.close()


async def _released_after(nvml: Any, limit_mib: float, timeout_s: float) -> float | None:
    """When device memory first fell to ``limit_mib`` (monotonic time), polling at 20 Hz."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(nvml.used_mib) <= limit_mib:
            return time.monotonic()
        await asyncio.sleep(0.05)
    return None


# -- 8. DDP over NCCL ---------------------------------------------------------------------------

def step_ddp(opts: Options, c: Checks) -> int | None:
    """Two ranks on two GPUs over NCCL (gloo on the CPU), sandbox off and on at once."""
    if opts.cuda and len(list_gpus()) < 2:
        print(f"SKIP: DDP needs two GPUs; this node has {len(list_gpus())}")
        return EXIT_SKIP
    backend = "nccl" if opts.cuda else "gloo"
    payload = for_device({**BF16_COMPILE, "compile": False, "steps": 200,
                          "distributed": {"nproc": 2, "backend": backend}}, opts)
    reports = asyncio.run(_ddp(opts, payload))
    heads = []
    for mode, report in reports.items():
        figures = check_job(c, f"ddp_sandbox_{mode}", report, opts, "bf16")
        metrics = report.output.get("metrics") or {}
        c(metrics.get("world_size") == 2 and metrics.get("backend") == backend,
          f"ddp_sandbox_{mode}: world_size {metrics.get('world_size')}, backend "
          f"{metrics.get('backend')}")
        heads.append(f"sandbox {mode} {figures['outcome']} {figures['samples_per_s']} samples/s")
        stderr = log_path(report.folder, "stderr") if report.folder else None
        text = stderr.read_text(errors="replace") if stderr and stderr.is_file() else ""
        if re.search(r"\(job, \d+\)|host job:", text):
            c.note(f"ddp_sandbox_{mode}: torchrun --standalone waited on the jail's hostname, "
                   "which runtimes/jail.py writes to /etc/hosts: a regression to look at")
    c.headline = f"2 ranks {backend}: " + ", ".join(heads)
    return None


async def _ddp(opts: Options, payload: dict[str, Any]) -> dict[str, JobReport]:
    """Both modes at once; the sandboxed one with a short timeout (its rendezvous may hang)."""
    runners = {mode: Runner(opts.work / f"ddp-{mode}", sandbox_on=mode == "on")
               for mode in ("off", "on")}
    try:
        gpus = job_gpus(opts, 2)
        runs = [runners[m].job(f"ddp-{m}", payload, gpus, timeout_s=min(90, opts.limit_s / 2))
                for m in runners]
        return dict(zip(runners, await asyncio.gather(*(r.run() for r in runs)), strict=True))
    finally:
        for runner in runners.values():
            await runner.close()


# -- 9. bench plausibility ----------------------------------------------------------------------

def step_bench(opts: Options, c: Checks) -> int | None:
    """``agent bench --quick --json``: bf16 matmul and memory copy at 0.5-1.0 of spec."""
    path = opts.out / "bench.json"
    cmd = [sys.executable, "-m", "agent", "bench", "--quick", "--json", str(path),
           "--device", "auto" if opts.cuda else "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, timeout=max(30.0, opts.limit_s - 10))
    if c(done.returncode == 0 and path.is_file(), f"bench exit {done.returncode}"):
        check_bench(c, _read_json(path), len(list_gpus()) if opts.cuda else 0)
    return None


def check_bench(c: Checks, result: dict[str, Any], gpus: int) -> None:
    """Every GPU measured, its spec known, bf16 matmul and memory copy at 0.5-1.0 of it."""
    devices = result.get("devices") or []
    cuda = [d for d in devices if d.get("kind") == "cuda"]
    if gpus:
        c(len(cuda) == gpus, f"bench measured {len(cuda)} of {gpus} GPU(s)")
    heads = [_check_bench_device(c, dev) for dev in cuda]
    if not cuda:
        c.note(f"no GPU measured: {[d.get('name') for d in devices]}")
    c.headline = "; ".join(heads) or "CPU only"


def _check_bench_device(c: Checks, dev: dict[str, Any]) -> str:
    ratios, results = dev.get("ratios") or {}, dev.get("results") or {}
    label = f"{dev.get('device')} {dev.get('name')}"
    c.figures[str(dev.get("device"))] = {
        "name": dev.get("name"), "spec": dev.get("spec"), "ratios": ratios,
        **{k: v.get("tflops", v.get("gbs", v.get("samples_s"))) for k, v in results.items()}}
    c(dev.get("spec") not in (None, "unknown"), f"{label}: spec peaks known ({dev.get('spec')})")
    for key, what in (("matmul_bf16", "bf16 matmul"), ("mem_bw", "memory copy")):
        ratio = ratios.get(key)
        value = results.get(key, {})
        c(ratio is not None and 0.5 <= ratio <= 1.0,
          f"{label}: {what} {value.get('tflops', value.get('gbs'))} = {ratio} of spec "
          f"(0.5-1.0) {value.get('error') or value.get('skipped') or ''}")
    return (f"{dev.get('device')} bf16 {ratios.get('matmul_bf16')}, "
            f"mem {ratios.get('mem_bw')} of spec")


# -- 3 and 4. the tests ----------------------------------------------------------------------------

SKIP_LINE = re.compile(r"^SKIPPED \[(\d+)\] \S+: needs two CUDA devices$", re.M)
_OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def run_pytest(c: Checks, marker: str, opts: Options, log: Path) -> dict[str, int]:
    """pytest -v -m MARKER into ``log``; the counts, read even from a run cut short."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEs",
           "-m", marker]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(max(10.0, opts.limit_s - 15))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
            c(False, f"pytest -m '{marker}' finished within {opts.limit_s - 15:.0f} s")
    text = log.read_text(errors="replace")
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    counts = {m.group(2).rstrip("s") if m.group(2).startswith("error") else m.group(2):
              int(m.group(1)) for m in _OUTCOME.finditer(tail)} if tail.startswith("=") else {}
    if not counts:  # cut short: count the verdict of each test line so far
        for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            counts[word.lower()] = len(re.findall(rf" {word}\b", text))
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
    c.figures.update(exit=code, counts=counts, failed_tests=failed, summary=tail)
    for name in failed:
        print(f"  failed: {name}")
    c(code == 0, f"pytest -m '{marker}': exit {code}, {tail.strip('= ') or counts}")
    return counts


def step_gputests(opts: Options, c: Checks) -> int | None:
    """The gpu-marked tests: all of them must run (none skipped) and pass."""
    counts = run_pytest(c, "gpu", opts, opts.out / "logs" / "3-gputests-pytest.log")
    if opts.cuda:
        # A test for two GPUs skips on a node with one: that skip is the node's, not a fault
        log = (opts.out / "logs" / "3-gputests-pytest.log").read_text(errors="replace")
        excused = sum(int(n) for n in SKIP_LINE.findall(log)) if len(list_gpus()) < 2 else 0
        skipped = counts.get("skipped", 0) - excused
        c(counts.get("passed", 0) > 0 and skipped <= 0,
          f"every gpu test ran on the GPU ({counts.get('passed', 0)} passed, "
          f"{counts.get('skipped', 0)} skipped, {excused} of them for want of a second GPU)")
    c.headline = c.figures.get("summary", "").strip("= ")
    return None


def step_suite(opts: Options, c: Checks) -> int | None:
    """Every test not marked gpu, on this node (step 3 runs the gpu ones alone)."""
    run_pytest(c, "not gpu", opts, opts.out / "logs" / "4-suite-pytest.log")
    c.headline = c.figures.get("summary", "").strip("= ")
    return None


# -- the figures and the command line -----------------------------------------------------------

def merge_figures(out: Path) -> dict[str, Any]:
    """OUT/figures.json: every step's result (steps.tsv) and figures (figures/*.json)."""
    steps = []
    tsv = out / "steps.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        fields = line.split("\t")
        if len(fields) >= 4:
            steps.append({"step": fields[0], "name": fields[1], "result": fields[2],
                          "seconds": int(fields[3]) if fields[3].isdigit() else None,
                          "figure": fields[4] if len(fields) > 4 else ""})
    figures = {p.stem: _read_json(p) for p in sorted((out / "figures").glob("*.json"))}
    merged = {"steps": steps, "figures": figures}
    (out / "figures.json").write_text(json.dumps(merged, indent=2, default=str) + "\n")
    return merged


# -- 1b. doctor -------------------------------------------------------------------------------

def step_doctor(opts: Options, c: Checks) -> int | None:
    """doctor's GPU checks: driver, device nodes, torch outside and inside the job sandbox."""
    from agent.commands.node import probe_torch_in_sandbox
    from agent.node import doctor
    from agent.node.telemetry import Telemetry

    tel = Telemetry()
    try:
        probe = (lambda python: probe_torch_in_sandbox(python, opts.limit_s / 2)) \
            if opts.sandbox == "on" else None
        found = doctor.gpu_checks(tel, sandbox_probe=probe, timeout_s=opts.limit_s / 2)
    finally:
        tel.close()
    if opts.sandbox == "on":
        c(any(check.name == "torch in sandbox" for check in found),
          "the torch probe ran inside the job sandbox (bubblewrap found, torch imports)")
    for check in found:
        # Without a GPU (the harness tried on a CPU machine) "no GPU" warnings are right
        ok = check.status == "OK" or (not opts.cuda and check.status == "WARN")
        fix = f" -> {check.fix}" if check.fix and check.status != "OK" else ""
        c(ok, f"doctor {check.name}: {check.status} {check.detail}{fix}")
    c.figures.update(doctor={check.name: [check.status, check.detail] for check in found})
    c.headline = ", ".join(f"{check.name} {check.status}" for check in found)
    return None


STEPS: dict[str, Callable[[Options, Checks], int | None]] = {
    "nvml": step_nvml, "doctor": step_doctor, "forkserver": step_forkserver,
    "gputests": step_gputests,
    "suite": step_suite, "inference": step_inference, "daemon": step_daemon,
    "cancel": step_cancel, "ddp": step_ddp, "bench": step_bench}


def parse_args(argv: list[str] | None) -> tuple[str, Options]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_smoke_steps", description=(__doc__ or "").split("\n\n")[0],
        epilog="steps: " + ", ".join(f"{name} ({fn.__doc__ or ''})".replace("\n", " ")
                                     for name, fn in STEPS.items()) + ", figures")
    parser.add_argument("step", choices=[*STEPS, "figures"])
    parser.add_argument("--out", type=Path, default=None, help="logs and figures (default: "
                        "$OUT, else a new temporary folder)")
    parser.add_argument("--work", type=Path, default=None, help="job folders (default: a "
                        "folder under --out)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--sandbox", choices=("on", "off"), default="on")
    parser.add_argument("--limit-s", type=float, default=300.0,
                        help="the time the step may take (the shell's timeout for it)")
    args = parser.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-smoke-"))
    work = args.work or out / "work"
    return args.step, Options(out.absolute(), work.absolute(), args.device, args.sandbox,
                              args.limit_s)


def main(argv: list[str] | None = None) -> int:
    step, opts = parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    if step == "figures":
        merged = merge_figures(opts.out)
        print(f"wrote {opts.out / 'figures.json'} ({len(merged['figures'])} steps' figures)")
        return 0
    opts.work.mkdir(parents=True, exist_ok=True)
    c = Checks()
    code: int | None = None
    try:
        code = STEPS[step](opts, c)
    except Exception:  # one broken step must still leave its figures and a verdict
        traceback.print_exc()
        c(False, f"step {step} ran to its end without an exception")
    name = f"{step}-{opts.sandbox}" if step == "forkserver" else step
    figures_dir = opts.out / "figures"
    figures_dir.mkdir(exist_ok=True)
    (figures_dir / f"{name}.json").write_text(
        json.dumps({**c.figures, "checks_failed": c.failed}, indent=2, default=str) + "\n")
    print(f"FIGURE: {c.headline}" if c.headline else "FIGURE: -", flush=True)
    if code == EXIT_SKIP and not c.failed:
        return EXIT_SKIP
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
