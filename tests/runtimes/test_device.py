"""Device selection, precision fallbacks, seeding, peak memory and the OOM guard."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from runtimes import device as dev
from runtimes.base import EventChannel, JobContext, JobFailed

NO_CUDA = not torch.cuda.is_available()


class Recorder(EventChannel):
    """An event channel that keeps what it was sent."""

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[dict[str, Any]] = []

    def send(self, event: str, **fields: Any) -> None:
        self.sent.append({"event": event, **fields})


def make_ctx(tmp_path: Path) -> tuple[JobContext, Recorder]:
    channel = Recorder()
    return JobContext({"job_id": "t", "payload": {}}, tmp_path, tmp_path, channel), channel


@pytest.fixture(autouse=True)
def restore_torch_globals():
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)
    torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU fallback")
def test_cpu_fallback_says_why_in_an_event_and_the_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    ctx, channel = make_ctx(tmp_path)
    setup = dev.select_device(ctx, {})
    assert setup.kind == "cpu" and setup.device == torch.device("cpu")
    assert setup.reason == "no CUDA device visible (CUDA_VISIBLE_DEVICES='')"
    event = next(e for e in channel.sent if e["event"] == "device")
    assert event["reason"] == setup.reason and event["precision"] == "fp32"
    assert ctx.metrics["device"]["reason"] == setup.reason
    assert "running on CPU" in capsys.readouterr().err


@pytest.mark.skipif(not NO_CUDA, reason="needs a node where CUDA cannot start")
@pytest.mark.parametrize("visible", ["GPU-8a1c0000-aaaa", "0,1"])
def test_a_job_given_a_gpu_it_cannot_use_fails_rather_than_run_on_the_cpu(
        tmp_path, monkeypatch, visible):
    # Given a job the agent gave GPUs to, in a process where CUDA cannot start
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    ctx, _ = make_ctx(tmp_path)
    # When it asks for the best device there is, Then it fails as a node fault, saying
    # which GPUs and why, instead of running many times slower on the CPU
    with pytest.raises(JobFailed) as failed:
        dev.select_device(ctx, {"device": "auto"})
    assert failed.value.code == "gpu_unavailable"
    assert visible in str(failed.value) and dev.cpu_reason() in str(failed.value)
    # and asking for the CPU outright still runs there
    assert dev.select_device(ctx, {"device": "cpu"}).kind == "cpu"


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU fallback")
def test_cpu_precisions(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    fp16 = dev.select_device(ctx, {"precision": "fp16"})
    assert fp16.amp_dtype is None and fp16.precision == "fp32"
    assert any("fp16" in note for note in fp16.notes)
    bf16 = dev.select_device(ctx, {"precision": "bf16"})
    assert bf16.amp_dtype is torch.bfloat16 and bf16.weights_dtype is torch.bfloat16
    with dev.autocast(bf16):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype is torch.bfloat16
    with dev.autocast(fp16):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype is torch.float32
    assert not dev.select_device(ctx, {"tf32": True}).tf32  # TF32 is a GPU feature
    with pytest.raises(JobFailed, match="no CUDA|no CUDA support|is_available") as info:
        dev.select_device(ctx, {"device": "cuda"})
    assert info.value.code == "no_capacity"


def test_bad_keys_are_invalid_jobs(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    for payload in ({"precision": "fp8"}, {"seed": "1"}, {"device": "tpu"}):
        with pytest.raises(JobFailed) as info:
            dev.select_device(ctx, payload)
        assert info.value.code == "invalid_job"


def test_seed_makes_torch_random_and_numpy_repeat(tmp_path):
    ctx, _ = make_ctx(tmp_path)

    def draw() -> tuple[float, float, float]:
        # On the CPU: on a GPU, deterministic mode would also set CUBLAS_WORKSPACE_CONFIG
        # in this process's environment, for every later test's children to inherit.
        dev.select_device(ctx, {"seed": 1234, "deterministic": True, "device": "cpu"})
        return torch.rand(1).item(), random.random(), float(np.random.rand())

    assert draw() == draw()
    assert torch.are_deterministic_algorithms_enabled()


def test_peak_memory_names_what_it_measures(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    setup = dev.select_device(ctx, {"device": "cpu"})
    dev.reset_peak_memory(setup)
    dev.synchronize(setup)
    figures = dev.peak_memory_metrics(setup)
    assert list(figures) == ["peak_rss_mb"] and figures["peak_rss_mb"] > 10


def test_oom_guard_turns_oom_into_cuda_oom_with_the_requested_size(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    setup = dev.select_device(ctx, {"device": "cpu"})
    message = ("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity "
               "of 79.15 GiB of which 1.2 GiB is free.")
    with pytest.raises(JobFailed) as info, dev.oom_guard(setup):
        raise torch.cuda.OutOfMemoryError(message)
    assert info.value.code == "cuda_oom"
    assert info.value.details["requested_mib"] == 2560.0
    assert "requested 2560 MiB" in info.value.message
    with pytest.raises(ValueError), dev.oom_guard(setup):  # anything else passes through
        raise ValueError("not an OOM")


def test_parse_requested_size_units():
    assert dev.parse_requested_mib("Tried to allocate 20.00 MiB") == 20.0
    assert dev.parse_requested_mib("Tried to allocate 512.00 KiB") == 0.5
    assert dev.parse_requested_mib("no size here") is None


def test_compile_falls_back_to_eager_with_a_warning(tmp_path, capsys):
    ctx, _ = make_ctx(tmp_path)
    setup = dev.select_device(ctx, {"device": "cpu"})
    model = torch.nn.Linear(2, 2)
    assert dev.maybe_compile(model, setup, {}) is model
    assert dev.maybe_compile(model, setup, {"compile": True,
                                            "compile_backend": "no-such-backend"}) is model
    assert "torch.compile failed" in capsys.readouterr().err
    compiled = dev.maybe_compile(model, setup, {"compile": True, "compile_backend": "eager"})
    assert compiled is not model
    x = torch.randn(3, 2)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_real_cuda_oom_reports_figures(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    setup = dev.select_device(ctx, {})
    assert setup.kind == "cuda" and setup.precision in ("bf16", "fp16")
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(JobFailed) as info, dev.oom_guard(setup):
        torch.empty(int(total * 2), dtype=torch.uint8, device=setup.device)
    details = info.value.details
    assert info.value.code == "cuda_oom"
    assert details["requested_mib"] > details["total_mib"] > 0
    assert details["free_mib"] > 0 and details["reserved_mib"] >= 0
