"""The agent's own http:// transport against real sockets: keep-alive, stale and cut
connections, bodies of every framing, bounds, timeouts and cancels."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import httpx
import pytest

from agent.coordinator.plainhttp import MAX_HEAD_BYTES, PlainHTTPTransport
from agent.coordinator.transport import plain_transport
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.conftest import EVENT_LOOPS, run_on_loop
from tests.agent.coordinator.conftest import GPU_CAPS, miner

Handler = Callable[[socket.socket, int], None]
T = TypeVar("T")


def read_request(conn: socket.socket) -> bytes:
    """One request's head and its Content-Length body, or b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        if name.strip().lower() == b"transfer-encoding":
            while not body.endswith(b"0\r\n\r\n"):
                body += conn.recv(65536)
            return head + b"\r\n\r\n" + body
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.fixture
def server() -> Iterator[Callable[[Handler], str]]:
    """A TCP server on loopback whose connections ``handler(conn, n)`` serves (n counts
    the connections from 0)."""
    servers: list[socketserver.ThreadingTCPServer] = []

    def start(handler: Handler) -> str:
        count = iter(range(1000))

        class Serve(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    handler(self.request, next(count))
                except OSError:
                    pass

        srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Serve)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def ok(body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra)) + body


def run(coro_fn: Callable[[PlainHTTPTransport, httpx.AsyncClient], Awaitable[T]]) -> T:
    async def main() -> T:
        transport = PlainHTTPTransport()
        async with httpx.AsyncClient(transport=transport) as http:
            return await coro_fn(transport, http)
    return asyncio.run(main())


def test_calls_share_one_keep_alive_connection(server: Callable[[Handler], str]) -> None:
    def serve(conn: socket.socket, _n: int) -> None:
        while read_request(conn):
            conn.sendall(ok(b'{"a": 1}'))

    url = server(serve)

    async def calls(t: PlainHTTPTransport, http: httpx.AsyncClient) -> tuple[list[object], int]:
        bodies = [(await http.post(f"{url}/x", json={"i": i})).json() for i in range(20)]
        return bodies, t.opened

    bodies, opened = run(calls)
    assert bodies == [{"a": 1}] * 20 and opened == 1


def test_a_connection_the_server_closed_while_idle_is_not_used(
        server: Callable[[Handler], str]) -> None:
    # The first connection answers once, then sends a stray 408 and closes, as some
    # servers do on an idle timeout: the next call must not take that 408 as its answer.
    def serve(conn: socket.socket, n: int) -> None:
        read_request(conn)
        conn.sendall(ok(b'{"n": %d}' % n))
        if n == 0:
            conn.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.2)

    url = server(serve)

    async def calls(t: PlainHTTPTransport, http: httpx.AsyncClient) -> object:
        first = (await http.get(f"{url}/")).json()
        await asyncio.sleep(0.05)
        second = await http.get(f"{url}/")
        return first, second.status_code, second.json(), t.opened

    assert run(calls) == ({"n": 0}, 200, {"n": 1}, 2)


def test_stray_bytes_on_an_idle_connection_make_it_stale(
        server: Callable[[Handler], str]) -> None:
    # A stray answer arrives while the connection is idle and the server keeps it open:
    # the loop has read it already, and the next call must not take it as its answer.
    def serve(conn: socket.socket, n: int) -> None:
        while read_request(conn):
            conn.sendall(ok(b'{"n": %d}' % n))
            if n == 0:
                time.sleep(0.05)
                conn.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")

    url = server(serve)

    async def calls(t: PlainHTTPTransport, http: httpx.AsyncClient) -> object:
        first = (await http.get(f"{url}/")).json()
        await asyncio.sleep(0.2)
        second = await http.get(f"{url}/")
        return first, second.status_code, second.json(), t.opened

    assert run(calls) == ({"n": 0}, 200, {"n": 1}, 2)


def test_bodies_chunked_and_read_until_close_arrive_whole(
        server: Callable[[Handler], str]) -> None:
    def serve(conn: socket.socket, n: int) -> None:
        read_request(conn)
        if n == 0:
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            read_request(conn)  # kept alive: the second call comes on this connection
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
        conn.close()

    url = server(serve)

    async def calls(t: PlainHTTPTransport, http: httpx.AsyncClient) -> object:
        chunked = (await http.get(f"{url}/")).content
        until_close = (await http.get(f"{url}/")).content
        return chunked, until_close, t.opened, len(t._idle)

    assert run(calls) == (b"hello world", b"until close", 1, 0)


