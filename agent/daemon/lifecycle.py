"""The agent's lifecycle: start up, main loop and tick, drain, shut down.

    serve():  startup -> (return early if it failed) -> main loop -> drain -> shutdown

Periodic work runs in its own loops so that none starves another: heartbeats on
their own timer (never behind job work), polling only while a slot is free (with
jitter and an idle back-off), the running-jobs check that detects core cancels,
and log/progress shipping where the coordinator offers those extensions.
Signal handlers only set flags: the first SIGTERM drains, the second cancels
running jobs at once, the third kills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.coordinator.client import CoordinatorClient, PolledJob
from agent.coordinator.retry import RetryPolicy
from agent.coordinator.transport import AuthError, NotRegistered
from agent.daemon.flow import Active, JobFlow
from agent.daemon.journal import Journal
from agent.daemon.scheduler import Device, Scheduler
from agent.daemon.shipping import LogShipper, ProgressSender
from agent.daemon.uploads import Uploads
from agent.errors import CoordinatorError, ExitCode
from agent.execution.environment import scrubbed_environ
from agent.execution.executor import ExecutorConfig
from agent.execution.launcher import make_launcher
from agent.jobs import valid_job_id
from agent.node.metrics import AgentMetrics, MetricsServer
from agent.node.notify import Notifier, watchdog_interval_s
from agent.node.telemetry import Telemetry, capabilities

log = logging.getLogger(__name__)
PRUNE_INTERVAL_S = 3600.0


class Agent:
    """One node's agent. ``await serve()`` runs it until it is told to stop."""

    def __init__(self, cfg: AgentConfig, api_key: str, burst: bool = False) -> None:
        self.cfg = cfg
        self.burst = burst  # stop once the coordinator has no work and nothing runs
        assert cfg.coordinator_url is not None
        self.client = CoordinatorClient(cfg.coordinator_url, api_key, cfg.miner_id,
                                        connect_timeout_s=cfg.connect_timeout_s,
                                        read_timeout_s=cfg.read_timeout_s,
                                        retry=RetryPolicy(cfg.retry_base_s, cfg.retry_cap_s))
        self.journal = Journal(cfg.state_dir / "journal.db")
        self.telemetry = Telemetry(disk_paths=[cfg.state_dir, cfg.cache_dir])
        self.scheduler = self._make_scheduler()
        self.job_environ = scrubbed_environ(os.environ)
        self.launcher = make_launcher(cfg.launcher, env=self.job_environ)
        self.exec_cfg = ExecutorConfig(cfg.jobs_dir, work_root=cfg.state_dir / "work",
                                       cancel_grace_s=cfg.cancel_grace_s,
                                       extra_runtimes=dict(cfg.runtimes),
                                       contract_env=self._contract_env())
        self.metrics = AgentMetrics()
        self.client.stats.observer = self.metrics.coordinator_call
        self.notifier = Notifier.from_env(unset=True)  # jobs never inherit NOTIFY_SOCKET
        self.flow = JobFlow(self)
        self.active: dict[str, Active] = {}
        self.extensions: frozenset[str] = frozenset()
        self.shipper: LogShipper | None = None
        self.progress: ProgressSender | None = None
        self.uploads = Uploads(self.client, frozenset())
        self.slot_freed = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.hard_stop = asyncio.Event()
        self._heartbeat_now = asyncio.Event()
        self._poll_now = asyncio.Event()
        self._register_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._job_tasks: set[asyncio.Task[Any]] = set()
        self._signals = 0
        self.draining = False
        self.registered_at: float | None = None
        self._last_prune = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------
    async def serve(self) -> int:
        with self.capture_signals():
            if not await self.startup():
                await self.shutdown()
                return ExitCode.UNAVAILABLE
            await self.main_loop()
            await self.drain()
            await self.shutdown()
        return ExitCode.OK

    async def startup(self) -> bool:
        self.cfg.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        metrics_server = self._start_metrics()
        if metrics_server is not None:
            self._metrics_server = metrics_server
        warm = getattr(self.launcher, "warm_up", None)
        warm_task = asyncio.create_task(warm()) if warm else None
        try:
            await self._until_stopped(self.register())
        except AuthError as exc:
            log.error("the coordinator refused this miner's API key: %s", exc)
            return False
        if self.stop_event.is_set():
            return False
        if warm_task is not None:
            await self._until_stopped(warm_task)
        self.flow.prune()
        await self.flow.recover()
        self.notifier.ready(status=self._status_line())
        for loop in (self._heartbeat_loop, self._poll_loop, self._cancel_check_loop,
                     self._ship_loop):
            self._tasks.append(asyncio.create_task(self._forever(loop), name=loop.__name__))
        return True

    async def main_loop(self) -> None:
        interval = min(1.0, watchdog_interval_s() or 1.0)
        while not self.stop_event.is_set():
            self.on_tick()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), interval)

    def on_tick(self) -> None:
        now = time.monotonic()
        if now - self._last_prune > PRUNE_INTERVAL_S:
            self._last_prune = now
            self.flow.prune()
        self.notifier.watchdog()
        self.notifier.status(self._status_line())
        self.metrics.set_running(len(self.active))

    async def drain(self) -> None:
        """Stop leasing; let jobs finish up to the drain timeout; then cancel and report."""
        # 1. Stop leasing: the poll loop sees `draining` and returns.
        self.draining = True
        self.notifier.stopping(status=f"draining {len(self.active)} job(s)")
        log.info("draining: %d job(s) running, up to %.0f s", len(self.active),
                 self.cfg.drain_timeout_s)
        # 2. Heartbeats and log shipping keep running (their loops are untouched).
        # 3. Wait for running jobs, up to the drain timeout or a second signal.
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while self.active and time.monotonic() < deadline and not self.hard_stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.hard_stop.wait(), 0.2)
        # 4. Cancel what is left: SIGTERM, grace period, SIGKILL (the executor's job).
        for active in list(self.active.values()):
            active.cancel("shutdown")
        # 5. Each job packages and reports itself; wait for that, bounded.
        if self._job_tasks:
            done, pending = await asyncio.wait(self._job_tasks,
                                               timeout=self.cfg.cancel_grace_s + 60)
            if pending:
                self.client.stop_retrying()  # reports stay journaled for the next start
                await asyncio.wait(pending, timeout=10)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(CoordinatorError):
            await self.client.heartbeat(0, self._metadata(), deadline_s=2.0)
        await self.launcher.close()
        await self.client.aclose()
        if getattr(self, "_metrics_server", None) is not None:
            self._metrics_server.stop()
        self.telemetry.close()
        self.journal.close()
        log.info("agent stopped")

    # -- registration ---------------------------------------------------------------
    async def register(self) -> None:
        async with self._register_lock:
            caps = capabilities(self.telemetry.inventory(), self.telemetry.reason,
                                models=sorted(self.cfg.models), bench=self._bench_summary())
            caps["runtimes"] = sorted({"command", "sleep", "inference", "batch_inference",
                                       "training", *self.cfg.runtimes})
            if self.cfg.extensions is not None:
                caps["extensions"] = list(self.cfg.extensions)
            answer = await self.client.register(caps, self.scheduler.capacity, self.cfg.region)
            self._set_extensions(answer.extensions)
            self.registered_at = time.time()
            log.info("registered as %s with concurrency %d%s; extensions: %s",
                     self.cfg.miner_id, self.scheduler.capacity,
                     "" if self.telemetry.has_gpus else " (CPU-only: no GPU found)",
                     ", ".join(sorted(self.extensions)) or "none (core protocol)")

    def _set_extensions(self, extensions: frozenset[str]) -> None:
        self.extensions = extensions
        self.uploads = Uploads(self.client, extensions, self.cfg.coordinator_url or "")
        self.shipper = LogShipper(self.client, self.journal, self.cfg.max_log_chunk_bytes,
                                  self.metrics.log_bytes_shipped) \
            if "logs" in extensions else None
        self.progress = ProgressSender(self.client, self.cfg.progress_interval_s) \
            if "progress" in extensions else None

    async def _reregister(self, why: str) -> None:
        log.warning("the coordinator does not know this miner (%s); registering again", why)
        await self.register()
        self.wake_heartbeat()

    # -- loops ------------------------------------------------------------------------
    async def _forever(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a loop; an unexpected error is logged and the loop restarts, never the agent."""
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; restarting it in 1 s", loop.__name__)
                await asyncio.sleep(1)

    async def _heartbeat_loop(self) -> None:
        while True:
            self._heartbeat_now.clear()
            await self._heartbeat()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._heartbeat_now.wait(), self._heartbeat_every_s())

    async def _heartbeat(self) -> None:
        leases = {j: a.lease_id for j, a in self.active.items() if a.lease_id}
        try:
            answer = await self.client.heartbeat(len(self.active), self._metadata(),
                                                 leases=leases or None,
                                                 deadline_s=self.cfg.heartbeat_interval_s)
        except NotRegistered:
            await self._reregister("heartbeat 404")
            return
        except CoordinatorError as exc:
            log.warning("heartbeat failed: %s", exc)
            return
        if len(self.active) < self.scheduler.capacity:
            self._poll_now.set()
        for job_id in answer.cancel:
            if job_id in self.active:
                log.info("job %s: cancel received in a heartbeat answer", job_id)
                self.active[job_id].cancel("coordinator")
        for job_id in answer.lost:
            if job_id in self.active:
                log.warning("job %s: lease lost; stopping it", job_id)
                self.active[job_id].cancel("lease_lost", dropped=True)

    def _heartbeat_every_s(self) -> float:
        """The configured interval, or a third of the shortest lease held, if shorter."""
        ttls = [a.lease_ttl_s for a in self.active.values() if a.lease_ttl_s]
        return min([self.cfg.heartbeat_interval_s, *(t / 3 for t in ttls)])

    def wake_heartbeat(self) -> None:
        self._heartbeat_now.set()

    def wake_poll(self) -> None:
        self._poll_now.set()

    async def _poll_loop(self) -> None:
        interval = self.cfg.poll_interval_s
        while not self.draining:
            if len(self.active) >= self.scheduler.capacity:
                self.slot_freed.clear()
                await self.slot_freed.wait()
                continue
            try:
                polled = await self.client.poll()
            except NotRegistered:
                await self._reregister("poll 500")
                continue
            except CoordinatorError as exc:
                log.warning("poll failed: %s", exc)
                polled = None
            if polled is not None:
                interval = self.cfg.poll_interval_s
                self._accept(polled)
                continue
            if self.burst and not self.active and not self._job_tasks:
                log.info("burst mode: no work left; stopping")
                self.stop_event.set()
                return
            # Idle: back off with jitter, but poll at once when a report or heartbeat has
            # just told the coordinator a slot is free (it counts in-flight jobs itself).
            self._poll_now.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poll_now.wait(), interval * random.uniform(
                    1 - self.cfg.poll_jitter, 1 + self.cfg.poll_jitter))
            interval = min(interval * 1.5, self.cfg.poll_max_interval_s)

    def _accept(self, polled: PolledJob) -> None:
        raw = polled.job_dict()
        if not self.journal.accept(polled.job_id, raw, polled.lease_id):
            log.warning("job %s: handed out twice; ignoring the repeat", polled.job_id)
            return
        log.info("job %s: accepted (%s)", polled.job_id,
                 (polled.payload or {}).get("type") if isinstance(polled.payload, dict) else "?")
        if valid_job_id(polled.job_id):  # a bad id fails the job; it never names a path
            self.flow.set_aside_earlier_attempt(polled.job_id)
        self.active[polled.job_id] = Active(polled.job_id, polled.lease_id,
                                            lease_ttl_s=polled.lease_ttl_s)
        task = asyncio.create_task(self.flow.handle(polled.job_id, raw, polled.lease_id))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_done)
        self.wake_heartbeat()

    def _job_done(self, task: asyncio.Task[Any]) -> None:
        self._job_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a job task failed: %r", task.exception())

    async def _cancel_check_loop(self) -> None:
        """Core cancels: a job that left the coordinator's running list is canceled."""
        while True:
            await asyncio.sleep(self.cfg.cancel_check_interval_s)
            running = [j for j, a in self.active.items() if a.run is not None]
            if not running:
                continue
            try:
                listed = await self.client.running_jobs()
            except CoordinatorError as exc:
                log.warning("running-jobs check failed: %s", exc)
                continue
            for job_id in running:
                if job_id not in listed and job_id in self.active:
                    log.info("job %s: no longer in the coordinator's running list; "
                             "canceling it", job_id)
                    self.active[job_id].cancel("coordinator", dropped=True)

    async def _ship_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.log_ship_interval_s)
            for job_id, active in list(self.active.items()):
                if active.run is None:
                    continue
                if self.shipper is not None:
                    await self.shipper.ship(job_id, active.run.folder)
                if self.progress is not None and await self.progress.maybe_send(
                        job_id, active.lease_id, active.run.progress):
                    log.info("job %s: cancel received in a progress answer", job_id)
                    active.cancel("coordinator")

    # -- helpers ------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        jobs = {}
        for job_id, a in self.active.items():
            p = dict(a.run.progress) if a.run else {}
            p.pop("t", None)
            jobs[job_id] = {"progress": p, "phase": "running" if a.run else "waiting",
                            "gpus": list(a.assignment.gpu_indices) if a.assignment else []}
        return {"telemetry": self._sample(), "jobs": jobs, "draining": self.draining,
                "agent": {"pid": os.getpid()}}

    def _sample(self) -> dict[str, Any]:
        sample = self.telemetry.sample()
        self.metrics.update_gpus(sample)
        return sample

    def _status_line(self) -> str:
        state = "draining" if self.draining else "serving"
        return (f"{state}: {len(self.active)}/{self.scheduler.capacity} slots busy, "
                f"coordinator {self.cfg.coordinator_url}")

    def _make_scheduler(self) -> Scheduler:
        devices = [Device(g.index, g.name, g.memory_total_mb, g.uuid)
                   for g in self.telemetry.inventory()
                   if self.cfg.gpus is None or g.index in self.cfg.gpus]
        return Scheduler(devices, self.cfg.jobs_per_gpu, self.cfg.cpu_slots)

    def _contract_env(self) -> dict[str, str]:
        env = {"MINER_CACHE_DIR": str(self.cfg.cache_dir),
               "MINER_CACHE_MAX_BYTES": str(self.cfg.cache_max_bytes)}
        if self.cfg.models:
            env["MINER_MODELS"] = json.dumps(dict(self.cfg.models))
        return env

    def _bench_summary(self) -> dict[str, Any] | None:
        path: Path = self.cfg.bench_file or self.cfg.state_dir / "bench-summary.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("bench file %s is unreadable; not attached to capabilities", path)
            return None
        return data if isinstance(data, dict) else None

    def _start_metrics(self) -> MetricsServer | None:
        if not self.cfg.metrics_port:
            return None
        server = MetricsServer(self.metrics.registry, self.cfg.metrics_host,
                               self.cfg.metrics_port).start()
        log.info("Prometheus metrics on http://%s:%d/metrics", self.cfg.metrics_host,
                 self.cfg.metrics_port)
        return server

    async def _until_stopped(self, aw: Awaitable[Any]) -> None:
        """Await ``aw`` unless a stop signal comes first."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.create_task(self.stop_event.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        task.result()

    # -- signals -------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT set flags: drain, then cancel now, then kill now."""
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGTERM, signal.SIGINT)
        for sig in sigs:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            log.info("%s: draining (send it again to cancel running jobs now)", name)
            self.stop_event.set()
        elif self._signals == 2:
            log.info("%s again: canceling running jobs now", name)
            self.hard_stop.set()
        else:
            log.info("%s a third time: killing running jobs", name)
            for active in self.active.values():
                if active.run is not None:
                    active.run.kill_now()
