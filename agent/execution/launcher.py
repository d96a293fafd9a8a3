"""How a job's process comes to exist: through the fork server, or a plain spawn.

Both launchers produce the same isolated process: a fresh process per job, its
own session and process group, the scrubbed environment it is given, its work
dir as cwd, stdout/stderr on the capture pipes and the events channel on fd 3
(fork server) or the fd named by ``MINER_EVENTS_FD`` (spawn). Neither imports
torch here: the fork server is a separate process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.config import LauncherKind
from agent.errors import LaunchError

log = logging.getLogger(__name__)

FORKSERVER_START_TIMEOUT_S = 120.0


@dataclass
class LaunchRequest:
    """What a launcher needs to start one job's process."""

    spec_path: Path
    cwd: Path
    env: dict[str, str]
    stdout_fd: int
    stderr_fd: int
    events_fd: int


class ProcessHandle(Protocol):
    pid: int
    via: str

    async def wait(self) -> int:
        """The exit status as subprocess reports it: the code, or minus the signal."""
        ...


class Launcher(Protocol):
    async def launch(self, request: LaunchRequest) -> ProcessHandle: ...

    async def close(self) -> None: ...


class _SpawnHandle:
    via = "spawn"

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.pid = proc.pid

    async def wait(self) -> int:
        return await self._proc.wait()


class SpawnLauncher:
    """Starts ``python -m runtimes.host SPEC`` as a new session (about 2 s with torch)."""

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        env = dict(request.env)
        env["MINER_EVENTS_FD"] = str(request.events_fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "runtimes.host", str(request.spec_path),
                stdin=subprocess.DEVNULL, stdout=request.stdout_fd, stderr=request.stderr_fd,
                pass_fds=(request.events_fd,), start_new_session=True, env=env,
                cwd=str(request.cwd))
        except OSError as exc:
            raise LaunchError(f"cannot start the job's process: {exc}") from exc
        return _SpawnHandle(proc)

    async def close(self) -> None:
        return None


class _ForkHandle:
    via = "forkserver"

    def __init__(self, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.pid = pid
        self._reader = reader
        self._writer = writer
        self._status: int | None = None

    async def wait(self) -> int:
        if self._status is None:
            line = await self._reader.readline()
            self._writer.close()
            if not line:  # the server died: its PDEATHSIG took the job with it
                self._status = -9
            else:
                self._status = os.waitstatus_to_exitcode(json.loads(line)["status"])
        return self._status


class ForkServerLauncher:
    """Talks to a torch-preloaded fork server; starts it on first use."""

    def __init__(self, env: dict[str, str] | None = None, runtime_dir: Path | None = None):
        self._env = env
        self._dir = Path(tempfile.mkdtemp(prefix="miner-fs-", dir=runtime_dir))
        self.sock_path = self._dir / "forkserver.sock"
        self._proc: asyncio.subprocess.Process | None = None
        self._start_lock = asyncio.Lock()
        self.info: dict[str, object] = {}

    async def start(self) -> None:
        async with self._start_lock:
            if self._proc is not None and self._proc.returncode is None:
                return
            await self._start_server()

    async def _start_server(self) -> None:
        t0 = time.perf_counter()
        env = dict(self._env if self._env is not None else os.environ)
        env.pop("PYTHONUNBUFFERED", None)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runtimes.forkserver", str(self.sock_path), str(os.getpid()),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env, start_new_session=True)
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), FORKSERVER_START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if not line:
            await self._stop_server()
            raise LaunchError("the fork server did not start (see the agent's stderr)")
        self.info = json.loads(line)
        log.info("fork server ready in %.2f s (pid %s)", time.perf_counter() - t0, self._proc.pid)

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        await self.start()
        try:
            reader, writer = await self._connect(request)
            line = await asyncio.wait_for(reader.readline(), 30)
        except (TimeoutError, OSError) as exc:
            raise LaunchError(f"fork server request failed: {exc}") from exc
        answer = json.loads(line) if line else {"error": "fork server closed the connection"}
        if "pid" not in answer:
            writer.close()
            raise LaunchError(f"fork server refused the job: {answer.get('error')}")
        return _ForkHandle(int(answer["pid"]), reader, writer)

    async def _connect(self, request: LaunchRequest) -> tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.sock_path))
            msg = {"spec": str(request.spec_path), "cwd": str(request.cwd),
                   "env": {**request.env, "MINER_EVENTS_FD": "3"}}
            fds = [os.open(os.devnull, os.O_RDONLY), request.stdout_fd, request.stderr_fd,
                   request.events_fd]
            try:
                socket.send_fds(sock, [(json.dumps(msg) + "\n").encode()], fds)
            finally:
                os.close(fds[0])
            sock.setblocking(False)
            return await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        await self._stop_server()
        try:
            self.sock_path.unlink(missing_ok=True)
            self._dir.rmdir()
        except OSError:
            pass

    async def _stop_server(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.kill()
        await proc.wait()


class AutoLauncher:
    """The fork server when it works, a plain spawn when it does not."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.forkserver = ForkServerLauncher(env)
        self.spawn = SpawnLauncher()
        self._broken_until = 0.0

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        if time.monotonic() >= self._broken_until:
            try:
                return await self.forkserver.launch(request)
            except LaunchError as exc:
                log.warning("fork server unavailable, falling back to spawn: %s", exc)
                self._broken_until = time.monotonic() + 60
        return await self.spawn.launch(request)

    async def warm_up(self) -> None:
        try:
            await self.forkserver.start()
        except LaunchError as exc:
            log.warning("fork server unavailable, jobs will be spawned: %s", exc)
            self._broken_until = time.monotonic() + 60

    async def close(self) -> None:
        await self.forkserver.close()


def make_launcher(kind: LauncherKind, env: dict[str, str] | None = None) -> Launcher:
    if kind == "spawn":
        return SpawnLauncher()
    if kind == "forkserver":
        return ForkServerLauncher(env)
    return AutoLauncher(env)
