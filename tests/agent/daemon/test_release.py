"""The GPU release gate, with real processes and real timing; NVML's answers are the
only stand-in (no GPU here): a list of pids per GPU, as nvmlDeviceGetComputeRunningProcesses
gives them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

from agent.daemon.release import ReleaseGate
from agent.daemon.scheduler import Device, GpuRequest, Scheduler


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_gpu_is_handed_on_once_the_finished_jobs_contexts_are_gone() -> None:
    # Given GPU 0, where a dead job process's context lingers for 0.3 s, and another
    # job's live process that holds GPU 0 too (jobs_per_gpu > 1)
    ghost, neighbour = dead_pid(), os.getpid()
    until = time.monotonic() + 0.3

    def pids_of(index: int) -> list[int]:
        return ([ghost] if time.monotonic() < until else []) + [neighbour]

    gate = ReleaseGate(pids_of, timeout_s=5, poll_s=0.02)
    # When the gate waits for it
    release = asyncio.run(gate.wait([0], job_pids={ghost}))
    # Then it waited for the ghost only (not the live neighbour) and says how long
    assert release.checked and not release.held
    assert release.ms is not None and 250 <= release.ms < 2000
    assert release.metrics()["gpu_release_ms"] == release.ms


def test_a_gpu_still_held_past_the_limit_is_blocked_until_free() -> None:
    ghost = dead_pid()
    gate = ReleaseGate(lambda index: [ghost], timeout_s=0.2, poll_s=0.02)
    release = asyncio.run(gate.wait([1], job_pids=set()))
    assert release.held == {1: [ghost]} and release.ms is None
    assert release.metrics()["gpu_still_held"] == {"1": [ghost]}
    # and the scheduler gives a blocked GPU to nobody, without calling the job impossible
    s = Scheduler([Device(0, "H200", 143771, "GPU-a"), Device(1, "H200", 143771, "GPU-b")])
    s.block(1, "held")
    a = s.reserve("a", GpuRequest(1))
    assert a is not None and a.gpu_indices == (0,)
    assert s.reserve("b", GpuRequest(1)) is None  # waits, not no_capacity
    s.unblock(1)
    b = s.reserve("b", GpuRequest(1))
    assert b is not None and b.gpu_indices == (1,)


def test_without_nvml_answers_nothing_is_waited_for() -> None:
    gate = ReleaseGate(lambda index: None, timeout_s=5)
    release = asyncio.run(gate.wait([0], job_pids=set()))
    assert not release.checked and release.metrics() == {}
