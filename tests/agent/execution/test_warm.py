"""Warm model workers: a real ``runtimes.warm`` process serving inference jobs run by the
real executor, with tiny GPT-2 models built and saved in the test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from agent.errors import CancelReason, Outcome
from agent.execution.executor import ExecutorConfig, JobReport, JobRun
from agent.execution.launcher import LaunchRequest, SpawnLauncher
from agent.execution.warm import WarmPool, WarmRun, WarmSettings
from agent.execution.warmworker import only_gpus
from agent.jobs import Job
from tests.runtimes.test_inference import tiny_tokenizer

HAS_CUDA = torch.cuda.is_available()  # at import, before conftest hides the GPUs
PROMPT = "the quick brown fox"
T = TypeVar("T")


def build_gpt2(folder: Path, hidden: int = 64, layers: int = 1, seed: int = 0) -> Path:
    """A random GPT-2 with no end token (runs go to max_new_tokens), saved with a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=8192, n_embd=hidden,
                        n_layer=layers, n_head=4, pad_token_id=1, bos_token_id=2,
                        eos_token_id=None)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def job(job_id: str, model: Any = "tiny", **payload: Any) -> Job:
    body = {"type": "inference", "model": model, "prompt": PROMPT, "max_new_tokens": 8,
            **payload}
    return Job.from_dict({"job_id": job_id, "payload": body, "constraints": {}})


class Node:
    """An executor config and a warm pool over ``tmp``, with the given models named."""

    def __init__(self, tmp: Path, models: dict[str, Path], **settings: Any) -> None:
        self.cfg = ExecutorConfig(tmp / "jobs", work_root=tmp / "work", cancel_grace_s=5,
                                  contract_env={"MINER_MODELS": json.dumps(
                                      {k: str(v) for k, v in models.items()})})
        self.cfg.out_root.mkdir(parents=True, exist_ok=True)
        self.pool = WarmPool(WarmSettings(tmp / "warm", **settings))

    def run_for(self, one: Job, gpus: tuple[int, ...] = (),
                gpu_ids: list[str] | None = None) -> WarmRun:
        run = self.pool.run_for(one, self.cfg, gpus, gpu_ids=gpu_ids, environ=dict(os.environ),
                                created_at=time.time())
        assert isinstance(run, WarmRun)
        return run

    async def run(self, one: Job, during: Callable[[JobRun], Awaitable[None]] | None = None
                  ) -> JobReport:
        run = self.run_for(one)
        task = asyncio.create_task(run.run())
        if during is not None:
            await during(run)
        return await task


def metrics(report: JobReport) -> dict[str, Any]:
    return dict(report.output["metrics"])


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class Loop:
    """One event loop for a module's tests, so they share a worker (each start is seconds)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 90.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def shared(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Loop]]:
    """A node whose CPU worker the module's tests share (started by the first job)."""
    loop = Loop()
    node = Node(tmp_path_factory.mktemp("node"), {"tiny": tiny})
    yield node, loop
    loop.run(node.pool.close())
    loop.close()


def test_a_second_job_reuses_the_model_cancel_stops_it_and_bad_payloads_fail_alone(
        shared: tuple[Node, Loop]) -> None:
    node, loop = shared

    async def cancel_once_generating(run: JobRun) -> None:
        await until(lambda: (run.progress.get("metrics") or {}).get("tokens_generated", 0) > 2)
        run.cancel(CancelReason.REQUESTED)

    async def scenario() -> list[JobReport]:
        reports = [await node.run(job("cold")), await node.run(job("warm"))]
        reports.append(await node.run(job("long", max_new_tokens=30000),
                                      during=cancel_once_generating))
        for bad in (job("unknown", model="no-such-model"), job("types", max_new_tokens="many"),
                    job("huge", max_new_tokens=10 ** 9), job("notype", model=["a", "list"])):
            reports.append(await node.run(bad))
        reports.append(await node.run(job("after")))
        return reports

    cold, warm, long, unknown, types, huge, notype, after = loop.run(scenario())
    # The first job loaded the model; the second found it loaded, in the same worker
    assert cold.outcome is Outcome.COMPLETED and metrics(cold)["model_cached"] is False
    assert metrics(cold)["model_load_ms"] > 0
    assert warm.outcome is Outcome.COMPLETED and metrics(warm)["model_cached"] is True
    assert metrics(warm)["model_load_ms"] == 0 and metrics(warm)["load_time_s"] == 0
    assert metrics(warm)["tokens_generated"] == 8
    # Its package is a normal inference package: text in result.txt and stdout, checked
    folder = warm.folder
    assert folder is not None
    text = (folder / "result.txt").read_text()
    assert text and (folder / "logs/stdout.log").read_text() == text
    assert "running on CPU" in (folder / "logs/stderr.log").read_text()
    assert warm.output["exit"]["via"] == "warm" and warm.output["exit"]["code"] == 0
    assert warm.output["environment"]["isolation"]["worker"]["key"] == "cpu"
    # The cancel stopped generation long before max_new_tokens; the text so far is kept
    assert long.outcome is Outcome.CANCELED and long.partial
    assert 0 < metrics(long)["tokens_generated"] < 30000
    assert metrics(long)["stop_reason"] == "canceled"
    # Hostile payloads failed their own job with a clear code
    assert (unknown.outcome, unknown.error_code) == (Outcome.FAILED, "model_not_found")
    assert (types.error_code, huge.error_code, notype.error_code) == ("invalid_job",) * 3
    # And the same worker served the next job from its cache
    assert after.outcome is Outcome.COMPLETED and metrics(after)["model_cached"] is True
    pids = {r.output["environment"]["isolation"]["worker"]["pid"] for r in
            (cold, warm, long, after)}
    assert len(pids) == 1


