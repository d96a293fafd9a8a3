"""The first code that runs in a job's process: set up, run the runtime, report, exit.

Started either by the fork server (``run_spec`` in a freshly forked child) or as
``python -m runtimes.host SPEC.json`` (the plain-spawn fallback). Either way the
process is already its own session and process-group leader, with stdout and
stderr on the agent's capture pipes and the events channel on
``$MINER_EVENTS_FD``.

It exits through ``os._exit`` after flushing: a normal interpreter teardown after
torch costs about half a second per job.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from runtimes import registry
from runtimes.base import EventChannel, JobCancelled, JobContext, JobFailed, install_cancel_handler

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_CANCELED = 3
EXIT_TIMED_OUT = 4

_PR_SET_PDEATHSIG = 1


PARENT_DIED = signal.SIGUSR2


def die_with_parent(expected_parent: int | None, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` when our parent dies; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the executor's group kill still applies
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(EXIT_FAILED)


def take_group_down_with_parent(expected_parent: int | None) -> None:
    """When the agent dies, kill this job's whole process group, not just this process.

    The kernel's parent-death signal reaches only us; a program we started (and its
    children) would live on. So the signal is SIGUSR2, whose handler kills the
    group, and whose default action, before the handler exists, still ends us.
    """

    def handler(_signum: int, _frame: object) -> None:
        os.killpg(os.getpgid(0), signal.SIGKILL)

    signal.signal(PARENT_DIED, handler)
    die_with_parent(expected_parent, PARENT_DIED)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> None:
    """Keep freed activation buffers in the heap instead of returning them each batch.

    A fresh process's glibc malloc hands buffers over ~128 KiB back to the kernel on
    free and faults them in again on the next batch: a CPU batch-inference job paid
    ~76k page faults per 400 batches and ran at 0.91x of the same loop in a warm
    process. Fixed thresholds bring it to par. A process-wide call, not MALLOC_*
    variables: a forked child inherits the allocator's state, not its environment.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def run_spec(spec: dict[str, Any]) -> int:
    """Run one job described by ``spec``; returns the process exit code."""
    tune_allocator()
    channel = EventChannel.from_env()
    job = spec["job"]
    timeout_s = job.get("constraints", {}).get("timeout_s")
    deadline = time.monotonic() + float(timeout_s) if timeout_s else None
    ctx = JobContext(job, Path(spec["package_dir"]), Path(spec["work_dir"]), channel, deadline)
    install_cancel_handler(ctx)
    # Inside a jail the keeper forked us with cancel signals blocked (PID 1 drops a
    # signal it has no handler for); the handler exists now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        fn = registry.load(spec["runtime"])
        # Imports done: the job's code runs now (its clock is the agent's: system-wide).
        channel.send("started", pid=os.getpid(), mono=time.monotonic())
        fn(ctx)
    except JobCancelled:
        pass
    except JobFailed as exc:
        return _finish(channel, ctx, "failed", exc.code, exc.message, exc.details)
    except Exception as exc:  # the job's bug, not ours: report it with its traceback
        traceback.print_exc()
        code, message = classify_exception(exc)
        return _finish(channel, ctx, "failed", code, message, {})
    if ctx.cancelled:
        outcome = "timed_out" if ctx.cancel_reason == "timeout" else "canceled"
        return _finish(channel, ctx, outcome, None, None, {})
    return _finish(channel, ctx, "completed", None, None, {})


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """Map an exception from a runtime to a stable error code and a short message."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if name == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return "cuda_oom", f"CUDA out of memory: {text[:400]}"
    return "runtime_error", f"{name}: {text[:400]}"


def _finish(channel: EventChannel, ctx: JobContext, outcome: str, code: str | None,
            message: str | None, details: dict[str, Any]) -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    metrics = {**ctx.metrics, "cpu_user_s": round(usage.ru_utime, 3),
               "cpu_system_s": round(usage.ru_stime, 3), "minor_page_faults": usage.ru_minflt}
    channel.send("finished", outcome=outcome, error_code=code, error_message=message,
                 partial=ctx.partial, metrics=metrics, details=details or None)
    return {"completed": EXIT_COMPLETED, "canceled": EXIT_CANCELED,
            "timed_out": EXIT_TIMED_OUT}.get(outcome, EXIT_FAILED)


def join_cgroup(cgroup_fd: int) -> None:
    """Move this process into the cgroup whose directory ``cgroup_fd`` is (then close it).

    Through a descriptor the agent opened: in the sandbox ``/sys/fs/cgroup`` is
    read-only, and the job must not learn or choose the path.
    """
    fd = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=cgroup_fd)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)
        os.close(cgroup_fd)


def exit_now(code: int) -> None:
    """Flush what the job printed, then leave without interpreter teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _events_on_fd3() -> None:
    """Put the events channel on fd 3, as the fork server does, so shells can use ``>&3``."""
    raw = os.environ.get("MINER_EVENTS_FD", "")
    if raw.isdigit() and int(raw) != 3:
        os.dup2(int(raw), 3, inheritable=True)
        os.close(int(raw))
        os.environ["MINER_EVENTS_FD"] = "3"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m runtimes.host SPEC.json (started by miner-agent, not by hand)",
              file=sys.stderr)
        raise SystemExit(2)
    run_file(args[0], check_parent=True)


def run_file(spec_path: str, check_parent: bool) -> None:
    """Run the job a spec file describes in this process, then exit.

    ``check_parent``: the plain-spawn path, where our parent is the agent and the
    job's group must die with it. In a jail the keeper is the parent and the PID
    namespace takes everything down with us.
    """
    spec = json.loads(Path(spec_path).read_text())
    if check_parent:
        take_group_down_with_parent(spec.get("parent_pid"))
    cgroup_fd = os.environ.pop("MINER_CGROUP_FD", "")
    if cgroup_fd.isdigit():
        join_cgroup(int(cgroup_fd))
    _events_on_fd3()
    os.chdir(spec["work_dir"])
    exit_now(run_spec(spec))


if __name__ == "__main__":
    main()
