"""Slots and GPU assignment."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.daemon.scheduler import (
    Device,
    GpuRequest,
    NoCapacity,
    Scheduler,
    gpu_request,
    visible_devices,
)
from agent.jobs import Job

GPUS = [Device(0, "A100", 40960), Device(1, "A100", 81920), Device(2, "L4", 23034)]


def test_one_slot_per_gpu_and_exact_devices() -> None:
    s = Scheduler(GPUS)
    assert s.capacity == 3
    a = s.reserve("a", GpuRequest(count=1, min_vram_mb=80000))
    assert a is not None and a.cuda_visible_devices == ["1"]
    b = s.reserve("b", GpuRequest(count=2))
    assert b is not None and sorted(b.gpu_indices) == [0, 2]
    assert s.reserve("c", GpuRequest(count=1)) is None  # full
    s.release("b")
    c = s.reserve("c", GpuRequest(count=1))
    assert c is not None and c.gpu_indices[0] in (0, 2)


def test_several_small_jobs_per_gpu_but_multi_gpu_jobs_take_whole_gpus() -> None:
    s = Scheduler(GPUS[:2], jobs_per_gpu=2)
    assert s.capacity == 4
    assert s.reserve("a", GpuRequest(count=1)) is not None
    assert s.reserve("b", GpuRequest(count=1)) is not None
    # Two GPUs each hold one job: a 2-GPU job must wait
    assert s.reserve("big", GpuRequest(count=2)) is None
    s.release("a")
    s.release("b")
    big = s.reserve("big", GpuRequest(count=2))
    assert big is not None and len(big.gpu_indices) == 2
    assert s.reserve("c", GpuRequest(count=1)) is None


def test_impossible_constraints_raise_no_capacity() -> None:
    s = Scheduler(GPUS)
    with pytest.raises(NoCapacity, match="at least 100000 MiB"):
        s.reserve("x", GpuRequest(count=1, min_vram_mb=100000))
    cpu = Scheduler([], cpu_slots=2)
    assert cpu.capacity == 2
    assert cpu.reserve("cpu-job", GpuRequest()) is not None
    with pytest.raises(NoCapacity, match="CPU-only"):
        cpu.reserve("gpu-job", GpuRequest(count=1))


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
    assert j.expired(-1) == ["a"]
    j.mark_pruned("a")  # the package is gone; the record stays
    assert j.pruned_at("a") is not None
    assert j.get("a").phase is Phase.REPORTED  # type: ignore[union-attr]
    j.close()


def test_a_job_keeps_only_its_own_gpu_device_nodes() -> None:
    # Given GPUs whose device minors NVML reported (one unknown)
    devices = [Device(0, "A100", 40960, "GPU-a", 3), Device(1, "A100", 40960, "GPU-b", 1),
               Device(2, "A100", 40960, "GPU-c", None)]
    sched = Scheduler(devices, jobs_per_gpu=1, cpu_slots=1)
    # Then a one-GPU job's sandbox keeps exactly that GPU's node
    one = sched.reserve("one", GpuRequest(count=1))
    assert one is not None and one.device_nodes == ["/dev/nvidia3"]
    # and a CPU job keeps none; a GPU whose minor is unknown keeps the sandbox's default
    cpu = sched.reserve("cpu", GpuRequest(count=0))
    assert cpu is not None and cpu.device_nodes == []
    two = sched.reserve("two", GpuRequest(count=2))
    assert two is not None and two.device_nodes is None


def job(payload: dict[str, object], **constraints: object) -> Job:
    return Job.from_dict({"job_id": "j", "payload": payload, "constraints": constraints})


def test_what_a_job_asks_in_either_dialect() -> None:
    train = {"type": "training"}
    # Ours: a count; the core coordinator's: a name, GB of VRAM, a CUDA version
    assert gpu_request(job(train, gpu_count=2), True) == GpuRequest(2)
    core = gpu_request(job({"type": "command"}, gpu="H200", min_vram_gb=16, cuda="12"), True)
    assert core == GpuRequest(1, 16384, "H200", "12")
    # Nothing asked: a GPU type gets one GPU on a GPU node (its rank count for DDP) ...
    assert gpu_request(job(train), True) == GpuRequest(1)
    ddp = {"type": "training", "distributed": {"nproc": 4}}
    assert gpu_request(job(ddp), True) == GpuRequest(4)
    assert gpu_request(job({"type": "inference", "prompt": "hi"}), True) == GpuRequest(1)
    # ... the CPU on a CPU node, and other types the CPU
    assert gpu_request(job(train), False) == GpuRequest()
    assert gpu_request(job({"type": "sleep"}), True) == GpuRequest()
    # and the payload's device "cpu" forces the CPU whatever was asked
    assert gpu_request(job({"type": "training", "device": "cpu"}, gpu="H200"), True) == \
        GpuRequest()


def test_names_cuda_and_uuids() -> None:
    h200 = [Device(0, "NVIDIA H200", 143771, "GPU-aaaa", 0),
            Device(1, "NVIDIA H200 NVL", 143771, "GPU-bbbb", 1)]
    s = Scheduler(h200, cuda_version="12.4")
    a = s.reserve("a", GpuRequest(1, name="h200 nvl"))
    assert a is not None and a.gpu_indices == (1,)
    assert a.cuda_visible_devices == ["GPU-bbbb"]  # by UUID: CUDA and NVML agree
    b = s.reserve("b", GpuRequest(1, name="H200", cuda="12"))
    assert b is not None and b.cuda_visible_devices == ["GPU-aaaa"]
    with pytest.raises(NoCapacity, match=r"CUDA 13.*CUDA 12.4"):
        s.reserve("c", GpuRequest(1, cuda="13"))
    with pytest.raises(NoCapacity, match=r"named like 'A100'.*2 x NVIDIA H200|NVIDIA H200"):
        s.reserve("d", GpuRequest(1, name="A100"))


def test_an_impossible_gpu_job_fails_even_while_the_node_is_busy() -> None:
    s = Scheduler([Device(0, "L4", 23034, "GPU-l4")])
    assert s.reserve("busy", GpuRequest(1)) is not None
    with pytest.raises(NoCapacity, match="at least 81920 MiB"):
        s.reserve("big", GpuRequest(1, min_vram_mb=81920))


MIXED = [Device(0, "NVIDIA H100 80GB HBM3", 81559, "GPU-8a1c0000-aaaa", 7),
         Device(1, "NVIDIA GeForce RTX 4090", 24564, "GPU-8a2d0000-bbbb", 6),
         Device(2, "NVIDIA H100 80GB HBM3", 81559, "GPU-ffff0000-cccc", 5)]


@pytest.mark.parametrize(("spec", "indices", "said"), [
    ("", [], None),                                 # CPU-only on purpose
    ("-1", [], None),
    ("GPU-ffff0000-cccc,GPU-8a1c", [2, 0], None),   # UUIDs, a unique prefix, in that order
    ("gpu-8A2D", [1], None),
    ("2, 0", [2, 0], "mixed GPU models"),           # indices: NVML's, said to be ambiguous
    ("0,7,1", [0], "'7' names no GPU"),             # CUDA stops at the first bad entry
    ("GPU-8,1", [], "'GPU-8' names several GPUs"),
    ("1,1,0", [1], "'1' repeats an earlier entry"),
    ("MIG-5c3b,0", [], "'MIG-5c3b' names no GPU"),
])
def test_the_agents_own_cuda_visible_devices_is_read_as_cuda_reads_it(
        spec: str, indices: list[int], said: str | None) -> None:
    chosen, notes = visible_devices(spec, MIXED)
    assert [d.index for d in chosen] == indices
    assert (said is None and notes == []) or any(said in n for n in notes), notes


def test_indices_on_a_node_of_one_model_or_in_pci_order_are_not_ambiguous() -> None:
    same = [MIXED[0], MIXED[2]]
    assert visible_devices("2,0", same) == ([MIXED[2], MIXED[0]], [])
    assert visible_devices("1", MIXED, "PCI_BUS_ID") == ([MIXED[1]], [])
