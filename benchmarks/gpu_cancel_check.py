"""Cancel a training job on the GPU mid-run, then check that its device memory came back.

    python -m benchmarks.gpu_cancel_check [--launcher forkserver|spawn] [--gpu N]

Starts a ``training`` job through :class:`agent.execution.executor.JobRun` (the fork server
by default) whose model, gradients and AdamW state hold a few GiB of CUDA memory,
waits until the loop is stepping and NVML shows the memory in use, cancels the
job, and checks:

- the outcome is ``canceled`` and the package is partial, with the checkpoint the
  training runtime saves on a cancel;
- the job's process is gone from NVML's compute processes (where NVML can see
  process ids: inside a container it often cannot), and neither the job nor the
  fork server holds device memory;
- the device's used memory is back within a margin of what it was before the job.

This process never imports torch (the agent's side never touches CUDA); it reads
the device through NVML only, which creates no CUDA context. Prints one line per
check and a verdict; exit status 0 when all pass, 1 on a failed check, 2 when
there is no GPU to check.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.errors import CancelReason
from agent.execution.executor import ExecutorConfig, JobRun
from agent.execution.launcher import Launcher, make_launcher
from agent.jobs import Job

MARGIN_MIB = 256
MIB = 1 << 20
# About 143 M parameters: weights, gradients and AdamW's two moments are ~2.3 GiB,
# and the checkpoint written on cancel is ~1.7 GB.
PAYLOAD: dict[str, Any] = {
    "type": "training", "device": "cuda", "seed": 0,
    "model": {"arch": "mlp", "config": {"hidden": [8192, 8192, 8192]}},
    "dataset": {"synthetic": {"kind": "classification", "samples": 16384, "features": 1024,
                              "classes": 10}},
    "batch_size": 4096, "steps": 1_000_000}


class Gpu:
    """One device seen through NVML: used memory and the compute processes on it."""

    def __init__(self, index: int) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self.handle)
        uuid = pynvml.nvmlDeviceGetUUID(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)

    def used_mib(self) -> float:
        return float(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used) / MIB

    def processes(self) -> dict[int, float]:
        """Compute processes on the device: pid to MiB (NaN where NVML will not say)."""
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self.nvml.NVMLError:
            return {}
        return {int(p.pid): p.usedGpuMemory / MIB if p.usedGpuMemory is not None
                else float("nan") for p in procs}

    def close(self) -> None:
        self.nvml.nvmlShutdown()


class Check:
    """Collects PASS/FAIL lines."""

    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, ok: bool, what: str) -> None:
        self.failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {what}", flush=True)


async def wait_mid_run(run: JobRun, task: asyncio.Task[Any], gpu: Gpu, baseline: float,
                       timeout_s: float) -> float:
    """Wait until the loop has stepped a few times with the memory in use; the peak MiB."""
    deadline = time.monotonic() + timeout_s
    peak = 0.0
    while time.monotonic() < deadline and not task.done():
        peak = max(peak, gpu.used_mib() - baseline)
        step = int((run.progress.get("metrics") or {}).get("step", 0))
        if run.progress.get("stage") == "train" and step >= 20 and peak >= 1024:
            return peak
        await asyncio.sleep(0.1)
    return peak


async def wait_released(gpu: Gpu, baseline: float, pids: set[int],
                        timeout_s: float) -> tuple[float, set[int], float]:
    """Poll until memory is back near the baseline; (used over baseline, pids left, s)."""
    t0 = time.monotonic()
    while True:
        over = gpu.used_mib() - baseline
        left = pids & set(gpu.processes())
        if (over <= MARGIN_MIB and not left) or time.monotonic() - t0 > timeout_s:
            return over, left, time.monotonic() - t0
        await asyncio.sleep(0.1)


async def check(launcher_kind: str, gpu: Gpu, root: Path) -> int:
    checks = Check()
    launcher: Launcher = make_launcher(launcher_kind)  # type: ignore[arg-type]
    try:
        if hasattr(launcher, "start"):
            await launcher.start()
        baseline = gpu.used_mib()
        print(f"device {gpu.name} ({gpu.uuid}): {baseline:,.0f} MiB used before the job")
        job = Job.from_dict({"job_id": "gpu-cancel", "payload": PAYLOAD,
                             "constraints": {"timeout_s": 600}})
        run = JobRun(job, ExecutorConfig(root, cancel_grace_s=60, make_zip=False), launcher,
                     gpu_ids=[gpu.uuid], gpu_names=[gpu.name])
        task = asyncio.create_task(run.run())
        peak = await wait_mid_run(run, task, gpu, baseline, 180)
        step = (run.progress.get("metrics") or {}).get("step")
        in_nvml = gpu.processes()
        print(f"mid-run: step {step}, {peak:,.0f} MiB over the baseline; NVML processes "
              f"{ {pid: round(mib) for pid, mib in in_nvml.items()} }", flush=True)
        checks(peak >= 1024 and not task.done(), "the job is training on the GPU with "
               f">= 1 GiB of device memory ({peak:,.0f} MiB)")
        run.cancel(CancelReason.REQUESTED)
        report = await task
        await _check_report(checks, run, report.outcome.value, report.partial)
        pids = {p for p in (run.pid, _server_pid(launcher)) if p}
        over, left, waited = await wait_released(gpu, baseline, pids, 30)
        checks(not left, f"the job's process is gone from NVML's list (NVML showed "
                         f"{sorted(in_nvml) or 'no pids: likely a container'})")
        checks(over <= MARGIN_MIB, f"device memory back to the baseline + {over:,.0f} MiB "
                                   f"(margin {MARGIN_MIB}) {waited:.1f} s after the package")
    finally:
        await launcher.close()
    print(f"gpu cancel check: {'PASS' if not checks.failed else 'FAIL'} "
          f"({checks.failed} failed)")
    return 1 if checks.failed else 0


async def _check_report(checks: Check, run: JobRun, outcome: str, partial: bool) -> None:
    cancel = run.cancel_times
    latency = (cancel.get("exited") or 0) - (cancel.get("requested") or 0)
    checks(outcome == "canceled", f"outcome {outcome!r} (cancel to exit {latency:.2f} s, "
                                  f"forced kill: {run.forced_kill})")
    ckpt = run.folder / "artifacts" / "checkpoints"
    saved = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []
    checks(partial and any(name.startswith("step-") for name in saved),
           f"package partial={partial} with the checkpoint saved on cancel ({saved})")


def _server_pid(launcher: Launcher) -> int | None:
    info = getattr(launcher, "info", None) or {}
    pid = info.get("pid")
    return int(pid) if isinstance(pid, int) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--launcher", choices=("forkserver", "spawn"), default="forkserver")
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the device")
    args = parser.parse_args(argv)
    try:
        gpu = Gpu(args.gpu)
    except Exception as exc:  # no driver, no device, no pynvml: nothing to check here
        print(f"no GPU: skipping the cancel check ({type(exc).__name__}: {exc})")
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-cancel-") as tmp:
            return asyncio.run(check(args.launcher, gpu, Path(tmp)))
    finally:
        gpu.close()


if __name__ == "__main__":
    sys.exit(main())
