"""The benchmarks still run end to end (tiny sizes; figures not checked)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.<module> ARGS`` from the checkout, its output captured."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_bench_runtimes_tiny_prints_both_workloads_and_ratios() -> None:
    # Given the checkout, when the runtime benchmark runs at its smoke-test size
    proc = bench("bench_runtimes", "--tiny", timeout=240)
    # Then both workloads ran in a fresh bare process and through the daemon, in pairs,
    # and each has its per-pair ratio line
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "method: per pair, a fresh `python`" in out and "fork server ready in" in out
    for name in ("training", "batch_inference"):
        assert f"\n{name}: " in out
        assert f"ratio {name}" in out
    assert out.count("(target >= 0.99x)") == 2 and out.count("(n=1 pairs)") == 2
    assert out.count("bare fresh process samples/s:") == 2
    assert out.count("job via daemon     samples/s:") == 2
    assert out.count("start-up, not in samples/s:") == 2
    assert "FAILED" not in out


@pytest.mark.slow
def test_bench_sandbox_tiny_prints_both_modes_side_by_side() -> None:
    # Given the checkout, when the sandbox benchmark runs at its smoke-test size
    proc = bench("bench_sandbox", "--tiny", timeout=90)
    if proc.returncode == 13:
        pytest.skip(f"no job sandbox on this machine: {proc.stdout.strip()}")
    # Then every figure is there for both modes, with its ratio and the summary block
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "fork server start and first job (not counted): on " in out
    for heading in ("start latency, request to the job's code", "tiny jobs (sleep",
                    "torch matmul job"):
        assert heading in out
    assert out.count("  sandbox on : ") == 3 and out.count("  sandbox off: ") == 3
    assert out.count("  on/off     : ") == 3
    assert "== summary: job sandbox on vs off" in out and "targets: " in out
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bench_logs_tiny_prints_its_method_ratio_and_memory() -> None:
    # Given the checkout, when the log shipping benchmark runs at its smoke-test size
    proc = bench("bench_logs", "--tiny")
    # Then the jobs ran in both modes, the copies matched, and every figure is printed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Workload: two `command` jobs" in out
    for line in ("ratio shipped / capture", "job runtime core / extensions (paired)",
                 "coordinator's copy == bytes on disk : yes", "CPU per MiB logged"):
        assert line in out
    for mode in ("core", "extensions", "embedded"):
        assert f"agent peak RSS (VmHWM), {mode}" in out


@pytest.mark.slow
def test_bench_package_prints_memory_and_download_time_for_both_coordinators() -> None:
    # Given the checkout, when the package benchmark runs at a small size
    proc = bench("bench_package", "--mb", "3", "--downloads", "1")
    # Then a package went through each coordinator and every figure is printed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("separate", "embedded"):
        assert f"== {name} coordinator: a 3.0 MB package ==" in out
    assert out.count("agent peak RSS after the upload") == 2
    assert out.count("coordinator peak RSS after the upload") == 1
    assert out.count("download wall time") == 2


def test_bench_transport_prints_both_arms_and_their_ratio() -> None:
    # Given the checkout, when the transport benchmark runs one round
    proc = bench("bench_transport", "--rounds", "1")
    # Then both arms made their calls against the coordinator, and the ratio is printed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "method: heartbeat + empty poll" in out
    assert "agent : median" in out and "httpx : median" in out
    assert "agent / httpx per round: median" in out and "n=1)" in out


def test_bench_seal_prints_both_arms_and_the_limit_holds(tmp_path: Path) -> None:
    # Given the checkout, when the seal benchmark runs on 600 files with a limit of 100
    proc = bench("bench_seal", "--files", "600", "--limit", "100", "--pairs", "2",
                 "--dir", str(tmp_path))
    # Then its method, both arms (n=2 each), what each packaged and the ratios are printed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "order alternating" in out and "600 empty files, limit 100 entries" in out
    limited = next(x for x in out.splitlines() if x.startswith("  limited  : "))
    unlimited = next(x for x in out.splitlines() if x.startswith("  unlimited: "))
    assert limited.count("n=2)") == 2 and limited.endswith("files packaged 100"), limited
    assert unlimited.endswith("files packaged 602"), unlimited
    assert "seal time, limited/unlimited per pair: median " in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bench_fork_prints_both_arms_and_their_ratio() -> None:
    # Given the checkout, when the fork benchmark runs two pairs
    proc = bench("bench_fork", "--pairs", "2")
    # Then its method, both arms' figures (n=2 each) and the per-pair ratio are printed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "arms' order alternating" in out and "objects left alive; 2 pairs" in out
    for arm in ("frozen   : ", "unfrozen : "):
        line = next(x for x in out.splitlines() if x.startswith(arm))
        assert line.count("n=2)") == 3, line
    assert "collection CPU frozen/unfrozen per pair: median " in out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed")
def test_bench_agent_prints_both_event_loops_side_by_side() -> None:
    # Given the checkout, when the agent benchmark compares the event loops on one pair
    proc = bench("bench_agent", "--only", "e", "--pairs", "1", "--jobs", "10", timeout=240)
    # Then both agents ran on the loop asked for, and the pair's ratio is printed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "== (e) the daemon's event loop: 1 pairs of 10 tiny jobs" in out
    assert "event loop: asyncio" in out and "event loop: uvloop" in out
    assert "pair 1: asyncio " in out and "uvloop/asyncio per pair" in out and "n=1)" in out


@pytest.mark.slow
def test_bench_events_prints_both_arms_and_their_ratio() -> None:
    # Given the checkout, when the events benchmark runs one short pair
    proc = bench("bench_events", "--seconds", "0.3", "--pairs", "1")
    # Then its method, both arms and the per-pair ratio are printed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "the order alternating pair by pair" in out and "pace 200/s" in out
    for arm in ("  paced   : agent CPU ", "  unpaced : agent CPU "):
        line = next(x for x in out.splitlines() if x.startswith(arm))
        assert "events parsed" in line and "each run's longest" in line, line
    assert "agent CPU, paced/unpaced per pair: median " in out
