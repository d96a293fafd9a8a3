"""The training runtime in a real job process: loss falls, checkpoints, resume, cancel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from runtimes.checkpoint import find_checkpoint, flatten_optimizer, unflatten_optimizer
from runtimes.plot import line_plot_png
from runtimes.train_spec import parse_spec
from runtimes.trainloop import lr_at
from tests.runtimes.conftest import EventHook, JobRun, run_job_process

RUNTIME = "runtimes.training:run"
Runner = Callable[..., JobRun]


def mlp_payload(**extra: Any) -> dict[str, Any]:
    """A tiny MLP on a synthetic 4-class problem: trains to low loss in well under a second."""
    return {"type": "training", "model": {"arch": "mlp", "config": {"hidden": [32]}},
            "dataset": {"synthetic": {"kind": "classification", "samples": 256, "seed": 1}},
            "optimizer": {"name": "adamw", "lr": 0.01}, "batch_size": 32, "seed": 3, **extra}


def sigterm_after_steps(metrics_file: Path, steps: int, state: dict[str, Any]) -> EventHook:
    """An ``on_event`` hook: SIGTERM the job once ``steps`` lines are in metrics.jsonl.

    It watches the file from a thread rather than reacting to a progress event, so the
    signal is not timed to land while the job is writing that event.
    """

    def watch(proc: subprocess.Popen[bytes]) -> None:
        while proc.poll() is None:
            if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= steps:
                state["pids"] = [c.pid for c in psutil.Process(proc.pid).children(True)]
                state["sent"] = True
                os.kill(proc.pid, signal.SIGTERM)  # what the executor does first
                return
            time.sleep(0.02)

    def hook(event: dict[str, Any], proc: subprocess.Popen[bytes]) -> None:
        if event.get("event") == "started":
            threading.Thread(target=watch, args=(proc,), daemon=True).start()

    return hook


def metrics_lines(run: JobRun) -> list[dict[str, Any]]:
    path = run.package_dir / "artifacts" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def completed(run: JobRun) -> dict[str, Any]:
    finished = run.finished
    assert finished["outcome"] == "completed", (finished, run.stderr[-3000:])
    return finished


@pytest.mark.slow
def test_mlp_loss_falls_and_writes_checkpoints_plot_and_metrics(run_job: Runner) -> None:
    run = run_job(RUNTIME, mlp_payload(steps=40, grad_accum=2, clip_grad_norm=1.0,
                                       checkpoint_every=15, keep_checkpoints=2,
                                       schedule={"name": "cosine", "warmup_steps": 5}))
    finished = completed(run)
    lines = metrics_lines(run)
    assert [m["step"] for m in lines] == list(range(1, 41))
    assert lines[-1]["loss"] < lines[0]["loss"] * 0.2
    assert all(m["grad_norm"] >= 0 and m["samples_per_s"] > 0 for m in lines)
    metrics = finished["metrics"]
    assert metrics["steps"] == 40 and metrics["final_loss"] == pytest.approx(lines[-1]["loss"],
                                                                             abs=1e-5)
    assert metrics["train_time_s"] > 0 and metrics["device"]["kind"] == "cpu"
    assert "peak_rss_mb" in metrics
    root = run.package_dir / "artifacts" / "checkpoints"
    # keep_checkpoints=2 pruned step 15; 30 and the final 40 remain.
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000030", "step-000040"]
    assert (root / "latest").read_text().strip() == "step-000040"
    assert not list(root.glob(".tmp-*"))
    final = root / "step-000040"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["step"] == 40 and meta["model"]["config"]["in_features"] == 16
    weights = load_file(str(final / "model.safetensors"))
    assert weights["0.weight"].shape == (32, 16)
    opt = load_file(str(final / "optimizer.safetensors"))
    assert any(key.endswith("/exp_avg") for key in opt)
    assert (run.package_dir / "artifacts" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final loss" in (run.package_dir / "result.txt").read_text()
    progress = [e for e in run.named("progress") if e.get("stage") == "train"]
    assert progress and "eta_s" in progress[-1] and "loss" in progress[-1]["metrics"]


@pytest.mark.slow
def test_resume_from_zip_continues_at_saved_step_with_same_batches(run_job: Runner,
                                                                   tmp_path: Path) -> None:
    # Given a 20-step run that also checkpointed at step 10
    whole = run_job(RUNTIME, mlp_payload(steps=20, checkpoint_every=10))
    completed(whole)
    archive = tmp_path / "ckpt.zip"
    folder = whole.package_dir / "artifacts" / "checkpoints" / "step-000010"
    with zipfile.ZipFile(archive, "w") as zf:
        for item in folder.iterdir():
            zf.write(item, f"step-000010/{item.name}")
    # When a second job resumes from a zip of the step-10 checkpoint
    (tmp_path / "rest").mkdir()
    rest = run_job_process(tmp_path / "rest", RUNTIME, mlp_payload(steps=20, resume_from={
        "uri": str(archive)}))
    # Then it starts at step 11, sees the same batches, and ends where the first run ended
    completed(rest)
    assert rest.named("resumed")[0]["step"] == 10
    resumed, original = metrics_lines(rest), metrics_lines(whole)
    assert [m["step"] for m in resumed] == list(range(11, 21))
    for got, want in zip(resumed, original[10:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6)
        assert got["lr"] == want["lr"]


@pytest.mark.slow
def test_npz_dataset_then_resume_from_the_checkpoints_folder(tmp_path: Path) -> None:
    gen = np.random.default_rng(0)
    x = gen.normal(size=(128, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    payload = mlp_payload(steps=6, dataset={"uri": str(tmp_path / "data.npz")})
    (tmp_path / "a").mkdir()
    run = run_job_process(tmp_path / "a", RUNTIME, payload)
    assert completed(run)["metrics"]["final_step"] == 6
    folder = run.package_dir / "artifacts" / "checkpoints"
    meta = json.loads((folder / "step-000006" / "meta.json").read_text())
    assert meta["model"]["config"]["out_features"] == 2
    # A folder path resumes from the checkpoint its ``latest`` names.
    (tmp_path / "b").mkdir()
    more = run_job_process(tmp_path / "b", RUNTIME, {**payload, "steps": 8,
                                                      "resume_from": {"uri": str(folder)}})
    assert completed(more)["metrics"]["steps"] == 2
    assert [m["step"] for m in metrics_lines(more)] == [7, 8]


@pytest.mark.slow
def test_jsonl_text_trains_gpt_and_reports_tokens(run_job: Runner, tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"the cat sat on mat number {i % 7}."}) for i in range(80)]
    (tmp_path / "text.jsonl").write_text("\n".join(lines) + "\n")
    payload = {"type": "training", "dataset": {"uri": str(tmp_path / "text.jsonl")},
               "model": {"arch": "gpt", "config": {"block_size": 32, "n_layer": 1,
                                                   "n_embd": 32, "n_head": 2}},
               "optimizer": {"lr": 0.003}, "steps": 25, "batch_size": 8}
    run = run_job(RUNTIME, payload)
    metrics = completed(run)["metrics"]
    assert metrics["tokens_per_s"] > 0
    lines_out = metrics_lines(run)
    assert lines_out[0]["loss"] > 4.5  # about ln(256) at the start
    assert lines_out[-1]["loss"] < lines_out[0]["loss"] - 1.5


@pytest.mark.slow
def test_cancel_saves_checkpoint_at_current_step_and_marks_partial(run_job: Runner,
                                                                   tmp_path: Path) -> None:
    state: dict[str, Any] = {}
    metrics_file = tmp_path / "job" / "package" / "artifacts" / "metrics.jsonl"
    run = run_job(RUNTIME, mlp_payload(steps=1_000_000),
                  on_event=sigterm_after_steps(metrics_file, 3, state))
    sent = state.get("sent")
    finished = run.finished
    assert sent and finished["outcome"] == "canceled" and finished["partial"] is True
    last = metrics_lines(run)[-1]["step"]
    root = run.package_dir / "artifacts" / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step-{last:06d}"
    assert json.loads((root / f"step-{last:06d}" / "meta.json").read_text())["step"] == last
    assert (run.package_dir / "artifacts" / "loss.png").exists()
    assert "stopped by cancel" in (run.package_dir / "result.txt").read_text()


@pytest.mark.parametrize("patch, words", [
    ({"model": {"arch": "resnet"}}, "payload.model.arch"),
    ({"steps": 0}, "payload.steps"),
    ({"steps": 5, "epochs": 1}, "not both"),
    ({"optimizer": {"name": "lion"}}, "payload.optimizer.name"),
    ({"batch_size": "big"}, "payload.batch_size"),
    ({"dataset": {}}, "uri"),
    ({"dataset": {"uri": "http://x/data.npz"}}, "sha256"),
    ({"schedule": {"name": "cosine", "warmup_steps": -1}}, "warmup_steps"),
])
def test_invalid_payload_values_are_named(patch: dict[str, Any], words: str) -> None:
    from runtimes.base import JobFailed

    with pytest.raises(JobFailed) as info:
        parse_spec({**mlp_payload(steps=3), **patch})
    assert info.value.code == "invalid_job" and words in info.value.message


def test_invalid_payload_fails_the_job_with_invalid_job(run_job: Runner) -> None:
    run = run_job(RUNTIME, mlp_payload(steps=3, clip_grad_norm=-1))
    finished = run.finished
    assert finished["outcome"] == "failed" and finished["error_code"] == "invalid_job"
    assert "clip_grad_norm" in finished["error_message"]


@pytest.mark.slow
def test_bad_model_config_fails_with_invalid_job(run_job: Runner) -> None:
    payload = mlp_payload(steps=3, model={"arch": "gpt", "config": {"n_embd": 30,
                                                                    "n_head": 4}},
                          dataset={"synthetic": {"kind": "text", "samples": 40}})
    finished = run_job(RUNTIME, payload).finished
    assert finished["error_code"] == "invalid_job" and "n_head" in finished["error_message"]


def test_schedules_warm_up_and_decay() -> None:
    spec = parse_spec(mlp_payload(steps=100, optimizer={"lr": 1.0},
                                  schedule={"name": "cosine", "warmup_steps": 10}))
    assert lr_at(spec, 0, 100) == pytest.approx(0.1)
    assert lr_at(spec, 10, 100) == pytest.approx(1.0)
    assert lr_at(spec, 99, 100) < 0.01
    linear = parse_spec(mlp_payload(steps=10, schedule={"name": "linear",
                                                        "min_lr_ratio": 0.5}))
    assert lr_at(linear, 10, 10) == pytest.approx(0.5e-2)


def test_optimizer_state_round_trips_through_flattening() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    tensors, info = flatten_optimizer(opt.state_dict())
    info = json.loads(json.dumps(info))
    again = unflatten_optimizer(tensors, info)
    fresh = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    fresh.load_state_dict(again)
    assert fresh.param_groups[0]["lr"] == 0.1
    buf = fresh.state[model.weight]["momentum_buffer"]
    assert torch.equal(buf, opt.state[model.weight]["momentum_buffer"])


def test_find_checkpoint_follows_latest_pointer(tmp_path: Path) -> None:
    for step in (5, 10):
        (tmp_path / f"step-{step:06d}").mkdir()
        (tmp_path / f"step-{step:06d}" / "meta.json").write_text("{}")
    (tmp_path / "latest").write_text("step-000005\n")
    assert find_checkpoint(tmp_path).name == "step-000005"
    (tmp_path / "latest").unlink()
    assert find_checkpoint(tmp_path).name == "step-000010"


def test_loss_plot_is_a_valid_png_of_the_requested_size() -> None:
    data = line_plot_png([1, 2, 3], [3.0, 1.0, 0.5], width=200, height=100)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 200
    assert int.from_bytes(data[20:24], "big") == 100


@pytest.mark.slow
def test_end_to_end_through_the_executor(tmp_path: Path) -> None:
    from agent.errors import Outcome
    from agent.execution.executor import run_job_sync
    from agent.jobs import Job

    job = Job.from_dict({"job_id": "train-e2e", "payload": mlp_payload(steps=5)})
    report = run_job_sync(job, tmp_path / "out", launcher="spawn")
    assert report.outcome == Outcome.COMPLETED, report
    assert report.folder is not None
    assert (report.folder / "artifacts" / "checkpoints" / "step-000005" / "meta.json").exists()
    assert report.output["metrics"]["final_step"] == 5


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpt_mixed_precision_on_cuda(tmp_path: Path, precision: str) -> None:
    payload = {"type": "training", "precision": precision, "steps": 30, "batch_size": 16,
               "model": {"arch": "gpt", "config": {"block_size": 32, "n_layer": 1}},
               "dataset": {"synthetic": {"kind": "text", "samples": 200}},
               "optimizer": {"lr": 0.003}}
    run = run_job_process(tmp_path, RUNTIME, payload)  # a gpu test: the job sees the GPUs
    metrics = completed(run)["metrics"]
    assert metrics["device"]["kind"] == "cuda" and metrics["device"]["precision"] == precision
    assert metrics["peak_cuda_allocated_mb"] > 0
    lines = metrics_lines(run)
    assert lines[-1]["loss"] < lines[0]["loss"]
    if precision == "fp16":
        meta = json.loads((run.package_dir / "artifacts/checkpoints/step-000030/meta.json")
                          .read_text())
        assert meta["scaler"]["scale"] > 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_oom_fails_with_figures(tmp_path: Path) -> None:
    # Given a job whose GPU has only gpu_fill.LEAVE_FREE_MIB (256 MiB) left free
    # When it trains an MLP with a 16384 x 16384 layer (1 GiB of fp32 weights): within
    # every payload cap, and about 1 GiB of host memory while it is built on the CPU
    payload = mlp_payload(steps=2, model={"arch": "mlp", "config": {"hidden": [16384, 16384]}},
                          dataset={"synthetic": {"kind": "classification", "samples": 64}})
    run = run_job_process(tmp_path, "tests.runtimes.gpu_fill:run", payload)
    # Then moving the model to the GPU fails, and the job says so with the figures
    filled = run.named("gpu_filled")
    assert filled and filled[0]["free_mib"] < 1024, (filled, run.stderr[-3000:])
    finished = run.finished
    assert finished["error_code"] == "cuda_oom", (finished, run.stderr[-3000:])
    details = finished["details"]
    assert details["device"] == "cuda:0" and details["total_mib"] > 0
    assert details["requested_mib"] >= 1024 > details["free_mib"]
    assert "MiB" in finished["error_message"]
