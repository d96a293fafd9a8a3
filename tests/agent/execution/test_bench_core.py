"""benchmarks/bench_core.py runs end to end at its smoke-test size (figures not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_bench_core_tiny_prints_every_section_with_its_method() -> None:
    # Given the checkout, when the core benchmark runs at its smoke-test size
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_core", "--tiny"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    # Then every section printed its method and figures, and every byte was kept
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "method: arms alternate in every pair" in out
    assert "spawn / fork server per pair: median" in out
    assert "cancel latency, cancel request to exit" in out
    assert "every byte on disk: True" in out and "every byte on disk and in lines: True" in out
    assert "ONE thread each: hashlib's own file_digest" in out
    assert "agent / hashlib per pair: median" in out and "apart, not in the ratio" in out
    assert "execution-side CPU per tiny job" in out
    assert ", p95 " not in out  # one or two samples each: no p95 is printed
    assert "Traceback" not in proc.stderr
