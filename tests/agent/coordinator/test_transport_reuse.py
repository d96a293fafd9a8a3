"""What the transport builds once and reuses per call: URLs, headers, the connection,
and sized answers read as they are, all against a real reference coordinator."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from agent.coordinator.retry import CallStats, RetryPolicy
from agent.coordinator.transport import AuthError, BadAnswer, Transport
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.coordinator.conftest import GPU_CAPS, MINER_KEY, miner

BASES = ["http://127.0.0.1:8000", "http://h.example:1/prefix", "http://h.example:1/prefix/",
         "https://user@h.example/a/b/"]
PATHS = ["/v1/miners/poll", "/v1/miners/%2E%2E/result", "/v1/miners/a%20b/logs?offset=3",
         "v1/miners/heartbeat", "//v1/x", "https://other.example/put?sig=abc"]
HEARTBEAT = {"inflight": 0, "status": "ONLINE", "metadata": {}}


@pytest.mark.parametrize("base", BASES)
def test_urls_are_merged_as_httpx_merges_them_and_parsed_once(base: str) -> None:
    async def check() -> None:
        t = Transport(base, "k", "m", connect_timeout_s=1, read_timeout_s=1,
                      policy=RetryPolicy(), stats=CallStats())
        plain = httpx.AsyncClient(base_url=base.rstrip("/"))
        try:
            for path in PATHS:
                ours = t._http.build_request("GET", t._url(path)).url
                assert str(ours) == str(plain.build_request("GET", path).url), path
            assert t._url("/v1/miners/poll") is t._url("/v1/miners/poll")
        finally:
            await t.aclose()
            await plain.aclose()

    asyncio.run(check())


def test_calls_share_one_connection_and_send_a_changed_key(
        core: ReferenceCoordinator) -> None:
    async def flow() -> set[object]:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 1)
            t = client._t
            peers = set()
            for _ in range(5):
                for endpoint, path in (("heartbeat", "/v1/miners/heartbeat"),
                                       ("poll", "/v1/miners/poll")):
                    resp = await t.request(endpoint, "POST", path, deadline_s=5,
                                           json=HEARTBEAT if endpoint == "heartbeat" else {})
                    stream = resp.extensions["network_stream"]
                    peers.add(stream.get_extra_info("client_addr"))
            client.set_api_key("not-the-key")
            with pytest.raises(AuthError):
                await client.heartbeat(0)
            client.set_api_key(MINER_KEY)
            await client.heartbeat(0)
            return peers

    assert len(asyncio.run(flow())) == 1


def test_a_sized_answer_is_read_up_to_the_cap_exactly(core: ReferenceCoordinator) -> None:
    async def answer(cap: int | None) -> httpx.Response:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 1)
        async with miner(core, **({} if cap is None else {"max_answer_bytes": cap})) as client:
            return await client._t.request("heartbeat", "POST", "/v1/miners/heartbeat",
                                           json=HEARTBEAT, deadline_s=5)

    resp = asyncio.run(answer(None))
    size = len(resp.content)
    assert size and resp.headers["content-length"] == str(size)
    assert resp.json()["status"]
    assert asyncio.run(answer(size)).content == resp.content
    with pytest.raises(BadAnswer, match="max_answer_bytes"):
        asyncio.run(answer(size - 1))


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """An HTTP/1.1 server on loopback in a daemon thread, and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class CookieServer:
    """An HTTP/1.1 server on loopback whose first answer sets a cookie; records each
    request's Cookie header."""

    def __init__(self) -> None:
        self.cookies: list[str | None] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.cookies.append(self.headers.get("Cookie"))
                body = json.dumps({"status": "ok"}).encode()
                self.send_response(200)
                if len(owner.cookies) == 1:
                    self.send_header("Set-Cookie", "sticky=node-2; Path=/")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server, self.url = serve(Handler)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cookie_server() -> Iterator[CookieServer]:
    server = CookieServer()
    yield server
    server.close()


def test_a_cookie_the_coordinator_sets_goes_back_and_requests_are_logged_by_httpx(
        cookie_server: CookieServer, caplog: pytest.LogCaptureFixture) -> None:
    async def flow() -> None:
        t = Transport(cookie_server.url, "k", "m", connect_timeout_s=2, read_timeout_s=2,
                      policy=RetryPolicy(), stats=CallStats())
        for _ in range(3):
            resp = await t.request("heartbeat", "POST", "/v1/miners/heartbeat",
                                   json=HEARTBEAT, deadline_s=5)
            assert resp.json() == {"status": "ok"} and resp.request.url.path.endswith("beat")
        await t.aclose()
        with pytest.raises(RuntimeError, match="closed"):  # as httpx's send says
            await t.request("heartbeat", "POST", "/v1/miners/heartbeat", json=HEARTBEAT,
                            deadline_s=5)

    with caplog.at_level(logging.INFO, logger="httpx"):
        asyncio.run(flow())
    assert cookie_server.cookies == [None, "sticky=node-2", "sticky=node-2"]
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert len(lines) == 3 and lines[0].startswith("HTTP Request: POST http://127.0.0.1:")


