"""Warm model workers, agent side: one inference worker per GPU that keeps models loaded.

A job of the built-in ``inference`` type does not get a process of its own: it is an
order to the worker of its GPU (one worker for a CPU-only node's slots), a long-lived
``python -m runtimes.warm`` in its own sandbox (bubblewrap, no network, no job
folder, no capabilities) and its own cgroup, started on first use and started again
after it dies. The worker sends back the job's text, events and result over one
socket (length-prefixed JSON frames, :mod:`agent.execution.warmworker`); a reader
thread writes them into the very pipes and files a job's own process would have
written, so :class:`WarmRun` (a :class:`JobRun`) captures, classifies and packages
the job exactly as for any other job: same package, same events, same outcome codes.

What differs, and why:

- cancel is a message: the worker's generation loop stops within one token and the
  worker serves the next job. A job still running ``cancel_grace_s`` after it (or
  a second after a forced cancel) means a wedged worker: it is killed;
- a job whose worker dies fails ``worker_died``; the next job gets a fresh worker;
- the worker's memory is the worker's: :attr:`WarmRun.pid` is None, so the GPU release
  gate waits for no process of it. A job of another type that needs the GPU first
  makes the worker go (stopped when idle, told to evict when busy), see
  :meth:`WarmPool.make_room`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from typing import Any

from agent.errors import CancelReason, LaunchError
from agent.execution.cgroups import Limits
from agent.execution.environment import job_environ
from agent.execution.executor import ExecutorConfig, JobRun
from agent.execution.launcher import Launcher, LaunchRequest, ProcessHandle
from agent.execution.warmworker import WarmJob, WarmSettings, Worker
from agent.jobs import Job

log = logging.getLogger(__name__)

WARM_TYPE = "inference"
WARM_RUNTIME = "runtimes.inference:run"
__all__ = ["WarmPool", "WarmRun", "WarmSettings"]


class WarmRun(JobRun):
    """A :class:`JobRun` whose process is an order to a warm worker (see the module doc)."""

    def __init__(self, job: Job, cfg: ExecutorConfig, worker: Worker, **kwargs: Any) -> None:
        super().__init__(job, cfg, _NoLauncher(), **kwargs)
        self.worker = worker
        self.warm: WarmJob | None = None

    @property
    def pid(self) -> int | None:
        """None: the worker outlives the job, and its memory is not the job's to release."""
        return None

    async def _run_process(self, runtime: str) -> tuple[int | None, bool]:
        self.times["requested"] = time.time()
        self.mono["requested"] = time.monotonic()
        fds = self._open_channels()
        try:
            self.warm = await self.worker.submit(self.job, fds, self.folder)
        except LaunchError as exc:
            self._close_child_ends(fds)
            self._exited.set()
            self.events_seen["launch_error"] = exc.message
            return None, False
        self.handle = self.warm
        log.info("job %s: started in warm model worker %s (pid %s)", self.job.job_id,
                 self.worker.key, self.worker.pid)
        if self.cancel_reason is not None:
            self._signal_cancel()
        return await self._supervise()

    def _signal_cancel(self) -> None:
        assert self.warm is not None
        self.warm.cancel("timeout" if self.cancel_reason is CancelReason.TIMEOUT else "canceled")
        self.cancel_times["signalled"] = time.time()
        self._kill_task = asyncio.get_running_loop().create_task(self._kill_after_grace())

    def _kill_group(self, sig: int, quiet: bool = False, leader_gone: bool = False) -> None:
        """No process group of its own: a forced stop goes through the worker (see force)."""
        if not quiet and self.warm is not None and not self._exited.is_set():
            self.warm.force()

    def _isolation(self) -> dict[str, Any]:
        isolation = super()._isolation()
        cgroup = self.worker.cgroup
        isolation.update({
            "worker": {"kind": "warm model worker", "key": self.worker.key,
                       "pid": self.worker.pid, "starts": self.worker.starts},
            "network": False if self.cfg.sandbox is not None else isolation["network"],
            "cgroup": cgroup.path.name if cgroup is not None else None,
            "kill": "cancel message to the worker; the worker killed past the grace period"})
        return isolation


