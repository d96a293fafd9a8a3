"""HTTP transport for the coordinator client: auth headers, timeouts, retries, errors.

One loop (:meth:`Transport.request`) decides, per answer, between "return it",
"retry after a wait" and "raise a typed error", so every endpoint shares one policy:

- 429 waits what Retry-After says (seconds or HTTP date), else backs off;
- 5xx, 408, refused/reset connections and timeouts back off with full jitter, capped;
- a 3xx is never followed (the key would go where ``Location`` says) nor taken as
  success: it is logged and retried like a 5xx;
- retries stop at the call's deadline (:class:`CoordinatorUnavailable`) or when the
  client is told to stop (:class:`RetriesStopped`), which aborts a wait at once;
- 401/403 raise :class:`AuthError` (a 401 first reads the key from ``key_source``
  again, once per call, and sends again if it changed), 409 :class:`LeaseLost`, other 4xx
  :class:`CoordinatorHTTPError`; the caller names statuses that mean
  :class:`NotRegistered` (heartbeat 404, poll 500) so those are never retried.

Every answer is read within :class:`AnswerLimits`: a plain body whose declared length
is within ``max_bytes`` is read whole, any other is streamed and dropped past
``max_bytes``, and :func:`decode_json` refuses nesting deeper than ``max_depth``
and numbers a double cannot hold (NaN, Infinity, 1e400, a 400-digit integer), so no
answer can exhaust memory or raise RecursionError or OverflowError further on.
An answer past a limit raises :class:`BadAnswer`, which is not retried.
"""

from __future__ import annotations

import asyncio
import enum
import json as jsonlib
import logging
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h11
import httpx

from agent.clock import wait_event
from agent.coordinator.plainhttp import PlainHTTPTransport
from agent.coordinator.retry import CallStats, Deadline, RetryPolicy, parse_retry_after
from agent.errors import AgentError, CoordinatorError

logger = logging.getLogger(__name__)
_HTTPX_LOG = logging.getLogger("httpx")  # where httpx's own send logs each request

Content = bytes | Callable[[], AsyncIterator[bytes]]
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MIN_ATTEMPT_TIMEOUT_S = 0.05
MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_ANSWER_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_ANSWER_DEPTH = 64
_HEAD_BYTES = 4096
# Python refuses int() of more than 4300 digits; a double holds at most 309.
_MAX_NUMBER_CHARS = 400
# Headers that describe the bytes on the wire, not the decoded body kept in memory.
_WIRE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
_JSON_HEADERS: Mapping[str, str] = {"Content-Type": "application/json"}
# Parsed URLs and merged headers kept per path and per header set: a fixed path (the
# heartbeat's, the poll's) is parsed once, not on every call. Emptied when full, so the
# per-job paths cannot grow it.
_CACHE_SIZE = 64
# A relative path sent as it is, by httpx and by the lean lane alike (no percent sign,
# dot segment, query or "//" authority to normalise): job ids of letters, digits, "-",
# "_" and "~" keep their calls on the lane; any other path goes through httpx.
_LEAN_PATH = re.compile(r"/[A-Za-z0-9_~-][A-Za-z0-9_~/-]*")


class AuthError(CoordinatorError):
    """Raised when the coordinator refuses the miner's API key (401) or role (403)."""

    code = "auth"


class NotRegistered(CoordinatorError):
    """Raised when the coordinator does not know this miner; register again, then retry."""

    code = "not_registered"


class LeaseLost(CoordinatorError):
    """Raised when the coordinator refuses a stale lease (409): stop that job."""

    code = "lease_lost"

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class CoordinatorHTTPError(CoordinatorError):
    """Raised when the coordinator answers a 4xx that retrying will not fix."""

    def __init__(self, message: str, status: int, body: Any = None,
                 code: str | None = None) -> None:
        super().__init__(message, code or f"http_{status}")
        self.status = status
        self.body = body