def test_an_httpx_without_the_router_falls_back_to_its_own_send(
        core: ReferenceCoordinator) -> None:
    # Given a transport whose httpx has no `_transport_for_url` (a later httpx may drop it)
    async def flow() -> tuple[int, int]:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 1)
            t = client._t
            t.routed = False
            # When it heartbeats and polls
            beat = await t.request("heartbeat", "POST", "/v1/miners/heartbeat",
                                   deadline_s=5, json=HEARTBEAT)
            poll = await t.request("poll", "POST", "/v1/miners/poll", deadline_s=5, json={})
            return beat.status_code, poll.status_code

    # Then both go through httpx's own send, answered as usual
    assert asyncio.run(flow()) == (200, 204)


class HeadServer:
    """An HTTP/1.1 server on loopback that records each request as it came: the request
    line, every header in order, and the body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[tuple[str, str]], bytes]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.seen.append((self.requestline, list(self.headers.items()), body))
                answer = b'{"status":"ok"}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_PUT = _any

        self.server, self.url = serve(Handler)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/miners/heartbeat", {"json": HEARTBEAT}),
    ("POST", "/v1/miners/poll", {"json": {}}),
    ("POST", "/v1/miners/poll", {"json": {"max_wait_seconds": 15}}),
    ("GET", "/v1/miners/m-1/jobs", {"params": {"job_status": "running", "limit": 100}}),
    ("POST", "/v1/miners/m-1/jobs/job_7-a~b/result", {"json": {"result": {"x": "é"}}}),
    ("POST", "/v1/miners/m-1/jobs/job_7-a~b/fail", {}),
    ("PUT", "/v1/jobs/j-1/logs", {"content": b"\x00raw", "params": {"offset": 3},
                                  "headers": {"Content-Type": "application/octet-stream"}}),
    ("GET", "/v1/miners/m-1/jobs/%2E%2E/x", {"auth": False}),  # through httpx: quoted
]


@pytest.mark.parametrize("prefix", ["", "/coord"])
def test_the_lean_lane_sends_what_httpx_would_byte_for_byte(prefix: str) -> None:
    # Given a recording server, and one transport on the lean lane and one made to send
    # every call through httpx
    server = HeadServer()

    async def calls(lean: bool) -> list[tuple[str, list[tuple[str, str]], bytes]]:
        t = Transport(server.url + prefix, "key-1", "m-1", connect_timeout_s=2,
                      read_timeout_s=2, policy=RetryPolicy(), stats=CallStats())
        if not lean:
            t._lane = None
        server.seen.clear()
        try:
            for method, path, kwargs in CALLS * 2:  # the second time from its caches
                resp = await t.request(path.rsplit("/", 1)[-1], method, path, deadline_s=5,
                                       **kwargs)
                assert resp.json() == {"status": "ok"}
        finally:
            await t.aclose()
        return list(server.seen)

    try:
        # When both make the same calls
        lean, plain = asyncio.run(calls(True)), asyncio.run(calls(False))
    finally:
        server.close()
    # Then the server saw the same request lines, headers (in order) and bodies
    assert len(lean) == 2 * len(CALLS)
    assert lean == plain
    assert lean[0][0] == f"POST {prefix}/v1/miners/heartbeat HTTP/1.1"
    assert ("X-Api-Key", "key-1") in lean[0][1] and lean[3][0].endswith(
        "/jobs?job_status=running&limit=100 HTTP/1.1")


def test_calls_on_the_lean_lane_build_no_httpx_request(core: ReferenceCoordinator) -> None:
    async def flow() -> int:
        async with miner(core) as client:
            await client.register(GPU_CAPS, 1)
            built = 0
            real = client._t._http.build_request

            def counted(*args: Any, **kwargs: Any) -> httpx.Request:
                nonlocal built
                built += 1
                return real(*args, **kwargs)

            client._t._http.build_request = counted  # type: ignore[method-assign]
            for _ in range(3):
                await client.heartbeat(0)
                await client.poll()
            return built

    # The first heartbeat and poll build one model request each (their headers); the
    # rest reuse them
    assert asyncio.run(flow()) <= 2