class _NoLauncher:
    """A warm run starts no process."""

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        raise LaunchError("a warm model job starts no process of its own")

    async def close(self) -> None:
        return None


class WarmPool:
    """The node's warm model workers by device key (``gpu<N>``, ``cpu``)."""

    def __init__(self, settings: WarmSettings) -> None:
        self.settings = settings
        self.workers: dict[str, Worker] = {}

    def run_for(self, job: Job, cfg: ExecutorConfig, gpu_indices: tuple[int, ...] | list[int],
                **run_kwargs: Any) -> JobRun | None:
        """A :class:`WarmRun` for a built-in inference job on one GPU or the CPU; else None."""
        runtime = cfg.extra_runtimes.get(WARM_TYPE, WARM_RUNTIME)
        if job.type != WARM_TYPE or runtime != WARM_RUNTIME or len(gpu_indices) > 1:
            return None
        key = f"gpu{gpu_indices[0]}" if gpu_indices else "cpu"
        worker = self.workers.get(key)
        if worker is None:
            worker = self.workers[key] = self._worker(key, cfg, run_kwargs)
        if time.monotonic() < worker.broken_until:
            return None  # its last start failed: a process per job for now
        note = ("the warm model worker's cgroup" if worker.cgroup is not None
                else cfg.cgroup_note)
        return WarmRun(job, replace(cfg, cgroup_note=note), worker, **run_kwargs)

    def _worker(self, key: str, cfg: ExecutorConfig, run_kwargs: dict[str, Any]) -> Worker:
        env = job_environ(run_kwargs.get("environ") or os.environ, cfg.contract_env,
                          run_kwargs.get("gpu_ids"))
        cgroup = None
        if cfg.cgroups is not None:
            limits = Limits(pids=cfg.limits.pids, cpu_weight=cfg.limits.cpu_weight)
            try:
                cgroup = cfg.cgroups.create(f"warm-{key}", limits)
            except OSError as exc:
                log.warning("warm model worker %s gets no cgroup of its own (%s)", key,
                            exc.strerror or exc)
        self.settings.root.mkdir(parents=True, exist_ok=True)
        return Worker(key, self.settings, env, cfg.sandbox, cgroup,
                      run_kwargs.get("gpu_devices") if key != "cpu" else [])

    def guard(self, launcher: Launcher, gpu_indices: tuple[int, ...] | list[int]) -> Launcher:
        """``launcher``, making the warm workers on these GPUs go before each launch."""
        return _RoomMaker(launcher, self, tuple(gpu_indices)) if gpu_indices else launcher

    async def make_room(self, gpu_indices: tuple[int, ...]) -> None:
        """Another kind of job needs these GPUs: idle workers stop, busy ones evict."""
        for index in gpu_indices:
            worker = self.workers.get(f"gpu{index}")
            if worker is None or not worker.alive:
                continue
            if worker.busy:
                log.info("warm model worker %s: evicting its models for another job on "
                         "GPU %d", worker.key, index)
                worker.send({"op": "evict"})
            else:
                await worker.stop(f"another job needs GPU {index}")

    async def close(self) -> None:
        for worker in self.workers.values():
            await worker.stop("the agent is stopping")
            if worker.cgroup is not None:
                worker.cgroup.remove()


class _RoomMaker:
    """A launcher that first makes the warm workers on the job's GPUs go."""

    def __init__(self, inner: Launcher, pool: WarmPool, gpu_indices: tuple[int, ...]) -> None:
        self.inner, self.pool, self.gpu_indices = inner, pool, gpu_indices

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        await self.pool.make_room(self.gpu_indices)
        return await self.inner.launch(request)

    async def close(self) -> None:
        return None  # the inner launcher is the agent's, closed with it
