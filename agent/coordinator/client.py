"""The miner side of the coordinator protocol: core calls and extensions, over httpx.

Every method is one logical call with its own deadline (see :data:`DEFAULT_DEADLINES_S`):
a heartbeat stops retrying before its next tick, a result retries until it lands or
:meth:`CoordinatorClient.stop_retrying` is called. Wire bodies are documented in
``docs/protocol-extensions.md``; errors are the typed ones in
:mod:`agent.coordinator.transport`.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.coordinator.capabilities import SUPPORTED_EXTENSIONS, Capabilities
from agent.coordinator.retry import CallStats, RetryPolicy
from agent.coordinator.transport import (
    DEFAULT_MAX_ANSWER_BYTES,
    DEFAULT_MAX_ANSWER_DEPTH,
    AnswerLimits,
    AnswerProblem,
    BadAnswer,
    CoordinatorHTTPError,
    LeaseLost,
    Transport,
    decode_json,
    path_segment,
    response_json,
)
from agent.errors import CoordinatorError
from agent.jobs import valid_job_id
from agent.layout import STREAMS, Stream

logger = logging.getLogger(__name__)

MAX_LOG_CHUNK_BYTES = 4 * 1024 * 1024
# A long-poll's read timeout is its wait plus this: the coordinator answers at the end of
# the wait, and a connection silent past that is dead.
LONG_POLL_GRACE_S = 10.0
_UPLOAD_CHUNK_BYTES = 1024 * 1024
_MAX_COUNT = 2**53  # offsets and sizes past what a double holds exactly are not believed
_MAX_LEASE_TTL_S = 7 * 24 * 3600.0
_LEASE_ID_RE = re.compile(r"^[\x21-\x7e]{1,256}$")
# The first key of a poll answer's top-level object, read from a body that cannot be
# decoded (past a limit) to fail the job it handed out.
_HEAD_JOB_ID_RE = re.compile(rb'^\s*\{\s*"job_id"\s*:\s*"([^"\\\x00-\x1f]{1,128})"')


class _Default(enum.Enum):
    TOKEN = 0


DEFAULT = _Default.TOKEN
Deadline = float | None | _Default

DEFAULT_DEADLINES_S: dict[str, float | None] = {
    "register": None, "heartbeat": 10.0, "poll": 10.0, "running_jobs": 10.0,
    "result": None, "fail": None, "progress": 10.0, "logs": 60.0, "log_offsets": 30.0,
    "package": None, "presigned": None,
}


class BadJobId(CoordinatorError):
    """Raised before a call whose URL would carry a job id that is not valid (see valid_job_id)."""

    code = "bad_job_id"


def _seg(job_id: str) -> str:
    """A job id as a path segment; refused unless valid (null, "..", "a/b", control chars)."""
    if not valid_job_id(job_id):
        raise BadJobId(f"refusing a call for the invalid job id {shown_id(job_id)}")
    return path_segment(job_id)


def shown_id(job_id: object) -> str:
    """An id from the wire as a log line may show it: repr'd, control characters escaped, cut."""
    text = ascii(job_id)
    return text if len(text) <= 80 else text[:77] + "..."


class LogOffsetConflict(CoordinatorError):
    """Raised when a log chunk starts past the coordinator's end; resend from ``offsets``."""

    code = "log_offset"

    def __init__(self, message: str, offsets: LogOffsets) -> None:
        super().__init__(message)
        self.offsets = offsets


@dataclass(frozen=True)
class RegisterAnswer:
    """What register said. ``extensions`` is what both sides speak (announced ∩ declared)."""

    session_token: str | None
    extensions: frozenset[str]
    announced: frozenset[str] = frozenset()
    max_package_bytes: int | None = None  # the package extension's announced upload limit

    @property
    def capabilities(self) -> Capabilities:
        """What the daemon may use: ask this, not the extension names."""
        return Capabilities(self.extensions, self.max_package_bytes)


