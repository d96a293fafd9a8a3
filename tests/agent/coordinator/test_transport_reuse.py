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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

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
