"""Log and package endpoints of the reference coordinator (extensions "logs",
"logs-binary", "package").

Logs are append-only per (job, stream), keyed by byte offset: a chunk starting at or
before the stored end contributes only its bytes past the end, so a retried or
overlapping chunk is neither lost nor duplicated; a chunk starting past the end is
refused (409 ``offset_ahead``) with the ends, so the agent resends from there. A chunk
comes as base64 in JSON (``POST .../logs``) or, with "logs-binary", as the raw body of
``POST .../logs/{stream}?offset=N``, gzip'd or zlib'd where ``Content-Encoding`` says so;
an encoded chunk is inflated at most to the body limit (a zip bomb is refused 413).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import zlib
from collections.abc import Callable
from typing import Any

from agent.layout import STREAMS
from agent.reference.model import Problem, Settings
from agent.reference.server import Request, Response, Route, route
from agent.reference.store import Store

# The miner API's check that a job is this miner's (and its lease current), passed in.
OwnedJob = Callable[[Request, Any], dict[str, Any]]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_OFFSET_RE = re.compile(r"^[0-9]{1,16}$")
_MAX_OFFSET = 2**53  # what the agent's client believes (a double holds it exactly)
# Content-Encoding -> zlib's wbits: gzip's header and trailer, or zlib's (HTTP "deflate")
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


class LogsAPI:
    """Handlers for ``/v1/miners/{job_id}/logs``, ``.../logs/{stream}``,
    ``.../logs/offsets`` and ``.../package``."""

    def __init__(self, store: Store, settings: Settings, owned_job: OwnedJob) -> None:
        self.store = store
        self.settings = settings
        self.owned_job = owned_job

    def routes(self) -> list[Route]:
        return [
            route("POST", "/v1/miners/{job_id}/logs", self.append, "miner", "logs"),
            route("GET", "/v1/miners/{job_id}/logs/offsets", self.offsets, "miner"),
            route("POST", "/v1/miners/{job_id}/logs/{stream}", self.append_binary, "miner",
                  "logs"),
            route("PUT", "/v1/miners/{job_id}/package", self.package, "miner",
                  max_body_bytes=self.settings.max_package_bytes, spool=True),
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
        return self._append(req, body.get("lease_id"), stream, offset, data)

    def append_binary(self, req: Request) -> Response:
        """``POST .../logs/{stream}?offset=N``: the chunk is the body (extension
        "logs-binary"; the lease, if any, in ``X-Lease-ID``)."""
        if "logs-binary" not in self.settings.extensions:
            raise Problem(404, "Not Found")
        stream, offset = req.params["stream"], req.query.get("offset", "")
        if stream not in STREAMS:
            raise Problem(422, "stream must be stdout or stderr")
        if not _OFFSET_RE.match(offset) or int(offset) > _MAX_OFFSET:
            raise Problem(422, f"offset must be an integer in [0, 2**53], not {offset[:40]!r}")
        data = _inflated(req.body, req.headers.get("Content-Encoding", ""),
                         self.settings.max_body_bytes)
        return self._append(req, req.headers.get("X-Lease-ID"), stream, int(offset), data)

    def _append(self, req: Request, lease_id: Any, stream: str, offset: int,
                data: bytes) -> Response:
        with self.store.tx():
            job = self.owned_job(req, lease_id)
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
        upload = req.upload
        assert upload is not None  # a spooled route
        if upload.sha256 != expected:
            raise Problem(422, "sha256 mismatch", error="sha256_mismatch",
                          expected=expected, actual=upload.sha256)
        with self.store.tx():
            job = self.owned_job(req, req.headers.get("X-Lease-ID"))
            self.store.put_package_file(job["job_id"], upload.sha256, upload.file, upload.size)
        return Response(200, {"status": "ok", "sha256": upload.sha256, "size": upload.size,
                              "url": f"/v1/jobs/{job['job_id']}/package"})


def _inflated(body: bytes, encoding: str, limit: int) -> bytes:
    """The chunk a body carries, decoded as ``Content-Encoding`` says; never more than
    ``limit`` bytes are inflated (a body that would give more is refused 413)."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return body
    if name not in _WBITS:
        raise Problem(415, f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, "
                      "deflate or none", error="unsupported_encoding")
    inflater = zlib.decompressobj(_WBITS[name])
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise Problem(422, f"the body is not valid {name}: {exc}", error="bad_encoding") from None
    if len(data) > limit:
        raise Problem(413, f"the chunk inflates past {limit} bytes", error="chunk_too_large",
                      max_bytes=limit)
    if not inflater.eof or inflater.unused_data:
        raise Problem(422, f"the body is not one whole {name} stream", error="bad_encoding")
    return data
