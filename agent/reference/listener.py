"""uvicorn serving one ASGI app on a fixed address, from a background thread with its own loop.

The listening socket is ours, bound with SO_REUSEADDR, so :meth:`Listener.down` and
:meth:`Listener.up` can close it and listen again on the same port, as a crashed and
restarted coordinator would. ``down`` closes the socket (connects are refused) and
aborts every open connection, keep-alive and WebSocket ones included; it does not wait
for handlers still running in worker threads (their answers go nowhere).

uvicorn's idle keep-alive timeout is set well past httpx's 5 s pool expiry: with equal
timeouts a client could reuse a connection the server is closing at that moment and
see a reset that no fault asked for. TCP_NODELAY is set on every accepted socket: uvicorn
writes an answer's head and body in two segments, and without it the second waits for
the peer's delayed ACK, about 40 ms a request. (asyncio sets it only on sockets whose
``proto`` says TCP, which a socket from ``socket.create_server`` does not.)

Every connection accepted is tracked here too, not only in uvicorn's list: one accepted
in the instant ``down`` cuts the others is not in that list yet, and ``close`` aborts
whatever is still open before the loop ends, so no socket is left to the garbage
collector (a ResourceWarning in whichever test ran next).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import socket
import struct
import threading
import time
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

# The ASGI extension (a no-argument callable) that cuts the request's connection with a
# TCP RST; True if it found the connection.
RESET_EXTENSION = "reference.reset"
KEEP_ALIVE_S = 75  # longer than any client pool keeps an idle connection (httpx: 5 s)
START_TIMEOUT_S = 10.0


class Listener:
    """Serves ``app`` on ``host:port`` (0: any free port, kept across down/up)."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self._app = app
        self._accepted: set[asyncio.BaseTransport] = set()
        protocol = type("_Tracked", (_Protocol,), {"accepted": self._accepted})
        self._config = uvicorn.Config(
            self._asgi, host=host, port=port, http=protocol, ws="websockets-sansio",
            lifespan="off", interface="asgi3", log_config=None, proxy_headers=False,
            timeout_keep_alive=KEEP_ALIVE_S)
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._serving: concurrent.futures.Future[None] | None = None
        self._lock = threading.Lock()

    @property
    def serving(self) -> bool:
        return self._server is not None

    def up(self) -> None:
        """Bind and listen (a second call while up does nothing); raises OSError."""
        with self._lock:
            if self._server is not None:
                return
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.create_server((self.host, self.port), family=family)
            self.port = sock.getsockname()[1]
            loop = self._ensure_loop()
            server = uvicorn.Server(self._config)
            self._serving = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), loop)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not server.started:
                if self._serving.done():
                    self._serving.result()  # raises what stopped it
                    raise OSError(f"the server on port {self.port} stopped while starting")
                if time.monotonic() > deadline:
                    raise OSError(f"the server on port {self.port} did not start in time")
                time.sleep(0.001)
            self._server = server

    def down(self) -> None:
        """Close the listening socket and cut every open connection; returns at once."""
        with self._lock:
            server, self._server = self._server, None
            if server is None or self._loop is None:
                return
            asyncio.run_coroutine_threadsafe(_cut_all(server), self._loop).result(5)

    def close(self) -> None:
        """Down, then end the loop and its thread (their tasks are cancelled)."""
        self.down()
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(_cancel_tasks(), loop).result(5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            logger.warning("reference coordinator: tasks still running at close")
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(_abort_all(self._accepted), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()

    def abort(self, client: Any) -> bool:
        """Cut the connection from ``client`` (the scope's address) with a TCP RST.

        Runs on the loop thread (from a request's own coroutine). SO_LINGER 0 makes the
        close send RST, so the peer reads "connection reset by peer", not a clean EOF.
        """
        server = self._server
        if server is None or client is None:
            return False
        wanted = tuple(client)
        for conn in list(server.server_state.connections):
            if getattr(conn, "client", None) == wanted:
                _rst(conn.transport)
                return True
        return False

    async def _asgi(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["extensions"] = {**(scope.get("extensions") or {}),
                                   RESET_EXTENSION: functools.partial(self.abort,
                                                                      scope.get("client"))}
        await self._app(scope, receive, send)

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="reference-coordinator",
                                      daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        return self._loop


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY on the accepted socket and no access log
    (query strings can hold presigned signatures; the app logs requests redacted).
    ``accepted``: the listener's own set of open connections (a subclass per listener)."""

    accepted: set[asyncio.BaseTransport] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.access_log = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.accepted) >= 1024:  # WebSockets' ends never come here: drop the closed
            self.accepted.difference_update([t for t in self.accepted if t.is_closing()])
        self.accepted.add(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # reset by the peer already
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(cast(asyncio.Transport, transport))

    def connection_lost(self, exc: Exception | None) -> None:
        self.accepted.discard(self.transport)
        super().connection_lost(exc)


def _rst(transport: asyncio.Transport | None) -> None:
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


async def _cut_all(server: uvicorn.Server) -> None:
    """Stop listening at once and abort open connections; uvicorn then winds down alone
    (``force_exit``: it does not wait for requests still being handled)."""
    for listening in getattr(server, "servers", []):
        listening.close()
    for conn in list(server.server_state.connections):
        transport: asyncio.Transport | None = getattr(conn, "transport", None)
        if transport is not None:
            transport.abort()
    server.should_exit = server.force_exit = True
    await asyncio.sleep(0)  # let connection_lost run, so handlers see the disconnect


async def _abort_all(accepted: set[asyncio.BaseTransport]) -> None:
    """Abort every connection still open (a WebSocket's too, whose protocol was switched
    from ours), and let each close its socket before the loop ends."""
    for _ in range(2):  # a connection_made still queued registers on the first pass
        await asyncio.sleep(0)
        for transport in list(accepted):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
    await asyncio.sleep(0)
    accepted.clear()


async def _cancel_tasks() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=2)