@dataclass(frozen=True)
class HeartbeatAnswer:
    """Jobs to cancel, leases renewed (job_id -> new ttl_s) and leases lost; ``kill``:
    cancels forced by the client, with no grace period."""

    cancel: frozenset[str] = frozenset()
    renewed: Mapping[str, float] = field(default_factory=dict)
    lost: frozenset[str] = frozenset()
    kill: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PolledJob:
    """A job handed out by poll, as raw JSON parts (validate with ``Job.from_dict``).

    ``job_id`` is always valid (:func:`agent.jobs.valid_job_id`). ``problem`` says why
    the answer cannot run (past a limit, or a malformed lease); such a job carries no
    payload, so ``Job.from_dict`` refuses it and the flow fails it with ``invalid_job``.
    """

    job_id: str
    payload: Any
    constraints: Any
    lease_id: str | None = None
    lease_ttl_s: float | None = None
    problem: str | None = None

    def job_dict(self) -> dict[str, Any]:
        """The shape :meth:`agent.jobs.Job.from_dict` reads (lease flattened to lease_id)."""
        out: dict[str, Any] = {"job_id": self.job_id, "payload": self.payload,
                               "constraints": self.constraints}
        if self.lease_id is not None:
            out["lease_id"] = self.lease_id
        if self.problem is not None:
            out["answer_problem"] = self.problem  # journaled: why it was refused
        return out


@dataclass(frozen=True)
class LogOffsets:
    """The coordinator's end offset of each stream: the next byte it expects."""

    stdout: int = 0
    stderr: int = 0

    def of(self, stream: str) -> int:
        return self.stdout if stream == "stdout" else self.stderr

    @classmethod
    def from_body(cls, body: Any) -> LogOffsets:
        body = body if isinstance(body, dict) else {}
        return cls(_count(body.get("stdout"), "offsets.stdout"),
                   _count(body.get("stderr"), "offsets.stderr"))


@dataclass(frozen=True)
class PackageAnswer:
    """Where the coordinator keeps an uploaded package and what it verified."""

    sha256: str
    size: int
    url: str | None = None


