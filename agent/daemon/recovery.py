"""What earlier runs of the agent left: unfinished jobs, unsent reports, old packages.

On start: a job that was running when the agent died is packaged from what it left
and reported as failed with ``agent_restart`` (one whose package was sealed before the
crash is reported as it ended, and its upload is done now); a report that was not
acknowledged goes back to the outbox as stored, never rebuilt, with its tries; a job
the coordinator canceled or expired meanwhile is dropped instead of reported (see
:func:`agent.daemon.cancels.disposition`).
Periodically: done jobs' packages are pruned by age and total size
(:mod:`agent.daemon.retention`), and scratch folders no running job holds are removed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.daemon.cancels import Disposition, disposition
from agent.daemon.flow import JobFlow
from agent.daemon.held import HeldJobs
from agent.daemon.journal import Journal, Phase
from agent.daemon.report import Report
from agent.daemon.retention import MIB, Retention
from agent.daemon.session import Session
from agent.daemon.uploads import plan as upload_plan
from agent.errors import CoordinatorError, InvalidJob, Outcome, PackageError
from agent.execution.executor import JobReport
from agent.execution.package import PackageInfo, write_package
from agent.execution.reclaim import remove_tree
from agent.execution.sealed import read_sealed
from agent.execution.sealwalk import has_entries
from agent.jobs import Job, valid_job_id
from agent.layout import (
    ARTIFACTS_DIR,
    LOGS_DIR,
    RESULT_TEXT,
    job_folder,
)

log = logging.getLogger(__name__)
LIST_DEADLINE_S = 30.0
LIST_LIMIT = 100  # jobs the start's look asks for, and the most it fails
UNRECORDED = ("the agent restarted and had no record of this job (lost to a power loss "
              "just after it started); it is not running on this node")


class Recovery:
    """Resumes what a previous run left unfinished, and prunes old packages."""

    def __init__(self, *, flow: JobFlow, journal: Journal, held: HeldJobs, out_root: Path,
                 work_root: Path | None, keep_packages_days: float,
                 keep_packages_max_mb: int, session: Callable[[], Session]) -> None:
        self.flow = flow
        self.journal = journal
        self.held = held
        self.out_root = out_root
        self.work_root = work_root
        self.retention = Retention(journal, out_root, keep_s=keep_packages_days * 86400,
                                   max_bytes=keep_packages_max_mb * MIB)
        self.session = session

    def prune(self) -> None:
        """Prune done jobs' packages (by age and total size) and orphaned scratch."""
        self.retention.prune()
        if self.work_root is not None and self.work_root.is_dir():
            for work in self.work_root.iterdir():
                if work.name not in self.held:  # scratch of a job that died with an agent
                    remove_tree(work)

    async def recover(self) -> None:
        """Deal with what a previous run of the agent left unfinished."""
        for record in self.journal.in_phase(Phase.ACCEPTED, Phase.RUNNING):
            log.warning("job %s was running when the agent stopped; packaging what it left",
                        record.job_id)
            session = self.session()
            if session.shipper is not None:
                await session.shipper.resume(record.job_id)
            # In a thread: a job's folder may hold tens of thousands of files.
            report = await asyncio.to_thread(self._package_leftovers, record.job_id,
                                             record.job)
            if disposition(report.outcome, session.caps) is Disposition.DROP:
                self.journal.set_phase(record.job_id, Phase.DROPPED,
                                       outcome=report.outcome.value)
                continue
            # The crash may have come before or during the upload: it is done now.
            upload = upload_plan(report, _job_or_none(record.job), session.caps)
            await self.flow.finish(report, record.lease_id, 0, upload=upload)
        await self._fail_unrecorded()
        for record in self.journal.in_phase(Phase.FINISHED):
            if record.report is not None:
                self.flow.submit(record.job_id, Report.from_dict(record.report),
                                 record.lease_id, record.delivery)
            else:  # journaled before the report was (a write lost to a full disk)
                log.error("job %s: finished without a stored report; nothing can be sent",
                          record.job_id)
                self.journal.set_phase(record.job_id, Phase.REJECTED)

    async def _fail_unrecorded(self) -> None:
        """Jobs the coordinator says run here that the journal has no record of.

        A job's records reach the disk within a second of its start, not before it
        (see JobFlow._run): a power loss in that second takes them, and the coordinator
        would wait for the job until it times out. Each such job is failed now as
        ``agent_restart``, with a package of whatever its folder holds. A coordinator
        that cannot list them leaves them to its timeouts (said in the log).
        """
        try:
            listed = await self.flow.client.running_jobs(limit=LIST_LIMIT,
                                                          deadline_s=LIST_DEADLINE_S)
        except CoordinatorError as exc:
            log.warning("cannot ask the coordinator which jobs it thinks run here (%s); one "
                        "whose record a power loss took stays running there until it times "
                        "out", exc)
            return
        bad = sorted(j for j in listed if not valid_job_id(j))
        if bad:  # an id that cannot name a folder or a URL path is never one of ours
            log.warning("the coordinator lists %d job id(s) no job can have as running "
                        "here (%.80r...); ignored", len(bad), bad[0])
        unknown = sorted(j for j in listed if valid_job_id(j) and self.journal.get(j) is None)
        if len(unknown) > LIST_LIMIT:  # more than it was asked for: a broken coordinator
            log.warning("the coordinator lists %d jobs this node has no record of, past the "
                        "%d asked for; failing the first %d", len(unknown), LIST_LIMIT,
                        LIST_LIMIT)
            unknown = unknown[:LIST_LIMIT]
        for job_id in unknown:
            log.warning("job %s: the coordinator says it runs here, but this node has no "
                        "record of it (lost to a power loss?); failing it as agent_restart",
                        job_id)
            raw = {"job_id": job_id}
            self.journal.accept(job_id, raw, None)
            report = await asyncio.to_thread(self._package_leftovers, job_id, raw, UNRECORDED)
            await self.flow.finish(report, None, 0)

    def _package_leftovers(self, job_id: str, raw: dict[str, Any],
                           message: str = "the agent restarted while the job was running",
                           ) -> JobReport:
        if not valid_job_id(job_id):  # refused before it ran: nothing on disk to package
            return JobReport(job_id, Outcome.FAILED, "invalid_job", "malformed job id", False,
                             {"status": "failed", "metrics": {}}, None)
        folder = job_folder(self.out_root, job_id)
        # Packaged before the crash: report what its zip says (read_sealed puts the
        # folder's output.json and sidecar back from it; the job may have forged them).
        sealed = read_sealed(folder)
        if sealed is not None:
            return report_from_package(job_id, sealed)
        for sub in (LOGS_DIR, ARTIFACTS_DIR):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        partial = has_entries(folder / ARTIFACTS_DIR) or (folder / RESULT_TEXT).exists()
        output = {"job_id": job_id, "type": (raw.get("payload") or {}).get("type"),
                  "status": Outcome.FAILED.value, "partial": partial, "progress": {},
                  "metrics": {}, "error": {"code": "agent_restart", "message": message}}
        try:
            cfg = self.flow.cfg
            info = write_package(folder, output, max_files=cfg.max_job_files or None,
                                 max_bytes=cfg.max_job_output_mb << 20 or None)
        except (OSError, PackageError) as exc:
            log.error("job %s: cannot package leftovers: %s", job_id, exc)
            return JobReport(job_id, Outcome.FAILED, "agent_restart", message, partial,
                             output, None)
        return report_from_package(job_id, info)


def _job_or_none(raw: dict[str, Any]) -> Job | None:
    try:
        return Job.from_dict(raw)
    except InvalidJob:
        return None


def report_from_package(job_id: str, info: PackageInfo) -> JobReport:
    """A JobReport rebuilt from a sealed package (for recovery), as the job ``job_id``:
    the journal's id, never one the package names."""
    output = info.output
    error = output.get("error")
    error = error if isinstance(error, dict) else {}
    try:
        outcome = Outcome(str(output.get("status")))
    except ValueError:
        outcome = Outcome.FAILED
    return JobReport(job_id, outcome, error.get("code"), error.get("message"),
                     bool(output.get("partial")), output, info)
