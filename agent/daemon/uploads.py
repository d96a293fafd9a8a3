"""Where a job's package goes beyond the node: the coordinator, or a presigned URL.

An upload is planned when the package is sealed (:meth:`Uploads.plan`), stored with the
report in the journal, and tried by the outbox (:mod:`agent.daemon.outbox`) before the
report goes out, one bounded try at a time, so a coordinator outage only delays it
and a crash resumes it. Each destination ends once:

- ``done``: the report's ``package.location`` names where the zip now is;
- ``failed`` with a code the report carries in ``package.upload_errors``:
  ``package_too_large`` (413, a size over the coordinator's announced limit, or a
  connection reset again and again on the upload while the coordinator answers other
  calls: what a server that refuses a big body without reading it looks like),
  ``sha256_mismatch`` (422), ``upload_refused`` (another 4xx) or ``upload_failed``
  (a presigned URL still failing after :data:`PRESIGNED_TRIES` tries, or the
  coordinator's upload after :data:`COORDINATOR_TRIES_WHILE_UP` while it answers other
  calls). An outage (nothing answers) never ends an upload: the report waits for it.

The report itself always goes out, with the manifest and the result hash.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

from agent.coordinator.capabilities import Capabilities
from agent.coordinator.client import CoordinatorClient
from agent.coordinator.transport import AmbiguousSend, CoordinatorHTTPError, LeaseLost
from agent.errors import CoordinatorError
from agent.execution.executor import JobReport
from agent.jobs import Job

log = logging.getLogger(__name__)
UPLOAD_TRY_MAX_S = 600.0  # one try of one upload, retries of 5xx and refused connections in it
SLOWEST_UPLOAD_BYTES_S = 1 << 20  # a try gives the body this long at 1 MiB/s on top
RESETS_MEAN_TOO_LARGE = 2  # resets on the upload while the coordinator answers a probe
PRESIGNED_TRIES = 5  # a job's own upload URL is not the coordinator: it may not hold a report
COORDINATOR_TRIES_WHILE_UP = 10  # failed tries, while other calls answer, before giving up


class UploadPending(CoordinatorError):
    """Raised when an upload could not finish now (an outage); the outbox tries again."""

    code = "upload_pending"


def plan(report: JobReport, job: Job | None, caps: Capabilities) -> dict[str, Any] | None:
    """The uploads a sealed package needs, as stored in the journal; None for none."""
    pkg = report.package
    if pkg is None or pkg.zip_path is None or pkg.zip_sha256 is None:
        return None
    targets: list[dict[str, Any]] = []
    url = job.payload.get("upload_url") if job is not None else None
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        targets.append({"kind": "presigned", "url": url, "state": "pending", "tries": 0})
    if caps.package:
        targets.append({"kind": "coordinator", "state": "pending", "tries": 0, "resets": 0})
    if not targets:
        return None
    try:
        size = pkg.zip_path.stat().st_size
    except OSError:
        size = None
    return {"zip": str(pkg.zip_path), "sha256": pkg.zip_sha256, "size": size,
            "targets": targets}


def pending(upload: dict[str, Any] | None) -> bool:
    return upload is not None and any(t.get("state") == "pending" for t in upload["targets"])


class Uploads:
    """Tries the pending uploads of one package; see the module docstring."""

    def __init__(self, client: CoordinatorClient, caps: Capabilities,
                 base_url: str = "") -> None:
        self.client = client
        self.base_url = base_url.rstrip("/") + "/"
        self.caps = caps

    async def attempt(self, job_id: str, upload: dict[str, Any], lease_id: str | None,
                      try_s: float) -> None:
        """One try of each pending destination; updates ``upload`` in place.

        A try lasts ``try_s`` plus the body's time at 1 MiB/s (at most
        :data:`UPLOAD_TRY_MAX_S`). Raises :class:`UploadPending` when one must be tried
        again later.
        """
        size = upload.get("size")
        try_s = min(UPLOAD_TRY_MAX_S, try_s + (size if isinstance(size, int) else 0)
                    / SLOWEST_UPLOAD_BYTES_S)
        waiting: list[str] = []
        for target in upload["targets"]:
            if target.get("state") != "pending":
                continue
            target["tries"] = int(target.get("tries", 0)) + 1
            try:
                await self._one(job_id, upload, target, lease_id, try_s)
            except LeaseLost:
                raise  # the job is no longer this miner's: its report is dropped
            except CoordinatorHTTPError as exc:
                self._failed(job_id, upload, target, _refusal_code(exc), str(exc),
                             _limit_of(exc.body))
            except CoordinatorError as exc:
                ended = await self._gives_up(upload, target, exc)
                if ended is not None:
                    self._failed(job_id, upload, target, *ended, None)
                    continue
                target["error"] = str(exc)[:500]
                waiting.append(f"{target['kind']}: {exc}")
            else:
                target["state"] = "done"
                target.pop("error", None)
        if waiting:
            raise UploadPending(f"package upload not finished ({'; '.join(waiting)})")

    async def _gives_up(self, upload: dict[str, Any], target: dict[str, Any],
                        exc: CoordinatorError) -> tuple[str, str] | None:
        """The code and message that end a destination after a failed try, or None to
        try again later (an outage: nothing answers)."""
        tries = target["tries"]
        if target["kind"] == "presigned":
            if tries >= PRESIGNED_TRIES:
                return "upload_failed", f"the job's upload URL failed {tries} times; last: {exc}"
            return None
        reset = isinstance(exc, AmbiguousSend)
        if not reset and tries < COORDINATOR_TRIES_WHILE_UP:
            return None
        if not await self._answers_other_calls():  # one probe a try: an outage waits
            return None
        if reset:
            target["resets"] = int(target.get("resets", 0)) + 1
            if target["resets"] >= RESETS_MEAN_TOO_LARGE:
                return "package_too_large", (
                    f"the coordinator reset the connection on this {upload.get('size')}-byte "
                    f"upload {target['resets']} times while answering other calls: it "
                    "refuses a body this large")
        if tries >= COORDINATOR_TRIES_WHILE_UP:
            return "upload_failed", (f"the package upload failed {tries} times while the "
                                     f"coordinator answered other calls; last: {exc}")
        return None

    async def _one(self, job_id: str, upload: dict[str, Any], target: dict[str, Any],
                   lease_id: str | None, try_s: float) -> None:
        zip_path, sha = upload["zip"], upload["sha256"]
        if target["kind"] == "presigned":
            await self.client.put_presigned(target["url"], zip_path, sha, deadline_s=try_s,
                                            retry_ambiguous=False)
            parts = urllib.parse.urlsplit(target["url"])
            target["location"] = urllib.parse.urlunsplit((*parts[:3], "", ""))  # no signature
            return
        limit = self.caps.max_package_bytes
        size = upload.get("size")
        if limit is not None and isinstance(size, int) and size > limit:
            raise CoordinatorHTTPError(f"the package is {size} bytes, over the coordinator's "
                                       f"{limit}-byte limit", 413, {"max_bytes": limit})
        answer = await self.client.upload_package(job_id, zip_path, sha, lease_id=lease_id,
                                                  deadline_s=try_s, retry_ambiguous=False)
        if answer.url:
            target["location"] = urllib.parse.urljoin(self.base_url, answer.url)

    async def _answers_other_calls(self) -> bool:
        """Whether the coordinator is up (a small call answers) despite the reset."""
        try:
            await self.client.running_jobs(deadline_s=10.0)
        except CoordinatorError:
            return False
        return True

    def _failed(self, job_id: str, upload: dict[str, Any], target: dict[str, Any], code: str,
                message: str, limit: int | None) -> None:
        target["state"] = "failed"
        target["error"] = {"error_code": code, "message": message[:500],
                           "size_bytes": upload.get("size"), "limit_bytes": limit}
        log.error("job %s: package upload to %s ended: %s: %s (the report goes out without "
                  "it)", job_id, target["kind"], code, message)


def location(upload: dict[str, Any] | None) -> str | None:
    """Where the uploaded zip is: the job's URL first, else the coordinator's."""
    if not upload:
        return None
    done = {t["kind"]: t.get("location") for t in upload["targets"] if t.get("state") == "done"}
    return done.get("presigned") or done.get("coordinator")


def errors(upload: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not upload:
        return []
    return [{"target": t["kind"], **t["error"]} for t in upload["targets"]
            if t.get("state") == "failed" and isinstance(t.get("error"), dict)]


def _refusal_code(exc: CoordinatorHTTPError) -> str:
    if exc.status == 413:
        return "package_too_large"
    if exc.status == 422:
        return "sha256_mismatch"
    return "upload_refused"


def _limit_of(body: Any) -> int | None:
    if isinstance(body, dict):
        for key in ("max_bytes", "limit_bytes", "max_package_bytes"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None
