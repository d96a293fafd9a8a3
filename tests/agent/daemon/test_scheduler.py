"""Slots and GPU assignment."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.daemon.scheduler import Device, NoCapacity, Scheduler
from agent.jobs import Constraints

GPUS = [Device(0, "A100", 40960), Device(1, "A100", 81920), Device(2, "L4", 23034)]


def test_one_slot_per_gpu_and_exact_devices() -> None:
    s = Scheduler(GPUS)
    assert s.capacity == 3
    a = s.reserve("a", Constraints(gpu_count=1, min_vram_mb=80000))
    assert a is not None and a.cuda_visible_devices == ["1"]
    b = s.reserve("b", Constraints(gpu_count=2))
    assert b is not None and sorted(b.gpu_indices) == [0, 2]
    assert s.reserve("c", Constraints(gpu_count=1)) is None  # full
    s.release("b")
    c = s.reserve("c", Constraints(gpu_count=1))
    assert c is not None and c.gpu_indices[0] in (0, 2)


def test_several_small_jobs_per_gpu_but_multi_gpu_jobs_take_whole_gpus() -> None:
    s = Scheduler(GPUS[:2], jobs_per_gpu=2)
    assert s.capacity == 4
    assert s.reserve("a", Constraints(gpu_count=1)) is not None
    assert s.reserve("b", Constraints(gpu_count=1)) is not None
    # Two GPUs each hold one job: a 2-GPU job must wait
    assert s.reserve("big", Constraints(gpu_count=2)) is None
    s.release("a")
    s.release("b")
    big = s.reserve("big", Constraints(gpu_count=2))
    assert big is not None and len(big.gpu_indices) == 2
    assert s.reserve("c", Constraints(gpu_count=1)) is None


def test_impossible_constraints_raise_no_capacity() -> None:
    s = Scheduler(GPUS)
    with pytest.raises(NoCapacity, match="at least 100000 MiB"):
        s.reserve("x", Constraints(gpu_count=1, min_vram_mb=100000))
    cpu = Scheduler([], cpu_slots=2)
    assert cpu.capacity == 2
    assert cpu.reserve("cpu-job", Constraints()) is not None
    with pytest.raises(NoCapacity, match="CPU-only"):
        cpu.reserve("gpu-job", Constraints(gpu_count=1))


def test_journal_starts_a_new_attempt_only_under_a_new_lease(tmp_path: Path) -> None:
    from agent.daemon.journal import Journal, Phase

    j = Journal(tmp_path / "j.db")
    assert j.accept("a", {"job_id": "a"}, "lease-1")
    assert not j.accept("a", {"job_id": "a"}, "lease-1")  # a repeat of the same answer
    assert not j.accept("a", {"job_id": "a"}, "lease-2")  # still running: not a new attempt
    j.set_phase("a", Phase.DROPPED)
    assert j.accept("a", {"job_id": "a"}, "lease-2")
    assert j.get("a").phase is Phase.ACCEPTED  # type: ignore[union-attr]
    j.set_phase("a", Phase.REPORTED)
    assert j.prune(-1) == ["a"] and j.get("a") is None
    j.close()


def test_a_job_keeps_only_its_own_gpu_device_nodes() -> None:
    # Given GPUs whose device minors NVML reported (one unknown)
    devices = [Device(0, "A100", 40960, "GPU-a", 3), Device(1, "A100", 40960, "GPU-b", 1),
               Device(2, "A100", 40960, "GPU-c", None)]
    sched = Scheduler(devices, jobs_per_gpu=1, cpu_slots=1)
    # Then a one-GPU job's sandbox keeps exactly that GPU's node
    one = sched.reserve("one", Constraints(gpu_count=1))
    assert one is not None and one.device_nodes == ["/dev/nvidia3"]
    # and a CPU job keeps none; a GPU whose minor is unknown keeps the sandbox's default
    cpu = sched.reserve("cpu", Constraints(gpu_count=0))
    assert cpu is not None and cpu.device_nodes == []
    two = sched.reserve("two", Constraints(gpu_count=2))
    assert two is not None and two.device_nodes is None