def test_an_answer_cut_short_is_a_protocol_error_and_the_connection_goes(
        server: Callable[[Handler], str]) -> None:
    def serve(conn: socket.socket, n: int) -> None:
        read_request(conn)
        if n == 0:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
            conn.close()
            return
        conn.sendall(ok())

    url = server(serve)

    async def calls(t: PlainHTTPTransport, http: httpx.AsyncClient) -> object:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(f"{url}/")
        return (await http.get(f"{url}/")).status_code, t.opened

    assert run(calls) == (200, 2)


def test_a_head_past_the_bound_is_refused(server: Callable[[Handler], str]) -> None:
    def serve(conn: socket.socket, _n: int) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        with contextlib.suppress(OSError):
            for _ in range(MAX_HEAD_BYTES // len(filler) + 10):
                conn.sendall(filler)
        time.sleep(0.5)

    url = server(serve)

    async def call(_t: PlainHTTPTransport, http: httpx.AsyncClient) -> object:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(f"{url}/")
        return True

    assert run(call)


def test_timeouts_and_refusals_are_httpx_errors(server: Callable[[Handler], str]) -> None:
    def silent(conn: socket.socket, _n: int) -> None:
        read_request(conn)
        time.sleep(1.0)

    url = server(silent)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # bound, never listening: refused

    async def calls(_t: PlainHTTPTransport, http: httpx.AsyncClient) -> float:
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{url}/", timeout=httpx.Timeout(5, read=0.2))
        waited = time.monotonic() - t0
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{closed_port}/")
        return waited

    assert run(calls) < 0.9


def test_a_cancelled_call_closes_its_connection(server: Callable[[Handler], str]) -> None:
    def serve(conn: socket.socket, n: int) -> None:
        while read_request(conn):
            if n == 0:
                time.sleep(0.5)
            conn.sendall(ok(b'{"n": %d}' % n))

    url = server(serve)

    async def calls(t: PlainHTTPTransport, http: httpx.AsyncClient) -> object:
        task = asyncio.create_task(http.get(f"{url}/"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The answer still on its way must never be read as the next call's.
        return (await http.get(f"{url}/")).json(), t.opened

    assert run(calls) == ({"n": 1}, 2)


def test_a_streamed_upload_arrives_whole(server: Callable[[Handler], str]) -> None:
    got: list[bytes] = []

    def serve(conn: socket.socket, _n: int) -> None:
        got.append(read_request(conn))
        conn.sendall(ok())

    url = server(serve)

    async def chunks() -> object:
        for i in range(50):
            yield bytes([65 + i % 26]) * 10_000

    async def call(_t: PlainHTTPTransport, http: httpx.AsyncClient) -> object:
        return (await http.put(f"{url}/up", content=chunks())).status_code  # type: ignore[arg-type]

    assert run(call) == 200
    body = got[0].split(b"\r\n\r\n", 1)[1]
    decoded = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        decoded, body = decoded + body[:size], body[size + 2:]
    assert decoded == b"".join(bytes([65 + i % 26]) * 10_000 for i in range(50))


def test_the_agent_client_talks_to_the_reference_over_it(core: ReferenceCoordinator) -> None:
    async def flow() -> tuple[type, int | None]:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 1)
            for _ in range(5):
                await client.heartbeat(0)
                await client.poll()
            transport = client._t._http._transport
            return type(transport), getattr(transport, "opened", None)

    kind, opened = asyncio.run(flow())
    assert kind is PlainHTTPTransport and opened == 1


def test_a_proxy_in_the_environment_leaves_the_job_to_httpx(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(plain_transport(), PlainHTTPTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert plain_transport() is None


@pytest.mark.parametrize("loop_kind", EVENT_LOOPS)
def test_a_reset_in_the_middle_of_a_streamed_upload_is_an_httpx_error(
        server: Callable[[Handler], str], loop_kind: str) -> None:
    # A server that reads the head and resets the connection (what a coordinator refusing
    # a large body does) while the body is still being streamed to it
    def reset(conn: socket.socket, _n: int) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    url = server(reset)

    async def chunks() -> object:
        for _ in range(200):
            yield b"x" * 10_000
            await asyncio.sleep(0.005)  # the reset arrives between two writes

    async def main() -> BaseException | None:
        transport = PlainHTTPTransport()
        async with httpx.AsyncClient(transport=transport) as http:
            try:
                await http.put(f"{url}/up", content=chunks())  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - the type is what is asserted
                return exc
        return None

    # Then the call fails as httpx's write or read error (a reset the client retries or
    # counts), never uvloop's RuntimeError from a write to a closed transport
    failure = run_on_loop(loop_kind, main())
    assert isinstance(failure, httpx.WriteError | httpx.ReadError | httpx.RemoteProtocolError), \
        repr(failure)
