"""A job's way through the node: accepted, run, packaged, reported exactly once.

Each step is journaled before the next one acts, so a crash at any point resumes
from the journal (:mod:`agent.daemon.recovery`). Whether a finished job is reported,
and how, is :func:`agent.daemon.cancels.disposition`'s decision alone. The flow gets
its collaborators explicitly; it never sees the agent that owns it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from agent.config import AgentConfig
from agent.coordinator.client import CoordinatorClient, PolledJob
from agent.daemon.cancels import Disposition, disposition
from agent.daemon.held import Active, HeldJobs
from agent.daemon.hooks import HookFailed, JobHooks
from agent.daemon.journal import Journal, Phase
from agent.daemon.outbox import Outbox
from agent.daemon.release import Release, ReleaseGate
from agent.daemon.report import Report, build_report, small_reads
from agent.daemon.scheduler import Assignment, NoCapacity, Scheduler
from agent.daemon.session import Session
from agent.daemon.uploads import plan as upload_plan
from agent.errors import AgentError, InvalidJob, LaunchError, Outcome, UnsupportedConstraint
from agent.execution.executor import ExecutorConfig, JobReport, JobRun, runtime_for
from agent.execution.launcher import Launcher
from agent.execution.warm import WarmPool
from agent.jobs import Job, valid_job_id
from agent.layout import job_folder, package_paths
from agent.node.metrics import AgentMetrics

log = logging.getLogger(__name__)
MAX_FAULT_CHARS = 500
# What refuses a job before its process starts: reported as the job's failure, no package.
REFUSALS = (InvalidJob, NoCapacity, LaunchError, UnsupportedConstraint, HookFailed)
START_FLUSH_S = 1.0  # a started job's records are on disk within this (see JobFlow._run)


async def _no_drain(reason: str) -> None:
    log.error("%s; nothing drains this node (no drain wired)", reason)


@dataclass(frozen=True)
class JobStarter:
    """How this node starts a job's process: executor config, launcher, base environment."""

    exec_cfg: ExecutorConfig
    launcher: Launcher
    environ: dict[str, str]
    warm: WarmPool | None = None  # built-in inference in warm model workers (warm_models)

    def run_for(self, job: Job, assignment: Assignment, created_at: float) -> JobRun:
        kwargs: dict[str, Any] = dict(
            gpu_ids=assignment.cuda_visible_devices, gpu_names=list(assignment.gpu_names),
            environ=self.environ, created_at=created_at, gpu_devices=assignment.device_nodes)
        if self.warm is None:
            return JobRun(job, self.exec_cfg, self.launcher, **kwargs)
        return self.warm.run_for(job, self.exec_cfg, assignment.gpu_indices, **kwargs) or \
            JobRun(job, self.exec_cfg, self.warm.guard(self.launcher, assignment.gpu_indices),
                   **kwargs)


