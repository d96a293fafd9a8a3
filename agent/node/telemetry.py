"""NVML and host figures: the GPU inventory, per-heartbeat samples, capabilities.

NVML is initialised once per :class:`Telemetry`. A node without the NVIDIA
driver (no ``libnvidia-ml.so``, driver not loaded, no device) is a CPU-only
node, not an error: :attr:`Telemetry.reason` says why there are no GPUs. Fields
a GPU does not support (power on some boards, ECC on consumer cards) become
``None``; a GPU that falls off the bus is reported with an ``error`` and the
rest of the sample carries on.

Everything here is cheap enough for a heartbeat every few seconds: handles and
static facts are read once, a sample is a dozen NVML calls per GPU plus a few
``/proc`` reads (see ``tests/test_telemetry.py`` for the measured cost).
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from agent.clock import within

log = logging.getLogger(__name__)

MIB = 1024 * 1024
T = TypeVar("T")

# nvmlClocksEventReason* bits (the same values under the older "ThrottleReason"
# names); spelled out so that decoding does not depend on the binding's version.
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

# NVML error codes that mean "no usable NVIDIA GPU here" rather than a fault.
_NO_GPU_REASONS = {
    "NVMLError_LibraryNotFound": "NVML library not found (no NVIDIA driver installed)",
    "NVMLError_DriverNotLoaded": "NVIDIA driver not loaded",
    "NVMLError_NoPermission": "no permission to open the NVIDIA devices",
    "NVMLError_Uninitialized": "NVML not initialised",
}


@dataclass(frozen=True)
class GpuInfo:
    """What does not change while the agent runs: one GPU's identity and size."""

    index: int
    name: str
    uuid: str
    pci_bus_id: str
    memory_total_mb: int
    compute_capability: str | None
    driver_version: str
    cuda_driver_version: str | None
    minor: int | None = None  # /dev/nvidia<minor>: the device node a job's sandbox binds
    mig: bool = False  # MIG mode on: CUDA sees its instances, not the GPU (never scheduled)


def decode_throttle_reasons(mask: int | None) -> list[str] | None:
    """Names of the set bits of an NVML clocks-event (throttle) mask; unknown bits as hex."""
    if mask is None:
        return None
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    if unknown:
        names.append(f"0x{unknown:x}")
    return names


def cuda_version_string(version: int | None) -> str | None:
    """NVML's integer CUDA driver version (12040) as ``"12.4"``."""
    if not version:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returned bytes before 11.515; accept both.
    return value.decode() if isinstance(value, bytes) else value


