"""A job's way through the node: accepted, run, packaged, reported exactly once.

Each step is journaled before the next one acts, so a crash at any point resumes
from the journal: a job that was running is packaged from what it left and
reported as failed with ``agent_restart``; a report that was not acknowledged is
sent again, as stored; a job the coordinator canceled or expired meanwhile is
dropped instead of reported (a core ``/result`` would flip it back to COMPLETED).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.coordinator.transport import CoordinatorHTTPError, LeaseLost
from agent.daemon.report import Report, build_report
from agent.daemon.scheduler import Assignment, NoCapacity
from agent.errors import CoordinatorError, InvalidJob, Outcome, PackageError
from agent.execution.executor import JobReport, JobRun
from agent.execution.package import PackageInfo, write_package
from agent.jobs import Job, valid_job_id

if TYPE_CHECKING:
    from agent.daemon.lifecycle import Agent

log = logging.getLogger(__name__)


@dataclass
class Active:
    """A job this node holds now."""

    job_id: str
    lease_id: str | None
    lease_ttl_s: float | None = None
    job: Job | None = None
    run: JobRun | None = None
    assignment: Assignment | None = None
    cancel_reason: str | None = None
    dropped: bool = False  # the coordinator no longer lists it: never report it
    accepted_at: float = field(default_factory=time.time)  # when poll handed it over

    def cancel(self, reason: str, dropped: bool = False) -> None:
        self.dropped = self.dropped or dropped
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.run is not None:
            self.run.cancel(reason)


class JobFlow:
    """Runs and reports jobs for an :class:`~agent.daemon.lifecycle.Agent`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    # -- from poll to package -----------------------------------------------------------
    async def handle(self, job_id: str, raw: dict[str, Any], lease_id: str | None) -> None:
        a = self.agent
        active = a.active[job_id]
        try:
            job = Job.from_dict(raw)
            assignment = await self._reserve(active, job)
        except (InvalidJob, NoCapacity) as exc:
            a.active.pop(job_id, None)
            a.slot_freed.set()
            report = Report("fail", {"error_code": exc.code, "error_message": exc.message,
                                     "metrics": {"duration_ms": 0, "units": 0,
                                                 "unit_type": "gpu_seconds"}})
            if lease_id:
                report.body["lease_id"] = lease_id
            log.warning("job %s refused: %s: %s", job_id, exc.code, exc.message)
            a.journal.set_phase(job_id, "finished", outcome="failed", report=report.to_dict())
            await asyncio.shield(self.deliver(job_id, report, lease_id))
            return
        if assignment is None:  # canceled while waiting for devices
            a.active.pop(job_id, None)
            a.journal.set_phase(job_id, "dropped", outcome="canceled")
            return
        report_obj = await self._run(active, job, assignment)
        await asyncio.shield(self.conclude(active, report_obj))

    async def _reserve(self, active: Active, job: Job) -> Assignment | None:
        a = self.agent
        while True:
            assignment = a.scheduler.reserve(job.job_id, job.constraints)
            if assignment is not None:
                return assignment
            if active.cancel_reason is not None:
                return None
            a.slot_freed.clear()
            await a.slot_freed.wait()

    async def _run(self, active: Active, job: Job, assignment: Assignment) -> JobReport:
        a = self.agent
        active.job, active.assignment = job, assignment
        run = JobRun(job, a.exec_cfg, a.launcher, gpu_ids=assignment.cuda_visible_devices,
                     gpu_names=list(assignment.gpu_names), environ=a.job_environ,
                     created_at=active.accepted_at)
        active.run = run
        if active.cancel_reason is not None:
            run.cancel(active.cancel_reason)
        a.journal.set_phase(job.job_id, "running", package_dir=str(run.folder))
        try:
            return await run.run()
        finally:
            a.scheduler.release(job.job_id)
            a.active.pop(job.job_id, None)
            a.slot_freed.set()

    async def conclude(self, active: Active, report: JobReport) -> None:
        """Package is written: upload it, journal the report, then deliver it."""
        a = self.agent
        a.metrics.job_finished(report.outcome.value,
                               float(report.output.get("metrics", {}).get("duration_ms", 0)) / 1000)
        cancel = report.output.get("cancel") or {}
        if cancel.get("latency_ms") is not None:
            a.metrics.cancel_latency_s(cancel["latency_ms"] / 1000)
        a.wake_heartbeat()  # the slot is free: say so now
        if active.dropped and "cancel" not in a.extensions:
            log.info("job %s: canceled by the coordinator; package kept at %s, nothing "
                     "reported", report.job_id, report.folder)
            a.journal.set_phase(report.job_id, "dropped", outcome=report.outcome.value)
            return
        location = await a.uploads.upload(active, report)
        gpu_count = len(active.assignment.gpu_indices) if active.assignment else 0
        rep = await self._finish(report, active.lease_id, gpu_count, location)
        await self.deliver(report.job_id, rep, active.lease_id)

    async def _finish(self, report: JobReport, lease_id: str | None, gpu_count: int,
                      location: str | None) -> Report:
        """Build the report once, journal it, and ship the logs' last bytes."""
        a = self.agent
        rep = build_report(report, gpu_count=gpu_count, extensions=a.extensions,
                           location=location, lease_id=lease_id,
                           max_text_bytes=a.cfg.max_result_text_bytes,
                           log_tail_bytes=a.cfg.log_tail_bytes)
        a.journal.set_phase(report.job_id, "finished", outcome=report.outcome.value,
                            report=rep.to_dict())
        if a.shipper is not None and report.folder is not None:
            await a.shipper.ship(report.job_id, report.folder)
        return rep

    # -- reporting ------------------------------------------------------------------
    async def deliver(self, job_id: str, report: Report, lease_id: str | None) -> None:
        """Send the stored report once; mark it reported, dropped or left for later."""
        a = self.agent
        if report.kind == "none":
            a.journal.set_phase(job_id, "dropped")
            return
        try:
            if not await self._still_ours(job_id, report):
                log.info("job %s: the coordinator no longer lists it (canceled or expired); "
                         "not reporting", job_id)
                a.journal.set_phase(job_id, "dropped")
                return
            await self._send(job_id, report)
        except LeaseLost:
            log.warning("job %s: lease lost; the coordinator gave it to another miner", job_id)
            a.journal.set_phase(job_id, "dropped")
            return
        except CoordinatorHTTPError as exc:
            log.error("job %s: the coordinator refused the report (%s); kept in the journal "
                      "as rejected", job_id, exc)
            a.journal.set_phase(job_id, "rejected")
            return
        except CoordinatorError as exc:
            log.warning("job %s: report not delivered (%s); it is sent on the next start",
                        job_id, exc)
            return
        a.journal.set_phase(job_id, "reported")
        log.info("job %s: reported (%s)", job_id, report.kind)
        a.wake_heartbeat()
        a.wake_poll()

    async def _still_ours(self, job_id: str, report: Report) -> bool:
        a = self.agent
        canceled = report.kind == "result" and report.body["result"].get("status") == "canceled"
        if canceled and "cancel" in a.extensions:
            return True  # the cancel extension wants the canceled report
        listed = await a.client.running_jobs()
        return job_id in listed

    async def _send(self, job_id: str, report: Report) -> None:
        body = report.body
        client = self.agent.client
        if report.kind == "result":
            await client.result(job_id, body["result"], body.get("metrics"),
                                body.get("lease_id"))
        else:
            await client.fail(job_id, body["error_code"], body.get("error_message", ""),
                              body.get("metrics"), body.get("lease_id"))

    def set_aside_earlier_attempt(self, job_id: str) -> None:
        """A requeued job runs again here: keep the earlier attempt's package, out of the way."""
        root = self.agent.exec_cfg.out_root
        folder = root / f"job_{job_id}"
        if not folder.exists():
            return
        aside = root / "superseded" / f"job_{job_id}-{int(time.time() * 1000)}"
        aside.mkdir(parents=True)
        for path in (folder, folder.with_name(folder.name + ".zip"),
                     folder.with_name(folder.name + ".zip.sha256")):
            if path.exists():
                path.rename(aside / path.name)
        log.info("job %s: a new attempt; the earlier package is kept in %s", job_id, aside)

    # -- recovery ---------------------------------------------------------------------
    def prune(self) -> None:
        """Remove packages of jobs reported (or dropped) more than keep_packages_days ago."""
        a = self.agent
        keep_s = a.cfg.keep_packages_days * 86400
        for job_id in a.journal.prune(keep_s):
            folder = a.exec_cfg.out_root / f"job_{job_id}"
            shutil.rmtree(folder, ignore_errors=True)
            for suffix in (".zip", ".zip.sha256"):
                folder.with_name(folder.name + suffix).unlink(missing_ok=True)
        if a.exec_cfg.work_root is not None and a.exec_cfg.work_root.is_dir():
            for work in a.exec_cfg.work_root.iterdir():
                if work.name not in a.active:  # scratch of a job that died with an agent
                    shutil.rmtree(work, ignore_errors=True)

    async def recover(self) -> None:
        """Deal with what a previous run of the agent left unfinished."""
        a = self.agent
        for record in a.journal.in_phase("accepted", "running"):
            log.warning("job %s was running when the agent stopped; packaging what it left",
                        record.job_id)
            if a.shipper is not None:
                await a.shipper.resume(record.job_id)
            report = self._package_leftovers(record.job_id, record.job)
            await self._finish(report, record.lease_id, 0, None)
        for record in a.journal.in_phase("finished"):
            if record.report is not None:
                await self.deliver(record.job_id, Report.from_dict(record.report),
                                   record.lease_id)

    def _package_leftovers(self, job_id: str, raw: dict[str, Any]) -> JobReport:
        if not valid_job_id(job_id):  # refused before it ran: nothing on disk to package
            return JobReport(job_id, Outcome.FAILED, "invalid_job", "malformed job id", False,
                             {"status": "failed", "metrics": {}}, None)
        folder = self.agent.exec_cfg.out_root / f"job_{job_id}"
        existing = folder / "output.json"
        if existing.is_file():  # packaged before the crash: report what it says
            return report_from_folder(folder)
        for sub in ("logs", "artifacts"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        partial = any((folder / "artifacts").iterdir()) or (folder / "result.txt").exists()
        output = {"job_id": job_id, "type": (raw.get("payload") or {}).get("type"),
                  "status": Outcome.FAILED.value, "partial": partial, "progress": {},
                  "metrics": {}, "error": {"code": "agent_restart",
                                           "message": "the agent restarted while the job "
                                                      "was running"}}
        try:
            write_package(folder, output)
        except (OSError, PackageError) as exc:
            log.error("job %s: cannot package leftovers: %s", job_id, exc)
        return report_from_folder(folder)


def report_from_folder(folder: Path) -> JobReport:
    """A JobReport rebuilt from a written package (for recovery)."""
    output = json.loads((folder / "output.json").read_text())
    zip_path = folder.with_name(folder.name + ".zip")
    side = zip_path.with_name(zip_path.name + ".sha256")
    zip_sha = side.read_text().split()[0] if side.is_file() else None
    info = PackageInfo(folder, zip_path if zip_path.is_file() else None, zip_sha,
                       output.get("files", []), output.get("result_hash", ""),
                       output.get("skipped", []), output)
    error = output.get("error") or {}
    return JobReport(output.get("job_id", folder.name[4:]), Outcome(output["status"]),
                     error.get("code"), error.get("message"), bool(output.get("partial")),
                     output, info)