def test_a_job_canceled_while_it_waits_behind_another_ends_at_once(
        shared: tuple[Node, Loop]) -> None:
    # Given a long job generating in the worker and a second one waiting behind it
    node, loop = shared

    async def scenario() -> tuple[JobReport, JobReport, bool]:
        first = node.run_for(job("busy", max_new_tokens=30000))
        first_task = asyncio.create_task(first.run())
        await until(lambda: (first.progress.get("metrics") or {}).get("tokens_generated", 0) > 0)
        second = node.run_for(job("waiting"))
        second_task = asyncio.create_task(second.run())
        await until(lambda: second.warm is not None)
        # When the waiting one is canceled
        second.cancel(CancelReason.REQUESTED)
        waited = await second_task
        still_running = not first_task.done()
        first.cancel(CancelReason.REQUESTED)
        return waited, await first_task, still_running

    waited, busy, still_running = loop.run(scenario())
    # Then it ended canceled without ever starting, while the first went on generating
    assert waited.outcome is Outcome.CANCELED and waited.output["started_at"] is None
    assert still_running and busy.outcome is Outcome.CANCELED and busy.partial


@pytest.mark.slow  # a job process of its own imports torch and transformers: seconds
def test_warm_and_per_job_packages_hold_the_same_things(shared: tuple[Node, Loop],
                                                        tmp_path: Path) -> None:
    # Given one job through the warm worker and the same job in a process of its own
    node, loop = shared
    per_job_cfg = ExecutorConfig(tmp_path / "jobs", work_root=tmp_path / "work",
                                 contract_env=node.cfg.contract_env)

    async def both() -> tuple[JobReport, JobReport]:
        warm = await node.run(job("same", seed=1))
        own = await JobRun(job("same", seed=1), per_job_cfg, SpawnLauncher(),
                           environ=dict(os.environ)).run()
        return warm, own

    warm, own = loop.run(both())
    # Then both completed with the same text, files, output keys and runtime metrics
    assert warm.outcome is own.outcome is Outcome.COMPLETED
    assert warm.folder is not None and own.folder is not None
    assert (warm.folder / "result.txt").read_text() == (own.folder / "result.txt").read_text()
    assert [f["path"] for f in warm.output["files"]] == [f["path"] for f in own.output["files"]]
    assert set(warm.output) == set(own.output)
    warm_only = {"model_cached", "model_load_ms", "models_evicted", "models_resident",
                 "model_cache_mb", "model_budget_mb"}
    assert set(metrics(warm)) - warm_only == set(metrics(own))


def test_a_dead_worker_fails_its_job_worker_died_and_the_next_job_gets_a_fresh_one(
        shared: tuple[Node, Loop]) -> None:
    node, loop = shared

    async def kill_worker_once_generating(run: JobRun) -> None:
        await until(lambda: (run.progress.get("metrics") or {}).get("tokens_generated", 0) > 0)
        worker = node.pool.workers["cpu"]
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)

    async def scenario() -> tuple[JobReport, JobReport, int | None, int | None]:
        await node.run(job("first"))
        first_pid = node.pool.workers["cpu"].pid
        died = await node.run(job("dies", max_new_tokens=30000),
                              during=kill_worker_once_generating)
        fresh = await node.run(job("fresh"))
        return died, fresh, first_pid, node.pool.workers["cpu"].pid

    before = set(Path(tempfile.gettempdir()).glob("warm-job-*"))
    died, fresh, first_pid, second_pid = loop.run(scenario())
    assert (died.outcome, died.error_code) == (Outcome.FAILED, "worker_died")
    # The killed worker left nothing in the system's temporary folder: its jobs' folder
    # is the one the agent named, in the worker's own scratch
    assert set(Path(tempfile.gettempdir()).glob("warm-job-*")) <= before
    environ = Path(f"/proc/{second_pid}/environ").read_bytes().split(b"\0")
    assert f"MINER_WARM_JOB_DIR={node.pool.settings.root / 'cpu' / 'job'}".encode() in environ
    assert "fresh worker" in (died.error_message or "")
    assert died.partial  # the text it had reached result.txt
    assert fresh.outcome is Outcome.COMPLETED and metrics(fresh)["model_cached"] is False
    assert first_pid != second_pid


