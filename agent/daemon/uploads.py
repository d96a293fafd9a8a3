"""Where a job's package goes beyond the node: the coordinator, or a presigned URL."""

from __future__ import annotations

import logging
import urllib.parse

from agent.coordinator.capabilities import Capabilities
from agent.coordinator.client import CoordinatorClient
from agent.errors import CoordinatorError
from agent.execution.executor import JobReport
from agent.jobs import Job

log = logging.getLogger(__name__)
UPLOAD_DEADLINE_S = 600.0


class Uploads:
    """Uploads a finished package where the job or the coordinator asks for it."""

    def __init__(self, client: CoordinatorClient, caps: Capabilities,
                 base_url: str = "") -> None:
        self.client = client
        self.base_url = base_url.rstrip("/") + "/"
        self.caps = caps

    async def upload(self, report: JobReport, *, job: Job | None,
                     lease_id: str | None) -> str | None:
        """The package's location after uploading, or None to keep the node-local one."""
        pkg = report.package
        if pkg is None or pkg.zip_path is None or pkg.zip_sha256 is None:
            return None
        url = job.payload.get("upload_url") if job is not None else None
        location = None
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            try:
                await self.client.put_presigned(url, pkg.zip_path, pkg.zip_sha256,
                                                deadline_s=UPLOAD_DEADLINE_S)
                parts = urllib.parse.urlsplit(url)
                location = urllib.parse.urlunsplit((*parts[:3], "", ""))  # no signature
            except CoordinatorError as exc:
                log.warning("job %s: upload to the job's URL failed: %s", report.job_id, exc)
        if self.caps.package:
            try:
                answer = await self.client.upload_package(
                    report.job_id, pkg.zip_path, pkg.zip_sha256, lease_id=lease_id,
                    deadline_s=UPLOAD_DEADLINE_S)
                if answer.url:
                    location = location or urllib.parse.urljoin(self.base_url, answer.url)
            except CoordinatorError as exc:
                log.warning("job %s: package upload failed: %s", report.job_id, exc)
        return location
