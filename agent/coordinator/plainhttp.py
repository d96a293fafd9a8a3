"""HTTP/1.1 on plain TCP for the coordinator client: h11 on asyncio streams.

httpx sends through httpcore, whose connection pool, anyio streams and cancel scopes cost
about half of a loopback call's CPU on this project's 2-core machine (and every call
probes each pooled socket with ``getpeername`` and ``poll``). The agent talks to one
coordinator over a handful of keep-alive connections, so :class:`PlainHTTPTransport`
does that part itself for ``http://`` URLs: the same h11 parser httpcore uses, a small
set of idle connections, and httpx's own errors and timeouts. Everything else (``https``,
where TLS settings matter, and any other scheme) goes to httpx's transport unchanged;
where the environment names a proxy, httpx keeps the whole job (``plain_transport``).

Bounds, as httpcore's: a response head is at most ``MAX_HEAD_BYTES``; a connection is
reused only after a complete exchange, never after an error, a cancel or an answer read
until close, and an idle one the server has closed is dropped before use. At most
``MAX_CONNECTIONS`` are open at once; a request past that waits for one up to its
``pool`` timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import h11
import httpx

from agent.aio import write_or_reset

MAX_HEAD_BYTES = 64 * 1024
MAX_CONNECTIONS = 32
MAX_IDLE = 8
READ_CHUNK = 64 * 1024


class _Connection:
    """One keep-alive TCP connection and its h11 state."""

    def __init__(self, key: tuple[str, int], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.key = key
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)

    @property
    def usable(self) -> bool:
        """Still open with nothing to read: an idle connection that is readable has been
        closed by the server (its FIN may not have reached the loop yet) or holds bytes
        nobody asked for (a "408" some servers send before closing): stale either way."""
        if self.writer.is_closing() or self.reader.at_eof() or self.h11.trailing_data[0] \
                or getattr(self.reader, "_buffer", b""):  # read already by the loop
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        probe = select.poll()
        probe.register(sock.fileno(), select.POLLIN)
        return not probe.poll(0)

    def get_extra_info(self, name: str) -> Any:
        """httpx's ``network_stream`` extension, as httpcore answers it."""
        if name in ("client_addr", "server_addr"):
            return self.writer.get_extra_info("sockname" if name == "client_addr"
                                              else "peername")
        return self.writer.get_extra_info(name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    def write(self, data: bytes) -> None:
        write_or_reset(self.writer, data, "coordinator")

    async def send(self, request: httpx.Request, timeout_s: float | None) -> None:
        """The request, in one write when its body is in memory (each write is a send
        syscall, and on loopback the receiver's side of TCP runs in it too)."""
        target = request.url.raw_path  # path and query, as sent
        head = h11.Request(method=request.method, target=target,
                           headers=request.headers.raw)
        wire = [self.h11.send(head) or b""]
        async with asyncio.timeout(timeout_s):
            if isinstance(request.stream, httpx.ByteStream):
                wire += [self.h11.send(h11.Data(data=chunk)) or b""
                         for chunk in request.stream if chunk]
            else:
                async for chunk in request.stream:  # type: ignore[union-attr]
                    if chunk:
                        wire.append(self.h11.send(h11.Data(data=chunk)) or b"")
                        self.write(b"".join(wire))
                        wire.clear()
                        await self.writer.drain()
            wire.append(self.h11.send(h11.EndOfMessage()) or b"")
            self.write(b"".join(wire))
            await self.writer.drain()

    async def send_prepared(self, head: h11.Request, body: bytes | None,
                            timeout_s: float | None) -> None:
        """A request whose head is built and checked already, body in memory: one write."""
        wire = self.h11.send(head) or b""
        if body:
            wire += self.h11.send(h11.Data(data=body)) or b""
        wire += self.h11.send(h11.EndOfMessage()) or b""
        async with asyncio.timeout(timeout_s):
            self.write(wire)
            await self.writer.drain()

    async def next_event(self, timeout_s: float | None) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(timeout_s):
                data = await self.reader.read(READ_CHUNK)
            self.h11.receive_data(data)  # b"": the peer closed; h11 says what that means

    async def read_head(self, timeout_s: float | None) -> h11.Response:
        while True:
            event = await self.next_event(timeout_s)
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):  # 100 Continue: skipped
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE


