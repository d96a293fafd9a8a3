"""Slots and GPU assignment.

By default a node holds one job per GPU. ``jobs_per_gpu`` > 1 packs several small
jobs on each GPU; a job whose constraints ask for several GPUs takes that many
whole GPUs at once. A GPU-less node has ``cpu_slots`` slots for jobs that need no
GPU. A job's constraints (GPU count, minimum VRAM) pick the devices, and the job
gets ``CUDA_VISIBLE_DEVICES`` for exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.errors import AgentError
from agent.jobs import Constraints


class NoCapacity(AgentError):
    """Raised when no set of this node's devices could ever meet a job's constraints."""

    code = "no_capacity"


@dataclass(frozen=True)
class Device:
    """One GPU as the scheduler sees it."""

    index: int
    name: str
    memory_mb: int
    uuid: str = ""
    minor: int | None = None  # /dev/nvidia<minor>, from NVML


@dataclass(frozen=True)
class Assignment:
    """What one job holds: GPU indices (empty for a CPU job) and their names."""

    job_id: str
    gpu_indices: tuple[int, ...]
    gpu_names: tuple[str, ...] = ()
    gpu_minors: tuple[int | None, ...] = ()

    @property
    def cuda_visible_devices(self) -> list[str]:
        return [str(i) for i in self.gpu_indices]

    @property
    def device_nodes(self) -> list[str] | None:
        """The ``/dev/nvidiaN`` the job's sandbox keeps; None when a minor is unknown."""
        if any(m is None for m in self.gpu_minors) or \
                len(self.gpu_minors) != len(self.gpu_indices):
            return None
        return [f"/dev/nvidia{m}" for m in self.gpu_minors]


@dataclass
class Scheduler:
    """Tracks which slots are held; all methods are synchronous and cheap."""

    devices: list[Device]
    jobs_per_gpu: int = 1
    cpu_slots: int = 1
    _gpu_load: dict[int, int] = field(default_factory=dict)
    _held: dict[str, Assignment] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._gpu_load = {d.index: 0 for d in self.devices}

    @property
    def capacity(self) -> int:
        """The concurrency to register: how many jobs the node can hold at once."""
        if self.devices:
            return len(self.devices) * self.jobs_per_gpu
        return self.cpu_slots

    @property
    def inflight(self) -> int:
        return len(self._held)

    def has_free_slot(self) -> bool:
        return self.inflight < self.capacity

    def held(self) -> dict[str, Assignment]:
        return dict(self._held)

    def reserve(self, job_id: str, constraints: Constraints) -> Assignment | None:
        """Take devices for a job; None when they are busy now (try again later).

        Raises :class:`NoCapacity` when this node could never run the job.
        """
        if job_id in self._held:
            return self._held[job_id]
        if not self.has_free_slot():
            return None
        if constraints.gpu_count == 0:
            return self._hold(Assignment(job_id, ()))
        fitting = [d for d in self.devices if d.memory_mb >= constraints.min_vram_mb]
        if len(fitting) < constraints.gpu_count:
            raise NoCapacity(self._why_not(constraints, len(fitting)))
        free = [d for d in fitting if self._gpu_load[d.index] < self._per_gpu(constraints)]
        if len(free) < constraints.gpu_count:
            return None
        free.sort(key=lambda d: (self._gpu_load[d.index], d.index))
        chosen = free[:constraints.gpu_count]
        for d in chosen:
            # A multi-GPU job takes whole GPUs: nothing else is packed beside it.
            self._gpu_load[d.index] += 1 if constraints.gpu_count == 1 else self.jobs_per_gpu
        return self._hold(Assignment(job_id, tuple(d.index for d in chosen),
                                     tuple(d.name for d in chosen),
                                     tuple(d.minor for d in chosen)))

    def _per_gpu(self, constraints: Constraints) -> int:
        return self.jobs_per_gpu if constraints.gpu_count == 1 else 1

    def _hold(self, assignment: Assignment) -> Assignment:
        self._held[assignment.job_id] = assignment
        return assignment

    def release(self, job_id: str) -> None:
        assignment = self._held.pop(job_id, None)
        if assignment is None:
            return
        step = 1 if len(assignment.gpu_indices) == 1 else self.jobs_per_gpu
        for index in assignment.gpu_indices:
            self._gpu_load[index] = max(0, self._gpu_load[index] - step)

    def _why_not(self, constraints: Constraints, fitting: int) -> str:
        if not self.devices:
            return (f"the job asks for {constraints.gpu_count} GPU(s) and this node has none "
                    "(CPU-only)")
        return (f"the job asks for {constraints.gpu_count} GPU(s) with at least "
                f"{constraints.min_vram_mb} MiB each; this node has {fitting} such GPU(s) of "
                f"{len(self.devices)}")
