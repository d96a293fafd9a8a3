"""What a job asks of the node's GPUs, end to end on a CPU node: the real daemon, the
real coordinator on loopback, `miner-agent submit` and `status` as a client runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.agent.daemon.helpers import CLIENT_KEY, AgentProcess, start_coordinator

CLI = [sys.executable, "-m", "agent"]


def client_cli(coord_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--coordinator", coord_url, "--client-key", CLIENT_KEY],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MINER_AGENT_CONFIG": "/dev/null"})


def test_gpu_asks_on_a_cpu_node(tmp_path: Path) -> None:
    coord = start_coordinator(tmp_path / "coord")
    agent = AgentProcess(coord.base_url, tmp_path / "state")
    try:
        agent.wait_log("registered", timeout=120)
        # Given a job in the core coordinator's dialect: a GPU by name, VRAM in GB (its
        # `cuda` is left out: the coordinator itself matches that against capabilities),
        # that no node has (so it holds on a GPU node too)
        asks = tmp_path / "h900.json"
        asks.write_text(json.dumps({"payload": {"type": "sleep", "steps": 1, "step_s": 0},
                                    "constraints": {"gpu": "H900", "min_vram_gb": 8000}}))
        submitted = client_cli(coord.base_url, "submit", str(asks), "--wait")
        # Then it fails at once with no_capacity, saying what it asked and what the node
        # has, and never runs on the CPU instead
        assert submitted.returncode == 1, submitted.stdout + submitted.stderr
        job_id = next(j["job_id"] for j in coord.store.jobs())
        shown = client_cli(coord.base_url, "status", job_id)
        assert "no_capacity" in shown.stdout, shown.stdout
        assert "'H900'" in shown.stdout and "8192000 MiB" in shown.stdout
        assert "CPU-only" in shown.stdout or "of them qualify" in shown.stdout
        assert not (tmp_path / "state" / "jobs" / f"job_{job_id}" / "logs").exists()
        # Given a training job that asks nothing (the real coordinator never sends gpu_count)
        train = tmp_path / "train.json"
        train.write_text(json.dumps({"payload": {
            "type": "training", "model": {"arch": "mlp", "config": {"hidden": 8}},
            "dataset": {"synthetic": {"kind": "classification", "samples": 64,
                                      "features": 4, "classes": 2}},
            "steps": 2, "batch_size": 16}}))
        done = client_cli(coord.base_url, "submit", str(train), "--wait")
        # Then it runs (on a CPU node, on the CPU)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        agent.stop()
        coord.stop()
