"""The client side of the coordinator's job API: what the client verbs call.

A small synchronous client over httpx (one short-lived command, one connection),
authenticated with a client key in ``X-Api-Key``. Errors are the typed ones of
:mod:`agent.coordinator.transport`, so a command decides what to tell the user.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from agent.coordinator.transport import (
    CoordinatorHTTPError,
    CoordinatorUnavailable,
    path_segment,
    response_json,
)

DEFAULT_TIMEOUT_S = 10.0
DOWNLOAD_CHUNK = 1024 * 1024
LOG_PAGE_BYTES = 4 << 20  # one GET .../logs answer (its limit)


class JobsClient:
    """Submit, read and cancel jobs on a coordinator; use as a context manager."""

    def __init__(self, base_url: str, client_key: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url
        self._timeout_s = timeout_s
        self._http = httpx.Client(base_url=base_url, headers={"X-Api-Key": client_key},
                                  timeout=timeout_s)

    def __repr__(self) -> str:
        return f"JobsClient(base_url={self.base_url!r}, client_key='***')"

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(self, payload: Any, constraints: Any, ttl_s: Any = None,
               job_id: str | None = None) -> dict[str, Any]:
        """Create a job; returns the coordinator's view of it (``job_id`` included).

        ``job_id`` asks for that id; a coordinator that makes its own ignores it (compare
        the answer's), the reference takes it or answers 409 when it is taken.
        """
        body: dict[str, Any] = {"payload": payload, "constraints": constraints or {}}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        if job_id:
            body["job_id"] = job_id
        return self._call("POST", "/v1/jobs", json=body)

    def job(self, job_id: str) -> dict[str, Any]:
        """The coordinator's view of one job."""
        return self._call("GET", f"/v1/jobs/{path_segment(job_id)}")

    def cancel(self, job_id: str, force: bool = False) -> dict[str, Any]:
        """Ask for a cancel; returns the job as it stands after the request."""
        body = {"force": True} if force else {}
        return self._call("POST", f"/v1/jobs/{path_segment(job_id)}/cancel", json=body)

    def jobs(self, **query: Any) -> dict[str, Any]:
        """One page of ``GET /v1/jobs`` (newest first): ``{"jobs", "total", ...}``."""
        params = {k: v for k, v in query.items() if v is not None}
        return self._call("GET", "/v1/jobs", params=params)

    def delete(self, job_id: str) -> dict[str, Any]:
        """Delete a finished (or pending) job and everything kept for it."""
        return self._call("DELETE", f"/v1/jobs/{path_segment(job_id)}")

    def share(self, job_id: str, expires_s: float) -> dict[str, Any]:
        """A signed download URL for the job's package, valid ``expires_s`` seconds."""
        return self._call("POST", f"/v1/jobs/{path_segment(job_id)}/share",
                          json={"expires_s": expires_s})

    def retry(self, job_id: str, resume: bool = False) -> dict[str, Any]:
        """Submit the job again (from its last checkpoint with ``resume``); the new view."""
        return self._call("POST", f"/v1/jobs/{path_segment(job_id)}/retry",
                          json={"resume": resume, "base_url": self.base_url})

    def events(self, job_id: str, after: int, wait_s: float = 0.0) -> dict[str, Any]:
        """The job's events after ``after``, waiting up to ``wait_s`` for one."""
        return self._call("GET", f"/v1/jobs/{path_segment(job_id)}/events",
                          params={"after": after, "wait_s": wait_s},
                          timeout=self._timeout_s + wait_s)

    def log(self, job_id: str, stream: str, offset: int = 0) -> Iterator[bytes]:
        """One stream's log bytes from ``offset`` as they arrive, a page at a time.

        A log may be gigabytes: pages of :data:`LOG_PAGE_BYTES` (``limit``), each read
        in chunks, until the end the first answer names (``X-Log-Size``) or, where no
        end is named, until a page comes back short. A coordinator that ignores
        ``limit`` answers the rest at once; it is still read in chunks, never held whole.
        """
        path = f"/v1/jobs/{path_segment(job_id)}/logs"
        end: int | None = None
        while True:
            got = 0
            try:
                with self._http.stream("GET", path, params={
                        "stream": stream, "offset": offset, "limit": LOG_PAGE_BYTES}) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        self._raise(resp, path)
                    if end is None:
                        end = _header_int(resp.headers.get("X-Log-Size"))
                    for chunk in resp.iter_bytes(DOWNLOAD_CHUNK):
                        got += len(chunk)
                        yield chunk
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from None
            offset += got
            if got == 0 or (offset >= end if end is not None else got < LOG_PAGE_BYTES):
                return

    def download(self, job_id: str, dest: Path) -> tuple[str, str | None, int]:
        """Stream the job's package zip into ``dest``: (its sha256 as written, the
        coordinator's ``X-Content-SHA256``, its size)."""
        path = f"/v1/jobs/{path_segment(job_id)}/download"
        digest, size = hashlib.sha256(), 0
        try:
            with self._http.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise(resp, path)
                with open(dest, "wb") as fh:
                    for chunk in resp.iter_bytes(DOWNLOAD_CHUNK):
                        fh.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                expected = resp.headers.get("X-Content-SHA256")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        return digest.hexdigest(), expected.strip().lower() if expected else None, size

    def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        data = response_json(self._request(method, path, **kw))
        return data if isinstance(data, dict) else {}

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code >= 400:
            self._raise(resp, path)
        return resp

    def _unreachable(self, exc: httpx.TransportError) -> CoordinatorUnavailable:
        return CoordinatorUnavailable(f"cannot reach the coordinator at {self.base_url}: "
                                      f"{exc}", last_error=str(exc))

    @staticmethod
    def _raise(resp: httpx.Response, path: str) -> None:
        body = response_json(resp)
        raise CoordinatorHTTPError(_problem(resp.status_code, path, body, resp.text),
                                   resp.status_code, body)


def _header_int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _problem(status: int, path: str, body: Any, text: str) -> str:
    """What an error answer says, in words a client user can act on."""
    detail = body.get("detail") if isinstance(body, dict) else None
    said = str(detail)[:300] if detail is not None else text[:300].strip() or f"HTTP {status}"
    if status in (401, 403):
        return (f"the coordinator refused the client key ({status} {said}): pass the "
                "coordinator's client key with --client-key")
    return f"the coordinator answered {status} to {path}: {said}"
