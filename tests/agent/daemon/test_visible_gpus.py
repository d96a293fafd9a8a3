"""Which GPUs the agent gives jobs: its own CUDA_VISIBLE_DEVICES (NVML ignores it), and
never one in MIG mode."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pynvml
import pytest

import agent.node.telemetry as telemetry
from agent.daemon.lifecycle import Agent
from agent.node.doctor import check_nvml
from tests.agent.daemon.helpers import Client, make_agent, start_coordinator
from tests.agent.node.test_telemetry import BrokenNvml, FakeNvml


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


class MigOnGpu0(FakeNvml):
    """GPU 0 (an H100) in MIG mode; GPU 1, a consumer card, has no MIG at all."""

    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE

    def nvmlDeviceGetMigMode(self, h: int) -> tuple[int, int]:
        self._check(h, supported_on=(0,))
        return (pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE)


def test_a_gpu_in_mig_mode_is_never_given_to_a_job_and_doctor_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Given a node whose GPU 0 is split into MIG instances (CUDA would not see it whole)
    monkeypatch.setitem(sys.modules, "pynvml", MigOnGpu0())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    caplog.set_level(logging.INFO, "agent")
    agent = make_agent(tmp_path)
    try:
        # Then telemetry still reports it, but jobs get only GPU 1, and the log says why
        assert [g.mig for g in agent.telemetry.inventory()] == [True, False]
        assert [d.uuid for d in agent.scheduler.devices] == ["GPU-00000001"]
        assert "gpu 0 (NVIDIA H100 80GB HBM3) is in MIG mode: left out" in caplog.text
        verdict = check_nvml(agent.telemetry)
        assert verdict.status == "WARN" and "MIG mode on for gpu 0" in verdict.detail
    finally:
        close(agent)


@pytest.mark.parametrize(("nvml", "spec", "gpus", "why"), [
    (FakeNvml, "1", None, "CUDA_VISIBLE_DEVICES"),
    (FakeNvml, None, (1,), "config gpus"),
    (MigOnGpu0, None, None, "MIG mode"),
])
def test_registration_offers_dispatch_only_the_gpus_jobs_can_get(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nvml: type[FakeNvml],
        spec: str | None, gpus: tuple[int, ...] | None, why: str) -> None:
    # Given a two-GPU node whose GPU 0 is left out (the environment, config or MIG)
    monkeypatch.setitem(sys.modules, "pynvml", nvml())
    if spec is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    coord = start_coordinator(tmp_path / "coord")
    client = Client(coord)
    two_gpus = client.submit({"type": "sleep", "seconds": 0.1}, gpu_count=2)
    agent = make_agent(tmp_path, url=coord.base_url,
                       **({"gpus": gpus} if gpus is not None else {}))

    async def register_then_poll() -> object:
        try:
            await agent.register()
            return await agent.client.poll()
        finally:
            await agent.shutdown()  # on this loop: the client's connection is bound to it

    try:
        # When it registers and asks for work
        polled = asyncio.run(register_then_poll())
        # Then the coordinator knows one GPU, so a job for two is not dispatched here
        miner = coord.store.miner("gpus-1")
        assert miner is not None
        caps = miner["capabilities"]
        assert [g["uuid"] for g in caps["gpus"]] == ["GPU-00000001"]
        assert caps["gpus_not_offered"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3",
                                             "uuid": "GPU-00000000", "why": why}]
        assert polled is None and client.job(two_gpus)["status"] == "pending"
    finally:
        Client.close_all()
        coord.stop()


def test_a_node_left_no_gpu_registers_as_cpu_only(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a two-GPU node whose agent is told to use none (CUDA_VISIBLE_DEVICES="")
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    coord = start_coordinator(tmp_path / "coord")
    agent = make_agent(tmp_path, url=coord.base_url)

    async def register() -> None:
        try:
            await agent.register()
        finally:
            await agent.shutdown()

    try:
        asyncio.run(register())
        # Then dispatch sees a CPU node, and people see both GPUs and why
        miner = coord.store.miner("gpus-1")
        assert miner is not None
        caps = miner["capabilities"]
        assert caps["gpus"] == [] and caps["cpu_only"] is True and caps["cuda"] == ""
        assert "every GPU is left out" in caps["cpu_only_reason"]
        assert [g["why"] for g in caps["gpus_not_offered"]] == ["CUDA_VISIBLE_DEVICES"] * 2
    finally:
        coord.stop()
