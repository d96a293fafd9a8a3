"""Client endpoints of the reference coordinator (what the CLI's client commands call).

``POST /v1/jobs`` submits; ``GET /v1/jobs`` lists newest first with filters, paging
and the true total; ``GET /v1/jobs/{id}`` shows a job in the client guide's
vocabulary; ``POST .../cancel`` cancels; ``DELETE /v1/jobs/{id}`` deletes a job that is
not running; ``.../result``, ``.../logs`` and ``.../package`` (alias ``.../download``)
fetch outputs; ``.../events`` (:mod:`agent.reference.events_api`) long-polls a job's
changes and ``.../retry`` (:mod:`agent.reference.retry_api`) submits it again. Also
``GET /health`` and the stand-in object store behind presigned upload URLs
(``PUT /presigned/{token}``).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from agent.jobs import read_tags, valid_job_id
from agent.layout import STREAMS
from agent.reference.events_api import EventsAPI
from agent.reference.model import (
    CANCELED,
    CLIENT_STATUSES,
    QUEUED,
    RUNNING,
    Problem,
    Settings,
    job_view,
    parse_iso,
)
from agent.reference.retry_api import RetryAPI
from agent.reference.server import Request, Response, Route, route
from agent.reference.share_api import ShareAPI, package_body
from agent.reference.store import Store

MAX_PAGE = 1000
# One answer of GET .../logs: a log may be gigabytes, and the embedded coordinator lives
# in the agent's process; a client reads on from X-Log-End until X-Log-Size.
MAX_LOG_ANSWER_BYTES = 8 << 20


class ClientAPI:
    """Handlers for ``/v1/jobs...``, ``/health`` and ``/presigned/{token}``."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.events = EventsAPI(store)
        self.retries = RetryAPI(store)
        self.shares = ShareAPI(store, settings.receipt_secret)

    def routes(self) -> list[Route]:
        return [
            route("GET", "/health", self.health),
            route("POST", "/v1/jobs", self.submit, "client", "submit"),
            route("GET", "/v1/jobs", self.list, "client"),
            route("GET", "/v1/jobs/{job_id}", self.show, "client"),
            route("DELETE", "/v1/jobs/{job_id}", self.delete, "client"),
            route("POST", "/v1/jobs/{job_id}/cancel", self.cancel, "client"),
            route("GET", "/v1/jobs/{job_id}/result", self.result, "client"),
            route("GET", "/v1/jobs/{job_id}/logs", self.logs, "client"),
            route("GET", "/v1/jobs/{job_id}/package", self.package, "client"),
            route("GET", "/v1/jobs/{job_id}/download", self.package, "client"),
            *self.events.routes(),
            *self.retries.routes(),
            *self.shares.routes(),
            route("PUT", "/presigned/{token}", self.put_presigned,
                  max_body_bytes=self.settings.max_package_bytes),
        ]

    def health(self, req: Request) -> Response:
        return Response(200, {"status": "ok", "extensions": list(self.settings.extensions)})

    def _view(self, job: dict[str, Any]) -> dict[str, Any]:
        return job_view(job, self.store.package_info(job["job_id"]))

    def submit(self, req: Request) -> Response:
        body = req.json_object()
        payload, constraints = body.get("payload"), body.get("constraints") or {}
        ttl = body.get("ttl_s", self.settings.job_ttl_s)
        if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
            raise Problem(422, "payload must be a JSON object with a string 'type'")
        if not isinstance(constraints, dict):
            raise Problem(422, "constraints must be a JSON object")
        if constraints.get("tags") is not None:
            try:
                read_tags(constraints["tags"], "constraints.tags")
            except ValueError as exc:
                raise Problem(422, str(exc)) from None
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
            raise Problem(422, "ttl_s must be a number of seconds > 0")
        wanted = body.get("job_id")
        if wanted is not None and not valid_job_id(wanted):
            raise Problem(422, "job_id must be 1-128 letters, digits, '.', '_', ':' or '-' "
                          "(no '..'), or absent for a generated one")
        job_id = self.store.submit(payload, constraints, float(ttl), job_id=wanted)
        return Response(201, self._view(self.store.job_or_404(job_id)))

    def list(self, req: Request) -> Response:
        """Newest first; ``status`` (client names, comma-separated), ``type``, ``since`` and
        ``until`` (ISO 8601, on created_at, until exclusive), ``limit`` and ``offset``."""
        q = req.query
        statuses = tuple(s.strip().lower() for s in q.get("status", "").split(",") if s.strip())
        unknown = [s for s in statuses if s not in CLIENT_STATUSES]
        if unknown:
            raise Problem(422, f"unknown status {unknown[0]!r}; one of "
                          f"{', '.join(CLIENT_STATUSES)}")
        limit = min(MAX_PAGE, max(1, _int(q.get("limit", "100"), "limit")))
        offset = max(0, _int(q.get("offset", "0"), "offset"))
        rows, total = self.store.client_jobs(
            statuses, q.get("type") or None,
            parse_iso(q["since"], "since") if q.get("since") else None,
            parse_iso(q["until"], "until") if q.get("until") else None, limit, offset)
        return Response(200, {"jobs": [self._view(j) for j in rows], "total": total,
                              "limit": limit, "offset": offset})

    def show(self, req: Request) -> Response:
        return Response(200, self._view(self.store.job_or_404(req.params["job_id"])))

    def delete(self, req: Request) -> Response:
        """Remove a job with its logs, package and receipts; 409 while a miner has it."""
        with self.store.tx():
            job = self.store.job_or_404(req.params["job_id"])
            if job["state"] == RUNNING:
                status = job_view(job)["status"]
                raise Problem(409, f"job is {status}: cancel it first, then delete it",
                              error="job_active", status=status)
            self.store.delete_job(job["job_id"])
        return Response(200, {"job_id": job["job_id"], "deleted": True})

    def cancel(self, req: Request) -> Response:
        """QUEUED: canceled at once. RUNNING: canceled at once in the core (the miner
        learns it from its running list); with the cancel extension, canceling until
        the miner confirms or ``cancel_grace_s`` passes. ``{"force": true}``: canceled
        at once, canceling or not, without waiting for the miner's confirmation; the
        miner learns it from its running list, and a miner with the cancel extension also
        from the heartbeat answer's ``kill`` list, which means no grace period."""
        body = req.json_object() if req.body else {}
        force = body.get("force", False) is True
        with self.store.tx():
            job = self.store.job_or_404(req.params["job_id"])
            now = time.time()
            if job["state"] == CANCELED or (job.get("cancel_requested_at") and not force):
                return Response(200, self._view(job))
            if job["state"] == QUEUED:
                self.store.update_job(job["job_id"], state=CANCELED, finished_at=now,
                                      finished_by="client")
            elif job["state"] == RUNNING:
                miner = self.store.miner(job["miner_id"]) if job.get("miner_id") else None
                if not force and miner is not None and "cancel" in miner["extensions"]:
                    self.store.update_job(job["job_id"], cancel_requested_at=now)
                else:
                    self.store.update_job(job["job_id"], state=CANCELED, finished_at=now,
                                          finished_by="client", lease_expires_at=None,
                                          cancel_force=int(force))
            else:
                raise Problem(409, f"job is already {job_view(job)['status']}")
            return Response(200, self._view(self.store.job_or_404(job["job_id"])))

    def result(self, req: Request) -> Response:
        job = self._view(self.store.job_or_404(req.params["job_id"]))
        if job["status"] not in ("completed", "failed", "canceled"):
            raise Problem(409, f"job is {job['status']}: no result yet", status=job["status"])
        receipts = self.store.receipts(job["job_id"])
        return Response(200, {"job_id": job["job_id"], "status": job["status"],
                              "result": job["result"], "error": job["error"],
                              "partial": job["partial"], "receipt": receipts[-1] if receipts
                              else None, "receipts": len(receipts)})

    def logs(self, req: Request) -> Response:
        stream = req.query.get("stream", "stdout")
        if stream not in STREAMS:
            raise Problem(422, "stream must be stdout or stderr")
        offset = min(1 << 62, max(0, _int(req.query.get("offset", "0"), "offset")))
        asked = _int(req.query.get("limit", "0"), "limit")
        limit = min(MAX_LOG_ANSWER_BYTES, asked) if asked > 0 else MAX_LOG_ANSWER_BYTES
        job = self.store.job_or_404(req.params["job_id"])
        data = self.store.read_log(job["job_id"], stream, offset, limit)
        return Response(200, data, {"X-Log-Offset": str(offset),
                                    "X-Log-End": str(offset + len(data)),
                                    "X-Log-Size": str(self.store.log_ends(job["job_id"])[stream])},
                        content_type="text/plain; charset=utf-8")

    def package(self, req: Request) -> Response:
        job = self.store.job_or_404(req.params["job_id"])
        info = self.store.package_info(job["job_id"])
        if info is None:
            raise Problem(404, "no package uploaded for this job")
        name = f"job_{job['job_id']}.zip"
        return Response(200, package_body(self.store, job["job_id"], info),
                        {"X-Content-SHA256": info["sha256"],
                                    "Content-Disposition": f'attachment; filename="{name}"'},
                        content_type="application/zip")

    def put_presigned(self, req: Request) -> Response:
        token = req.params["token"]
        if self.store.presigned(token) is None:
            raise Problem(403, "upload URL is not valid")
        if req.headers.get("X-Api-Key"):  # the URL may belong to a third party
            raise Problem(400, "an upload URL must not be sent the coordinator's API key")
        actual = hashlib.sha256(req.body).hexdigest()
        expected = (req.headers.get("X-Content-SHA256") or "").strip().lower()
        if expected and expected != actual:
            raise Problem(422, "sha256 mismatch", error="sha256_mismatch",
                          expected=expected, actual=actual)
        self.store.put_presigned(token, actual, req.body)
        return Response(200, {"status": "ok", "sha256": actual, "size": len(req.body)})


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Problem(422, f"{name} must be an integer") from None
