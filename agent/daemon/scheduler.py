"""Slots and GPU assignment.

By default a node holds one job per GPU. ``jobs_per_gpu`` > 1 packs several small
jobs on each GPU; a job whose constraints ask for several GPUs takes that many
whole GPUs at once. A GPU-less node has ``cpu_slots`` slots for jobs that need no
GPU. What a job gets (:func:`gpu_request`): the GPUs its constraints ask for in
either dialect (count, name, minimum VRAM, CUDA version); when it asks nothing, what
its type is best served by (on a GPU node one GPU for inference and training, the
rank count for DDP; the CPU otherwise); ``payload.device = "cpu"`` forces the CPU.
A job asking for what the node can never give fails at once (``no_capacity``) and
never runs on the CPU instead. The job sees exactly its GPUs, by UUID, in
``CUDA_VISIBLE_DEVICES`` (UUIDs make CUDA's and NVML's numbering agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.errors import AgentError
from agent.jobs import Job

# Payload types a GPU serves best: on a GPU node they get one (or their rank count).
GPU_TYPES = frozenset({"inference", "batch_inference", "training"})


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


def cuda_visible_entries(spec: str) -> list[str]:
    """A CUDA_VISIBLE_DEVICES value's entries, up to one that can name no device ("",
    -1): an empty list means no GPU, on purpose."""
    entries = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry in ("", "-1"):
            break
        entries.append(entry)
    return entries


def visible_devices(spec: str, devices: list[Device],
                    cuda_device_order: str | None = None) -> tuple[list[Device], list[str]]:
    """The devices ``CUDA_VISIBLE_DEVICES=spec`` (set for the agent itself) leaves it, read
    as CUDA reads it, and what an operator should hear about the reading.

    Entries are comma-separated NVML indices or UUIDs (``GPU-...``; a unique prefix
    will do), in the order given; the first entry that names no device (``-1``, an
    unknown index, a repeat, a ``MIG-`` instance this agent cannot schedule) ends the
    list, as it does for CUDA. ``""`` leaves none: the node runs CPU-only. CUDA numbers
    devices fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; NVML by PCI bus: on
    a node of mixed models, indices are named ambiguous.
    """
    chosen: list[Device] = []
    notes: list[str] = []
    entries = cuda_visible_entries(spec)
    for entry in entries:
        if entry.lstrip("+-").isdigit():
            found = [d for d in devices if d.index == int(entry)]
        else:
            found = [d for d in devices if d.uuid and d.uuid.lower().startswith(entry.lower())]
        why = ("names several GPUs" if len(found) > 1 else
               "names no GPU of this agent's" if not found else
               "repeats an earlier entry" if found[0] in chosen else None)
        if why is not None:
            notes.append(f"CUDA_VISIBLE_DEVICES entry {entry!r} {why}: it and the "
                         "entries after it are left out, as CUDA does")
            break
        chosen.append(found[0])
    if (any(e.lstrip("+-").isdigit() for e in entries) and chosen
            and cuda_device_order != "PCI_BUS_ID" and len({d.name for d in devices}) > 1):
        notes.append("CUDA_VISIBLE_DEVICES gives indices on a node of mixed GPU models: "
                     "read as NVML's (PCI bus order), which CUDA's fastest-first order may "
                     "not match; give UUIDs, or set CUDA_DEVICE_ORDER=PCI_BUS_ID")
    return chosen, notes


@dataclass(frozen=True)
class Assignment:
    """What one job holds: GPU indices (empty for a CPU job) and their names."""

    job_id: str
    gpu_indices: tuple[int, ...]
    gpu_names: tuple[str, ...] = ()
    gpu_minors: tuple[int | None, ...] = ()
    gpu_uuids: tuple[str, ...] = ()

    @property
    def cuda_visible_devices(self) -> list[str]:
        """UUIDs where NVML gave them (CUDA and NVML then agree), else NVML indices."""
        if len(self.gpu_uuids) == len(self.gpu_indices) and all(self.gpu_uuids):
            return list(self.gpu_uuids)
        return [str(i) for i in self.gpu_indices]

    @property
    def device_nodes(self) -> list[str] | None:
        """The ``/dev/nvidiaN`` the job's sandbox keeps; None when a minor is unknown."""
        if any(m is None for m in self.gpu_minors) or \
                len(self.gpu_minors) != len(self.gpu_indices):
            return None
        return [f"/dev/nvidia{m}" for m in self.gpu_minors]


