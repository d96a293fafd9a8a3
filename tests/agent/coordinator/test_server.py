"""The reference coordinator's HTTP layer on its real server: errors, limits and faults.

Raw sockets where the wire itself is the point (a reset, a refused connect, a body the
server must not read), httpx elsewhere.
"""

from __future__ import annotations

import gc
import http.client
import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.coordinator.conftest import CLIENT_KEY, MINER_KEY, client_http

MINER = {"X-Api-Key": MINER_KEY, "X-Miner-ID": "m1"}


def address(coord: ReferenceCoordinator) -> tuple[str, int]:
    host, port = coord.base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def raw(coord: ReferenceCoordinator, head: str, body: bytes = b"") -> socket.socket:
    """A connection that has sent ``head`` (a request line and headers) and ``body``."""
    sock = socket.create_connection(address(coord), timeout=5)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_unknown_paths_and_wrong_methods_answer_json(coordinator: ReferenceCoordinator) -> None:
    with client_http(coordinator) as http:
        nope = http.get("/v1/nope")
        assert (nope.status_code, nope.json()) == (404, {"detail": "Not Found"})
        assert nope.headers["content-type"] == "application/json"
        wrong = http.patch("/v1/jobs")
        assert (wrong.status_code, wrong.json()) == (405, {"detail": "Method Not Allowed"})
        assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
        assert http.put("/v1/miners/register", json={}).status_code == 405
        assert http.request("DELETE", "/v1/jobs/nope").json() == {"detail": "Job not found"}


def test_a_chunked_body_past_the_limit_is_drained_and_refused(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    coord = make_coordinator(max_body_bytes=1024)
    with httpx.Client(base_url=coord.base_url, headers=MINER) as http:
        # a generator body goes out chunked: no Content-Length to refuse it by
        resp = http.post("/v1/miners/poll", content=iter([b"x" * 800] * 4))
        assert resp.status_code == 413
        assert resp.json() == {"detail": "Request body too large", "max_bytes": 1024}
        assert resp.headers["connection"] == "close"


def test_a_body_past_the_drain_limit_is_cut_unread(core: ReferenceCoordinator) -> None:
    # 65 MiB declared: the server resets instead of reading (or answering) it
    sock = raw(core, f"POST /v1/miners/poll HTTP/1.1\nHost: x\nX-Api-Key: {MINER_KEY}\n"
                     f"X-Miner-ID: m1\nContent-Length: {65 << 20}\n", b"{" * 4096)
    with sock, pytest.raises(ConnectionResetError):
        read_all(sock)


def test_a_reset_fault_is_a_tcp_reset_and_counts_as_arrived(
        core: ReferenceCoordinator) -> None:
    core.faults.reset(count=1, paths=("/health",))
    sock = raw(core, "GET /health HTTP/1.1\nHost: x\n")
    with sock, pytest.raises(ConnectionResetError):
        read_all(sock)
    assert (core.faults.arrived("/health"), core.faults.answered("/health")) == (1, 0)
    assert httpx.get(f"{core.base_url}/health").status_code == 200


def test_a_delayed_answer_holds_only_its_own_request(core: ReferenceCoordinator) -> None:
    core.faults.set(status=None, delay_s=1.0, count=1, paths=("/v1/jobs",))
    took: dict[str, float] = {}

    def slow() -> None:
        started = time.monotonic()
        with client_http(core) as http:
            assert http.get("/v1/jobs").status_code == 200
        took["slow"] = time.monotonic() - started

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert httpx.get(f"{core.base_url}/health").status_code == 200
    took["other"] = time.monotonic() - started
    thread.join(5)
    assert took["slow"] >= 1.0 and took["other"] < 0.5


def test_down_refuses_connects_and_cuts_open_ones_and_up_serves_the_same_port(
        core: ReferenceCoordinator) -> None:
    # Given an idle keep-alive connection
    kept = http.client.HTTPConnection(*address(core), timeout=5)
    kept.request("GET", "/health")
    assert kept.getresponse().read()
    port = address(core)[1]
    # When the coordinator goes down
    core.faults.down()
    # Then that connection is closed, and a new one is refused
    with kept.sock:
        try:
            assert read_all(kept.sock) == b""
        except ConnectionResetError:
            pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address(core), timeout=2).close()
    # And once up again it serves on the same port
    core.faults.up()
    assert address(core)[1] == port
    assert httpx.get(f"{core.base_url}/health").status_code == 200


def test_rate_limited_calls_say_when_to_come_back(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    coord = make_coordinator(rate_limits={"submit": 2})
    with httpx.Client(base_url=coord.base_url, headers={"X-Api-Key": CLIENT_KEY}) as http:
        answers = [http.post("/v1/jobs", json={"payload": {"type": "command"}})
                   for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 429]
    assert answers[2].json() == {"detail": "Rate limit exceeded"}
    assert 1 <= int(answers[2].headers["retry-after"]) <= 61


def test_accepted_sockets_have_tcp_nodelay(core: ReferenceCoordinator) -> None:
    with httpx.Client(base_url=core.base_url) as http:
        assert http.get("/health").status_code == 200
        sockets = [c.transport.get_extra_info("socket")
                   for c in core._listener._server.server_state.connections]  # type: ignore[union-attr]
        assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                               for s in sockets)


def test_stop_closes_every_accepted_connection_even_one_the_server_lost(
        make_coordinator: Callable[..., ReferenceCoordinator]) -> None:
    # Given a keep-alive connection the uvicorn server no longer lists, as one accepted
    # in the instant the coordinator went down (its socket was left to the garbage
    # collector: a ResourceWarning in whichever test ran next)
    coord = make_coordinator()
    kept = http.client.HTTPConnection(*address(coord), timeout=5)
    kept.request("GET", "/health")
    assert kept.getresponse().read()
    coord._listener._server.server_state.connections.clear()  # type: ignore[union-attr]
    # When the coordinator stops
    coord.stop()
    gc.collect()  # a socket left open would warn here (warnings are errors)
    # Then the connection was closed on the server's side
    with kept.sock:
        try:
            assert read_all(kept.sock) == b""
        except ConnectionResetError:
            pass
