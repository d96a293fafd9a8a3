"""Fixtures for runtime tests: a real job process, a loopback HTTP server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class JobRun:
    """What a job process left behind."""

    exit_code: int
    events: list[dict[str, Any]]
    package_dir: Path
    stdout: str
    stderr: str

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    @property
    def finished(self) -> dict[str, Any]:
        done = self.named("finished")
        assert done, f"no finished event; stderr:\n{self.stderr[-3000:]}"
        return done[-1]


EventHook = Callable[[dict[str, Any], subprocess.Popen[bytes]], None]


def run_job_process(tmp_path: Path, runtime: str, payload: dict[str, Any],
                    env: dict[str, str] | None = None, on_event: EventHook | None = None,
                    constraints: dict[str, Any] | None = None,
                    timeout_s: float = 60.0) -> JobRun:
    """Run one job through ``python -m runtimes.host`` and collect its events.

    ``on_event(event, proc)`` sees each event as it arrives (to send a signal
    mid-run, for example).
    """
    package_dir, work_dir = tmp_path / "package", tmp_path / "work"
    package_dir.mkdir(exist_ok=True)
    work_dir.mkdir(exist_ok=True)
    spec = {"job": {"job_id": "test-job", "payload": payload, "constraints": constraints or {}},
            "package_dir": str(package_dir), "work_dir": str(work_dir), "runtime": runtime,
            "parent_pid": None}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    read_fd, write_fd = os.pipe()
    # CUDA_VISIBLE_DEVICES comes from os.environ: tests/conftest.py empties it for every
    # test not marked gpu, and a gpu test's job sees the very devices the test process sees.
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MINER_EVENTS_FD": str(write_fd),
                **(env or {})}
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "runtimes.host", str(spec_path)],
                                cwd=REPO_ROOT, env=full_env, stdout=out, stderr=err,
                                pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    try:
        events = _read_events(read_fd, proc, on_event, timeout_s)
        code = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:  # a hung job (or a test timeout): no process outlives the test
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return JobRun(code, events, package_dir, out_path.read_text(errors="replace"),
                  err_path.read_text(errors="replace"))


def _read_events(read_fd: int, proc: subprocess.Popen[bytes], on_event: EventHook | None,
                 timeout_s: float) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    killer = threading.Timer(timeout_s, lambda: proc.poll() is None and os.killpg(
        proc.pid, signal.SIGKILL))
    killer.start()
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                event = json.loads(line)
                events.append(event)
                if on_event is not None:
                    on_event(event, proc)
    finally:
        killer.cancel()
    return events


@pytest.fixture
def run_job(tmp_path: Path) -> Callable[..., JobRun]:
    """``run_job(runtime, payload, env=..., on_event=...)`` in a real job process."""

    def runner(runtime: str, payload: dict[str, Any], **kwargs: Any) -> JobRun:
        return run_job_process(tmp_path / "job", runtime, payload, **kwargs)

    (tmp_path / "job").mkdir()
    return runner


@dataclass
class BlobServer:
    """A loopback HTTP server over a folder, counting GETs per path."""

    root: Path
    port: int
    hits: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def put(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.url(name)


@pytest.fixture
def blob_server(tmp_path: Path) -> Iterator[BlobServer]:
    root = tmp_path / "served"
    root.mkdir()
    state = BlobServer(root=root, port=0)
    lock = threading.Lock()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            with lock:
                state.hits[self.path] = state.hits.get(self.path, 0) + 1
            time.sleep(state.delay_s)
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that hangs up mid-body (a cancel test) is expected

    server = Server(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