class _Body(httpx.AsyncByteStream):
    """A response's body, read from its connection; the connection goes back when done."""

    def __init__(self, transport: PlainHTTPTransport, conn: _Connection,
                 timeout_s: float | None) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._timeout_s = timeout_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        while True:
            try:
                event = await conn.next_event(self._timeout_s)
            except BaseException as exc:
                await self.aclose()
                raise _mapped(exc, reading=True) from exc
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:  # ConnectionClosed before the end (a body read until close ends here)
                if conn.h11.their_state is not h11.CLOSED:
                    await self.aclose()
                    raise httpx.RemoteProtocolError("the answer ended early")
                return

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport.release(conn)


class PlainHTTPTransport(httpx.AsyncBaseTransport):
    """``http://`` over h11 and asyncio; other schemes through httpx's own transport."""

    def __init__(self, fallback: httpx.AsyncBaseTransport | None = None) -> None:
        self._fallback = fallback
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._closed = False
        self.opened = 0  # connections made (tests count reuse with it)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport()
            return await self._fallback.handle_async_request(request)
        timeouts = request.extensions.get("timeout") or {}
        return await self._exchange((request.url.host, request.url.port or 80), timeouts,
                                    lambda conn: conn.send(request, timeouts.get("write")))

    async def send_prepared(self, key: tuple[str, int], head: h11.Request, body: bytes | None,
                            timeouts: Mapping[str, float | None]) -> httpx.Response:
        """One request to ``key`` (host, port) without an :class:`httpx.Request`: the
        caller built and checked ``head`` (method, target, every header, Content-Length
        among them) and keeps it for the next call of its kind. The answer is as
        :meth:`handle_async_request` gives it, but has no ``request`` set."""
        return await self._exchange(key, timeouts, lambda conn: conn.send_prepared(
            head, body, timeouts.get("write")))

    async def _exchange(self, key: tuple[str, int], timeouts: Mapping[str, float | None],
                        send: Callable[[_Connection], Awaitable[None]]) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout("no connection free in time") from exc
        conn: _Connection | None = None
        try:
            conn = self._idle_for(key) or await self._connect(key, timeouts.get("connect"))
            await send(conn)
            head = await conn.read_head(timeouts.get("read"))
        except BaseException as exc:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise _mapped(exc, reading=conn is not None and conn.h11.our_state is h11.DONE,
                          connecting=conn is None) from exc
        return httpx.Response(
            head.status_code, headers=head.headers.raw_items(),
            stream=_Body(self, conn, timeouts.get("read")),
            extensions={"http_version": b"HTTP/" + head.http_version,
                        "reason_phrase": head.reason, "network_stream": conn})

    def _idle_for(self, key: tuple[str, int]) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.key == key and conn.usable:
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[str, int], timeout_s: float | None) -> _Connection:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(key[0], key[1], limit=READ_CHUNK)
        self.opened += 1
        return _Connection(key, reader, writer)

    def release(self, conn: _Connection) -> None:
        """A response is done with ``conn``: keep it for the next request, or close it."""
        self._slots.release()
        if conn.reusable and not self._closed and len(self._idle) < MAX_IDLE:
            try:
                conn.h11.start_next_cycle()
            except h11.LocalProtocolError:
                conn.close()
                return
            self._idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()
        if self._fallback is not None:
            await self._fallback.aclose()


def _mapped(exc: BaseException, *, reading: bool, connecting: bool = False) -> BaseException:
    """httpx's exception for what went wrong, as httpcore's would have been mapped."""
    if isinstance(exc, httpx.HTTPError | asyncio.CancelledError) or \
            not isinstance(exc, Exception):
        return exc
    if isinstance(exc, TimeoutError):
        if connecting:
            return httpx.ConnectTimeout(str(exc) or "connect timed out")
        return (httpx.ReadTimeout if reading else httpx.WriteTimeout)(
            str(exc) or "timed out")
    if isinstance(exc, h11.RemoteProtocolError):
        return httpx.RemoteProtocolError(str(exc))
    if isinstance(exc, h11.LocalProtocolError):
        return httpx.LocalProtocolError(str(exc))
    if isinstance(exc, OSError):
        if connecting:
            return httpx.ConnectError(str(exc) or type(exc).__name__)
        return (httpx.ReadError if reading else httpx.WriteError)(str(exc) or
                                                                  type(exc).__name__)
    return exc
