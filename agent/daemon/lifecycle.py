"""The agent's lifecycle: start up, main loop and tick, drain, shut down.

    serve():  startup -> (return early if it failed) -> main loop -> drain -> shutdown

Periodic work runs in its own loops so that none starves another, one module each:
heartbeats (:mod:`~agent.daemon.heartbeat`), polling while a slot is free
(:mod:`~agent.daemon.poll`), the running-list check that detects core cancels
(:mod:`~agent.daemon.cancel_check`) and log/progress shipping
(:mod:`~agent.daemon.shipping`). Jobs go through :mod:`~agent.daemon.flow`; every
cancel goes through one inbox (:mod:`~agent.daemon.cancels`). Signal handlers only
set flags: the first SIGTERM drains, the second cancels running jobs at once, the
third kills them; SIGHUP reloads what may change (:mod:`~agent.daemon.reload`). The
operator's `ps`, `drain` and `resume` come in over the control socket
(:mod:`~agent.daemon.control`); every reason no work is taken is in
:mod:`~agent.daemon.drains`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiofiles

from agent.clock import wait_event, within
from agent.config import AgentConfig
from agent.coordinator.client import CoordinatorClient
from agent.coordinator.retry import RetryPolicy
from agent.coordinator.transport import AuthError
from agent.daemon.cancel_check import CancelCheckLoop
from agent.daemon.cancels import CancelInbox
from agent.daemon.control import ControlServer, socket_path
from agent.daemon.drains import Drains, drain_path
from agent.daemon.flow import JobFlow, JobStarter
from agent.daemon.heartbeat import HeartbeatLoop
from agent.daemon.held import HeldJobs
from agent.daemon.journal import Journal
from agent.daemon.operator import OperatorControls
from agent.daemon.outbox import Outbox
from agent.daemon.poll import RELEASE_WAIT_S, PollLoop
from agent.daemon.recovery import Recovery
from agent.daemon.release import ReleaseGate
from agent.daemon.reload import ConfigSource, Reloader, key_now
from agent.daemon.scheduler import Device, Scheduler, cuda_visible_entries, visible_devices
from agent.daemon.session import Session
from agent.daemon.shipping import ShipLoop
from agent.daemon.view import NodeView
from agent.errors import CancelReason, CoordinatorError, ExitCode
from agent.execution.capture import NO_LOG_CAP
from agent.execution.environment import scrubbed_environ
from agent.execution.executor import ExecutorConfig
from agent.execution.isolation import Isolation, for_agent, share_tmp
from agent.execution.launcher import make_launcher
from agent.execution.modelstore import resolve_models
from agent.execution.warm import WarmPool, WarmSettings
from agent.node.metrics import AgentMetrics, MetricsServer
from agent.node.notify import Notifier, watchdog_interval_s
from agent.node.telemetry import GpuInfo, Sampler, Telemetry, capabilities
from agent.signals import capture_signals
from runtimes.registry import BUILTIN_RUNTIMES

log = logging.getLogger(__name__)
PRUNE_INTERVAL_S = 3600.0
LEAVE_DEADLINE_S = 2.0  # each of the last heartbeat and the deregistration, on the way out
OUTBOX_FLUSH_MIN_S = 5.0  # the drain's last try of undelivered reports, however late
OUTBOX_FLUSH_MAX_S = 30.0


class Agent:
    """One node's agent. ``await serve()`` runs it until it is told to stop."""

    def __init__(self, cfg: AgentConfig, api_key: str, burst: bool = False,
                 isolation: Isolation | None = None, source: ConfigSource | None = None) -> None:
        self.cfg = cfg
        self.source = source  # where SIGHUP reads the config again
        self.burst = burst  # stop once the coordinator has no work and nothing runs
        assert cfg.coordinator_url is not None
        self.client = CoordinatorClient(cfg.coordinator_url, api_key, cfg.miner_id,
                                        connect_timeout_s=cfg.connect_timeout_s,
                                        read_timeout_s=cfg.read_timeout_s,
                                        retry=RetryPolicy(cfg.retry_base_s, cfg.retry_cap_s),
                                        max_answer_bytes=cfg.max_answer_bytes,
                                        max_answer_depth=cfg.max_answer_depth,
                                        key_source=lambda: key_now(self.cfg, self.source))
        self.journal = Journal(cfg.state_dir / "journal.db")
        self.telemetry = Telemetry(disk_paths=[cfg.state_dir, cfg.cache_dir])
        self.sampler = Sampler(self.telemetry, timeout_s=max(2.0, cfg.heartbeat_interval_s * 2))
        self.scheduler = self._make_scheduler()
        self.held = HeldJobs()
        self.inbox = CancelInbox(self.held)
        job_environ = scrubbed_environ(os.environ)
        self._owns_isolation = isolation is None
        self.isolation = isolation or for_agent(cfg, None)
        share_tmp(self.isolation, cfg, self.scheduler.capacity)
        self.launcher = make_launcher(cfg.launcher, env=job_environ,
                                      sandbox=self.isolation.sandbox)
        exec_cfg = ExecutorConfig(cfg.jobs_dir, work_root=cfg.state_dir / "work",
                                  cancel_grace_s=cfg.cancel_grace_s,
                                  extra_runtimes=dict(cfg.runtimes),
                                  contract_env=self._contract_env(),
                                  allowed_types=frozenset(cfg.allowed_job_types),
                                  sandbox=self.isolation.sandbox,
                                  cgroups=self.isolation.cgroups,
                                  cgroup_note=self.isolation.cgroup_note,
                                  limits=self.isolation.limits,
                                  max_output_bytes=cfg.max_job_output_mb << 20 or None,
                                  max_work_bytes=cfg.max_job_work_mb << 20 or None,
                                  max_files=cfg.max_job_files or None,
                                  max_work_files=cfg.max_job_work_files or None,
                                  max_log_bytes=cfg.max_job_log_mb << 20 or NO_LOG_CAP)
        self.warm = WarmPool(WarmSettings(cfg.state_dir / "warm", cfg.model_memory_budget_mb,
                                          cfg.model_idle_s)) if cfg.warm_models else None
        self.metrics = AgentMetrics()
        self.metrics.count_journal_flushes(lambda: self.journal.flushes)
        self.client.stats.observer = self.metrics.coordinator_call
        self.notifier = Notifier.from_env(unset=True)  # jobs never inherit NOTIFY_SOCKET
        self.session = Session.core(self.client, cfg.coordinator_url)
        self.outbox = Outbox(journal=self.journal, client=self.client, session=self._session,
                             policy=RetryPolicy(cfg.retry_base_s, cfg.retry_cap_s),
                             on_settled=self.wake_poll,
                             on_uncounted=lambda: self.heartbeats.beat(),
                             try_s=max(1.0, cfg.read_timeout_s))
        self.flow = JobFlow(cfg=cfg, journal=self.journal, client=self.client,
                            scheduler=self.scheduler, held=self.held,
                            starter=JobStarter(exec_cfg, self.launcher, job_environ,
                                               warm=self.warm),
                            metrics=self.metrics, session=self._session,
                            wake_heartbeat=self.wake_heartbeat, wake_poll=self.wake_poll,
                            outbox=self.outbox, gate=ReleaseGate(self.telemetry.compute_pids,
                                             timeout_s=cfg.gpu_release_timeout_s)
                            if self.telemetry.has_gpus else None)
        self.flow.on_hook_failures = self._hooks_failing
        self.recovery = Recovery(flow=self.flow, journal=self.journal, held=self.held,
                                 out_root=exec_cfg.out_root, work_root=exec_cfg.work_root,
                                 keep_packages_days=cfg.keep_packages_days,
                                 keep_packages_max_mb=cfg.keep_packages_max_mb,
                                 session=self._session)
        self.drains = Drains(drain_path(cfg.state_dir), stopping=self._stopping,
                             low_disk=lambda: self.polls.pause_reason(),
                             blocked=lambda: self.scheduler.blocked,
                             gpu_count=len(self.scheduler.devices))
        self.view = NodeView(cfg=lambda: self.cfg, held=self.held, scheduler=self.scheduler,
                             sample=self._sample, drains=self.drains,
                             reports_pending=lambda: len(self.outbox),
                             registered=lambda: self.registered_at is not None)
        self.heartbeats = HeartbeatLoop(
            client=self.client, held=self.held, inbox=self.inbox,
            interval_s=cfg.heartbeat_interval_s, capacity=self.scheduler.capacity,
            metadata=self.view.metadata, status=self._status, reregister=self._reregister,
            on_free_slot=self.wake_poll, owed_leases=self.outbox.leases)
        self.polls = PollLoop(cfg=cfg, client=self.client, held=self.held,
                              capacity=self.scheduler.capacity, accept=self.flow.accept,
                              reregister=self._reregister, draining=lambda: self.draining,
                              on_empty=self._burst_done, resync=self.heartbeats.beat,
                              on_pause=self.wake_heartbeat, before_poll=self.outbox.catch_up,
                              paused=self.drains.operator_paused,
                              longpoll=lambda: self.session.caps.longpoll and not self.burst)
        self.cancel_checks = CancelCheckLoop(client=self.client, held=self.held,
                                             inbox=self.inbox,
                                             interval_s=cfg.cancel_check_interval_s,
                                             running=self.outbox.running)
        self.shipping = ShipLoop(held=self.held, inbox=self.inbox, session=self._session,
                                 interval_s=cfg.log_ship_interval_s)
        self.reloader = Reloader(source, current=lambda: self.cfg, apply=self._use_config,
                                 client=self.client, register=self._register_again)
        self.control = ControlServer(socket_path(cfg.state_dir), OperatorControls(
            self.view, self.drains, on_change=self._report_settled,
            settled=self._poll_released).handlers())
        self.stop_event = asyncio.Event()
        self.hard_stop = asyncio.Event()
        self._register_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._signals = 0
        self._metrics_server: MetricsServer | None = None
        self.draining = False
        self.drain_reason: str | None = None  # why it stops: in the heartbeat while draining
        self.registered_at: float | None = None
        self._last_prune = time.monotonic()
        self._pruning: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def serve(self) -> int:
        if self.telemetry.failure and not self._cpu_only_on_purpose:
            log.error("not starting: %s", self.telemetry.failure)
            await self.shutdown()
            return ExitCode.FAILED
        with capture_signals(self._on_signal), \
                capture_signals(self.reloader.request, (signal.SIGHUP,)):
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
        await self.drains.load()  # an operator's drain holds across restarts
        await self.control.start()
        self._metrics_server = self._start_metrics()
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
        await self.prune()
        await self.recovery.recover()
        await self.sampler.refresh()
        self.notifier.ready(status=self._status_line())
        for loop in (self.heartbeats, self.polls, self.cancel_checks, self.shipping,
                     self.outbox, self.reloader):
            self._tasks.append(asyncio.create_task(self._forever(loop.run),
                                                   name=type(loop).__name__))
        self._tasks.append(asyncio.create_task(self._forever(self._sample_forever),
                                               name="Sampler"))
        return True

    async def main_loop(self) -> None:
        interval = min(1.0, watchdog_interval_s() or 1.0)
        while not self.stop_event.is_set():
            self.on_tick()
            await wait_event(self.stop_event, interval)

    def on_tick(self) -> None:
        now = time.monotonic()
        if now - self._last_prune > PRUNE_INTERVAL_S and (
                self._pruning is None or self._pruning.done()):
            self._last_prune = now
            self._pruning = asyncio.get_running_loop().create_task(self.prune(), name="Prune")
        self.notifier.watchdog()
        self.notifier.status(self._status_line())
        self.metrics.set_running(len(self.held))

    async def prune(self) -> None:
        """Old packages and orphaned scratch removed, in a thread: a package may hold
        tens of thousands of files and a scratch a million, and the loop supervises
        every job meanwhile (the journal's calls take its lock)."""
        try:
            await asyncio.to_thread(self.recovery.prune)
        except Exception:  # noqa: BLE001 - logged; the next pass tries again
            log.exception("retention: pruning failed; the next pass tries again")

    async def drain(self) -> None:
        """Stop leasing; let jobs finish up to the drain timeout; then cancel and report."""
        # 1. Stop leasing: the poll loop sees `draining` and returns; the next heartbeat
        #    says DRAINING, with the reason.
        self.drain_reason = self.drain_reason or "shutdown"
        self.draining = True
        self.wake_poll()  # a held long-poll is abandoned now
        self.wake_heartbeat()
        await self._poll_released()  # before the log says so: no poll of ours is held
        self.notifier.stopping(status=f"draining {len(self.held)} job(s)")
        log.info("draining: %d job(s) running, up to %.0f s", len(self.held),
                 self.cfg.drain_timeout_s)
        # 2. Heartbeats and log shipping keep running (their loops are untouched).
        # 3. Wait for running jobs, up to the drain timeout or a second signal.
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while len(self.held) and time.monotonic() < deadline and not self.hard_stop.is_set():
            await wait_event(self.hard_stop, 0.2)
        # 4. Cancel what is left: SIGTERM, grace period, SIGKILL (the executor's job).
        self.inbox.cancel_all(CancelReason.SIGNAL if self.hard_stop.is_set()
                              else CancelReason.DRAIN)
        # 5. Each job packages itself and hands its report to the outbox; wait for that,
        #    bounded, then give the outbox what is left of the budget (at least a few
        #    seconds) to deliver. What it cannot deliver stays journaled for the next start.
        if self.flow.tasks:
            done, pending = await asyncio.wait(self.flow.tasks,
                                               timeout=self.cfg.cancel_grace_s + 60)
            if pending:
                self.client.stop_retrying()
                await asyncio.wait(pending, timeout=10)
        await self.outbox.flush(min(OUTBOX_FLUSH_MAX_S, max(OUTBOX_FLUSH_MIN_S,
                                                            deadline - time.monotonic())))
        self.client.stop_retrying()

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.control.close()
        if self.registered_at is not None:
            await self.leave()
        await self.launcher.close()
        if self.warm is not None:
            await self.warm.close()
        if self._owns_isolation:
            self.isolation.close()
        await self.client.aclose()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self.sampler.close()
        self.telemetry.close()
        if self._pruning is not None:  # its thread uses the journal: let it finish first
            await asyncio.gather(self._pruning, return_exceptions=True)
        self.journal.close()
        log.info("agent stopped")

    async def leave(self) -> None:
        """Tell the coordinator this node is gone: a last heartbeat saying OFFLINE (in-flight
        0), then a deregistration. Both best effort and short: exit never waits on them."""
        beat = await _best_effort("last heartbeat", self.client.heartbeat(
            0, self.view.metadata(), status="OFFLINE", deadline_s=LEAVE_DEADLINE_S))
        # Deregister even if the beat failed: either one alone tells the truth.
        gone = await _best_effort("deregistration",
                                  self.client.deregister(deadline_s=LEAVE_DEADLINE_S))
        if beat and gone:
            log.info("left the coordinator: OFFLINE and deregistered")

    # -- registration ---------------------------------------------------------------
    async def register(self) -> None:
        async with self._register_lock:
            offered, left_out = self._offered_gpus()
            cpu_only_reason = self.telemetry.reason
            if left_out and not offered:
                cpu_only_reason = ("every GPU is left out of scheduling (config gpus, "
                                   "CUDA_VISIBLE_DEVICES or MIG mode)")
            caps = capabilities(offered, cpu_only_reason,
                                models=sorted(await asyncio.to_thread(resolve_models,
                                                                      self.cfg)),
                                bench=await self._bench_summary())
            if left_out:  # for people: dispatch reads `gpus`, which jobs here can get
                caps["gpus_not_offered"] = left_out
            # Only what this node would run: a type it has but does not allow is not offered.
            caps["runtimes"] = sorted({*BUILTIN_RUNTIMES, *self.cfg.runtimes}
                                      & set(self.cfg.allowed_job_types))
            caps["sandbox"] = "bwrap" if self.isolation.sandbox is not None else "off"
            if self.cfg.price is not None:  # dispatch matches it against max_price
                caps["price"] = self.cfg.price
            if self.cfg.tags:  # dispatch matches them against constraints.tags
                caps["tags"] = dict(self.cfg.tags)
            if self.cfg.extensions is not None:
                caps["extensions"] = list(self.cfg.extensions)
            answer = await self.client.register(caps, self.scheduler.capacity, self.cfg.region)
            self.session = Session.open(
                answer.capabilities, client=self.client, journal=self.journal,
                base_url=self.cfg.coordinator_url or "",
                max_log_chunk_bytes=self.cfg.max_log_chunk_bytes,
                progress_interval_s=self.cfg.progress_interval_s,
                on_log_bytes=self.metrics.log_bytes_shipped)
            self.registered_at = time.time()
            cpu_only = ("" if self.scheduler.devices else
                        " (CPU-only: no GPU left to jobs)" if self.telemetry.has_gpus else
                        " (CPU-only: no GPU found)")
            log.info("registered as %s with concurrency %d%s; extensions: %s",
                     self.cfg.miner_id, self.scheduler.capacity, cpu_only,
                     self.session.caps.describe())

    def _session(self) -> Session:
        return self.session

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
                log.exception("%s failed; restarting it in 1 s", loop.__qualname__)
                await asyncio.sleep(1)

    def wake_heartbeat(self) -> None:
        self.heartbeats.wake()

    def wake_poll(self) -> None:
        self.polls.wake()

    async def _poll_released(self) -> None:
        """Until a held poll that a drain or a stop abandoned has closed its connection."""
        if not await self.polls.released():
            log.warning("a held poll was still open %.0f s after it was abandoned; a job the "
                        "coordinator hands it now is leased back after its lease lapses",
                        RELEASE_WAIT_S)

    def _report_settled(self) -> None:
        """The node's state changed (an operator's drain or resume): the heartbeat says
        so now, and the poll loop looks again."""
        self.wake_heartbeat()
        self.wake_poll()

    async def _hooks_failing(self, reason: str) -> None:
        """pre-job failed FAILURES_TO_DRAIN times in a row: the operator's kind of drain
        (kept across restarts, shown by ps and the heartbeat) until `miner-agent resume`."""
        log.error("draining: %s", reason)
        await self.drains.drain(reason, by="pre-job hook")
        self.wake_poll()  # a held long-poll is abandoned now
        self.wake_heartbeat()

    def _burst_done(self) -> bool:
        """Burst mode: stop once the coordinator has no work, no job is held and every
        report is delivered (an outage keeps a burst run waiting, as it keeps a report)."""
        if not self.burst or len(self.held) or self.flow.tasks or len(self.outbox):
            return False
        log.info("burst mode: no work left; stopping")
        self.drain_reason = "burst mode: no work left"
        self.stop_event.set()
        return True

    # -- operator controls: drains, SIGHUP's reload (the control socket: OperatorControls)
    def _stopping(self) -> str | None:
        """The shutdown's reason from the first SIGTERM (or burst's end) on."""
        return (self.drain_reason or "shutdown") if self.draining or self.stop_event.is_set() \
            else None

    def _use_config(self, cfg: AgentConfig) -> None:
        """A reload's config: every reader of a reloadable field reads it from here."""
        self.cfg = self.flow.cfg = self.polls.cfg = cfg
        self.flow.starter.exec_cfg.allowed_types = frozenset(cfg.allowed_job_types)

    async def _register_again(self) -> None:
        await self.register()
        self.wake_heartbeat()

    # -- helpers ------------------------------------------------------------------------
    def _status(self) -> str:
        """The heartbeat's status: DRAINING while no new work is taken, else ONLINE."""
        return "DRAINING" if self.drains.node_drain() is not None else "ONLINE"

    def _sample(self) -> dict[str, Any]:
        """The latest telemetry (taken off the event loop by the sampler)."""
        return self.sampler.latest()

    async def _sample_forever(self) -> None:
        while True:
            sample = await self.sampler.refresh()
            if sample:
                self.metrics.update_gpus(sample)
                self._drop_lost_gpus(sample)
            await asyncio.sleep(self.cfg.heartbeat_interval_s)

    def _drop_lost_gpus(self, sample: dict[str, Any]) -> None:
        """A GPU that stopped answering NVML gets no new job (the others go on)."""
        for gpu in sample.get("gpus") or ():
            index, error = gpu.get("index"), gpu.get("error")
            if error and isinstance(index, int) and index not in self.scheduler.blocked:
                log.error("GPU %d stopped answering NVML (%s): no new job goes to it", index,
                          error)
                self.scheduler.block(index, f"NVML: {error}")

    def _status_line(self) -> str:
        drain = self.drains.node_drain()
        state = f"draining ({drain.reason})" if drain is not None else "serving"
        return (f"{state}: {len(self.held)}/{self.scheduler.capacity} slots busy, "
                f"coordinator {self.cfg.coordinator_url}")

    @property
    def _cpu_only_on_purpose(self) -> bool:
        """`gpus = []`, or no `gpus` and the agent started with CUDA_VISIBLE_DEVICES
        naming none ("" or -1): an NVML that cannot start is then no reason to stop."""
        if self.cfg.gpus is not None:
            return self.cfg.gpus == ()
        spec = os.environ.get("CUDA_VISIBLE_DEVICES")
        return spec is not None and not cuda_visible_entries(spec)

    def _make_scheduler(self) -> Scheduler:
        inventory = self.telemetry.inventory()
        for g in inventory:
            if g.mig:
                log.warning("gpu %d (%s) is in MIG mode: left out, as this agent gives jobs "
                            "whole GPUs (turn MIG off: nvidia-smi -i %d -mig 0)",
                            g.index, g.name, g.index)
        devices = [Device(g.index, g.name, g.memory_total_mb, g.uuid, g.minor)
                   for g in inventory if not g.mig
                   and (self.cfg.gpus is None or g.index in self.cfg.gpus)]
        spec = os.environ.get("CUDA_VISIBLE_DEVICES")
        if spec is not None and self.cfg.gpus is None:
            # The agent's own CUDA_VISIBLE_DEVICES narrows the GPUs it gives jobs (NVML
            # ignores the variable; each job's is set anew); config `gpus` wins over it.
            devices, notes = visible_devices(spec, devices,
                                             os.environ.get("CUDA_DEVICE_ORDER"))
            for note in notes:
                log.warning("%s", note)
            log.info("CUDA_VISIBLE_DEVICES=%r in the agent's environment: %d of %d GPU(s) "
                     "used%s", spec, len(devices), len(inventory),
                     f" ({', '.join(str(d.index) for d in devices)})" if devices else "")
        elif spec is not None:
            log.info("CUDA_VISIBLE_DEVICES in the agent's environment is not read: config "
                     "`gpus` names the GPUs")
        cuda = inventory[0].cuda_driver_version or "" if inventory else ""
        return Scheduler(devices, self.cfg.jobs_per_gpu, self.cfg.cpu_slots, cuda_version=cuda)

    def _offered_gpus(self) -> tuple[list[GpuInfo], list[dict[str, Any]]]:
        """The GPUs jobs here can get (what registration offers dispatch), and the others
        NVML sees, each with why it is left out."""
        given = {d.index for d in self.scheduler.devices}
        offered, left_out = [], []
        for gpu in self.telemetry.inventory():
            if gpu.index in given:
                offered.append(gpu)
            else:
                why = ("MIG mode" if gpu.mig else "config gpus" if self.cfg.gpus is not None
                       else "CUDA_VISIBLE_DEVICES")
                left_out.append({"index": gpu.index, "name": gpu.name, "uuid": gpu.uuid,
                                 "why": why})
        return offered, left_out

    def _contract_env(self) -> dict[str, str]:
        env = {"MINER_CACHE_DIR": str(self.cfg.cache_dir),
               "MINER_CACHE_MAX_BYTES": str(self.cfg.cache_max_bytes)}
        models = resolve_models(self.cfg)  # the model store's names, then config [models]
        if models:
            env["MINER_MODELS"] = json.dumps(models)
        if self.cfg.default_model:
            env["MINER_DEFAULT_MODEL"] = self.cfg.default_model
        return env

    async def _bench_summary(self) -> dict[str, Any] | None:
        path: Path = self.cfg.bench_file or self.cfg.state_dir / "bench-summary.json"
        if not path.is_file():
            return None
        try:
            async with aiofiles.open(path) as fh:
                data = json.loads(await fh.read())
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
    def _on_signal(self, sig: int) -> None:
        """SIGTERM/SIGINT set flags: drain, then cancel now, then kill now."""
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            log.info("%s: draining (send it again to cancel running jobs now)", name)
            self.drain_reason = f"shutdown ({name})"
            self.stop_event.set()
        elif self._signals == 2:
            log.info("%s again: canceling running jobs now", name)
            self.hard_stop.set()
        else:
            log.info("%s a third time: killing running jobs", name)
            self.inbox.kill_all()


async def _best_effort(what: str, call: Awaitable[Any]) -> bool:
    """Await one leaving call; a failure or a hang is logged, never raised."""
    try:
        # The call's deadline bounds its retries; the timeout also bounds a hung attempt.
        await within(call, LEAVE_DEADLINE_S + 0.5)
    except (TimeoutError, CoordinatorError) as exc:
        log.warning("%s not sent: %s", what, exc or "timed out")
        return False
    return True
