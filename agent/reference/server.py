"""The reference coordinator's HTTP layer: framework-free routes behind a Starlette app.

Routes are plain ``Request -> Response`` functions registered with :func:`route`; they
run in worker threads (the store is synchronous SQLite), never on the event loop. Each
HTTP request passes, in order: injected faults (they stand for the network and the
infrastructure in front of a coordinator), Starlette's router, the body limit, per-IP
rate limits, auth by role, then the route. A held route (:func:`held_route`, the
long-poll) is a coroutine on the event loop instead: it waits without a worker thread,
runs its store work through :meth:`HTTPApp.run_sync`, and sees ``request.gone`` set
the moment its client disconnects. Answers are FastAPI-shaped JSON,
``{"detail": ...}``, on every error: unknown paths (404) and wrong methods (405) too.

A spooled route's body (a package's hundreds of MiB) goes to a temporary file, hashed on
the way, and a :class:`Streamed` answer is read a piece at a time: the embedded
coordinator lives in the agent's process, which held a 200 MB package three times over.
A body over its limit is drained, up to 64 MiB, and answered 413 with ``max_bytes``
and ``Connection: close``; past that the connection is cut unread (a TCP RST), as the
real server's proxy does. WebSocket routes (:func:`ws_route`) check the API key before
the handshake and answer a refusal as JSON too. :mod:`agent.reference.listener` serves
the app with uvicorn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse
from starlette.responses import Response as StarletteResponse
from starlette.routing import BaseRoute, Match, WebSocketRoute
from starlette.routing import Route as StarletteRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState

from agent.reference.faults import RESET, Faults, RateLimiter
from agent.reference.listener import RESET_EXTENSION
from agent.reference.model import Problem

logger = logging.getLogger(__name__)

_DRAIN_MAX_BYTES = 64 * 1024 * 1024
# Long-polls hold a worker for up to 30 s each; http.server had a thread per request.
MAX_WORKERS = 256
_APPS = itertools.count(1)

T = TypeVar("T")


@dataclass
class Upload:
    """A large body (a package) as it arrived: spooled to a temporary file while it was
    hashed, never held whole in memory. Closed once the route has answered."""

    file: BinaryIO
    size: int
    sha256: str


@dataclass(frozen=True)
class Streamed:
    """An answer body read a piece at a time: ``read(offset, size)`` runs in a worker
    thread for each piece (a package from the store), so a download of any size holds
    one piece in memory. A short read ends the answer early: the connection is cut."""

    length: int
    read: Callable[[int, int], bytes]


STREAM_PIECE_BYTES = 1 << 20


@dataclass
class Request:
    """One decoded HTTP request as routes see it."""

    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    client_ip: str
    params: dict[str, str] = field(default_factory=dict)
    miner_id: str = ""
    # Held routes only: set once the client has gone (read from worker threads too).
    gone: asyncio.Event | None = None
    upload: Upload | None = None  # a spooled route's body (``body`` is then empty)

    def left(self) -> bool:
        """Whether the client has disconnected (always False outside a held route)."""
        return self.gone is not None and self.gone.is_set()

    def json(self) -> Any:
        """The JSON body; a missing or invalid one is a 422, as FastAPI answers it."""
        if not self.body:
            raise Problem(422, [{"type": "missing", "loc": ["body"], "msg": "Field required"}])
        try:
            return json.loads(self.body)
        except ValueError:
            raise Problem(422, [{"type": "json_invalid", "loc": ["body"],
                                 "msg": "JSON decode error"}]) from None

    def json_object(self) -> dict[str, Any]:
        body = self.json()
        if not isinstance(body, dict):
            raise Problem(422, "body must be a JSON object")
        return body


@dataclass
class Response:
    """An answer: a JSON-able body, raw bytes, or nothing (204)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