class BodyTooLarge(CoordinatorError):
    """Raised before sending a JSON body over the coordinator's 10 MiB limit (it answers 413)."""

    code = "body_too_large"


class AnswerProblem(enum.StrEnum):
    """Why an answer was refused: the limit it broke, or how it is malformed."""

    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    BAD_NUMBER = "bad_number"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    BAD_FIELD = "bad_field"


class BadAnswer(CoordinatorError):
    """Raised when a coordinator answer is past a limit or is not the JSON it should be.

    ``head`` is the start of the body as read (at most 4 KiB), so a caller can still
    find which job a broken poll answer handed out; ``job_id`` is that job's id once a
    caller found a valid one.
    """

    code = "bad_answer"

    def __init__(self, message: str, problem: AnswerProblem, head: bytes = b"",
                 job_id: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem
        self.head = head
        self.job_id = job_id


@dataclass(frozen=True)
class AnswerLimits:
    """How much of an answer the agent reads: bytes of the body, and JSON nesting."""

    max_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    max_depth: int = DEFAULT_MAX_ANSWER_DEPTH

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or not 1 <= self.max_depth <= 512:
            raise ValueError("answer limits: max_bytes must be at least 1 and max_depth "
                             "between 1 and 512")


class CoordinatorUnavailable(CoordinatorError):
    """Raised when a call's deadline passed while the coordinator was unreachable or busy."""

    code = "unavailable"

    def __init__(self, message: str, last_error: str | None = None) -> None:
        super().__init__(message)
        self.last_error = last_error


class AmbiguousSend(CoordinatorUnavailable):
    """Raised instead of a retry when a request may have reached the coordinator but no
    answer came back (a reset or a timeout after it went out), for a call whose caller
    must look before sending again: a core ``/result`` is not idempotent."""

    code = "ambiguous_send"


class RetriesStopped(CoordinatorUnavailable):
    """Raised when the client was told to stop retrying (agent shutdown)."""

    code = "retries_stopped"


def path_segment(value: str) -> str:
    """One path segment, quoted: an id from the wire never changes which endpoint is hit.

    Raises ValueError for "", "." and "..": quoting leaves them as they are, and an
    HTTP client folds them into the path (``/v1/miners/../fail`` is ``/v1/fail``).
    """
    text = str(value)
    if text in ("", ".", ".."):
        raise ValueError(f"{text!r} cannot be a URL path segment")
    return urllib.parse.quote(text, safe="")


def _refuse_constant(name: str) -> Any:
    raise _NumberError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text) if len(text) <= _MAX_NUMBER_CHARS else math.inf
    if not math.isfinite(value):
        raise _NumberError(f"the number {text[:40]}... is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > _MAX_NUMBER_CHARS:
        raise _NumberError(f"a {len(text)}-digit number is out of range")
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise _NumberError(f"a {len(text)}-digit number is out of range") from None
    return value


class _NumberError(ValueError):
    pass


def _depth(value: Any) -> int:
    """Nesting of decoded JSON, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1)
                         for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def decode_json(data: bytes, max_depth: int = DEFAULT_MAX_ANSWER_DEPTH) -> Any:
    """Decode an answer's JSON body within the depth and number limits, or raise BadAnswer."""
    head = data[:_HEAD_BYTES]
    try:
        value = jsonlib.loads(data, parse_float=_finite_float, parse_int=_bounded_int,
                              parse_constant=_refuse_constant)
    except RecursionError:
        # The C scanner stops at the interpreter's recursion limit (1000 by default).
        raise BadAnswer(f"the answer nests JSON deeper than {max_depth}",
                        AnswerProblem.TOO_DEEP, head) from None
    except _NumberError as exc:
        raise BadAnswer(f"the answer holds a number out of range: {exc}",
                        AnswerProblem.BAD_NUMBER, head) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadAnswer(f"the answer is not JSON: {str(exc)[:200]}",
                        AnswerProblem.NOT_JSON, head) from None
    if _depth(value) > max_depth:
        raise BadAnswer(f"the answer nests JSON deeper than {max_depth}",
                        AnswerProblem.TOO_DEEP, head)
    return value


def response_json(resp: httpx.Response) -> Any:
    """The decoded JSON body, or None when there is none, it is not JSON or past a limit."""
    try:
        return decode_json(resp.content)
    except BadAnswer:
        return None


def _detail(resp: httpx.Response) -> str:
    body = response_json(resp)
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return (resp.reason_phrase or "")[:300]


def _encode_json(endpoint: str, body: Any) -> bytes:
    try:
        data = jsonlib.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a NaN or an infinity somewhere: JSON has neither
        logger.warning("%s body holds a NaN or infinite number; sent as null", endpoint)
        data = jsonlib.dumps(_finite(body), separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"{endpoint} body is {len(data)} bytes, over the coordinator's "
                           f"{MAX_BODY_BYTES}-byte limit; trim it (e.g. the result's log tail)")
    return data


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinite float replaced by None, as JSON can say."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


_NEVER_SENT = frozenset({"connect"})  # errors that say the request never went out


def _redact(url: str) -> str:
    """A URL for the log: no query string (it may be a presigned credential)."""
    parts = urllib.parse.urlsplit(url[:500])
    return urllib.parse.urlunsplit((*parts[:3], "", ""))


def _transport_error_name(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError | httpx.PoolTimeout):
        return "connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return "reset"
    return "transport"


def plain_transport() -> PlainHTTPTransport | None:
    """Our own ``http://`` transport, or None (httpx's) where the environment names a proxy:
    httpx reads proxies from the environment only when it builds the transport itself."""
    proxies = urllib.request.getproxies_environment()
    return None if any(k in proxies for k in ("http", "https", "all")) else PlainHTTPTransport()


class Transport:
    """Sends one logical call, retrying as the module docstring says; owns the httpx client."""

    def __init__(self, base_url: str, api_key: str, miner_id: str, *,
                 connect_timeout_s: float, read_timeout_s: float,
                 policy: RetryPolicy, stats: CallStats,
                 limits: AnswerLimits | None = None,
                 key_source: Callable[[], str | None] | None = None) -> None:
        self._api_key = api_key
        # On a 401, read the key again (once per call): a rotated key file needs no restart.
        self.key_source = key_source
        self.limits = limits or AnswerLimits()
        self.miner_id = miner_id
        self.policy = policy
        self.stats = stats
        self._connect_s = connect_timeout_s
        self._read_s = read_timeout_s
        self._stop = asyncio.Event()
        # Auth headers go on each request, not here, so a presigned PUT never carries them.
        plain = plain_transport()
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), follow_redirects=False,
                                       transport=plain)
        self._urls: dict[str, httpx.URL] = {}
        self._headers: dict[tuple[Any, ...], httpx.Headers] = {}
        # The lean lane (plain http to the coordinator, no proxy): a call's head is built
        # as httpx would build it, once per kind, and sent without an httpx.Request.
        base = self._http.base_url
        self._lane = plain if plain is not None and base.scheme == "http" else None
        self._lane_key = (base.host, base.port or 80)
        self._base_path = base.raw_path  # ends in "/"
        self._origin = str(base.copy_with(raw_path=b"/"))[:-1]  # for the log: no path
        self._protos: dict[tuple[Any, ...], list[tuple[bytes, bytes]]] = {}
        self._heads: dict[tuple[Any, ...], h11.Request] = {}
        self._targets: dict[tuple[Any, ...], bytes] = {}

    def __repr__(self) -> str:
        return f"Transport(base_url={str(self._http.base_url)!r}, miner_id={self.miner_id!r}, " \
               "api_key='***')"

    def stop_retrying(self) -> None:
        """Abort current and future retry waits; first attempts still go out."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def aclose(self) -> None:
        await self._http.aclose()

    def set_api_key(self, api_key: str) -> bool:
        """Send ``api_key`` from now on; True when it differs from the one in use."""
        changed, self._api_key = api_key != self._api_key, api_key
        return changed

    async def _rekeyed(self, endpoint: str) -> bool:
        """After a 401: a different key read from its source now is used; True if so."""
        if self.key_source is None:
            return False
        try:
            key = await asyncio.to_thread(self.key_source)
        except AgentError as exc:  # the key file has become unreadable: the 401 stands
            logger.error("coordinator %s: 401, and the API key could not be read again: %s",
                         endpoint, exc.message)
            return False
        if not key or not self.set_api_key(key):
            return False
        logger.warning("coordinator %s: 401; the API key file holds a new key: trying it",
                       endpoint)
        return True

    def _url(self, url: str) -> httpx.URL | str:
        """``url`` merged with the base URL as httpx merges it, once per path.

        An absolute URL (a presigned PUT) is passed on as it is, for httpx to merge.
        """
        merged = self._urls.get(url)
        if merged is not None:
            return merged
        relative = httpx.URL(url)
        if not relative.is_relative_url:
            return url
        base = self._http.base_url  # ends in "/": httpx appends the path to it
        merged = base.copy_with(raw_path=base.raw_path + relative.raw_path.lstrip(b"/"))
        if len(self._urls) >= _CACHE_SIZE:
            self._urls.clear()
        self._urls[url] = merged
        return merged

    def _header_set(self, auth: bool, headers: Mapping[str, str] | None) -> tuple[Any, ...]:
        """What sets a call's headers apart: the credentials it carries, and its own."""
        return ((self._api_key, self.miner_id) if auth else None,
                *(headers.items() if headers else ()))

    def _request_headers(self, auth: bool, headers: Mapping[str, str] | None) -> httpx.Headers:
        """The auth headers (when ``auth``) updated with ``headers``, built once per set."""
        key = self._header_set(auth, headers)
        merged = self._headers.get(key)
        if merged is None:
            all_headers = {"X-Api-Key": self._api_key, "X-Miner-ID": self.miner_id} \
                if auth else {}
            all_headers.update(headers or {})
            merged = httpx.Headers(all_headers)
            if len(self._headers) >= _CACHE_SIZE:
                self._headers.clear()
            self._headers[key] = merged
        return merged

    def _lean_target(self, url: str, params: Mapping[str, str | int] | None) -> bytes | None:
        """The request target the lean lane sends for ``url`` and ``params``, exactly as
        httpx would, or None where the call goes through httpx (an absolute URL, a path
        that httpx would normalise or quote, a cookie to send)."""
        if self._lane is None or self._http.is_closed or self._http.cookies or \
                not _LEAN_PATH.fullmatch(url):
            return None
        if not params:
            return self._base_path + url[1:].encode()
        key = (url, *params.items())
        target = self._targets.get(key)
        if target is None:
            merged = self._url(url)
            assert isinstance(merged, httpx.URL)  # relative: merged with the base URL
            target = merged.copy_merge_params(params).raw_path
            if len(self._targets) >= _CACHE_SIZE:
                self._targets.clear()
            self._targets[key] = target
        return target

    def _lean_head(self, method: str, target: bytes, auth: bool,
                   headers: Mapping[str, str] | None, body: bytes | None) -> h11.Request:
        """The request's head as httpx builds it (its default headers, Host, the call's
        own, Content-Length), checked by h11 once per method, target, size and header set."""
        size = None if body is None else len(body)
        extra = self._header_set(auth, headers)
        key = (method, target, size, extra)
        head = self._heads.get(key)
        if head is not None:
            return head
        # httpx puts the length of a body first among the headers when it has none to
        # send ("0", a POST's), and last when it has: the model takes the same shape
        shape = None if body is None else b"x" if body else b""
        proto = self._protos.get((method, shape, extra))
        if proto is None:
            model = self._http.build_request(method, self._url("/"), content=shape,
                                             headers=self._request_headers(auth, headers))
            proto = list(model.headers.raw)
            if len(self._protos) >= _CACHE_SIZE:
                self._protos.clear()
            self._protos[(method, shape, extra)] = proto
        fields = proto
        if body:  # the model's length, 1, says this body's size
            length = str(size).encode()
            fields = [(name, length if name.lower() == b"content-length" else value)
                      for name, value in proto]
        head = h11.Request(method=method, target=target, headers=fields)
        if len(self._heads) >= _CACHE_SIZE:
            self._heads.clear()
        self._heads[key] = head
        return head

    def _timeout(self, deadline: Deadline, read_s: float | None = None) -> dict[str, float]:
        """The attempt's timeouts, as httpx's ``timeout`` request extension holds them."""
        left = max(_MIN_ATTEMPT_TIMEOUT_S, deadline.remaining_s())
        read = min(self._read_s if read_s is None else read_s, left)
        return {"connect": min(self._connect_s, left), "read": read,
                "write": min(self._read_s, left), "pool": min(self._connect_s, left)}

    async def request(self, endpoint: str, method: str, url: str, *,
                      json: Any = None, content: Content | None = None,
                      headers: Mapping[str, str] | None = None,
                      params: Mapping[str, str | int] | None = None,
                      deadline_s: float | None, auth: bool = True,
                      not_registered: frozenset[int] = frozenset(),
                      accept: frozenset[int] = frozenset(),
                      retry_ambiguous: bool = True,
                      max_attempts: int | None = None,
                      read_timeout_s: float | None = None) -> httpx.Response:
        """Send until an answer that is not retryable; see the module docstring.

        ``retry_ambiguous=False``: a failure after the request may have gone out (reset,
        read timeout) raises :class:`AmbiguousSend` instead of sending it again; a
        connection that never opened is still retried. ``max_attempts`` caps the attempts
        (a check-then-send caller keeps the time between its check and the send short).
        ``read_timeout_s`` replaces the client's read timeout for this call (a long-poll
        waits longer than any answer should take).
        """
        deadline = Deadline(deadline_s)
        if json is not None:
            content, json = _encode_json(endpoint, json), None
            headers = {**_JSON_HEADERS, **headers} if headers else _JSON_HEADERS
        self.stats.call_started(endpoint)
        attempt = 0
        rekeyed = not auth
        while True:
            try:
                resp, error = await self._attempt(endpoint, method, url, content, headers,
                                                  params, deadline, auth, read_timeout_s)
            except BadAnswer:
                self.stats.call_finished(endpoint, False, attempt)
                raise
            if resp is not None and resp.status_code == 401 and not rekeyed:
                rekeyed = True
                if await self._rekeyed(endpoint):
                    continue
            wait: float | None = None
            if resp is None and not retry_ambiguous and error not in _NEVER_SENT:
                self.stats.call_finished(endpoint, False, attempt)
                raise AmbiguousSend(f"{endpoint}: no answer ({error}) after the request may "
                                    "have reached the coordinator", error)
            if resp is not None:
                self._raise_if_final_error(resp, endpoint, attempt, not_registered, accept)
                if resp.status_code < 300 or resp.status_code in accept:
                    self.stats.call_finished(endpoint, resp.status_code < 300, attempt)
                    return resp
                if resp.status_code == 429:
                    wait = parse_retry_after(resp.headers.get("Retry-After"))
            if wait is None:
                wait = self.policy.backoff_s(attempt)
            if max_attempts is not None and attempt + 1 >= max_attempts:
                self.stats.call_finished(endpoint, False, attempt)
                raise CoordinatorUnavailable(f"{endpoint}: no answer ({error}) in "
                                             f"{max_attempts} attempt(s)", error)
            await self._wait_or_give_up(endpoint, error or "", wait, deadline, attempt)
            attempt += 1

    async def _attempt(self, endpoint: str, method: str, url: str,
                       content: Content | None, headers: Mapping[str, str] | None,
                       params: Mapping[str, str | int] | None, deadline: Deadline,
                       auth: bool, read_s: float | None = None
                       ) -> tuple[httpx.Response | None, str | None]:
        body = content() if callable(content) else content
        started = time.monotonic()
        try:
            target = self._lean_target(url, params) \
                if body is None or isinstance(body, bytes) else None
            if target is not None:
                assert body is None or isinstance(body, bytes)
                streamed = await self._send_lean(
                    method, url, self._lean_head(method, target, auth, headers, body), body,
                    self._timeout(deadline, read_s))
            else:
                request = self._http.build_request(
                    method, self._url(url), content=body,
                    headers=self._request_headers(auth, headers), params=params,
                    extensions={"timeout": self._timeout(deadline, read_s)})
                streamed = await self._send(request)
            try:
                resp = await self._read_capped(streamed, endpoint)
            finally:
                await streamed.aclose()
        except httpx.TransportError as exc:
            name = _transport_error_name(exc)
            self.stats.attempt(endpoint, time.monotonic() - started, name)
            logger.debug("coordinator %s: %s (%s)", endpoint, name, type(exc).__name__)
            return None, name
        except BadAnswer as exc:
            self.stats.attempt(endpoint, time.monotonic() - started, exc.problem.value)
            raise
        error = f"http_{resp.status_code}" if resp.status_code >= 300 else None
        if 300 <= resp.status_code < 400:
            # Never followed: the key would go wherever the Location says. Retried like a
            # 5xx (a coordinator moving to https is a config fix away), never a success.
            logger.warning("coordinator %s answered %d, a redirect to %r: not followed; "
                           "set coordinator_url to where the coordinator really is",
                           endpoint, resp.status_code,
                           _redact(resp.headers.get("Location", "")))
        self.stats.attempt(endpoint, time.monotonic() - started, error)
        return resp, error

    # httpx 0.20-0.28 route a request with this private method; without it, send() does.
    routed = hasattr(httpx.AsyncClient, "_transport_for_url")

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """What ``AsyncClient.send(request, stream=True)`` does here, for less CPU.

        No auth flow or redirect runs (none is set), and cookies are parsed only from an
        answer that sets one: ``send`` builds a cookie-jar request for every answer, a
        tenth of a call's CPU. Falls back to ``send`` on an httpx without the router.
        """
        if not self.routed or self._http.is_closed:
            return await self._http.send(request, stream=True)
        try:
            route = self._http._transport_for_url(request.url)
            resp = await route.handle_async_request(request)
        except httpx.RequestError as exc:
            exc.request = request
            raise
        resp.request = request
        if "Set-Cookie" in resp.headers:
            self._http.cookies.extract_cookies(resp)
        if _HTTPX_LOG.isEnabledFor(logging.INFO):
            _HTTPX_LOG.info('HTTP Request: %s %s "%s %d %s"', request.method, request.url,
                            resp.http_version, resp.status_code, resp.reason_phrase)
        return resp

    async def _send_lean(self, method: str, url: str, head: h11.Request, body: bytes | None,
                         timeouts: dict[str, float]) -> httpx.Response:
        """The lean lane's send: what :meth:`_send` does, less the httpx.Request (its URL
        parse, header merges and checks cost more than the rest of a loopback call)."""
        assert self._lane is not None
        resp = await self._lane.send_prepared(self._lane_key, head, body, timeouts)
        if "Set-Cookie" in resp.headers:  # the jar wants the request; later calls send it
            resp.request = self._http.build_request(method, self._url(url))
            self._http.cookies.extract_cookies(resp)
        if _HTTPX_LOG.isEnabledFor(logging.INFO):
            _HTTPX_LOG.info('HTTP Request: %s %s%s "%s %d %s"', method, self._origin,
                            head.target.decode(),
                            resp.http_version, resp.status_code, resp.reason_phrase)
        return resp

    async def _read_capped(self, streamed: httpx.Response, endpoint: str) -> httpx.Response:
        """The answer with its body read, at most ``limits.max_bytes`` of it (decoded).

        A success past the cap raises :class:`BadAnswer` before more is read; an error
        answer's body only feeds the error's detail, so it is cut at the cap instead.
        """
        cap = self.limits.max_bytes
        strict = streamed.status_code < 300
        wire = streamed.headers
        declared = wire.get("Content-Length", "")
        if declared.isdigit() and int(declared) <= cap and "Content-Encoding" not in wire \
                and "Transfer-Encoding" not in wire:
            # A plain body of a declared size within the cap (h11 reads no byte past the
            # declared length): read as it is, without copying it into a new Response.
            await streamed.aread()
            return streamed
        early = strict and declared.isdigit() and int(declared) > cap
        # Over a declared size past the cap, only the head a caller may need is read.
        limit = _HEAD_BYTES if early else cap
        chunks: list[bytes] = []
        size = 0
        async for chunk in streamed.aiter_bytes():
            chunks.append(chunk[:limit + 1 - size])
            size += len(chunks[-1])
            if size > limit:
                break
        if strict and (early or size > cap):
            raise BadAnswer(f"coordinator's {endpoint} answer is over the {cap}-byte limit "
                            "(max_answer_bytes); not read", AnswerProblem.TOO_LARGE,
                            b"".join(chunks)[:_HEAD_BYTES])
        body = b"".join(chunks)[:cap]
        headers = [(k, v) for k, v in streamed.headers.multi_items()
                   if k.lower() not in _WIRE_HEADERS]
        try:
            request: httpx.Request | None = streamed.request
        except RuntimeError:  # the lean lane's answers have none
            request = None
        return httpx.Response(streamed.status_code, headers=headers, content=body,
                              request=request, extensions=streamed.extensions)

    def _raise_if_final_error(self, resp: httpx.Response, endpoint: str, attempt: int,
                              not_registered: frozenset[int], accept: frozenset[int]) -> None:
        status = resp.status_code
        if status < 400 or status in accept:
            return  # a 3xx is retried (see _attempt)
        if status in _RETRY_STATUSES and status not in not_registered:
            return
        self.stats.call_finished(endpoint, False, attempt)
        if status in not_registered:
            raise NotRegistered(f"coordinator does not know miner {self.miner_id!r} "
                                f"({endpoint} answered {status}); register again")
        if status in (401, 403):
            raise AuthError(f"coordinator refused the miner's credentials on {endpoint} "
                            f"({status} {_detail(resp)}): check the agent's api_key setting "
                            "and that the key has the miner role")
        if status == 409:
            raise LeaseLost(f"coordinator refused a stale lease on {endpoint}: "
                            f"{_detail(resp)}")
        raise CoordinatorHTTPError(f"coordinator refused {endpoint} with {status}: "
                                   f"{_detail(resp)}", status, response_json(resp))

    async def _wait_or_give_up(self, endpoint: str, error: str, wait: float,
                               deadline: Deadline, attempt: int) -> None:
        if self._stop.is_set():
            self.stats.call_finished(endpoint, False, attempt)
            raise RetriesStopped(f"{endpoint}: not retrying ({error}), agent is stopping",
                                 error)
        if wait > deadline.remaining_s():
            self.stats.call_finished(endpoint, False, attempt)
            raise CoordinatorUnavailable(
                f"{endpoint}: coordinator unavailable ({error}) after {attempt + 1} "
                "attempt(s); giving up at the call's deadline", error)
        logger.info("coordinator %s: %s, retry %d in %.2fs", endpoint, error, attempt + 1, wait)
        if not await wait_event(self._stop, wait):
            return
        self.stats.call_finished(endpoint, False, attempt)
        raise RetriesStopped(f"{endpoint}: not retrying ({error}), agent is stopping", error)
