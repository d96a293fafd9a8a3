"""Retrying a job, from scratch or from its last checkpoint.

``POST /v1/jobs/{id}/retry`` ``{"resume": false}`` submits a new job with the same
payload, constraints and TTL. With ``"resume": true`` (a canceled or failed
``training`` job whose package holds a checkpoint) the coordinator takes the newest
checkpoint out of that package (``artifacts/checkpoints/latest``, else the highest
``step-N``), keeps it as a zip of its own, and sets the new job's
``payload.resume_from`` to ``{"uri": <base>/v1/checkpoints/<token>, "sha256": ...}``:
the training runtime's own resume field, fetched like any http input (by the agent,
outside the job's sandbox, checked against the sha256). The URL is a bearer URL, as a
presigned one is (no API key: the runtime's fetch sends none); ``<base>`` is the
request's ``base_url``, else ``http://`` plus its Host header.
"""

from __future__ import annotations

import hashlib
import io
import re
import uuid
import zipfile
from typing import Any

from agent.reference.model import Problem, job_view
from agent.reference.server import Request, Response, Route, route
from agent.reference.store import Store

RESUMABLE_TYPES = ("training",)
RESUMABLE_STATUSES = ("canceled", "failed")
_CHECKPOINTS = "artifacts/checkpoints/"
_STEP_RE = re.compile(r"^step-(\d+)$")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # same checkpoint, same zip bytes, same sha256


class RetryAPI:
    """Handlers for ``POST /v1/jobs/{job_id}/retry`` and ``GET /v1/checkpoints/{token}``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def routes(self) -> list[Route]:
        return [route("POST", "/v1/jobs/{job_id}/retry", self.retry, "client", "submit"),
                route("GET", "/v1/checkpoints/{token}", self.checkpoint)]

    def retry(self, req: Request) -> Response:
        body = req.json_object() if req.body else {}
        resume = body.get("resume", False)
        if not isinstance(resume, bool):
            raise Problem(422, "resume must be true or false")
        with self.store.tx():
            job = self.store.job_or_404(req.params["job_id"])
            payload = dict(job["payload"])
            kept: tuple[str, str, bytes] | None = None
            if resume:
                sha, data = self._resume_point(job)
                token = uuid.uuid4().hex
                payload["resume_from"] = {"uri": f"{_base_url(req, body)}/v1/checkpoints/{token}",
                                          "sha256": sha}
                kept = (token, sha, data)
            ttl_s = max(1.0, float(job["expires_at"]) - float(job["created_at"]))
            new_id = self.store.submit(payload, job["constraints"], ttl_s)
            if kept is not None:
                self.store.put_checkpoint(kept[0], new_id, kept[1], kept[2])
            view = job_view(self.store.job_or_404(new_id))
        return Response(201, {**view, "retry_of": job["job_id"]})

    def _resume_point(self, job: dict[str, Any]) -> tuple[str, bytes]:
        """The checkpoint archive to resume ``job`` from, and its sha256; 409 if none."""
        status = job_view(job)["status"]
        kind = job["payload"].get("type")
        if kind not in RESUMABLE_TYPES:
            raise Problem(409, f"a {kind} job has no checkpoints to resume from; retry it "
                          "without resume", error="not_resumable")
        if status not in RESUMABLE_STATUSES:
            raise Problem(409, f"job is {status}: only a canceled or failed job resumes",
                          error="not_resumable", status=status)
        package = self.store.package_data(job["job_id"])
        if package is None:
            raise Problem(409, "no package was uploaded for this job: no checkpoint to resume "
                          "from", error="no_checkpoint")
        data = latest_checkpoint(package)
        if data is None:
            raise Problem(409, "the job's package holds no checkpoint (it stopped before its "
                          "first one)", error="no_checkpoint")
        return hashlib.sha256(data).hexdigest(), data

    def checkpoint(self, req: Request) -> Response:
        kept = self.store.checkpoint(req.params["token"])
        if kept is None:
            raise Problem(404, "Not Found")
        sha, data = kept
        return Response(200, data, {"X-Content-SHA256": sha}, content_type="application/zip")


def _base_url(req: Request, body: dict[str, Any]) -> str:
    given = body.get("base_url")
    if isinstance(given, str) and given.startswith(("http://", "https://")):
        return given.rstrip("/")
    host = req.headers.get("Host")
    if not host:
        raise Problem(422, "no Host header: pass base_url, the URL miners reach this "
                      "coordinator at")
    return f"http://{host}"


def latest_checkpoint(package: bytes) -> bytes | None:
    """The newest checkpoint in a package zip, as a zip of its ``step-N/`` folder."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(package))
    except zipfile.BadZipFile:
        return None
    with zf:
        names = zf.namelist()
        roots = {n[:n.index(_CHECKPOINTS) + len(_CHECKPOINTS)] for n in names
                 if _CHECKPOINTS in n}
        if len(roots) != 1:
            return None
        root = roots.pop()
        folder = _newest(root, names, zf)
        if folder is None:
            return None
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dest:
            for name in sorted(n for n in names if n.startswith(f"{root}{folder}/")):
                if name.endswith("/"):
                    continue
                info = zipfile.ZipInfo(name[len(root):], _FIXED_TIME)
                info.external_attr = 0o644 << 16
                dest.writestr(info, zf.read(name))
        return out.getvalue()


def _newest(root: str, names: list[str], zf: zipfile.ZipFile) -> str | None:
    """The folder ``latest`` names, else the highest ``step-N`` with a ``meta.json``."""
    complete = {n[len(root):].split("/", 1)[0] for n in names
                if n.startswith(root) and n.endswith("/meta.json")}
    steps = sorted((int(m[1]), f) for f in complete if (m := _STEP_RE.match(f)))
    if f"{root}latest" in names:
        named = zf.read(f"{root}latest").decode(errors="replace").strip()
        if named in complete:
            return named
    return steps[-1][1] if steps else None