def test_lru_and_idle_eviction_and_another_job_on_the_gpu_stops_the_worker(
        tmp_path: Path) -> None:
    # Given two models of ~6 MiB each, a budget that holds one, unused ones kept 1 s, in a
    # worker keyed to GPU 0 (on the CPU here: what it holds is what matters)
    first = build_gpt2(tmp_path / "m1", hidden=256, layers=2, seed=1)
    second = build_gpt2(tmp_path / "m2", hidden=256, layers=2, seed=2)
    node = Node(tmp_path, {"one": first, "two": second}, budget_mb=10, idle_s=1.0)
    seen: list[bool] = []

    class Recording:
        """The node's launcher: notes whether the worker was still alive at launch."""

        async def launch(self, request: LaunchRequest) -> Any:
            seen.append(node.pool.workers["gpu0"].alive)
            return "launched"

        async def close(self) -> None:
            return None

    async def on_gpu0(name: str, model: str) -> JobReport:
        return await node.run_for(job(name, model=model), gpus=(0,)).run()

    async def scenario() -> tuple[list[JobReport], bool, Any]:
        try:
            reports = [await on_gpu0("a", "one"), await on_gpu0("b", "two"),
                       await on_gpu0("c", "two"), await on_gpu0("d", "one")]
            await asyncio.sleep(2.0)  # past model_idle_s
            reports.append(await on_gpu0("e", "one"))
            alive_before = node.pool.workers["gpu0"].alive
            # When a job of another type is launched on GPU 0
            request = LaunchRequest(tmp_path / "spec.json", {}, tmp_path, {}, -1, -1, -1)
            answer = await node.pool.guard(Recording(), (0,)).launch(request)
            return reports, alive_before, answer
        finally:
            await node.pool.close()

    reports, alive_before, answer = asyncio.run(scenario())
    a, b, c, d, e = (metrics(r) for r in reports)
    # Then when the second model came, the first went; coming back, it was loaded again
    assert (a["model_cached"], b["model_cached"], c["model_cached"]) == (False, False, True)
    assert b["models_evicted"] == ["one"] and b["models_resident"] == 1
    assert d["model_cached"] is False and d["models_evicted"] == ["two"]
    # After model_idle_s of no use, it was unloaded
    assert e["model_cached"] is False and e["models_evicted"] == []
    # And the worker (with every model it held) was gone before the other job launched
    assert alive_before and seen == [False] and answer == "launched"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_on_a_gpu_the_worker_keeps_the_model_in_vram_and_lets_go_for_another_job(
        tiny: Path, tmp_path: Path) -> None:
    # Given a worker for GPU 0 and two jobs on one model
    node = Node(tmp_path, {"tiny": tiny})

    async def scenario() -> tuple[list[JobReport], bool]:
        try:
            reports = [await node.run_for(job(name), gpus=(0,), gpu_ids=["0"]).run()
                       for name in ("cold", "warm")]
            await node.pool.make_room((0,))  # as before a training job on GPU 0
            return reports, node.pool.workers["gpu0"].alive
        finally:
            await node.pool.close()

    (cold, warm), alive = asyncio.run(scenario())
    # Then both ran on CUDA, the second from VRAM, within a budget from the GPU's memory
    assert metrics(cold)["device"]["kind"] == "cuda" and metrics(warm)["model_cached"] is True
    total_mb = torch.cuda.get_device_properties(0).total_memory / (1 << 20)
    assert 0.5 * total_mb < metrics(warm)["model_budget_mb"] < total_mb
    assert metrics(warm)["peak_cuda_allocated_mb"] > 0
    # And the worker was gone (its CUDA context with it) once another job needed the GPU
    assert not alive


def test_the_cpu_worker_keeps_no_gpu_device_node_and_a_gpu_worker_only_its_own(
        tmp_path: Path) -> None:
    # Given a node's warm pool, and the sandbox's command line on a node of two GPUs
    node = Node(tmp_path, {})
    node.run_for(job("c"))  # a CPU job: the CPU worker (made, not started)
    node.pool.run_for(job("g"), node.cfg, (1,), gpu_ids=["GPU-1"], environ=dict(os.environ),
                      created_at=time.time(), gpu_devices=["/dev/nvidia1"])
    argv = ["bwrap", "--dev-bind", "/dev/nvidia0", "/dev/nvidia0", "--dev-bind",
            "/dev/nvidia1", "/dev/nvidia1", "--dev-bind", "/dev/nvidiactl", "/dev/nvidiactl",
            "--dev-bind", "/dev/nvidia-uvm", "/dev/nvidia-uvm", "--", "python"]

    def bound(worker: str) -> list[str]:
        kept = only_gpus(argv, node.pool.workers[worker].gpu_devices)
        return [kept[i + 1] for i, a in enumerate(kept) if a == "--dev-bind"]

    # Then the CPU worker sees no GPU, the GPU 1 worker only GPU 1 (control nodes stay)
    assert bound("cpu") == ["/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert bound("gpu1") == ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]