class CoordinatorClient:
    """Async client for the miner endpoints; one per agent, closed with :meth:`aclose`.

    The API key travels in ``X-Api-Key`` on every miner call and nowhere else: it is
    masked in ``repr`` and never logged.
    """

    def __init__(self, base_url: str, api_key: str, miner_id: str, *,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0,
                 retry: RetryPolicy | None = None,
                 deadlines_s: Mapping[str, float | None] | None = None,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
                 max_answer_depth: int = DEFAULT_MAX_ANSWER_DEPTH,
                 key_source: Callable[[], str | None] | None = None) -> None:
        _install_url_redaction()
        self.miner_id = miner_id
        self.stats = CallStats()
        self.deadlines_s = {**DEFAULT_DEADLINES_S, **(deadlines_s or {})}
        self._t = Transport(base_url, api_key, miner_id, connect_timeout_s=connect_timeout_s,
                            read_timeout_s=read_timeout_s, policy=retry or RetryPolicy(),
                            stats=self.stats,
                            limits=AnswerLimits(max_answer_bytes, max_answer_depth),
                            key_source=key_source)

    def __repr__(self) -> str:
        return f"CoordinatorClient(miner_id={self.miner_id!r}, api_key='***')"

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._t.aclose()

    def stop_retrying(self) -> None:
        """Shutdown: abort retry waits now; later calls get one attempt each."""
        self._t.stop_retrying()

    def set_api_key(self, api_key: str) -> bool:
        """Send ``api_key`` from now on (a rotated key); True when it is a new one."""
        return self._t.set_api_key(api_key)

    def _deadline(self, endpoint: str, given: Deadline) -> float | None:
        return self.deadlines_s.get(endpoint) if isinstance(given, _Default) else given

    # -- core ---------------------------------------------------------------------------

    async def register(self, capabilities: Mapping[str, Any], concurrency: int,
                       region: str | None = None, *,
                       deadline_s: Deadline = DEFAULT) -> RegisterAnswer:
        """Register (or re-register) this miner; resets the coordinator's in-flight count.

        Declares :data:`SUPPORTED_EXTENSIONS` in ``capabilities.extensions`` unless the
        caller put its own list there (to switch some off).
        """
        caps = dict(capabilities)
        declared = frozenset(caps.setdefault("extensions", sorted(SUPPORTED_EXTENSIONS)))
        body = {"capabilities": caps, "concurrency": concurrency, "region": region}
        resp = await self._t.request("register", "POST", "/v1/miners/register", json=body,
                                     deadline_s=self._deadline("register", deadline_s))
        data = self._object(resp, "register")
        announced = frozenset(str(x) for x in _list(data, "extensions", "register"))
        limits = data.get("limits")
        limit = limits.get("max_package_bytes") if isinstance(limits, dict) else None
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) \
            and limit > 0 else None
        return RegisterAnswer(data.get("session_token"), announced & declared, announced,
                              limit)

    async def heartbeat(self, inflight: int, metadata: Mapping[str, Any] | None = None,
                        leases: Mapping[str, str] | None = None, *, status: str = "ONLINE",
                        deadline_s: Deadline = DEFAULT) -> HeartbeatAnswer:
        """Report the true in-flight count; with leases (job_id -> lease_id), renew them.

        Raises :class:`NotRegistered` on 404.
        """
        body: dict[str, Any] = {"inflight": inflight, "status": status,
                                "metadata": dict(metadata or {})}
        if leases:
            body["leases"] = [{"job_id": j, "lease_id": lid} for j, lid in leases.items()]
        resp = await self._t.request("heartbeat", "POST", "/v1/miners/heartbeat", json=body,
                                     deadline_s=self._deadline("heartbeat", deadline_s),
                                     not_registered=frozenset({404}))
        return _heartbeat_answer(self._object(resp, "heartbeat"))

    async def poll(self, *, max_wait_s: float | None = None,
                   deadline_s: Deadline = DEFAULT) -> PolledJob | None:
        """Ask for one job; None when there is none. Raises :class:`NotRegistered` on 500.

        ``max_wait_s`` (the ``longpoll`` extension: only where the coordinator announced
        it) asks the coordinator to hold an empty poll up to that long; the call's read
        timeout and deadline grow by as much. Cancel the call to abandon the wait.

        An answer past a limit or malformed comes back as a job with a ``problem`` (to
        fail through ``/fail``) when it names a valid job id, and raises
        :class:`BadAnswer` when it does not (nothing can be reported for it).
        """
        body: dict[str, Any] = {}
        deadline = self._deadline("poll", deadline_s)
        read_s = None
        if max_wait_s is not None and max_wait_s > 0:
            body["max_wait_seconds"] = int(max_wait_s) if float(max_wait_s).is_integer() \
                else round(max_wait_s, 3)
            read_s = max_wait_s + LONG_POLL_GRACE_S
            if deadline is not None and isinstance(deadline_s, _Default):
                deadline += max_wait_s
        try:
            resp = await self._t.request("poll", "POST", "/v1/miners/poll", json=body,
                                         deadline_s=deadline, read_timeout_s=read_s,
                                         not_registered=frozenset({500}))
            if resp.status_code == 204 or not resp.content:
                return None
            data = self._object(resp, "poll")
        except BadAnswer as exc:
            found = _HEAD_JOB_ID_RE.match(exc.head)
            job_id = found.group(1).decode() if found else None
            if not valid_job_id(job_id):
                raise
            return PolledJob(str(job_id), None, None, problem=exc.message)
        return _polled_job(data)

    async def running_jobs(self, *, limit: int = 100,
                           deadline_s: Deadline = DEFAULT) -> set[str]:
        """Ids of the jobs the coordinator thinks this miner runs (a missing one: stop it)."""
        resp = await self._t.request(
            "running_jobs", "POST", f"/v1/miners/{path_segment(self.miner_id)}/jobs", json={},
            params={"job_status": "running", "limit": limit},
            deadline_s=self._deadline("running_jobs", deadline_s))
        jobs = _list(self._object(resp, "running_jobs"), "jobs", "running_jobs")
        ids = (j.get("job_id", j.get("id")) for j in jobs if isinstance(j, dict))
        # An entry without a usable id names no job (never the job "None")
        return {str(i) for i in ids if isinstance(i, str | int) and not isinstance(i, bool)}

    async def result(self, job_id: str, result: Mapping[str, Any],
                     metrics: Mapping[str, Any] | None = None, lease_id: str | None = None,
                     *, deadline_s: Deadline = DEFAULT, retry_ambiguous: bool = True,
                     max_attempts: int | None = None) -> dict[str, Any] | None:
        """Report a completion (or, with the cancel extension, a cancel); returns the receipt.

        Never call this for a job the coordinator canceled or expired in the core: it
        would flip that job back to COMPLETED.
        """
        body: dict[str, Any] = {"result": dict(result), "metrics": dict(metrics or {})}
        if lease_id is not None:
            body["lease_id"] = lease_id
        resp = await self._t.request("result", "POST", f"/v1/miners/{_seg(job_id)}/result",
                                     json=body, deadline_s=self._deadline("result", deadline_s),
                                     retry_ambiguous=retry_ambiguous,
                                     max_attempts=max_attempts)
        receipt = self._object(resp, "result").get("receipt")
        return receipt if isinstance(receipt, dict) else None

    async def fail(self, job_id: str, error_code: str, error_message: str = "",
                   metrics: Mapping[str, Any] | None = None, lease_id: str | None = None,
                   *, deadline_s: Deadline = DEFAULT, retry_ambiguous: bool = True,
                   max_attempts: int | None = None) -> None:
        """Report a failure. The core does not free the in-flight slot: heartbeat next."""
        body: dict[str, Any] = {"error_code": error_code, "error_message": error_message,
                                "metrics": dict(metrics or {})}
        if lease_id is not None:
            body["lease_id"] = lease_id
        await self._t.request("fail", "POST", f"/v1/miners/{_seg(job_id)}/fail", json=body,
                              deadline_s=self._deadline("fail", deadline_s),
                              retry_ambiguous=retry_ambiguous, max_attempts=max_attempts)

    # -- extensions ---------------------------------------------------------------------

    async def progress(self, job_id: str, *, lease_id: str | None = None,
                       fraction: float | None = None, stage: str | None = None,
                       message: str | None = None, eta_s: float | None = None,
                       metrics: Mapping[str, Any] | None = None,
                       deadline_s: Deadline = DEFAULT) -> bool:
        """Send progress (extension "progress"); True when the coordinator says cancel."""
        fields = {"lease_id": lease_id, "fraction": fraction, "stage": stage,
                  "message": message, "eta_s": eta_s,
                  "metrics": dict(metrics) if metrics is not None else None}
        body = {k: v for k, v in fields.items() if v is not None}
        resp = await self._t.request("progress", "POST", f"/v1/miners/{_seg(job_id)}/progress",
                                     json=body, deadline_s=self._deadline("progress", deadline_s))
        return bool(self._object(resp, "progress").get("cancel"))

    async def ship_logs(self, job_id: str, stream: Stream, offset: int, data: bytes, *,
                        lease_id: str | None = None,
                        deadline_s: Deadline = DEFAULT) -> LogOffsets:
        """Ship ``data`` that starts at byte ``offset`` of ``stream``; returns the new ends.

        Safe to repeat: the coordinator appends only bytes past its end. Raises
        :class:`LogOffsetConflict` when ``offset`` is past its end (resend from there).
        """
        _check_chunk(stream, data)
        body: dict[str, Any] = {"stream": stream, "offset": offset,
                                "data_b64": base64.b64encode(data).decode("ascii")}
        if lease_id is not None:
            body["lease_id"] = lease_id
        resp = await self._t.request("logs", "POST", f"/v1/miners/{_seg(job_id)}/logs", json=body,
                                     deadline_s=self._deadline("logs", deadline_s),
                                     accept=frozenset({409}))
        return _log_ends(resp, job_id, stream, offset)

    async def ship_log_chunk(self, job_id: str, stream: Stream, offset: int, body: bytes, *,
                             encoding: str | None = None, lease_id: str | None = None,
                             deadline_s: Deadline = DEFAULT) -> LogOffsets:
        """:meth:`ship_logs` as a raw body (extension "logs-binary"): ``body`` is the chunk,
        or the chunk gzip'd when ``encoding`` is ``"gzip"`` (the coordinator inflates it)."""
        _check_chunk(stream, body)
        headers = {"Content-Type": "application/octet-stream"}
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        if lease_id is not None:
            headers["X-Lease-ID"] = lease_id
        resp = await self._t.request("logs", "POST", f"/v1/miners/{_seg(job_id)}/logs/{stream}",
                                     content=body, headers=headers, params={"offset": offset},
                                     deadline_s=self._deadline("logs", deadline_s),
                                     accept=frozenset({409}))
        return _log_ends(resp, job_id, stream, offset)

    async def log_offsets(self, job_id: str, *,
                          deadline_s: Deadline = DEFAULT) -> LogOffsets:
        """Where the coordinator's copy of each stream ends (resume point after a crash)."""
        resp = await self._t.request("log_offsets", "GET",
                                     f"/v1/miners/{_seg(job_id)}/logs/offsets",
                                     deadline_s=self._deadline("log_offsets", deadline_s))
        return LogOffsets.from_body(response_json(resp))

    async def upload_package(self, job_id: str, zip_path: str | os.PathLike[str], sha256: str,
                             *, lease_id: str | None = None,
                             deadline_s: Deadline = DEFAULT,
                             retry_ambiguous: bool = True) -> PackageAnswer:
        """PUT the result zip; the coordinator checks ``sha256`` (422: code sha256_mismatch)."""
        headers = _upload_headers(zip_path, sha256)
        if lease_id is not None:
            headers["X-Lease-ID"] = lease_id
        resp = await self._t.request("package", "PUT", f"/v1/miners/{_seg(job_id)}/package",
                                     content=lambda: _file_chunks(zip_path), headers=headers,
                                     deadline_s=self._deadline("package", deadline_s),
                                     accept=frozenset({422}), retry_ambiguous=retry_ambiguous)
        data = response_json(resp)
        data = data if isinstance(data, dict) else {}
        if resp.status_code == 422:
            raise CoordinatorHTTPError(f"coordinator rejected the package of {job_id}: "
                                       f"{data.get('detail', 'unprocessable')}", 422, data,
                                       code="sha256_mismatch")
        url = data.get("url")
        return PackageAnswer(str(data.get("sha256", sha256)), _count(data.get("size"), "size"),
                             url if isinstance(url, str) else None)

    async def put_presigned(self, url: str, zip_path: str | os.PathLike[str], sha256: str, *,
                            deadline_s: Deadline = DEFAULT, retry_ambiguous: bool = True) -> None:
        """PUT the zip to a payload's ``upload_url`` (no API key: the URL is the credential)."""
        resp = await self._t.request("presigned", "PUT", url, auth=False,
                                     content=lambda: _file_chunks(zip_path),
                                     headers=_upload_headers(zip_path, sha256),
                                     deadline_s=self._deadline("presigned", deadline_s),
                                     accept=frozenset({422}), retry_ambiguous=retry_ambiguous)
        if resp.status_code == 422:
            raise CoordinatorHTTPError("upload URL rejected the package: checksum mismatch",
                                       422, response_json(resp), code="sha256_mismatch")

    async def deregister(self, *, deadline_s: float | None = 10.0) -> bool:
        """Leave: ``DELETE /v1/miners/{miner_id}`` (the coordinator marks it OFFLINE).

        Returns False when the coordinator did not know this miner (404: already gone).
        """
        resp = await self._t.request("deregister", "DELETE",
                                     f"/v1/miners/{path_segment(self.miner_id)}",
                                     deadline_s=deadline_s, accept=frozenset({404}))
        return resp.status_code != 404


    def _object(self, resp: Any, endpoint: str) -> dict[str, Any]:
        """The answer's JSON object, within the depth and number limits, or BadAnswer."""
        try:
            body = decode_json(resp.content, self._t.limits.max_depth)
        except BadAnswer as exc:
            raise BadAnswer(f"coordinator's {endpoint} answer: {exc.message}", exc.problem,
                            exc.head) from None
        if not isinstance(body, dict):
            raise BadAnswer(f"coordinator answered {endpoint} with a body that is not a "
                            "JSON object", AnswerProblem.NOT_OBJECT, resp.content[:4096])
        return body


