"""miner-agent bench: the real torch child on this CPU, the spec-table arithmetic, and
which GPU each figure is measured on (faked here, real under the ``gpu`` mark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.node import bench
from runtimes import nodebench

ROOT = Path(__file__).resolve().parents[3]
NO_CUDA = not torch.cuda.is_available()

CLI = """
import argparse, sys
from agent.commands import node
parser = argparse.ArgumentParser(prog="miner-agent")
node.add_bench_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
code = args.func(args)
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH")
sys.exit(code)
"""


def _cli(*argv: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", CLI, "bench", *argv], cwd="/", env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_quick_bench_on_cpu_writes_json_and_summary(tmp_path: Path) -> None:
    # Given a CPU-only node, when the operator runs `miner-agent bench --quick`
    start = time.monotonic()
    out = _cli("--quick", "--json", str(tmp_path / "b.json"),
               "--attach-capabilities", str(tmp_path / "state" / "summary.json"))
    elapsed = time.monotonic() - start
    # Then it finishes well within a minute, never imports torch in the agent's process,
    assert out.returncode == 0, out.stderr
    assert elapsed < 60
    assert out.stdout.strip().endswith("NO_TORCH")
    # shows progress on stderr and a table on stdout,
    assert "bench: 9/9 done" in out.stderr
    assert "matmul fp32" in out.stdout and "(fp16 matmul has no fast path on CPU)" in out.stdout
    # and writes the versioned result and the capabilities summary
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["version"] == bench.BENCH_VERSION and result["quick"] is True
    (cpu,) = result["devices"]
    assert cpu["kind"] == "cpu" and cpu["spec"] == "unknown"
    assert cpu["results"]["matmul_fp32"]["tflops"] > 0
    assert cpu["results"]["matmul_tf32"]["skipped"]
    assert cpu["results"]["train_mlp"]["samples_s"] > 0
    assert cpu["results"]["infer_mlp"]["samples_s"] > 0
    assert cpu["results"]["mem_bw"]["gbs"] > 0
    summary = bench.load_bench_summary(tmp_path / "state" / "summary.json")
    assert summary is not None and summary["bench_version"] == bench.BENCH_VERSION
    assert summary["devices"][0]["matmul_tflops"]["fp32"] > 0


def test_a_device_torch_cannot_see_fails_with_the_childs_reason() -> None:
    out = _cli("--quick", "--device", "cuda:0")
    assert out.returncode == 1
    assert "bench failed" in out.stderr and "torch sees no CUDA device" in out.stderr


def test_timeout_kills_the_child() -> None:
    with pytest.raises(RuntimeError, match="timed out"):
        bench.run_bench(quick=True, device="cpu", progress=None, timeout_s=0.3)


@pytest.mark.parametrize(("name", "key"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100", "H100 SXM"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200 96GB"),
    ("NVIDIA GH200 120GB", "GH200 96GB"),
    ("NVIDIA GH200 144G HBM3e", "GH200 144GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA A10G", None),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("Tesla V100-SXM2-16GB", "V100"),
    ("Tesla T4", "T4"),
    ("NVIDIA RTX A6000", None),
    ("AMD EPYC", None),
])
def test_known_gpu_names(name: str, key: str | None) -> None:
    assert bench.known_gpu(name) == key


def test_ratios_and_table_for_a_known_gpu() -> None:
    result: dict[str, Any] = {"version": 1, "devices": [{
        "device": "cuda:0", "kind": "cuda", "name": "NVIDIA H100 80GB HBM3",
        "results": {"matmul_bf16": {"tflops": 742.0}, "mem_bw": {"gbs": 2680.0},
                    "matmul_fp16": {"error": "RuntimeError: CUDA out of memory"},
                    "train_mlp": {"samples_s": 123456.0}}}]}
    bench.annotate(result)
    dev = result["devices"][0]
    assert dev["spec"] == "H100 SXM"
    assert dev["ratios"] == {"matmul_bf16": 0.75, "mem_bw": 0.8}
    table = bench.format_table(result)
    assert "H100 SXM" in table and "75%" in table and "989.4" in table
    assert "CUDA out of memory" in table and "123,456" in table
    summary = bench.bench_summary_for_capabilities(result)
    assert summary["devices"][0]["matmul_tflops"] == {"bf16": 742.0}
    json.dumps(summary)


def test_default_summary_path_prefers_systemd_state_directory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/miner-agent:/var/lib/other")
    assert bench.default_summary_path() == Path("/var/lib/miner-agent/bench-summary.json")
    assert bench.default_summary_path("/srv/state") == Path("/srv/state/bench-summary.json")
    monkeypatch.delenv("STATE_DIRECTORY")
    assert bench.default_summary_path().parent == Path("/var/lib/miner-agent")


def test_missing_or_broken_summary_is_none(tmp_path: Path) -> None:
    assert bench.load_bench_summary(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert bench.load_bench_summary(tmp_path / "bad.json") is None


@pytest.mark.parametrize(("name", "memory_mb", "key"), [
    # torch reports 97,871 MiB for the 96 GB HBM3 part and 145,922 MiB for 144 GB HBM3e
    ("NVIDIA GH200 480GB", 97871, "GH200 96GB"),
    ("NVIDIA GH200 144G HBM3e", 145922, "GH200 144GB"),
    ("NVIDIA GH200", 145922, "GH200 144GB"),
    ("NVIDIA GH200", None, "GH200 96GB"),  # nothing tells them apart: the lower figure
    ("NVIDIA H200", 143771, "H200 SXM"),  # memory decides nothing outside GH200
    ("NVIDIA H200 NVL", 143771, "H200 NVL"),
])
def test_gh200_memory_picks_its_bandwidth(name: str, memory_mb: int | None, key: str) -> None:
    assert bench.known_gpu(name, memory_mb) == key


@pytest.mark.parametrize(("name", "bf16", "fp32", "mem"), [
    ("NVIDIA H100 80GB HBM3", 989.4, 67, 3350),
    ("NVIDIA H100 NVL", 835.5, 60, 3900),
    ("NVIDIA H100 PCIe", 756, 51.2, 2000),
    ("NVIDIA H200", 989.4, 67, 4800),
    ("NVIDIA H200 NVL", 835.5, 60, 4800),
    ("NVIDIA GH200 480GB", 989.4, 67, 4000),
    ("NVIDIA GH200 144G HBM3e", 989.4, 67, 4900),
])
def test_hopper_peaks_are_dense_and_per_part(name: str, bf16: float, fp32: float,
                                             mem: float) -> None:
    peaks = bench.spec_peaks(name)
    assert (peaks["bf16"], peaks["fp16"], peaks["fp32"], peaks["mem"]) == (bf16, bf16, fp32, mem)
    assert peaks["tf32"] == pytest.approx(bf16 / 2, rel=0.01)


def test_a_figure_above_the_spec_peak_is_flagged_suspect() -> None:
    # Given an H200 whose bf16 figure is what this workplace measured and whose memory
    # copy came out above the spec sheet (the signature of events timed on another GPU)
    result: dict[str, Any] = {"version": 1, "devices": [{
        "device": "cuda:1", "kind": "cuda", "name": "NVIDIA H200", "memory_mb": 143771,
        "results": {"matmul_bf16": {"tflops": 790.0}, "mem_bw": {"gbs": 41000.0}}}]}
    # When it is annotated and printed
    bench.annotate(result)
    dev = result["devices"][0]
    table = bench.format_table(result)
    # Then the healthy figure is a plain ratio and the impossible one is called out
    assert dev["spec"] == "H200 SXM"
    assert dev["ratios"] == {"matmul_bf16": 0.798, "mem_bw": 8.542}
    assert dev["suspect"] == ["mem_bw"]
    bf16_row = next(ln for ln in table.splitlines() if "matmul bf16" in ln)
    mem_row = next(ln for ln in table.splitlines() if "memory copy" in ln)
    assert "80%" in bf16_row and "SUSPECT" not in bf16_row
    assert "854%" in mem_row and "SUSPECT" in mem_row
    assert "suspect" not in bench.bench_summary_for_capabilities(result)["devices"][0]


def test_placement_makes_the_measured_gpu_current() -> None:
    cpu = nodebench.placement(torch.device("cpu"))
    assert cpu.device == torch.device("cpu") and cpu.cuda_index is None
    with cpu.context():
        pass
    gpu = nodebench.placement(torch.device("cuda", 3))
    assert gpu.device == torch.device("cuda", 3) and gpu.cuda_index == 3
    context = gpu.context()
    assert isinstance(context, torch.cuda.device) and context.idx == 3
    with pytest.raises(ValueError, match="cuda:N"):
        nodebench.placement(torch.device("cuda"))


class FakeGpus:
    """Just enough of torch.cuda to see where a measurement's events and syncs land."""

    def __init__(self) -> None:
        self.current = 0
        self.log: list[tuple[str, int, int]] = []  # (what, on which GPU, current GPU)
        gpus = self

        class Device:
            def __init__(self, idx: int) -> None:
                self.idx = idx

            def __enter__(self) -> None:
                self.prev, gpus.current = gpus.current, self.idx

            def __exit__(self, *exc: object) -> None:
                gpus.current = self.prev

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing

            def record(self, stream: int | None = None) -> None:
                gpus.log.append(("record", gpus.current if stream is None else stream,
                                 gpus.current))

            def synchronize(self) -> None:
                pass

            def elapsed_time(self, end: object) -> float:
                return 1.0

        self.Device, self.Event = Device, Event

    def stream(self, device: torch.device | None = None) -> int:
        return self.current if device is None or device.index is None else device.index

    def synchronize(self, device: torch.device | None = None) -> None:
        self.log.append(("sync", self.stream(device), self.current))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "device", self.Device)
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "current_stream", self.stream)
        monkeypatch.setattr(torch.cuda, "synchronize", self.synchronize)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def test_events_and_syncs_of_gpu_n_land_on_gpu_n(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a node whose current GPU is 0 and a measurement of GPU 2
    gpus = FakeGpus()
    gpus.install(monkeypatch)
    seen: list[tuple[torch.device, int]] = []

    def measure(device: torch.device, quick: bool) -> dict[str, Any]:
        def kernel() -> None:
            seen.append((device, gpus.current))
        return {"s": nodebench.time_per_iter(kernel, device, target_s=0.001)}

    # When it runs as bench runs every figure
    out = nodebench.run_task(measure, torch.device("cuda", 2), quick=True)
    # Then its kernels, events and syncs all ran with GPU 2 current and on GPU 2,
    timed = len(seen) - 3  # after two warm-up calls and one estimate
    assert out["s"] == pytest.approx(1e-3 / timed)  # the fake events' 1 ms over those
    assert seen and set(seen) == {(torch.device("cuda", 2), 2)}
    assert [w for w, _, _ in gpus.log].count("record") == 2
    assert {(on, current) for _, on, current in gpus.log} == {(2, 2)}
    # and GPU 0 is current again afterwards
    assert gpus.current == 0


def test_every_cpu_task_still_produces_a_figure() -> None:
    cpu = torch.device("cpu")
    for name, fn in nodebench.TASKS:
        out = nodebench.run_task(fn, cpu, quick=True)
        assert "error" not in out, (name, out)
        if "skipped" not in out:
            assert next(v for k, v in out.items() if k in ("tflops", "gbs", "samples_s")) > 0


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_no_gpu_beats_its_spec_sheet() -> None:
    devices = []
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        report = nodebench.describe(device)
        report["results"] = {name: nodebench.run_task(fn, device, quick=True)
                             for name, fn in nodebench.TASKS if name in ("matmul_bf16", "mem_bw")}
        devices.append(report)
    result = bench.annotate({"devices": devices})
    for dev in result["devices"]:
        assert dev["suspect"] == [], bench.format_table(result)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_the_last_gpu_is_measured_on_itself_not_on_gpu_0() -> None:
    # Given GPU 0 current, as it is in the bench child
    last = torch.cuda.device_count() - 1
    torch.cuda.set_device(0)
    first = nodebench.run_task(nodebench.memory_bandwidth, torch.device("cuda", 0), True)
    for index in (0, last):
        torch.cuda.reset_peak_memory_stats(index)
    # When the last GPU is measured
    out = nodebench.run_task(nodebench.memory_bandwidth, torch.device("cuda", last), True)
    # Then its buffers live there, GPU 0 is untouched and current again, and the figure is
    # of the same order as GPU 0's (timing GPU 0's idle stream made it 10-100x too high)
    assert torch.cuda.max_memory_allocated(last) >= 2 * out["bytes"]
    assert torch.cuda.max_memory_allocated(0) == 0
    assert torch.cuda.current_device() == 0
    assert 0.5 < out["gbs"] / first["gbs"] < 2


def test_the_bench_child_counts_gpus_as_nvidia_smi_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # `--device cuda:1` is nvidia-smi's GPU 1: CUDA must count by PCI bus, not speed
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert bench._child_env()["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # unless the operator chose an order
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    assert bench._child_env()["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
