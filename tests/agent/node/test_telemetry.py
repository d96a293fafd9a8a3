"""Telemetry: real NVML where the driver is absent, a stand-in only for the GPU itself."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from agent.node import telemetry
from agent.node.telemetry import GpuInfo, Telemetry, capabilities, decode_throttle_reasons

MIB = 1024 * 1024


class FakeNvml:
    """Answers like NVML for two GPUs; GPU 1 is a consumer card without power or ECC."""

    NVMLError = pynvml.NVMLError
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_MEMORY_ERROR_TYPE_CORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC

    def __init__(self) -> None:
        self.lost: set[int] = set()
        self.shutdowns = 0

    def _check(self, h: int, supported_on: tuple[int, ...] = (0, 1)) -> None:
        if h in self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if h not in supported_on:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: self.shutdowns += 1
    def nvmlDeviceGetCount(self) -> int: return 2
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int: return i
    def nvmlSystemGetDriverVersion(self) -> str: return "550.54.15"
    def nvmlSystemGetCudaDriverVersion(self) -> int: return 12040
    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        # old bindings answered bytes
        return "NVIDIA H100 80GB HBM3" if h == 0 else b"NVIDIA GeForce RTX 4090"
    def nvmlDeviceGetUUID(self, h: int) -> str: return f"GPU-{h:08d}"
    def nvmlDeviceGetMinorNumber(self, h: int) -> int: return 7 - h
    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        self._check(h)
        return [SimpleNamespace(pid=4242 + h, usedGpuMemory=512 * MIB)]
    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=f"00000000:0{h}:00.0")
    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return [(9, 0), (8, 9)][h]
    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        self._check(h)
        return SimpleNamespace(total=[81559, 24564][h] * MIB, used=1024 * MIB, free=0)
    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        self._check(h)
        return SimpleNamespace(gpu=97, memory=40)
    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        self._check(h)
        return 61
    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        self._check(h, supported_on=(0,))
        return 612_345
    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        self._check(h, supported_on=(0,))
        return 700_000
    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        self._check(h)
        return 0x4 | 0x20
    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        self._check(h, supported_on=(0,))
        return 3 if kind == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else 0


def test_no_driver_is_a_cpu_only_node_not_an_error(tmp_path: Any) -> None:
    # Given this machine, which has no NVIDIA driver, when telemetry starts for real
    with Telemetry(disk_paths=[tmp_path]) as tel:
        # Then it reports no GPUs with a reason, and still samples the host
        assert tel.inventory() == [] and not tel.has_gpus
        assert tel.reason is not None and ("NVML" in tel.reason or "driver" in tel.reason)
        sample = tel.sample()
    assert sample["gpus"] == []
    host = sample["host"]
    assert host["mem_total_mb"] > 0 and host["uptime_s"] > 0 and len(host["load_avg"]) == 3
    assert host["disks"][str(tmp_path)]["free_gb"] > 0
    json.dumps(sample)


def test_inventory_and_sample_from_nvml() -> None:
    fake = FakeNvml()
    tel = Telemetry(nvml=fake)
    h100, rtx = tel.inventory()
    assert h100 == GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-00000000", "00000000:00:00.0",
                           81559, "9.0", "550.54.15", "12.4", minor=7)
    assert rtx.minor == 6  # /dev/nvidia6: NVML's minor, not the index
    assert rtx.name == "NVIDIA GeForce RTX 4090" and rtx.compute_capability == "8.9"
    g0, g1 = tel.sample()["gpus"]
    assert g0["power_w"] == 612.3 and g0["power_limit_w"] == 700.0
    assert g0["throttle"] == ["sw_power_cap", "sw_thermal_slowdown"]
    assert (g0["ecc_corrected"], g0["ecc_uncorrected"]) == (3, 0)
    assert g0["util_gpu_pct"] == 97 and g0["mem_used_mb"] == 1024 and g0["temp_c"] == 61
    # Not supported on the consumer card: None, never an exception
    assert g1["power_w"] is None and g1["ecc_corrected"] is None and g1["util_gpu_pct"] == 97
    tel.close()
    tel.close()
    assert fake.shutdowns == 1


def test_a_lost_gpu_is_reported_and_the_others_still_sampled() -> None:
    fake = FakeNvml()
    tel = Telemetry(nvml=fake)
    fake.lost.add(1)
    g0, g1 = tel.sample()["gpus"]
    assert g0["temp_c"] == 61
    assert set(g1) == {"index", "uuid", "error"} and "lost" in g1["error"]


def test_decode_throttle_reasons_keeps_unknown_bits() -> None:
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(None) is None
    assert decode_throttle_reasons(0x1 | 0x8000) == ["gpu_idle", "0x8000"]


def test_capabilities_gpu_node_and_cpu_only_node() -> None:
    gpus = Telemetry(nvml=FakeNvml()).inventory()
    caps = capabilities(gpus, models=["llama3.2:3b"], bench={"bench_version": 1})
    assert caps["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert caps["gpus"][0]["memory_mb"] == 81559
    assert caps["cuda"] == "12.4" and "cpu_only" not in caps and caps["models"] == ["llama3.2:3b"]
    cpu = capabilities([], reason="NVIDIA driver not loaded")
    assert cpu["gpus"] == [] and cpu["cpu_only"] is True
    assert cpu["cpu_only_reason"] == "NVIDIA driver not loaded"
    assert cpu["host"]["cpu_count"] >= 1
    json.dumps(caps)


def test_cuda_version_string() -> None:
    assert telemetry.cuda_version_string(12040) == "12.4"
    assert telemetry.cuda_version_string(11080) == "11.8"
    assert telemetry.cuda_version_string(None) is None


def test_missing_disk_path_is_an_error_field(tmp_path: Any) -> None:
    assert "error" in telemetry.disk_sample(str(tmp_path / "absent"))


@pytest.mark.parametrize("gpus", [0, 2])
def test_sample_is_cheap_enough_for_a_heartbeat(tmp_path: Any, gpus: int) -> None:
    tel = Telemetry(disk_paths=[tmp_path, tmp_path], nvml=FakeNvml() if gpus else None)
    n = 200
    start = time.perf_counter()
    for _ in range(n):
        tel.sample()
    per_sample_ms = (time.perf_counter() - start) / n * 1000
    print(f"telemetry sample ({gpus} stand-in GPUs): {per_sample_ms:.3f} ms")
    # A heartbeat every few seconds can afford far more; this only catches a blocking call.
    assert per_sample_ms < 50


class BrokenNvml(FakeNvml):
    """A driver whose library does not match: nvmlInit fails."""

    def nvmlInit(self) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)


def test_a_broken_driver_is_a_failure_not_a_cpu_node() -> None:
    # Given NVML failing where the NVIDIA driver is installed
    tel = Telemetry(nvml=BrokenNvml(), driver_present=True)
    # Then the node is not silently CPU-only: a failure says what to do
    assert tel.failure is not None and "nvidia-smi" in tel.failure
    assert "gpus = []" in tel.failure
    from agent.node.doctor import check_nvml
    assert check_nvml(tel).status == "FAIL"
    # and with no driver installed, the same NVML error is just a CPU-only node
    cpu = Telemetry(nvml=BrokenNvml(), driver_present=False)
    assert cpu.failure is None and cpu.inventory() == [] and cpu.reason


def test_one_lost_gpu_drops_only_that_gpu() -> None:
    # Given a node where GPU 0 fell off the bus before the agent started
    nvml = FakeNvml()
    nvml.lost.add(0)
    tel = Telemetry(nvml=nvml, driver_present=True)
    # Then the other GPU serves, the lost one is named, and the agent may start
    assert [g.index for g in tel.inventory()] == [1]
    assert tel.lost[0]["index"] == 0 and tel.failure is None
    from agent.node.doctor import check_nvml
    assert check_nvml(tel).status == "WARN"


def test_a_wedged_gpu_never_stalls_the_event_loop() -> None:
    import asyncio
    import threading

    from agent.node.telemetry import Sampler

    release = threading.Event()

    class Wedged(Telemetry):
        calls = 0

        def sample(self) -> dict[str, Any]:
            Wedged.calls += 1
            if Wedged.calls > 1:
                release.wait(30)  # the second sample hangs, as NVML does on a wedged GPU
            return {"gpus": [], "n": Wedged.calls}

    async def main() -> None:
        sampler = Sampler(Wedged(nvml=BrokenNvml(), driver_present=False), timeout_s=0.2)
        assert (await sampler.refresh())["n"] == 1
        t0 = time.monotonic()
        again = await sampler.refresh()  # hangs in its thread; we wait only the timeout
        assert time.monotonic() - t0 < 1.0 and again["n"] == 1
        await asyncio.sleep(0.25)
        stale = sampler.latest()
        assert stale["n"] == 1 and stale["error"] == "NVML is not answering"
        await sampler.refresh()
        assert Wedged.calls == 2  # no second thread piled up behind the wedged one
        release.set()
        assert (await sampler.refresh())["n"] in (2, 3)
        sampler.close()

    asyncio.run(main())


def test_compute_pids_per_gpu_and_none_when_nvml_cannot_say() -> None:
    nvml = FakeNvml()
    tel = Telemetry(nvml=nvml, driver_present=True)
    assert tel.compute_pids(0) == [4242] and tel.compute_pids(1) == [4243]
    assert tel.compute_pids(7) is None  # no such GPU
    nvml.lost.add(1)
    assert tel.compute_pids(1) is None


class NoV3Call(FakeNvml):
    """A driver older than the binding's process call: pynvml raises a plain Exception."""

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        raise pynvml.NVMLLibraryMismatchError("Unversioned function called and the "
                                              "pyNVML version does not match the NVML lib")


def test_compute_pids_says_none_for_a_binding_the_driver_is_too_old_for_or_once_closed() -> None:
    tel = Telemetry(nvml=NoV3Call(), driver_present=True)
    assert tel.compute_pids(0) is None
    tel = Telemetry(nvml=FakeNvml(), driver_present=True)
    tel.close()
    assert tel.compute_pids(0) is None