@dataclass(frozen=True)
class GpuRequest:
    """What one job takes: how many GPUs, and which ones qualify."""

    count: int = 0
    min_vram_mb: int = 0
    name: str | None = None  # a substring of the GPU's name, spaces and case aside
    cuda: str | None = None  # a substring of the node's CUDA version

    def describe(self) -> str:
        parts = [f"{self.count} GPU(s)"]
        if self.name:
            parts.append(f"named like {self.name!r}")
        if self.min_vram_mb:
            parts.append(f"with at least {self.min_vram_mb} MiB")
        if self.cuda:
            parts.append(f"CUDA {self.cuda}")
        return " ".join(parts)


def gpu_request(job: Job, node_has_gpus: bool) -> GpuRequest:
    """What ``job`` asks of this node's GPUs (see the module docstring)."""
    c = job.constraints
    if str(job.payload.get("device", "")).strip().lower() == "cpu":
        return GpuRequest()
    if c.gpu_count is not None:
        count = c.gpu_count
    elif c.asks_for_gpu or (node_has_gpus and job.type in GPU_TYPES):
        count = _ranks(job.payload)
    else:
        count = 0
    return GpuRequest(count, c.min_vram_mb if count else 0, c.gpu_name if count else None,
                      c.cuda if count else None)


def _ranks(payload: dict[str, object]) -> int:
    """A training payload's DDP rank count (``distributed.nproc`` or ``world_size``), else 1."""
    dist = payload.get("distributed")
    for value in (dist.get("nproc") if isinstance(dist, dict) else None,
                  payload.get("world_size")):
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64:
            return value
    return 1


def _squash(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


@dataclass
class Scheduler:
    """Tracks which slots are held; all methods are synchronous and cheap."""

    devices: list[Device]
    jobs_per_gpu: int = 1
    cpu_slots: int = 1
    cuda_version: str = ""  # the driver's CUDA version ("12.4"), for constraints.cuda
    blocked: dict[int, str] = field(default_factory=dict)  # GPU index -> why it waits
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

    def request_for(self, job: Job) -> GpuRequest:
        return gpu_request(job, bool(self.devices))

    def reserve(self, job_id: str, want: GpuRequest) -> Assignment | None:
        """Take devices for a job; None when they are busy now (try again later).

        Raises :class:`NoCapacity` when this node could never run the job.
        """
        if job_id in self._held:
            return self._held[job_id]
        fitting = self._fitting(want)
        if want.count and len(fitting) < want.count:
            raise NoCapacity(self._why_not(want, len(fitting)))
        if not self.has_free_slot():
            return None
        if want.count == 0:
            return self._hold(Assignment(job_id, ()))
        per_gpu = self.jobs_per_gpu if want.count == 1 else 1
        free = [d for d in fitting
                if self._gpu_load[d.index] < per_gpu and d.index not in self.blocked]
        if len(free) < want.count:
            return None
        free.sort(key=lambda d: (self._gpu_load[d.index], d.index))
        chosen = free[:want.count]
        for d in chosen:
            # A multi-GPU job takes whole GPUs: nothing else is packed beside it.
            self._gpu_load[d.index] += 1 if want.count == 1 else self.jobs_per_gpu
        return self._hold(Assignment(job_id, tuple(d.index for d in chosen),
                                     tuple(d.name for d in chosen),
                                     tuple(d.minor for d in chosen),
                                     tuple(d.uuid for d in chosen)))

    def block(self, index: int, reason: str) -> None:
        """Give GPU ``index`` to no job until :meth:`unblock` (its memory is still held)."""
        self.blocked[index] = reason

    def unblock(self, index: int) -> None:
        self.blocked.pop(index, None)

    def _fitting(self, want: GpuRequest) -> list[Device]:
        if want.cuda and want.cuda not in self.cuda_version:
            return []
        name = _squash(want.name) if want.name else ""
        return [d for d in self.devices
                if d.memory_mb >= want.min_vram_mb and name in _squash(d.name)]

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

    def _why_not(self, want: GpuRequest, fitting: int) -> str:
        asked = f"the job asks for {want.describe()}"
        if not self.devices:
            return f"{asked}; this node has no GPU (CPU-only)"
        counts: dict[str, int] = {}
        for d in self.devices:
            label = f"{d.name} ({d.memory_mb} MiB)"
            counts[label] = counts.get(label, 0) + 1
        have = ", ".join(f"{n} x {label}" for label, n in counts.items())
        return (f"{asked}; this node has {have}, CUDA {self.cuda_version or 'unknown'}: "
                f"{fitting} of them qualify")