class JobFlow:
    """Runs and reports the jobs handed to this node."""

    def __init__(self, *, cfg: AgentConfig, journal: Journal, client: CoordinatorClient,
                 scheduler: Scheduler, held: HeldJobs, starter: JobStarter,
                 metrics: AgentMetrics, session: Callable[[], Session],
                 wake_heartbeat: Callable[[], None], wake_poll: Callable[[], None],
                 outbox: Outbox, gate: ReleaseGate | None = None) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.gate = gate  # None: no GPU, or NVML cannot tell
        self.journal = journal
        self.client = client
        self.scheduler = scheduler
        self.held = held
        self.starter = starter
        self.metrics = metrics
        self.session = session
        self.wake_heartbeat = wake_heartbeat
        self.wake_poll = wake_poll
        self.tasks: set[asyncio.Task[Any]] = set()
        # Awaited when pre-job has failed FAILURES_TO_DRAIN times in a row, before the
        # job's slot is freed: the agent sets its drain here. Left as it is, the node goes
        # on taking jobs.
        self.on_hook_failures: Callable[[str], Awaitable[None]] = _no_drain
        self.hooks = JobHooks(lambda: self.cfg, starter.environ,
                              on_failures=lambda reason: self.on_hook_failures(reason))

    # -- from poll to package -----------------------------------------------------------
    def accept(self, polled: PolledJob) -> None:
        """Journal a polled job, hold it, and start its task."""
        raw = polled.job_dict()
        if not self.journal.accept(polled.job_id, raw, polled.lease_id):
            if not self.outbox.adopt_lease(polled.job_id, polled.lease_id):
                log.warning("job %s: handed out twice; ignoring the repeat", polled.job_id)
            return
        log.info("job %s: accepted (%r)", polled.job_id,
                 (polled.payload or {}).get("type") if isinstance(polled.payload, dict) else "?")
        if valid_job_id(polled.job_id):  # a bad id fails the job; it never names a path
            self.set_aside_earlier_attempt(polled.job_id)
        self.held.add(Active(polled.job_id, polled.lease_id, lease_ttl_s=polled.lease_ttl_s))
        task = asyncio.create_task(self.handle(polled.job_id, raw, polled.lease_id))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        # No heartbeat: the coordinator counted this job in our in-flight as it handed it
        # over. Heartbeats keep their own timer (see agent.daemon.heartbeat).

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a job task failed: %r", task.exception())

    async def handle(self, job_id: str, raw: dict[str, Any], lease_id: str | None) -> None:
        active = self.held.get(job_id)
        assert active is not None
        try:
            problem = raw.get("answer_problem")
            if isinstance(problem, str):  # the coordinator's answer itself was unreadable
                raise InvalidJob(f"the coordinator's answer for this job was refused: {problem}")
            job = Job.from_dict(raw)
            self._check_type(job)  # before devices: a missing runtime is the answer
            self._check_tags(job)
            assignment = await self._reserve(active, job)
            if assignment is not None:
                await self._pre_job(active, job, assignment)
        except REFUSALS as exc:
            self.scheduler.release(job_id)  # devices pre-job held, if it got that far
            self.held.release(job_id)
            await asyncio.shield(self._refuse(job_id, lease_id, exc))
            return
        if assignment is None:  # canceled while waiting for devices
            self.held.release(job_id)
            self.journal.set_phase(job_id, Phase.DROPPED, outcome="canceled")
            self.wake_heartbeat()  # nothing is reported: only a heartbeat frees its slot
            return
        try:
            try:
                report = await self._run(active, job, assignment)
            except Exception as exc:  # a fault of the agent's own: the job still ends
                log.exception("job %s: the agent failed while running it", job_id)
                self.scheduler.release(job_id)  # both no-ops where _run got to free them
                self.held.release(job_id)
                report = _agent_fault(job_id, exc)
            await asyncio.shield(self.conclude(active, report))
        finally:
            self.outbox.unexpect(job_id)  # reported, dropped or failed: no longer awaited

    def _check_type(self, job: Job) -> None:
        """Refuse a type this node lacks, or does not allow, before it waits for devices."""
        runtime_for(job.type, self.cfg.runtimes, self.cfg.allowed_job_types)

    def _check_tags(self, job: Job) -> None:
        """Refuse a job asking for tags this node lacks (a coordinator that ignores them)."""
        missing = job.constraints.tags_missing(dict(self.cfg.tags))
        if missing:
            asked = ", ".join(f"{k}={v!r}" for k, v in sorted(missing.items()))
            have = ", ".join(f"{k}={v!r}" for k, v in sorted(self.cfg.tags.items()))
            raise UnsupportedConstraint(f"the job asks for tags {asked}; this node's tags "
                                        f"are {have or 'none'}")

    async def _pre_job(self, active: Active, job: Job, assignment: Assignment) -> None:
        """The operator's pre-job hook, once devices are held, before the process starts."""
        active.job, active.assignment = job, assignment
        await self.hooks.pre_job(job, assignment.cuda_visible_devices,
                                 job_folder(self.starter.exec_cfg.out_root, job.job_id))

    async def _post_job(self, active: Active, report: JobReport) -> None:
        """The operator's post-job hook: the package is sealed; the outcome is known."""
        if active.job is None or active.assignment is None:
            return
        folder = report.folder or job_folder(self.starter.exec_cfg.out_root, report.job_id)
        await self.hooks.post_job(active.job, active.assignment.cuda_visible_devices, folder,
                                  report.outcome.value, report.error_code)

    async def _refuse(self, job_id: str, lease_id: str | None, exc: AgentError) -> None:
        report = Report("fail", {"error_code": exc.code, "error_message": exc.message,
                                 "metrics": {"duration_ms": 0, "units": 0,
                                             "unit_type": "gpu_seconds"}})
        if lease_id:
            report.body["lease_id"] = lease_id
        log.warning("job %s refused: %s: %s", job_id, exc.code, exc.message)
        self.journal.set_phase(job_id, Phase.FINISHED, outcome="failed",
                               report=report.to_dict(), delivery={})
        self.submit(job_id, report, lease_id)

    async def _reserve(self, active: Active, job: Job) -> Assignment | None:
        while True:
            assignment = self.scheduler.reserve(job.job_id, self.scheduler.request_for(job))
            if assignment is not None:
                return assignment
            if active.cancel_reason is not None:
                return None
            await self.held.slot_freed()

    async def _run(self, active: Active, job: Job, assignment: Assignment) -> JobReport:
        active.job, active.assignment = job, assignment
        run = self.starter.run_for(job, assignment, active.accepted_at)
        active.run = run
        if active.cancel_reason is not None:
            run.cancel(active.cancel_reason)
        self.journal.set_phase(job.job_id, Phase.RUNNING, package_dir=str(run.folder))
        try:
            # Its records are committed: an agent crash from here on finds the job in
            # the journal. They reach the disk within START_FLUSH_S (usually sooner, with
            # another job's report), not before the process starts: a job's start waits
            # for no disk, and a power loss that takes them is put right at the next
            # start from the coordinator's list of our jobs (Recovery.recover).
            self.journal.durable_within(START_FLUSH_S)
            return await run.run()
        finally:
            try:
                active.release = await self._release_gpus(assignment, run)
            finally:
                self.scheduler.release(job.job_id)
                # The poll the free slot brings waits for this report (Outbox.catch_up).
                self.outbox.expect(job.job_id)
                self.held.release(job.job_id)

    async def _release_gpus(self, assignment: Assignment, run: JobRun) -> Release:
        """The release gate: the job's GPUs go on only once it let go of them."""
        if self.gate is None or not assignment.gpu_indices:
            return Release()
        release = await self.gate.wait(assignment.gpu_indices,
                                       {run.pid} if run.pid is not None else set())
        for index, pids in release.held.items():
            reason = (f"GPU {index} still held by finished job {assignment.job_id}'s "
                      f"processes {pids} after {self.gate.timeout_s:.0f} s")
            log.error("%s: no job gets it until it is free", reason)
            self.scheduler.block(index, reason)
            task = asyncio.create_task(self._unblock_when_free(index))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return release

    async def _unblock_when_free(self, index: int) -> None:
        assert self.gate is not None
        while await self.gate.still_held(index):
            await asyncio.sleep(5)
        log.info("GPU %d is free again", index)
        self.scheduler.unblock(index)
        self.wake_poll()

    async def conclude(self, active: Active, report: JobReport) -> None:
        """The package is written: report it as :func:`disposition` says."""
        self._count(report)
        # The slot is already free (the poll loop may lease the next job); the report
        # waits for post-job, which hook_timeout_s bounds. No heartbeat: the report tells
        # the coordinator (see Outbox.on_uncounted for those that do not).
        await self._post_job(active, report)
        session = self.session()
        if disposition(report.outcome, session.caps, active.dropped) is Disposition.DROP:
            log.info("job %s: canceled by the coordinator; package kept at %s, nothing "
                     "reported", report.job_id, report.folder)
            self.journal.set_phase(report.job_id, Phase.DROPPED, outcome=report.outcome.value)
            session.forget(report.job_id)
            self.wake_heartbeat()  # nothing is reported: only a heartbeat frees its slot
            return
        upload = upload_plan(report, active.job, session.caps)
        rep = await self.finish(report, active.lease_id, active.gpu_count,
                                active.release.metrics(), upload=upload)
        self.submit(report.job_id, rep, active.lease_id, {"upload": upload} if upload else {})

    def _count(self, report: JobReport) -> None:
        metrics = report.output.get("metrics", {})
        self.metrics.job_finished(report.outcome.value,
                                  float(metrics.get("duration_ms", 0)) / 1000)
        cancel = report.output.get("cancel") or {}
        if cancel.get("latency_ms") is not None:
            self.metrics.cancel_latency_s(cancel["latency_ms"] / 1000)

    async def finish(self, report: JobReport, lease_id: str | None, gpu_count: int,
                     extra_metrics: dict[str, Any] | None = None, *,
                     upload: dict[str, Any] | None = None) -> Report:
        """Build the report once, journal it with its uploads to do, and ship the logs'
        last bytes. The outbox sends it (:meth:`submit`)."""
        bounds = {"max_text_bytes": self.cfg.max_result_text_bytes,
                  "log_tail_bytes": self.cfg.log_tail_bytes}
        build = partial(build_report, report, gpu_count=gpu_count, location=None,
                        lease_id=lease_id, **bounds)
        # A tiny job's report is built on the loop: a thread hop would cost more than its
        # reads. Large (or odd) files are read in a thread.
        rep = build() if small_reads(report.folder, **bounds) else await asyncio.to_thread(build)
        if extra_metrics:
            rep.body["metrics"].update(extra_metrics)
        self.journal.set_phase(report.job_id, Phase.FINISHED, outcome=report.outcome.value,
                               report=rep.to_dict(),
                               delivery={"upload": upload} if upload else {})
        shipper = self.session().shipper
        if shipper is not None and report.folder is not None:
            await shipper.ship(report.job_id, report.folder)
        return rep

    # -- reporting ------------------------------------------------------------------
    def submit(self, job_id: str, report: Report, lease_id: str | None,
               delivery: dict[str, Any] | None = None) -> None:
        """Hand a journaled report to the outbox, which sends it until it is settled."""
        self.session().forget(job_id)  # its last log bytes went out in finish()
        self.outbox.submit(job_id, report, lease_id, delivery)

    def set_aside_earlier_attempt(self, job_id: str) -> None:
        """A requeued job runs again here: keep the earlier attempt's package, out of the way."""
        root = self.starter.exec_cfg.out_root
        folder = job_folder(root, job_id)
        if not folder.exists():
            return
        aside = root / "superseded" / f"{folder.name}-{int(time.time() * 1000)}"
        aside.mkdir(parents=True)
        for path in package_paths(folder):
            if path.exists():
                path.rename(aside / path.name)
        log.info("job %s: a new attempt; the earlier package is kept in %s", job_id, aside)


def _agent_fault(job_id: str, exc: Exception) -> JobReport:
    """The report of a job the agent itself failed (a bug): failed, ``agent_error``, so
    the coordinator hears of it now rather than when its timeout or lease runs out."""
    message = f"the agent failed while running the job: {exc!r}"[:MAX_FAULT_CHARS]
    return JobReport(job_id, Outcome.FAILED, "agent_error", message, False,
                     {"job_id": job_id, "status": Outcome.FAILED.value, "metrics": {},
                      "error": {"code": "agent_error", "message": message}}, None)
