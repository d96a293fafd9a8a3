"""benchmarks/gpu_smoke.sh: a machine without a GPU is told so at once, and the script parses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.daemon.scheduler import Device, Scheduler, gpu_request
from agent.jobs import Job
from benchmarks.gpu_smoke_steps import (
    SKIP_LINE,
    STEPS,
    Checks,
    Gpu,
    Options,
    _coordinator_constraints,
    check_bench,
    merge_figures,
    step_doctor,
    step_nvml,
)
from tests.agent.node.test_telemetry import FakeNvml

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "gpu_smoke.sh"
ALIAS = ROOT / "benchmarks" / "gpu_check.sh"
MIB = 1 << 20


def fake_smi(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def run_smoke(tmp_path: Path, smi: str | Path, script: Path = SMOKE,
              **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("SMOKE_", "GPU_SMOKE_", "NVIDIA_SMI"))}
    # CUDA hidden from torch: on a GPU machine the "no CUDA" case must still be one.
    full.update(OUT=str(tmp_path / "out"), NVIDIA_SMI=str(smi), PYTHON=sys.executable,
                CUDA_VISIBLE_DEVICES="", **env)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    return proc, time.monotonic() - t0


def assert_no_gpu(proc: subprocess.CompletedProcess[str], tmp_path: Path, why: str) -> None:
    assert proc.returncode == 99, proc.stdout + proc.stderr
    assert proc.stdout.startswith("no GPU: ") and why in proc.stdout, proc.stdout
    assert (tmp_path / "out" / "summary.txt").read_text().startswith("no GPU: ")
    assert not (tmp_path / "out" / "steps.tsv").exists()  # no step ran


def test_without_nvidia_smi_it_says_no_gpu_and_exits_99_at_once(tmp_path: Path) -> None:
    # Given a machine where nvidia-smi is not installed
    proc, seconds = run_smoke(tmp_path, tmp_path / "missing" / "nvidia-smi")
    # Then the script says so and exits 99 before any step, within a few seconds
    assert_no_gpu(proc, tmp_path, "nvidia-smi not found")
    assert seconds < 5


@pytest.mark.parametrize(("body", "said"), [
    ('echo "NVIDIA-SMI has failed" >&2; exit 9', "nvidia-smi failed (exit 9)"),  # no driver
    ('echo "No devices were found"', "nvidia-smi lists no GPU"),
], ids=["failing", "listing-nothing"])
def test_an_nvidia_smi_without_gpus_means_no_gpu(tmp_path: Path, body: str, said: str) -> None:
    proc, seconds = run_smoke(tmp_path, fake_smi(tmp_path, body))
    assert_no_gpu(proc, tmp_path, said)
    assert seconds < 5


def test_torch_without_cuda_means_no_gpu(tmp_path: Path) -> None:
    # Given an nvidia-smi that lists a GPU, but a torch that sees no CUDA device
    smi = fake_smi(tmp_path, 'echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000)"')
    proc, seconds = run_smoke(tmp_path, smi)
    # Then it is still "no GPU": only torch's import is paid, no step runs
    assert_no_gpu(proc, tmp_path, "torch sees no CUDA device")
    assert seconds < 60


def test_the_old_name_is_a_deprecated_alias(tmp_path: Path) -> None:
    proc, _ = run_smoke(tmp_path, tmp_path / "missing" / "nvidia-smi", script=ALIAS)
    assert_no_gpu(proc, tmp_path, "nvidia-smi not found")
    assert "deprecated" in proc.stderr and "gpu_smoke.sh" in proc.stderr


@pytest.mark.parametrize("script", [SMOKE, ALIAS], ids=["gpu_smoke", "gpu_check"])
def test_the_scripts_parse_and_pass_shellcheck(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_the_steps_module_lists_every_step_in_its_help() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke_steps", "--help"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in (*STEPS, "figures"):
        assert name in done.stdout


def test_the_steps_module_plays_the_agent_and_never_imports_torch() -> None:
    code = "import sys, benchmarks.gpu_smoke_steps; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr or "torch was imported"


def test_every_step_the_script_runs_exists() -> None:
    text = SMOKE.read_text()
    for name in ("nvml", "forkserver", "inference", "daemon", "cancel", "gputests", "ddp",
                 "bench", "suite", "figures"):
        assert f" {name}" in text and (name in STEPS or name == "figures")


def test_figures_merge_each_step_result_and_its_figures(tmp_path: Path) -> None:
    # Given what a run leaves: the shell's step lines and one step's figures
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "cancel.json").write_text('{"cancel_to_release_s": 1.5}')
    (tmp_path / "steps.tsv").write_text("1\tNVML\tPASS\t3\t1x H200\n"
                                        "8\tDDP\tSKIP\t0\tDDP needs two GPUs\n")
    merged = merge_figures(tmp_path)
    assert merged["steps"][0] == {"step": "1", "name": "NVML", "result": "PASS",
                                  "seconds": 3, "figure": "1x H200"}
    assert merged["steps"][1]["result"] == "SKIP"
    assert merged["figures"]["cancel"]["cancel_to_release_s"] == 1.5
    assert (tmp_path / "figures.json").is_file()


class OneH200(FakeNvml):
    """NVML as an H200 node answers it: bytes, milliwatts, degrees C, percent."""

    power_mw = 118_456

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: return 1
    def nvmlDeviceGetHandleByIndex(self, i: int) -> int: return i
    def nvmlSystemGetDriverVersion(self) -> str: return "570.86.15"
    def nvmlSystemGetCudaDriverVersion(self) -> int: return 12080
    def nvmlDeviceGetName(self, h: int) -> str: return "NVIDIA H200"
    def nvmlDeviceGetUUID(self, h: int) -> str: return "GPU-0000"
    def nvmlDeviceGetMinorNumber(self, h: int) -> int: return 0
    def nvmlDeviceGetPciInfo(self, h: int) -> Any: return SimpleNamespace(busId="0:1b:0.0")
    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]: return (9, 0)
    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=143771 * MIB, used=520 * MIB, free=0)
    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=0, memory=0)
    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int: return 31
    def nvmlDeviceGetPowerUsage(self, h: int) -> int: return self.power_mw
    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int: return 700_000
    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int: return 0x1
    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int: return 0


class PowerInWatts(OneH200):
    power_mw = 118  # a binding or driver that answered watts


def nvml_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: OneH200) -> Checks:
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    smi = fake_smi(tmp_path, 'echo "0, GPU-0000, NVIDIA H200, 143771"')
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    checks = Checks()
    step_nvml(Options(tmp_path, tmp_path, "cuda", "on", 60), checks)
    return checks


def test_nvml_step_passes_sane_units_that_agree_with_nvidia_smi(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checks = nvml_step(tmp_path, monkeypatch, OneH200())
    assert checks.failed == 0
    assert checks.figures["gpus"][0]["power_mw"] == 118_456
    assert checks.figures["telemetry"][0]["power_w"] == 118.5
    assert checks.headline == "1x NVIDIA H200, 140 GiB, 118 W, 31 C"


def test_nvml_step_fails_power_in_the_wrong_unit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    checks = nvml_step(tmp_path, monkeypatch, PowerInWatts())
    assert checks.failed >= 1
    assert "FAIL  gpu0 power 118 mW" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H200 NVL"])
def test_the_daemon_steps_job_fits_the_gpu_it_was_shaped_after(
        monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # Given a node whose one GPU NVML names so (the step shapes its job after that GPU)
    monkeypatch.setitem(sys.modules, "pynvml", OneH200())
    constraints = _coordinator_constraints([Gpu(0, "GPU-0000", name, 0, 143771 * MIB)])
    # When the agent's own scheduler places the job on that node
    job = Job.from_dict({"job_id": "smoke", "payload": {"type": "training"},
                         "constraints": constraints})
    sched = Scheduler([Device(0, name, 143771, "GPU-0000", 0)], cuda_version="12.8")
    placed = sched.reserve("smoke", gpu_request(job, True))
    # Then it lands on that GPU (the spec table's key, "H200 SXM", named no such GPU)
    assert placed is not None and placed.cuda_visible_devices == ["GPU-0000"], constraints


def test_a_skip_for_want_of_a_second_gpu_is_told_apart() -> None:
    # pytest -rs lines as step 3's log holds them
    log = ("SKIPPED [1] tests/agent/node/test_bench.py:301: needs two CUDA devices\n"
           "SKIPPED [2] tests/agent/execution/test_warm.py:301: needs a CUDA device\n")
    assert SKIP_LINE.findall(log) == ["1"]


def test_doctor_step_runs_doctors_probes_and_a_gpu_run_wants_every_check_ok(
        tmp_path: Path) -> None:
    # On this CPU machine, tried as the harness allows: "no GPU" warnings are right
    tried = Checks()
    step_doctor(Options(tmp_path, tmp_path, "cpu", "on", 60), tried)
    assert tried.failed == 0, tried.figures
    assert tried.figures["doctor"]["torch"][0] == "OK"
    if shutil.which("bwrap"):
        assert tried.figures["doctor"]["torch in sandbox"][0] == "OK"
    # but a run that claims CUDA fails on the same answers
    on_gpu = Checks()
    step_doctor(Options(tmp_path, tmp_path, "cuda", "on", 60), on_gpu)
    assert on_gpu.failed >= 1 and on_gpu.figures["doctor"]["nvidia driver"][0] == "WARN"


def bench_result(bf16: float, mem: float) -> dict[str, Any]:
    return {"devices": [{"device": "cuda:0", "kind": "cuda", "name": "NVIDIA H200",
                         "spec": "H200", "ratios": {"matmul_bf16": bf16, "mem_bw": mem},
                         "results": {"matmul_bf16": {"tflops": bf16 * 989.4},
                                     "mem_bw": {"gbs": mem * 4800}}}]}


@pytest.mark.parametrize(("bf16", "mem", "failed"), [(0.79, 0.9, 0), (1.3, 0.9, 1),
                                                     (0.79, 0.2, 1)])
def test_bench_ratios_must_be_plausible(bf16: float, mem: float, failed: int) -> None:
    checks = Checks()
    check_bench(checks, bench_result(bf16, mem), gpus=1)
    assert checks.failed == failed
    assert checks.figures["cuda:0"]["ratios"] == {"matmul_bf16": bf16, "mem_bw": mem}


def test_bench_must_measure_every_gpu() -> None:
    checks = Checks()
    check_bench(checks, bench_result(0.8, 0.9), gpus=2)
    assert checks.failed == 1
