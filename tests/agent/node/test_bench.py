"""miner-agent bench: the real torch child on this CPU, and the spec-table arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.node import bench

ROOT = Path(__file__).resolve().parents[3]

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
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10", "A10"),
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