def _polled_job(data: dict[str, Any]) -> PolledJob:
    """A decoded poll answer as a job; BadAnswer when its job_id is not valid."""
    job_id = data.get("job_id")
    if not isinstance(job_id, str) or not valid_job_id(job_id):
        raise BadAnswer(f"coordinator's poll answer names the invalid job id "
                        f"{shown_id(job_id)}", AnswerProblem.BAD_FIELD)
    raw = data.get("lease")
    lease = raw if isinstance(raw, dict) else {}
    lease_id, ttl = lease.get("id"), lease.get("ttl_s")
    if lease_id is not None and not (isinstance(lease_id, str) and _LEASE_ID_RE.match(lease_id)):
        return PolledJob(job_id, None, None, problem=f"the poll answer's lease id "
                         f"{shown_id(lease_id)} is not 1-256 printable characters")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) \
            or not 0 < ttl <= _MAX_LEASE_TTL_S:
        ttl = None  # not a usable TTL: the lease is renewed on every heartbeat anyway
    return PolledJob(job_id=job_id, payload=data.get("payload"),
                     constraints=data.get("constraints"), lease_id=lease_id,
                     lease_ttl_s=float(ttl) if ttl is not None else None)


def _check_chunk(stream: str, data: bytes) -> None:
    if stream not in STREAMS:
        raise ValueError(f"stream must be stdout or stderr, not {stream!r}")
    if len(data) > MAX_LOG_CHUNK_BYTES:
        raise ValueError(f"log chunk of {len(data)} bytes exceeds {MAX_LOG_CHUNK_BYTES}")


