"""Log and package endpoints of the reference coordinator (extensions "logs", "package").

Logs are append-only per (job, stream), keyed by byte offset: a chunk starting at or
before the stored end contributes only its bytes past the end, so a retried or
overlapping chunk is neither lost nor duplicated; a chunk starting past the end is
refused (409 ``offset_ahead``) with the ends, so the agent resends from there.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

from agent.layout import STREAMS
from agent.reference.model import Problem, Settings
from agent.reference.server import Request, Response, Route, route
from agent.reference.store import Store

# The miner API's check that a job is this miner's (and its lease current), passed in.
OwnedJob = Callable[[Request, Any], dict[str, Any]]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class LogsAPI:
    """Handlers for ``/v1/miners/{job_id}/logs``, ``.../logs/offsets`` and ``.../package``."""

    def __init__(self, store: Store, settings: Settings, owned_job: OwnedJob) -> None:
        self.store = store
        self.settings = settings
        self.owned_job = owned_job

    def routes(self) -> list[Route]:
        return [
            route("POST", "/v1/miners/{job_id}/logs", self.append, "miner", "logs"),
            route("GET", "/v1/miners/{job_id}/logs/offsets", self.offsets, "miner"),
            route("PUT", "/v1/miners/{job_id}/package", self.package, "miner",
                  max_body_bytes=self.settings.max_package_bytes),
        ]

    def append(self, req: Request) -> Response:
        body = req.json_object()
        stream, offset = body.get("stream"), body.get("offset")
        if stream not in STREAMS:
            raise Problem(422, "stream must be stdout or stderr")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise Problem(422, "offset must be an integer >= 0")
        try:
            data = base64.b64decode(str(body.get("data_b64", "")), validate=True)
        except (binascii.Error, ValueError):
            raise Problem(422, "data_b64 must be base64") from None
        with self.store.tx():
            job = self.owned_job(req, body.get("lease_id"))
            ends = self.store.log_ends(job["job_id"])
            end = ends[stream]
            if offset > end:
                raise Problem(409, f"chunk starts at {offset}, past the end {end}",
                              error="offset_ahead", **ends)
            fresh = data[end - offset:]
            if fresh:
                self.store.append_log(job["job_id"], stream, end, fresh)
                ends[stream] = end + len(fresh)
            if job["state"] == "RUNNING" and job.get("started_at") is None:
                self.store.update_job(job["job_id"], started_at=time.time())
        return Response(200, ends)

    def offsets(self, req: Request) -> Response:
        job = self.owned_job(req, None)
        return Response(200, self.store.log_ends(job["job_id"]))

    def package(self, req: Request) -> Response:
        expected = (req.headers.get("X-Content-SHA256") or "").strip().lower()
        if not _SHA256_RE.match(expected):
            raise Problem(422, "X-Content-SHA256 must be the package's hex sha256",
                          error="sha256_missing")
        actual = hashlib.sha256(req.body).hexdigest()
        if actual != expected:
            raise Problem(422, "sha256 mismatch", error="sha256_mismatch",
                          expected=expected, actual=actual)
        with self.store.tx():
            job = self.owned_job(req, req.headers.get("X-Lease-ID"))
            self.store.put_package(job["job_id"], actual, req.body)
        return Response(200, {"status": "ok", "sha256": actual, "size": len(req.body),
                              "url": f"/v1/jobs/{job['job_id']}/package"})
