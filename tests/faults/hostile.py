"""A hostile coordinator: the core miner endpoints, answering from queues of bad answers.

It speaks just enough of the core protocol (register, heartbeat, poll, the running
list, result, fail, deregister) for the real agent to serve, records every request
(method, path, headers, body), and answers each endpoint from its queue first:
oversized, deeply nested, out-of-range or mistyped JSON, HTML, or a redirect to
another host. A :class:`Witness` on another loopback address stands for that host and
records whatever reaches it.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MINER = "/v1/miners/"
HTML = (b"<!doctype html><html><head><title>Sign in</title></head><body><form>"
        b"<input name=user></form></body></html>")
BIG_BYTES = 20 << 20  # past the agent's default max_answer_bytes (16 MiB)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, sent as given."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    hands_out: str | None = None  # a poll answer that gives this job id to the miner
    hostile: bool = False  # one of a row's bad answers (not a normal one)


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0  # what it was answered
    hostile: bool = False  # answered with one of a row's bad answers


def json_answer(value: Any, status: int = 200, hands_out: str | None = None) -> Answer:
    return Answer(status, json.dumps(value).encode(), hands_out=hands_out)


def build(spec: tuple[Any, ...], elsewhere: str) -> Answer:
    """A bad answer from a row's spec: ("json", value), ("raw", bytes), ("html",),
    ("big", job_id, id_first), ("deep", job_id), ("huge_number",), ("redirect", status)
    to ``elsewhere``."""
    return dataclasses.replace(_build(spec, elsewhere), hostile=True)


def _build(spec: tuple[Any, ...], elsewhere: str) -> Answer:
    kind, *args = spec
    if kind == "json":
        return json_answer(args[0])
    if kind == "raw":
        return Answer(body=args[0])
    if kind == "html":
        return Answer(body=HTML, content_type="text/html; charset=utf-8")
    if kind == "big":
        job_id, id_first = args
        pad = b'"pad":"' + b"x" * BIG_BYTES + b'"'
        head = b'"job_id":"' + job_id.encode() + b'"'
        parts = (head, b'"payload":{"type":"sleep","steps":1}', pad)
        return Answer(body=b"{" + b",".join(parts if id_first else parts[::-1]) + b"}")
    if kind == "deep":
        nested = b"[" * 10_000 + b"]" * 10_000
        return Answer(body=b'{"job_id":"' + args[0].encode() + b'","payload":' + nested + b"}")
    if kind == "huge_number":
        return Answer(body=b'{"status":"ok","jobs":[],"n":' + b"9" * 400 + b"}")
    if kind == "redirect":
        return Answer(args[0], b"", headers=(("Location", elsewhere),))
    raise ValueError(f"unknown answer spec {spec!r}")


class RecordingServer:
    """A threading HTTP/1.1 server on ``host`` that records requests and asks ``answer``."""

    def __init__(self, answer: Callable[[Seen], Answer], host: str = "127.0.0.1") -> None:
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self._answer = answer
        self._server = _Server((host, 0), _Handler)
        self._server.owner = self
        self.base_url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def handle(self, seen: Seen) -> Answer:
        answer = self._answer(seen)
        with self.lock:
            self.seen.append(dataclasses.replace(seen, status=answer.status,
                                                 hostile=answer.hostile))
        return answer

    def requests(self, path_prefix: str = "", status: int | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path.startswith(path_prefix)
                    and (status is None or s.status == status)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class Witness(RecordingServer):
    """Another host: records what reaches it and answers 404."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        super().__init__(lambda seen: json_answer({"detail": "Not Found"}, 404), host)


class HostileCoordinator:
    """The core miner endpoints; each answers from its queue first, then normally."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queues: dict[str, list[Answer]] = {}
        self.running: set[str] = set()  # handed out and not yet reported
        self.server = RecordingServer(self._answer)
        self.base_url = self.server.base_url

    def queue(self, endpoint: str, *answers: Answer) -> None:
        """Answer the next calls of ``endpoint`` (register, heartbeat, poll, running, or
        ``result:<job id>``) with ``answers``, in order."""
        with self._lock:
            self.queues.setdefault(endpoint, []).extend(answers)

    def hand_out(self, job_id: str, payload: dict[str, Any]) -> None:
        """Queue a normal poll answer that gives this job to the miner."""
        self.queue("poll", json_answer({"job_id": job_id, "payload": payload,
                                        "constraints": {}}, hands_out=job_id))

    def requests(self, path_prefix: str = "", status: int | None = None) -> list[Seen]:
        return self.server.requests(path_prefix, status)

    def reports(self, job_id: str, kind: str, status: int = 200) -> list[dict[str, Any]]:
        """Bodies of ``kind`` (result, fail) calls for ``job_id`` answered ``status``."""
        return [json.loads(s.body) for s in self.requests(f"{MINER}{job_id}/{kind}", status)]

    def close(self) -> None:
        self.server.close()

    def _answer(self, seen: Seen) -> Answer:
        endpoint, job_id = _endpoint(seen)
        with self._lock:
            queued = self.queues.get(f"{endpoint}:{job_id}") or self.queues.get(endpoint)
            answer = queued.pop(0) if queued else self._normal(endpoint, job_id)
            if answer.hands_out is not None:
                self.running.add(answer.hands_out)
            if endpoint in ("result", "fail") and answer.status == 200:
                self.running.discard(job_id)
        return answer

    def _normal(self, endpoint: str, job_id: str) -> Answer:
        if endpoint == "register":
            return json_answer({"status": "ok", "session_token": uuid.uuid4().hex})
        if endpoint in ("heartbeat", "fail", "deregister"):
            return json_answer({"status": "ok"})
        if endpoint == "poll":
            return Answer(204)
        if endpoint == "running":
            jobs = [{"job_id": j, "state": "RUNNING"} for j in sorted(self.running)]
            return json_answer({"jobs": jobs, "total": len(jobs), "limit": 100})
        if endpoint == "result":
            return json_answer({"status": "ok", "receipt": {"receipt_id": uuid.uuid4().hex,
                                                            "job_id": job_id}})
        return json_answer({"detail": "Not Found"}, 404)


def _endpoint(seen: Seen) -> tuple[str, str]:
    """(endpoint name, the job or miner id in the path) of a miner call."""
    rest = seen.path.split("?", 1)[0].removeprefix(MINER)
    if seen.method == "DELETE":
        return "deregister", rest
    if rest in ("register", "heartbeat", "poll"):
        return rest, ""
    ident, _, tail = rest.rpartition("/")
    if tail in ("result", "fail"):
        return tail, ident
    if tail == "jobs":
        return "running", ident
    return "unknown", rest


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: RecordingServer

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-answer (a 20 MiB one, say) is expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_GET

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        seen = Seen(self.command, self.path, dict(self.headers.items()), body)
        answer = self.server.owner.handle(seen)
        self.send_response(answer.status)
        if answer.status != 204:
            self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers:
            self.send_header(name, value)
        self.end_headers()
        if answer.body:
            self.wfile.write(answer.body)
