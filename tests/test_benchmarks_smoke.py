"""benchmarks/bench_runtimes.py still runs end to end (tiny sizes; figures not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_runtimes_tiny_prints_both_workloads_and_ratios() -> None:
    # Given the checkout, when the runtime benchmark runs at its smoke-test size
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_runtimes", "--tiny"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    # Then both workloads ran bare and as a job, and each has its ratio line
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "fork server ready in" in out
    for name in ("training", "batch_inference"):
        assert f"\n{name}: " in out
        assert f"ratio {name}" in out and "target >= 0.97x" in out
    assert out.count("bare in-process samples/s:") == 2
    assert out.count("job via agent   samples/s:") == 2
    assert out.count("job start-up, not in samples/s:") == 2
    assert "FAILED" not in out
