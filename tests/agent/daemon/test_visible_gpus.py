"""The agent's own CUDA_VISIBLE_DEVICES narrows the GPUs it gives jobs (NVML ignores it)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

import agent.node.telemetry as telemetry
from agent.config import load_config
from agent.daemon.lifecycle import Agent
from tests.agent.daemon.helpers import MINER_KEY
from tests.agent.node.test_telemetry import BrokenNvml, FakeNvml


def make_agent(tmp_path: Path, **overrides: object) -> Agent:
    cfg = load_config(Path("/dev/null"), environ={}, overrides={
        "coordinator_url": "http://127.0.0.1:9", "miner_id": "gpus-1", "launcher": "spawn",
        "state_dir": tmp_path / "state", "cache_dir": tmp_path / "cache", **overrides})
    return Agent(cfg, MINER_KEY)


def close(agent: Agent) -> None:
    asyncio.run(agent.shutdown())


@pytest.mark.parametrize(("spec", "uuids"), [
    (None, ["GPU-00000000", "GPU-00000001"]),  # not set: every GPU NVML sees
    ("GPU-00000001", ["GPU-00000001"]),
    ("1,0", ["GPU-00000001", "GPU-00000000"]),
    ("", []),                                  # CPU-only on purpose
])
def test_the_scheduler_gets_the_gpus_the_agents_environment_leaves_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        spec: str | None, uuids: list[str]) -> None:
    # Given a node with two GPUs (NVML's answers; the GPU is all that is absent here)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    if spec is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    caplog.set_level(logging.INFO, "agent")
    # When the agent starts with CUDA_VISIBLE_DEVICES set (or not) for itself
    agent = make_agent(tmp_path)
    try:
        # Then jobs are given those GPUs only, and the log says which
        assert [d.uuid for d in agent.scheduler.devices] == uuids
        if spec is not None:
            assert f"CUDA_VISIBLE_DEVICES={spec!r} in the agent's environment: " \
                   f"{len(uuids)} of 2 GPU(s) used" in caplog.text
        if spec == "1,0":  # an H100 and a 4090: indices could be read two ways
            assert "mixed GPU models" in caplog.text
    finally:
        close(agent)


def test_config_gpus_wins_over_the_environment(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    agent = make_agent(tmp_path, gpus=(1,))
    try:
        assert [d.uuid for d in agent.scheduler.devices] == ["GPU-00000001"]
    finally:
        close(agent)


@pytest.mark.parametrize(("spec", "stops"), [("", False), ("-1", False), ("0", True),
                                             (None, True)])
def test_a_broken_driver_stops_the_agent_unless_it_was_told_to_use_no_gpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str | None,
        stops: bool) -> None:
    # Given an installed driver that NVML cannot serve
    monkeypatch.setitem(sys.modules, "pynvml", BrokenNvml())
    monkeypatch.setattr(telemetry, "nvidia_driver_present", lambda: True)
    if spec is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    agent = make_agent(tmp_path)
    try:
        # Then the agent refuses to start, unless its environment names no GPU at all
        assert agent.telemetry.failure is not None
        assert agent._cpu_only_on_purpose is not stops
    finally:
        close(agent)
