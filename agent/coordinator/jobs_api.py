"""The client side of the coordinator's job API: what `submit`, `status` and `cancel` call.

A small synchronous client over httpx (one short-lived command, one connection),
authenticated with a client key in ``X-Api-Key``. Errors are the typed ones of
:mod:`agent.coordinator.transport`, so a command decides what to tell the user.
"""

from __future__ import annotations

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


class JobsClient:
    """Submit, read and cancel jobs on a coordinator; use as a context manager."""

    def __init__(self, base_url: str, client_key: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url
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

    def submit(self, payload: Any, constraints: Any, ttl_s: Any = None) -> dict[str, Any]:
        """Create a job; returns the coordinator's view of it (``job_id`` included)."""
        body: dict[str, Any] = {"payload": payload, "constraints": constraints or {}}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return self._call("POST", "/v1/jobs", json=body)

    def job(self, job_id: str) -> dict[str, Any]:
        """The coordinator's view of one job."""
        return self._call("GET", f"/v1/jobs/{path_segment(job_id)}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask for a cancel; returns the job as it stands after the request."""
        return self._call("POST", f"/v1/jobs/{path_segment(job_id)}/cancel", json={})

    def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise CoordinatorUnavailable(f"cannot reach the coordinator at {self.base_url}: "
                                         f"{exc}", last_error=str(exc)) from None
        if resp.status_code >= 400:
            body = response_json(resp)
            raise CoordinatorHTTPError(_problem(resp.status_code, path, body, resp.text),
                                       resp.status_code, body)
        data = response_json(resp)
        return data if isinstance(data, dict) else {}


def _problem(status: int, path: str, body: Any, text: str) -> str:
    """What an error answer says, in words a client user can act on."""
    detail = body.get("detail") if isinstance(body, dict) else None
    said = str(detail)[:300] if detail is not None else text[:300].strip() or f"HTTP {status}"
    if status in (401, 403):
        return (f"the coordinator refused the client key ({status} {said}): pass the "
                "coordinator's client key with --client-key")
    return f"the coordinator answered {status} to {path}: {said}"