Handler = Callable[[Request], Response]
HeldHandler = Callable[[Request, "HTTPApp"], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """A method and path pattern, the role it needs, and the rate-limit group it counts in."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler
    role: str | None = None
    group: str | None = None
    max_body_bytes: int | None = None
    path: str = ""
    held: HeldHandler | None = None  # a coroutine on the loop, in place of ``handler``
    spool: bool = False  # the body goes to a temporary file (``request.upload``)


def route(method: str, path: str, handler: Handler, role: str | None = None,
          group: str | None = None, max_body_bytes: int | None = None, *,
          spool: bool = False) -> Route:
    """A route whose ``{name}`` path segments become ``request.params``; with ``spool``
    its body comes as ``request.upload`` (for bodies of hundreds of MiB)."""
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
    return Route(method, re.compile(f"^{regex}$"), handler, role, group, max_body_bytes, path,
                 spool=spool)


def held_route(method: str, path: str, handler: HeldHandler, role: str | None = None,
               group: str | None = None) -> Route:
    """A route whose handler may wait (a long-poll): it runs on the event loop and gets the
    app (for :meth:`HTTPApp.run_sync`); ``request.gone`` tells it its client left."""
    plain = route(method, path, _never_sync, role, group)
    return dataclasses.replace(plain, held=handler)


def _never_sync(req: Request) -> Response:
    raise AssertionError("a held route runs its coroutine, never a thread")


WSHandler = Callable[[WebSocket, "HTTPApp"], Awaitable[None]]


@dataclass(frozen=True)
class WSRoute:
    """A WebSocket path, its handler and the role its API key needs."""

    path: str
    handler: WSHandler
    role: str | None = None


def ws_route(path: str, handler: WSHandler, role: str | None = None) -> WSRoute:
    """A WebSocket route; the handler gets the socket (not yet accepted) and the app."""
    return WSRoute(path, handler, role)


class HTTPApp:
    """The ASGI application: the fault layer in front of Starlette's router."""

    def __init__(self, routes: Sequence[Route], api_keys: Mapping[str, frozenset[str]],
                 faults: Faults, limiter: RateLimiter, max_body_bytes: int,
                 websockets: Sequence[WSRoute] = ()) -> None:
        self.api_keys = api_keys
        self.faults = faults
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes
        self._workers = f"refcoord-{next(_APPS)}"
        self.pool = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix=self._workers)
        table: list[BaseRoute] = [
            StarletteRoute(r.path, _Endpoint(self, r), methods=[r.method]) for r in routes]
        table += [WebSocketRoute(w.path, functools.partial(self._websocket, w))
                  for w in websockets]
        self.router = Starlette(routes=table, exception_handlers={
            HTTPException: self._no_route, Exception: self._crashed})

    def close(self, timeout_s: float = 2.0) -> None:
        """Let the workers go, waiting up to ``timeout_s`` for them: the embedded agent
        exits past non-daemon threads still alive (and says so). One stuck in a
        handler past that finishes on its own."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout_s
        for thread in threading.enumerate():
            if thread.name.startswith(f"{self._workers}_"):
                thread.join(max(0.0, deadline - time.monotonic()))

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def role_of(self, key: str | None) -> str | None:
        for role, keys in self.api_keys.items():
            if key is not None and key in keys:
                return role
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.router(scope, receive, send)
            return
        if logger.isEnabledFor(logging.DEBUG):
            send = _logged(scope, send)
        # The fault's delay sleeps on the loop, not in a worker: other requests go on.
        rule = self.faults.claim(scope["path"])
        if rule is not None and rule.delay_s:
            await asyncio.sleep(rule.delay_s)
        injected = self.faults.resolve(scope["path"], rule)
        if injected is None:
            await self.router(scope, receive, send)
            return
        length = _content_length(scope) or 0
        if 0 < length <= self.max_body_bytes:
            await _drain(receive, 0, length)
        headers = dict(injected.headers)
        if length > self.max_body_bytes:
            headers["Connection"] = "close"  # its body stays unread
        await self._send(scope, send, Response(injected.status, injected.body, headers))

    async def serve(self, r: Route, scope: Scope, receive: Receive, send: Send) -> None:
        """One matched request: body, rate limit, auth, then the route in a thread."""
        limit = self.max_body_bytes if r.max_body_bytes is None else r.max_body_bytes
        spool = _Spool() if r.spool else None
        try:
            await self._answer(r, scope, receive, send, limit, spool)
        finally:
            if spool is not None:
                spool.file.close()

    async def _answer(self, r: Route, scope: Scope, receive: Receive, send: Send, limit: int,
                      spool: _Spool | None) -> None:
        try:
            body = await self._read_body(scope, receive, limit, spool)
            if body is None:
                return
            client = scope.get("client")
            req = Request(scope["method"], scope["path"], _query(scope), Headers(scope=scope),
                          body, client[0] if client else "", dict(scope["path_params"]))
            if spool is not None:
                spool.file.seek(0)
                req.upload = Upload(spool.file, spool.size, spool.digest.hexdigest())
            if r.group is not None:
                self.limiter.check(r.group, req.client_ip)
            self._authorize(r, req)
            if r.held is not None:
                resp = await self._held(r.held, req, receive)
            else:
                resp = await self.run_sync(r.handler, req)
        except Problem as exc:
            resp = Response(exc.status, exc.body, exc.headers)
        except Exception:
            logger.exception("reference coordinator: %s %s failed", scope["method"],
                             scope["path"])
            resp = Response(500, {"detail": "Internal Server Error"})
        await self._send(scope, send, resp)

    async def _held(self, handler: HeldHandler, req: Request, receive: Receive) -> Response:
        """Run a held route while watching its connection: ``req.gone`` is set as soon as
        the client disconnects (the body is read, so the next message is the disconnect)."""
        req.gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, req.gone))
        try:
            return await handler(req, self)
        finally:
            watcher.cancel()

    def _authorize(self, r: Route, req: Request) -> None:
        if r.role is None:
            return
        role = self.role_of(req.headers.get("X-Api-Key"))
        if role is None:
            raise Problem(401, "Invalid API key")
        if role != r.role:
            raise Problem(403, f"API key does not have the {r.role} role")
        if r.role == "miner":
            miner_id = req.headers.get("X-Miner-ID") or ""
            if not miner_id:
                raise Problem(422, [{"type": "missing", "loc": ["header", "x-miner-id"],
                                     "msg": "Field required"}])
            req.miner_id = miner_id

    async def _read_body(self, scope: Scope, receive: Receive, limit: int,
                         spool: _Spool | None = None) -> bytes | None:
        """The whole body (empty when it went to ``spool``); a 413 Problem past
        ``limit``; None when the connection is gone (the client left, or a body past the
        drain limit was cut)."""
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, limit, declared, 0, more=True)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > limit:  # a body without a length (chunked) that ran past it
                await self._refuse(scope, receive, limit, None, size, more=more)
                return None
            if spool is not None:
                spool.add(chunk)
            else:
                chunks.append(chunk)
            if not more:
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, limit: int,
                      declared: int | None, seen: int, *, more: bool) -> None:
        # Drain a moderately large body so the client reads the 413 instead of a reset
        # mid-upload; past that, cut the connection and let it see the reset.
        if declared is None or declared <= _DRAIN_MAX_BYTES:
            if more:
                seen = await _drain(receive, seen, _DRAIN_MAX_BYTES)
            if seen <= _DRAIN_MAX_BYTES:
                problem = Problem(413, "Request body too large", max_bytes=limit)
                problem.headers["Connection"] = "close"
                raise problem
        await _reset(scope)

    async def _send(self, scope: Scope, send: Send, resp: Response) -> None:
        if resp.status == RESET:  # a fault asked for a reset: no answer at all
            await _reset(scope)
            return
        status, headers, data = _encode(resp)
        prefix = "websocket." if scope["type"] == "websocket" else ""
        await send({"type": f"{prefix}http.response.start", "status": status,
                    "headers": headers})
        if isinstance(resp.body, Streamed):
            await self._send_streamed(scope, send, resp.body)
            return
        await send({"type": f"{prefix}http.response.body", "body": data})

    async def _send_streamed(self, scope: Scope, send: Send, body: Streamed) -> None:
        """The body a piece at a time, each read in a worker thread. Where it was changed
        or removed meanwhile (a new upload, a delete, retention), the answer cannot be
        whole: the connection is cut, so the client sees a broken download, not a
        short one."""
        offset = 0
        while offset < body.length:
            want = min(STREAM_PIECE_BYTES, body.length - offset)
            piece = await self.run_sync(body.read, offset, want)
            if len(piece) != want:
                logger.warning("reference coordinator: %s changed while it was sent; cut "
                               "at %d of %d bytes", scope["path"], offset, body.length)
                await _reset(scope)
                return
            offset += want
            await send({"type": "http.response.body", "body": piece,
                        "more_body": offset < body.length})
        if body.length == 0:
            await send({"type": "http.response.body", "body": b""})

    async def _no_route(self, request: StarletteRequest, exc: Exception) -> StarletteResponse:
        """404 and 405, after the body (limited as any route's) is read or refused."""
        assert isinstance(exc, HTTPException)
        scope = request.scope
        resp: Response | None = None  # None: the connection is gone, nothing to answer
        try:
            if await self._read_body(scope, request.receive, self.max_body_bytes) is None:
                return _Answer(self, None)
            headers = dict(exc.headers or {})
            if exc.status_code == 405:
                headers["Allow"] = ", ".join(self._allowed(scope))
            resp = Response(exc.status_code, {"detail": exc.detail}, headers)
        except Problem as problem:
            resp = Response(problem.status, problem.body, problem.headers)
        return _Answer(self, resp)

    def _allowed(self, scope: Scope) -> list[str]:
        """Every method some route takes on this path (Starlette names the first's only)."""
        methods: set[str] = set()
        for r in self.router.routes:
            if isinstance(r, StarletteRoute) and r.matches(scope)[0] != Match.NONE:
                methods |= r.methods or set()
        return sorted(methods)

    async def _crashed(self, request: StarletteRequest, exc: Exception) -> StarletteResponse:
        return JSONResponse({"detail": "Internal Server Error"}, 500)

    async def _websocket(self, r: WSRoute, websocket: WebSocket) -> None:
        """Auth before the handshake (a refusal is a JSON answer), then the handler."""
        try:
            if r.role is not None:
                role = self.role_of(websocket.headers.get("X-Api-Key"))
                if role is None:
                    raise Problem(401, "Invalid API key")
                if role != r.role:
                    raise Problem(403, f"API key does not have the {r.role} role")
            await r.handler(websocket, self)
        except Problem as exc:
            if websocket.application_state == WebSocketState.CONNECTING:
                await websocket.send_denial_response(
                    JSONResponse(exc.body, exc.status, headers=exc.headers))
            elif websocket.application_state == WebSocketState.CONNECTED:
                await websocket.close(1011, str(exc)[:120])


class _Endpoint:
    """The ASGI endpoint Starlette calls for one of our routes."""

    def __init__(self, app: HTTPApp, r: Route) -> None:
        self.app, self.route = app, r

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app.serve(self.route, scope, receive, send)


class _Answer(StarletteResponse):
    """One of our responses where Starlette wants one of its own (an exception handler)."""

    def __init__(self, app: HTTPApp, resp: Response | None) -> None:
        super().__init__(status_code=resp.status if resp else 500)
        self._app, self._resp = app, resp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._resp is not None:
            await self._app._send(scope, send, self._resp)


def _encode(resp: Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    length = None
    if isinstance(resp.body, bytes | bytearray):
        data = bytes(resp.body)
    elif resp.body is None:
        data = b""
    elif isinstance(resp.body, Streamed):
        data, length = b"", resp.body.length
    else:
        data = json.dumps(resp.body, separators=(",", ":")).encode()
    length = len(data) if length is None else length
    headers = [(b"content-length", str(length).encode())]
    if length or resp.status != 204:
        headers.append((b"content-type", resp.content_type.encode("latin-1")))
    headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
                for k, v in resp.headers.items()]
    return resp.status, headers, data


class _Spool:
    """Where a spooled route's body goes as it arrives: a temporary file (in memory up to
    1 MiB), and its sha256 taken on the way."""

    def __init__(self) -> None:
        self.file: BinaryIO = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # type: ignore[assignment]
        self.digest = hashlib.sha256()
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _query(scope: Scope) -> dict[str, str]:
    return dict(parse_qsl(scope["query_string"].decode("latin-1")))


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def _drain(receive: Receive, seen: int, most: int) -> int:
    """Read and drop the rest of a body, stopping once past ``most`` bytes in all."""
    while seen <= most:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return seen


async def _reset(scope: Scope) -> None:
    """Cut this request's connection with a TCP RST (the listener knows the socket)."""
    abort = scope.get("extensions", {}).get(RESET_EXTENSION)
    if abort is None or not abort():
        raise RuntimeError("cannot reset this connection: not served by the Listener")
    # Let connection_lost run first: uvicorn then sees a client gone, not a missing answer.
    await asyncio.sleep(0)


def _logged(scope: Scope, send: Send) -> Send:
    """``send``, logging the status line (query strings can hold presigned signatures:
    they stay out of the log)."""
    async def logging_send(message: Any) -> None:
        if message["type"] == "http.response.start":
            client = scope.get("client")
            query = "?<redacted>" if scope.get("query_string") else ""
            logger.debug('%s "%s %s%s HTTP/%s" %s', client[0] if client else "-",
                         scope["method"], scope["path"], query,
                         scope.get("http_version", "1.1"), message["status"])
        await send(message)
    return logging_send
