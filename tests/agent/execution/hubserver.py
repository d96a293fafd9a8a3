"""A Hugging Face hub on loopback: the endpoints ``snapshot_download`` calls, over files
held in memory, and a record of what was asked (tests/agent/execution/test_modelstore.py)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class FakeRepo:
    """One model repo at one commit."""

    def __init__(self, repo: str, files: dict[str, bytes], commit: str = "c" * 40,
                 branch: str = "main") -> None:
        self.repo, self.files, self.commit, self.branch = repo, files, commit, branch


class Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: list[FakeRepo], token: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = {r.repo: r for r in repos}
        self.token = token  # when set, requests without "Bearer <token>" get 401
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:  # http.server calls it by this name
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append(f"{self.command} {path}")
        if self.server.token and self.headers.get("authorization") != (
                f"Bearer {self.server.token}"):
            return self._send(401, b'{"error": "Invalid credentials"}', body,
                              {"X-Error-Code": "GatedRepo"})
        for repo in self.server.repos.values():
            if path.startswith(f"/api/models/{repo.repo}/"):
                return self._api(repo, path.removeprefix(f"/api/models/{repo.repo}/"), body)
            prefix = f"/{repo.repo}/resolve/"
            if path.startswith(prefix):
                rev, _, name = path.removeprefix(prefix).partition("/")
                return self._file(repo, rev, name, body)
        self._send(404, b'{"error": "Repository not found"}', body,
                   {"X-Error-Code": "RepoNotFound"})

    def _api(self, repo: FakeRepo, rest: str, body: bool) -> None:
        kind, _, rev = rest.partition("/")
        rev = rev.split("/")[0]
        if rev not in (repo.branch, repo.commit):
            return self._send(404, b'{"error": "Invalid rev id"}', body,
                              {"X-Error-Code": "RevisionNotFound"})
        if kind == "revision":
            info = {"id": repo.repo, "modelId": repo.repo, "sha": repo.commit,
                    "siblings": [{"rfilename": n} for n in sorted(repo.files)]}
            return self._send(200, json.dumps(info).encode(), body)
        if kind == "tree":
            tree = [{"type": "file", "path": n, "size": len(d),
                     "oid": hashlib.sha1(d).hexdigest()} for n, d in sorted(repo.files.items())]
            return self._send(200, json.dumps(tree).encode(), body)
        self._send(404, b"{}", body)

    def _file(self, repo: FakeRepo, rev: str, name: str, body: bool) -> None:
        data = repo.files.get(name)
        if rev not in (repo.branch, repo.commit) or data is None:
            return self._send(404, b'{"error": "Entry not found"}', body,
                              {"X-Error-Code": "EntryNotFound"})
        self._send(200, data, body, {"X-Repo-Commit": repo.commit,
                                     "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                     "Content-Type": "application/octet-stream"})

    def _send(self, status: int, data: bytes, body: bool,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@contextmanager
def serve_hub(repos: list[FakeRepo], token: str | None = None) -> Iterator[Hub]:
    hub = Hub(repos, token)
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join(5)
