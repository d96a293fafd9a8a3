"""Two CPU ranks (gloo) under torchrun, started from a real job process."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.runtimes.conftest import JobRun
from tests.runtimes.test_training import sigterm_after_steps

RUNTIME = "runtimes.training:run"
Runner = Callable[..., JobRun]
pytestmark = pytest.mark.slow  # torchrun plus two ranks import torch three times


def ddp_payload(**extra: Any) -> dict[str, Any]:
    return {"type": "training", "model": {"arch": "mlp", "config": {"hidden": [16]}},
            "dataset": {"synthetic": {"kind": "classification", "samples": 256}},
            "optimizer": {"name": "sgd", "lr": 0.05}, "batch_size": 16,
            "distributed": {"nproc": 2, "backend": "gloo"}, **extra}


def metrics_lines(run: JobRun) -> list[dict[str, Any]]:
    path = run.package_dir / "artifacts" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_gloo_ranks_train_and_rank0_reports(run_job: Runner, tmp_path: Path) -> None:
    before = set(Path(tempfile.gettempdir()).glob("torchelastic_*"))
    run = run_job(RUNTIME, ddp_payload(steps=12, checkpoint_every=6), timeout_s=120)
    finished = run.finished
    # torchrun's folder is in the job's scratch, not a torchelastic_* left in /tmp
    assert set(Path(tempfile.gettempdir()).glob("torchelastic_*")) <= before
    assert (tmp_path / "job" / "work" / "ddp" / "torchelastic").is_dir()
    assert finished["outcome"] == "completed", run.stderr[-3000:]
    metrics = finished["metrics"]
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo"
    assert metrics["steps"] == 12 and metrics["samples_per_s"] > 0
    lines = metrics_lines(run)
    assert [m["step"] for m in lines] == list(range(1, 13))  # rank 0 alone writes
    assert lines[-1]["loss"] < lines[0]["loss"]
    root = run.package_dir / "artifacts" / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000006", "step-000012"]
    assert json.loads((root / "step-000012" / "meta.json").read_text())["world_size"] == 2
    assert [e["step"] for e in run.named("checkpoint")] == [6, 12]


def test_cancel_stops_both_ranks_at_one_step_and_saves(run_job: Runner,
                                                        tmp_path: Path) -> None:
    state: dict[str, Any] = {}
    metrics_file = tmp_path / "job" / "package" / "artifacts" / "metrics.jsonl"
    run = run_job(RUNTIME, ddp_payload(steps=1_000_000), timeout_s=120,
                  on_event=sigterm_after_steps(metrics_file, 3, state))
    finished = run.finished
    assert "sent" in state, run.stderr[-3000:]
    assert finished["outcome"] == "canceled" and finished["partial"] is True
    last = metrics_lines(run)[-1]["step"]
    root = run.package_dir / "artifacts" / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step-{last:06d}"
    assert (run.package_dir / "artifacts" / "loss.png").exists()
    # torchrun and both ranks are gone once the job process has exited
    assert len(state["pids"]) >= 3
    assert not [pid for pid in state["pids"] if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_failing_rank_fails_the_job_with_its_own_cause(run_job: Runner,
                                                       tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    run = run_job(RUNTIME, ddp_payload(steps=3, dataset={"uri": str(missing)}),
                  timeout_s=120)
    finished = run.finished
    assert finished["outcome"] == "failed"
    assert finished["error_code"] == "input_error" and "no such file" in \
        finished["error_message"]