class Telemetry:
    """NVML (once) plus psutil: :meth:`inventory`, :meth:`sample`, :meth:`close`.

    ``nvml`` defaults to the ``pynvml`` module; tests pass a stand-in for the GPU.
    ``disk_paths`` are the directories whose file systems each sample reports
    (the state and cache directories).
    """

    def __init__(self, disk_paths: Iterable[str | Path] = (), nvml: Any = None,
                 driver_present: bool | None = None) -> None:
        self.disk_paths = [str(p) for p in disk_paths]
        self.reason: str | None = None
        # The driver is installed but NVML cannot serve it (a library/driver mismatch, a
        # broken install): not a CPU node, a broken GPU node. The agent refuses to start.
        self.failure: str | None = None
        self.lost: list[dict[str, Any]] = []  # GPUs dropped at start, and why
        self._driver_present = nvidia_driver_present() if driver_present is None \
            else driver_present
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._inventory: list[GpuInfo] = []
        psutil.cpu_percent(interval=None)  # primes the counter; the next call measures since now
        self._init_nvml(nvml)

    def _init_nvml(self, nvml: Any) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self.reason = _NO_GPU_REASONS.get(type(exc).__name__, f"NVML failed to start: {exc}")
            self._fail_if_driver(self.reason)
            return
        self._nvml = nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            self.reason = f"NVML could not count the GPUs: {exc}"
            self._fail_if_driver(self.reason)
            self.close()
            return
        for index in range(count):  # one lost GPU drops that GPU, not the node's others
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                info = self._gpu_info(index, handle)
            except nvml.NVMLError as exc:
                log.error("gpu %d is left out: NVML cannot read it: %s", index, exc)
                self.lost.append({"index": index, "error": str(exc)})
                continue
            self._handles.append(handle)
            self._inventory.append(info)
        if not self._handles:
            self.reason = ("the NVIDIA driver reports no GPU" if not self.lost
                           else f"every GPU failed in NVML: {self.lost[0]['error']}")
            if self.lost:
                self._fail_if_driver(self.reason)

    def _fail_if_driver(self, reason: str) -> None:
        if self._driver_present:
            self.failure = (f"the NVIDIA driver is installed but NVML cannot use it: {reason}. "
                            "Check that nvidia-smi works (a driver/library version mismatch "
                            "needs a reboot or matching packages), or set gpus = [] to run "
                            "this node CPU-only on purpose")
            log.error("%s", self.failure)
        else:
            log.info("no GPUs: %s", reason)

    def _field(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)``, or None where the GPU or driver does not offer the figure."""
        try:
            return fn(*args)
        except self._nvml.NVMLError_GpuIsLost:
            raise
        except self._nvml.NVMLError:
            return None

    def _gpu_info(self, index: int, handle: Any) -> GpuInfo:
        nvml = self._nvml
        cc = self._field(nvml.nvmlDeviceGetCudaComputeCapability, handle)
        return GpuInfo(
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
            memory_total_mb=int(nvml.nvmlDeviceGetMemoryInfo(handle).total // MIB),
            compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
            driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
            cuda_driver_version=cuda_version_string(
                self._field(nvml.nvmlSystemGetCudaDriverVersion)),
            minor=self._field(nvml.nvmlDeviceGetMinorNumber, handle),
            mig=self._mig_enabled(handle),
        )

    def _mig_enabled(self, handle: Any) -> bool:
        """MIG mode is on now (NVML's current mode; bindings without MIG say no)."""
        get = getattr(self._nvml, "nvmlDeviceGetMigMode", None)
        modes: Any = self._field(get, handle) if get is not None else None
        return bool(modes) and modes[0] == getattr(self._nvml, "NVML_DEVICE_MIG_ENABLE", 1)

    @property
    def has_gpus(self) -> bool:
        """True when NVML started and sees at least one GPU."""
        return bool(self._inventory)

    def compute_pids(self, index: int) -> list[int] | None:
        """Pids (host pids, in any namespace) holding a CUDA context on GPU ``index``.

        None when NVML cannot say (no NVML, an unknown index, an error). Blocking:
        call it off the event loop.
        """
        nvml = self._nvml  # None once closed (a sampler thread may still ask)
        for info, handle in zip(self._inventory, self._handles, strict=True):
            if info.index != index or nvml is None:
                continue
            try:
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:  # noqa: BLE001 - NVMLError, or the binding's
                # NVMLLibraryMismatchError (a plain Exception) on a driver without the v3 call
                return None
            return [int(p.pid) for p in procs]
        return None

    def inventory(self) -> list[GpuInfo]:
        """The GPUs NVML saw at start, in NVML index order (empty on a CPU-only node)."""
        return list(self._inventory)

    def sample(self) -> dict[str, Any]:
        """One JSON-ready reading of every GPU and the host."""
        return {
            "t": round(time.time(), 3),
            "gpus": [self._sample_gpu(info, handle)
                     for info, handle in zip(self._inventory, self._handles, strict=True)],
            "host": host_sample(self.disk_paths),
        }

    def _sample_gpu(self, info: GpuInfo, handle: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"index": info.index, "uuid": info.uuid}
        try:
            out.update(self._gpu_figures(handle))
        except self._nvml.NVMLError as exc:  # GpuIsLost: the board fell off the bus
            log.error("gpu %d (%s) stopped answering: %s", info.index, info.uuid, exc)
            out["error"] = str(exc)
        return out

    def _gpu_figures(self, handle: Any) -> dict[str, Any]:
        nvml, f = self._nvml, self._field
        util = f(nvml.nvmlDeviceGetUtilizationRates, handle)
        mem = f(nvml.nvmlDeviceGetMemoryInfo, handle)
        power_mw = f(nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = f(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        return {
            "util_gpu_pct": util.gpu if util is not None else None,
            "util_mem_pct": util.memory if util is not None else None,
            "mem_used_mb": int(mem.used // MIB) if mem is not None else None,
            "mem_total_mb": int(mem.total // MIB) if mem is not None else None,
            "temp_c": f(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
            "power_w": round(power_mw / 1000, 1) if power_mw is not None else None,
            "power_limit_w": round(limit_mw / 1000, 1) if limit_mw is not None else None,
            "throttle": decode_throttle_reasons(self._throttle_mask(handle)),
            "ecc_corrected": self._ecc(handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
            "ecc_uncorrected": self._ecc(handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
        }

    def _throttle_mask(self, handle: Any) -> int | None:
        nvml = self._nvml
        fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if fn is None:  # bindings before 12.535 only know the older name
            fn = nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return self._field(fn, handle)

    def _ecc(self, handle: Any, kind: int) -> int | None:
        nvml = self._nvml
        return self._field(nvml.nvmlDeviceGetTotalEccErrors, handle, kind, nvml.NVML_VOLATILE_ECC)

    def close(self) -> None:
        """Shut NVML down; safe to call twice."""
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvmlShutdown failed: %s", exc)
            self._nvml = None

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def host_sample(disk_paths: Sequence[str] = ()) -> dict[str, Any]:
    """CPU, load, memory, uptime and the file systems under ``disk_paths``."""
    vm = psutil.virtual_memory()
    load1, load5, load15 = os.getloadavg()
    return {
        "cpu_pct": psutil.cpu_percent(interval=None),
        "load_avg": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "mem_used_mb": int((vm.total - vm.available) // MIB),
        "mem_total_mb": int(vm.total // MIB),
        "uptime_s": int(time.time() - psutil.boot_time()),
        "disks": {path: disk_sample(path) for path in disk_paths},
    }


def disk_sample(path: str) -> dict[str, Any]:
    """Used and free GiB of the file system holding ``path``; an ``error`` when unreadable."""
    try:
        usage = psutil.disk_usage(path)
    except OSError as exc:
        return {"error": exc.strerror or type(exc).__name__}
    return {"used_gb": round(usage.used / 1024**3, 2), "free_gb": round(usage.free / 1024**3, 2)}


def capabilities(
    gpus: Sequence[GpuInfo],
    reason: str | None = None,
    models: Sequence[str] = (),
    bench: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``capabilities`` object for ``/v1/miners/register``.

    Dispatch reads ``gpus[].name``, ``gpus[].memory_mb``, ``cuda`` (as a substring)
    and ``models``; the rest is stored by the coordinator for people to read.
    """
    caps: dict[str, Any] = {
        "gpus": [gpu_capability(g) for g in gpus],
        "models": list(models),
        "host": host_capability(),
    }
    if gpus:
        caps["cuda"] = gpus[0].cuda_driver_version or ""
        caps["driver"] = gpus[0].driver_version
    else:
        caps["cpu_only"] = True
        caps["cuda"] = ""
        caps["cpu_only_reason"] = reason or "no GPU"
    if bench:
        caps["bench"] = bench
    return caps


def gpu_capability(gpu: GpuInfo) -> dict[str, Any]:
    """One GPU as dispatch wants it (``name``, ``memory_mb``) plus identity for people."""
    return {
        "name": gpu.name,
        "memory_mb": gpu.memory_total_mb,
        "index": gpu.index,
        "uuid": gpu.uuid,
        "pci_bus_id": gpu.pci_bus_id,
        "compute_capability": gpu.compute_capability,
    }


def host_capability() -> dict[str, Any]:
    """The host's static facts: CPUs, memory, OS, Python."""
    return {
        "cpu_count": os.cpu_count() or 1,
        "cpu_model": cpu_model(),
        "memory_mb": int(psutil.virtual_memory().total // MIB),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else the machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def nvidia_driver_present() -> bool:
    """Is the NVIDIA kernel driver loaded (whatever NVML says)?"""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


class Sampler:
    """Telemetry samples taken in a worker thread, so a wedged GPU never stalls the loop.

    NVML calls can block for a long time on a GPU that stopped answering. The agent
    asks :meth:`refresh` once per heartbeat interval and reads :meth:`latest` when it
    heartbeats: a sample that has not come back within ``timeout_s`` leaves the last
    one in place, marked stale, and no second sample starts while one hangs.
    """

    def __init__(self, telemetry: Telemetry, timeout_s: float = 10.0) -> None:
        self.telemetry = telemetry
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self._latest: dict[str, Any] = {}
        self._at: float | None = None
        self._stuck_logged = False

    async def refresh(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if self._pending is None or self._pending.done():
            self._pending = loop.run_in_executor(self._pool, self.telemetry.sample)
        try:
            sample = await within(asyncio.shield(self._pending), self.timeout_s)
        except TimeoutError:
            if not self._stuck_logged:
                log.error("NVML did not answer within %.0f s (a wedged GPU?); heartbeats go on "
                          "with the last sample", self.timeout_s)
                self._stuck_logged = True
            return self.latest()
        self._stuck_logged = False
        self._latest, self._at = sample, time.monotonic()
        return sample

    def latest(self) -> dict[str, Any]:
        """The last sample; ``stale_s`` and ``error`` when the newest one is overdue."""
        if self._pending is not None and not self._pending.done() and self._at is not None \
                and time.monotonic() - self._at > self.timeout_s:
            return {**self._latest, "stale_s": round(time.monotonic() - self._at, 1),
                    "error": "NVML is not answering"}
        return self._latest

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def inventory_as_dicts(gpus: Sequence[GpuInfo]) -> list[dict[str, Any]]:
    """The inventory as plain dicts (for JSON output and doctor)."""
    return [asdict(g) for g in gpus]