def _log_ends(resp: Any, job_id: str, stream: str, offset: int) -> LogOffsets:
    """A logs answer: the ends, or LogOffsetConflict / LeaseLost for a 409."""
    answer = response_json(resp)
    if resp.status_code == 409:
        if isinstance(answer, dict) and answer.get("error") == "offset_ahead":
            raise LogOffsetConflict(f"log chunk for {job_id} {stream} at {offset} is past "
                                    "the coordinator's end", LogOffsets.from_body(answer))
        raise LeaseLost(f"coordinator refused logs for {job_id}: stale lease", job_id)
    return LogOffsets.from_body(answer)


def _list(data: dict[str, Any], key: str, endpoint: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadAnswer(f"coordinator's {endpoint} answer: {key} is not a list",
                        AnswerProblem.BAD_FIELD)
    return value


def _count(value: Any, name: str) -> int:
    """A byte offset or size from an answer: a whole number in [0, 2**53]; missing is 0."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not (math.isfinite(value) and 0 <= value <= _MAX_COUNT and value == int(value)):
        raise BadAnswer(f"coordinator's answer: {name} is not a whole number in "
                        f"[0, 2**53]: {shown_id(value)}", AnswerProblem.BAD_FIELD)
    return int(value)


def _heartbeat_answer(data: dict[str, Any]) -> HeartbeatAnswer:
    renewed: dict[str, float] = {}
    lost: set[str] = set()
    raw = data.get("leases")
    leases = raw if isinstance(raw, dict) else {}
    for job_id, state in leases.items():
        ttl = state.get("ttl_s") if isinstance(state, dict) else None
        if isinstance(ttl, int | float) and not isinstance(ttl, bool):
            # decode_json let only finite numbers through; a huge TTL is cut, not believed
            renewed[str(job_id)] = min(float(ttl), _MAX_LEASE_TTL_S)
        else:
            lost.add(str(job_id))
    cancel = frozenset(str(j) for j in _list(data, "cancel", "heartbeat") if j is not None)
    kill = frozenset(str(j) for j in _list(data, "kill", "heartbeat") if j is not None)
    return HeartbeatAnswer(cancel | kill, renewed, frozenset(lost), kill)


def _upload_headers(zip_path: str | os.PathLike[str], sha256: str) -> dict[str, str]:
    return {"Content-Type": "application/zip", "Content-Length": str(os.path.getsize(zip_path)),
            "X-Content-SHA256": sha256.lower()}


async def _file_chunks(path: str | os.PathLike[str]) -> AsyncIterator[bytes]:
    # open() is cheap; the reads, which can block on a slow disk, run in a thread.
    with open(path, "rb") as fh:
        while True:
            chunk = await asyncio.to_thread(fh.read, _UPLOAD_CHUNK_BYTES)
            if not chunk:
                return
            yield chunk


class _RedactQuery(logging.Filter):
    """Drops query strings from httpx's request log lines: presigned URLs carry secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_strip_query(a) for a in record.args)
        return True


def _strip_query(value: Any) -> Any:
    text = str(value) if type(value).__name__ == "URL" else None
    if text is None or "?" not in text:
        return value
    return text.split("?", 1)[0] + "?<redacted>"


def _install_url_redaction(loggers: Iterable[str] = ("httpx",)) -> None:
    for name in loggers:
        log = logging.getLogger(name)
        if not any(isinstance(f, _RedactQuery) for f in log.filters):
            log.addFilter(_RedactQuery())
