"""Sharing a job's package: a signed, time-limited download URL that needs no API key.

``POST /v1/jobs/{id}/share`` ``{"expires_s": 3600}`` (client role) answers
``{"url": <base>/v1/shared/<token>, "expires_at": ISO}``; ``GET /v1/shared/<token>``
serves the zip (header ``X-Content-SHA256``) to whoever holds the URL until it expires.
The token carries the job id and the expiry, signed with HMAC-SHA256 under the
coordinator's secret: nothing is stored, and a coordinator started again with another
secret (the reference makes one per start) no longer honours older links.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import time
from typing import Any

from agent.reference.model import Problem, iso
from agent.reference.server import Request, Response, Route, Streamed, route
from agent.reference.store import Store

DEFAULT_EXPIRES_S = 3600.0
MAX_EXPIRES_S = 30 * 86400.0


class ShareAPI:
    """Handlers for ``POST /v1/jobs/{job_id}/share`` and ``GET /v1/shared/{token}``."""

    def __init__(self, store: Store, secret: bytes) -> None:
        self.store = store
        self._secret = hashlib.sha256(b"share\0" + secret).digest()  # not the receipts' key

    def routes(self) -> list[Route]:
        return [route("POST", "/v1/jobs/{job_id}/share", self.share, "client"),
                route("GET", "/v1/shared/{token}", self.shared)]

    def share(self, req: Request) -> Response:
        body = req.json_object() if req.body else {}
        expires_s = body.get("expires_s", DEFAULT_EXPIRES_S)
        if isinstance(expires_s, bool) or not isinstance(expires_s, int | float) \
                or not 0 < expires_s <= MAX_EXPIRES_S:
            raise Problem(422, "expires_s must be a number of seconds in "
                          f"(0, {MAX_EXPIRES_S:.0f}]")
        job_id = req.params["job_id"]
        self.store.job_or_404(job_id)
        if self.store.package_info(job_id) is None:
            raise Problem(404, "this job has no package to share (none uploaded, or removed "
                          "by retention)")
        expires = int(time.time() + float(expires_s))
        token = self._token(job_id, expires)
        base = f"http://{req.headers.get('Host') or 'localhost'}"
        return Response(200, {"job_id": job_id, "url": f"{base}/v1/shared/{token}",
                              "expires_at": iso(expires)})

    def shared(self, req: Request) -> Response:
        job_id = self._verify(req.params["token"])
        info = self.store.package_info(job_id)
        if info is None:
            raise Problem(404, "the shared package is gone")
        return Response(200, package_body(self.store, job_id, info),
                        content_type="application/zip",
                        headers={"X-Content-SHA256": str(info["sha256"]),
                                 "Content-Disposition":
                                     f'attachment; filename="job_{job_id}.zip"'})

    def _token(self, job_id: str, expires: int) -> str:
        claim = f"{job_id}\n{expires}".encode()
        return f"{_b64(claim)}.{_b64(self._sign(claim))}"

    def _sign(self, claim: bytes) -> bytes:
        return hmac.new(self._secret, claim, hashlib.sha256).digest()[:20]

    def _verify(self, token: str) -> str:
        try:
            claim_text, _, signature = token.partition(".")
            claim = _unb64(claim_text)
            job_id, _, expires = claim.decode().partition("\n")
            good = hmac.compare_digest(_unb64(signature), self._sign(claim))
            alive = int(expires) >= time.time()
        except (ValueError, UnicodeDecodeError, binascii.Error):
            good = alive = False
        if not good:
            raise Problem(403, "this share link is not valid")
        if not alive:
            raise Problem(410, "this share link has expired; ask for a new one with "
                          "`miner-agent share JOB_ID`")
        return job_id


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def package_body(store: Store, job_id: str, info: dict[str, Any]) -> Streamed:
    """A stored package as an answer body, read from the store a piece at a time."""
    return Streamed(int(info["size"]), functools.partial(store.read_package, job_id,
                                                         str(info["sha256"])))
