"""The reference coordinator's HTTP layer: a threading HTTP/1.1 server on loopback.

Each request passes, in order: injected faults (they stand for the network and the
infrastructure in front of a coordinator), the 10 MiB body limit, per-IP rate limits,
auth by role, then the route. Answers are FastAPI-shaped: ``{"detail": ...}`` on error.
TCP_NODELAY is set on every accepted socket: without it, a small answer written in two
segments waits for the peer's delayed ACK, about 40 ms a request.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from agent.reference.faults import Faults, RateLimiter
from agent.reference.model import Problem

logger = logging.getLogger(__name__)

_DRAIN_MAX_BYTES = 64 * 1024 * 1024
_QUERY_RE = re.compile(r"\?[^\s\"]*")


@dataclass
class Request:
    """One decoded HTTP request as routes see it."""

    method: str
    path: str
    query: dict[str, str]
    headers: Message
    body: bytes
    client_ip: str
    params: dict[str, str] = field(default_factory=dict)
    miner_id: str = ""

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


@dataclass(frozen=True)
class Route:
    """A method and path pattern, the role it needs, and the rate-limit group it counts in."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler
    role: str | None = None
    group: str | None = None
    max_body_bytes: int | None = None


def route(method: str, path: str, handler: Handler, role: str | None = None,
          group: str | None = None, max_body_bytes: int | None = None) -> Route:
    """A route whose ``{name}`` path segments become ``request.params``."""
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
    return Route(method, re.compile(f"^{regex}$"), handler, role, group, max_body_bytes)


class CoordinatorHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with TCP_NODELAY, tracked connections and a route table."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], routes: list[Route],
                 api_keys: Mapping[str, frozenset[str]], faults: Faults,
                 limiter: RateLimiter, max_body_bytes: int) -> None:
        self.routes = routes
        self.api_keys = api_keys
        self.faults = faults
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.conn_lock:
            self.connections.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self.conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Cut every open connection (keep-alive ones included), as a crash would."""
        with self.conn_lock:
            socks = list(self.connections)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def role_of(self, key: str | None) -> str | None:
        for role, keys in self.api_keys.items():
            if key is not None and key in keys:
                return role
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CoordinatorHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        # Query strings can hold presigned signatures: keep them out of the log.
        logger.debug("%s %s", self.address_string(), _QUERY_RE.sub("?<redacted>", format % args))

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        try:
            resp = self._dispatch()
        except Problem as exc:
            resp = Response(exc.status, exc.body, exc.headers)
        except Exception:
            logger.exception("reference coordinator: %s %s failed", self.command, self.path)
            resp = Response(500, {"detail": "Internal Server Error"})
        if resp.status < 0:  # a fault asked for a reset: no answer at all
            self._reset()
            return
        self._write(resp)

    def _dispatch(self) -> Response:
        split = urlsplit(self.path)
        path, query = split.path, dict(parse_qsl(split.query))
        injected = self.server.faults.take(path)
        if injected is not None:
            self._discard_body()
            return Response(injected.status, injected.body, injected.headers)
        matched, params, wrong_method = self._match(path)
        limit = self.server.max_body_bytes
        if matched is not None and matched.max_body_bytes is not None:
            limit = matched.max_body_bytes
        body = self._read_body(limit)
        if matched is None:
            raise Problem(405, "Method Not Allowed") if wrong_method else Problem(404, "Not Found")
        if matched.group is not None:
            self.server.limiter.check(matched.group, self.client_address[0])
        req = Request(self.command, path, query, self.headers, body, self.client_address[0],
                      params)
        self._authorize(matched, req)
        return matched.handler(req)

    def _match(self, path: str) -> tuple[Route | None, dict[str, str], bool]:
        wrong_method = False
        for r in self.server.routes:
            m = r.pattern.match(path)
            if m is None:
                continue
            if r.method == self.command:
                return r, m.groupdict(), False
            wrong_method = True
        return None, {}, wrong_method

    def _read_body(self, limit: int) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            # Drain a moderately large body so the client reads the 413 instead of a
            # reset mid-upload; past that, close and let it see the reset.
            if length <= _DRAIN_MAX_BYTES:
                self._skip(length)
            self.close_connection = True
            raise Problem(413, "Request body too large", max_bytes=limit)
        return self.rfile.read(length) if length > 0 else b""

    def _skip(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1024 * 1024))
            if not chunk:
                return
            length -= len(chunk)

    def _discard_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= self.server.max_body_bytes:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    def _authorize(self, r: Route, req: Request) -> None:
        if r.role is None:
            return
        role = self.server.role_of(self.headers.get("X-Api-Key"))
        if role is None:
            raise Problem(401, "Invalid API key")
        if role != r.role:
            raise Problem(403, f"API key does not have the {r.role} role")
        if r.role == "miner":
            miner_id = self.headers.get("X-Miner-ID") or ""
            if not miner_id:
                raise Problem(422, [{"type": "missing", "loc": ["header", "x-miner-id"],
                                     "msg": "Field required"}])
            req.miner_id = miner_id

    def _write(self, resp: Response) -> None:
        if isinstance(resp.body, bytes | bytearray):
            data = bytes(resp.body)
        elif resp.body is None:
            data = b""
        else:
            data = json.dumps(resp.body, separators=(",", ":")).encode()
        self.send_response(resp.status)
        if data or resp.status != 204:
            self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in resp.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def _reset(self) -> None:
        # SO_LINGER 0 makes close() send RST: the client sees "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
