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
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.clock import within
from agent.config import LauncherKind
from agent.errors import LaunchError
from agent.execution.cgroups import pid_alive
from agent.execution.sandbox import SandboxPolicy

log = logging.getLogger(__name__)

FORKSERVER_START_TIMEOUT_S = 120.0
# A fork-server request carries the job's spec inline up to this size (the server reads
# at most 64 KiB of one request); a larger one goes as a file, and the request names it.
INLINE_REQUEST_MAX_BYTES = 48 << 10
# The fork server's socket folder, named after the agent that made it: one whose agent
# was SIGKILLed (no close() ran) is removed by the next agent that starts. Agents before
# 2026-12-03 named it without the pid; such folders go too once nothing serves there.
SOCKET_DIR_PREFIX = "miner-fs-"
_SOCKET_DIR = re.compile(re.escape(SOCKET_DIR_PREFIX) + r"(?:(\d+)-)?[A-Za-z0-9_]+")
_EMPTY_SOCKET_DIR_GRACE_S = 60.0  # an agent makes the folder before its server binds


@dataclass
class LaunchRequest:
    """What a launcher needs to start one job's process.

    ``spec`` is what the job's process runs. A launcher whose process reads it from a
    file writes it to ``spec_path`` first (:meth:`write_spec`); the fork server sends it
    in its request instead, unless it is large.
    """

    spec_path: Path
    spec: dict[str, Any]
    cwd: Path
    env: dict[str, str]
    stdout_fd: int
    stderr_fd: int
    events_fd: int
    jail: dict[str, Any] | None = None  # the job's namespaces (runtimes.jail), in a sandbox
    cgroup_fd: int | None = None  # the job's cgroup directory, joined before any job code

    async def write_spec(self, *others: tuple[Path, dict[str, Any]]) -> None:
        """Write the spec to ``spec_path`` (and ``others``, path and object): one thread hop."""
        try:
            await asyncio.to_thread(_write_json, ((self.spec_path, self.spec), *others))
        except OSError as exc:
            raise LaunchError(f"cannot write the job's spec: {exc}") from exc


def _write_json(files: tuple[tuple[Path, dict[str, Any]], ...]) -> None:
    for path, obj in files:
        path.write_text(json.dumps(obj))


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

    def __init__(self, proc: asyncio.subprocess.Process, pid: int | None = None,
                 sandboxed: bool = False) -> None:
        self._proc = proc
        self.pid = pid or proc.pid
        self._sandboxed = sandboxed

    async def wait(self) -> int:
        code = await self._proc.wait()
        if self._sandboxed and 128 < code < 128 + 65:
            return 128 - code  # bubblewrap reports a signal death as 128 + N
        return code


class SpawnLauncher:
    """Starts ``python -m runtimes.host SPEC`` as a new session (about 2 s with torch).

    In the sandbox: ``bwrap ... python -m runtimes.jail REQUEST``, whose keeper
    confines the job as the fork server's does; the handle's pid is the keeper's
    (bubblewrap's ``--info-fd`` names it), which forwards a cancel's SIGTERM.
    """

    def __init__(self, sandbox: SandboxPolicy | None = None) -> None:
        self.sandbox = sandbox

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        if self.sandbox is not None and request.jail is not None:
            return await self._launch_jailed(request, self.sandbox)
        await request.write_spec()
        env = dict(request.env)
        env["MINER_EVENTS_FD"] = str(request.events_fd)
        pass_fds = [request.events_fd]
        if request.cgroup_fd is not None:
            env["MINER_CGROUP_FD"] = str(request.cgroup_fd)
            pass_fds.append(request.cgroup_fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "runtimes.host", str(request.spec_path),
                stdin=subprocess.DEVNULL, stdout=request.stdout_fd, stderr=request.stderr_fd,
                pass_fds=pass_fds, start_new_session=True, env=env, cwd=str(request.cwd))
        except OSError as exc:
            raise LaunchError(f"cannot start the job's process: {exc}") from exc
        return _SpawnHandle(proc)

    async def _launch_jailed(self, request: LaunchRequest, sandbox: SandboxPolicy
                             ) -> ProcessHandle:
        env = {**request.env, "MINER_EVENTS_FD": str(request.events_fd)}
        order = {"spec": str(request.spec_path), "jail": request.jail,
                 "events_fd": request.events_fd, "cgroup_fd": request.cgroup_fd}
        order_path = request.spec_path.with_name(".miner-jail.json")
        await request.write_spec((order_path, order))
        info_read, info_write = os.pipe()
        pass_fds = [request.events_fd, info_write]
        if request.cgroup_fd is not None:
            pass_fds.append(request.cgroup_fd)
        argv = sandbox.argv([sys.executable, "-m", "runtimes.jail", str(order_path)])
        argv[1:1] = ["--info-fd", str(info_write)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=request.stdout_fd,
                stderr=request.stderr_fd, pass_fds=pass_fds, start_new_session=True, env=env)
        except OSError as exc:
            os.close(info_read)
            raise LaunchError(f"cannot start the job's sandbox: {exc}") from exc
        finally:
            os.close(info_write)
        info = await asyncio.to_thread(_read_all, info_read)
        try:
            keeper = int(json.loads(info)["child-pid"])
        except (ValueError, KeyError, TypeError):
            keeper = None  # bubblewrap failed before its child existed: wait() says how
        return _SpawnHandle(proc, keeper, sandboxed=True)

    async def close(self) -> None:
        return None


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as fh:
        return fh.read(1 << 16)


class _ForkHandle:
    """A job the fork server started: its exit status comes as one line on the socket
    (read as :func:`_readable` says)."""

    via = "forkserver"
    LINE_MAX = 1 << 16

    def __init__(self, pid: int, sock: socket.socket, buffered: bytes = b""):
        self.pid = pid
        self._sock = sock
        self._buffer = bytearray(buffered)  # kept across a canceled wait()
        self._status: int | None = None

    async def wait(self) -> int:
        if self._status is None:
            line = await self._line()
            self._sock.close()
            if not line:  # the server died: its PDEATHSIG took the job with it
                self._status = -9
            else:
                self._status = os.waitstatus_to_exitcode(json.loads(line)["status"])
        return self._status

    async def _line(self) -> bytes:
        """The first line of the answer; what came before the end if it ends first."""
        while b"\n" not in self._buffer and len(self._buffer) <= self.LINE_MAX:
            await _readable(self._sock)  # (the line comes when the job ends)
            try:
                chunk = self._sock.recv(self.LINE_MAX)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                return bytes(self._buffer)
            self._buffer += chunk
        line, _, _ = bytes(self._buffer).partition(b"\n")
        return line


async def _readable(sock: socket.socket) -> None:
    """Return once ``sock`` has something to read (or is closed at the other end).

    The fork server's socket is read this way, not through an asyncio stream: a
    transport, protocol, reader and writer a job cost the loop more than its two
    short answers."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


class ForkServerLauncher:
    """Talks to a torch-preloaded fork server; starts it on first use."""

    def __init__(self, env: dict[str, str] | None = None, runtime_dir: Path | None = None,
                 sandbox: SandboxPolicy | None = None):
        self._env = env
        self.sandbox = sandbox
        # The socket's folder is the agent's: no job's sandbox holds it (a job that could
        # reach the server could ask it for a process outside its own jail).
        sweep_socket_dirs(runtime_dir)
        self._dir = Path(tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-",
                                          dir=runtime_dir))
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
        listener = self._listen()
        fd = listener.fileno()
        if self.sandbox is not None:  # bwrap's --die-with-parent ties the server to us
            argv = self.sandbox.argv([sys.executable, "-m", "runtimes.forkserver", f"fd:{fd}",
                                      "0"])
        else:
            argv = [sys.executable, "-m", "runtimes.forkserver", f"fd:{fd}", str(os.getpid())]
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
                start_new_session=True, pass_fds=(fd,))
        finally:
            listener.close()
        assert self._proc.stdout is not None
        try:
            line = await within(self._proc.stdout.readline(), FORKSERVER_START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if not line:
            await self._stop_server()
            raise LaunchError("the fork server did not start (see the agent's stderr)")
        self.info = json.loads(line)
        huge = self.info.get("huge_pages_mb")
        log.info("fork server ready in %.2f s (pid %s; %s)", time.perf_counter() - t0,
                 self._proc.pid, f"{huge} MB of it in 2 MiB pages, which makes a fork cheaper"
                 if huge is not None else self.info.get("huge_pages", "no huge pages"))

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock_path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.sock_path))
        finally:
            os.umask(old_umask)
        listener.listen(64)
        return listener

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        await self.start()
        message = await self._message(request)
        try:
            sock = self._send(request, message)
        except OSError as exc:
            raise LaunchError(f"fork server request failed: {exc}") from exc
        try:
            data, fds = await within(_receive_with_fds(sock), 30)
        except (TimeoutError, OSError) as exc:
            sock.close()
            raise LaunchError(f"fork server request failed: {exc}") from exc
        first, _, rest = data.partition(b"\n")
        answer = json.loads(first) if first else {"error": "fork server closed the connection"}
        if "pid" not in answer:
            for fd in fds:
                os.close(fd)
            sock.close()
            raise LaunchError(f"fork server refused the job: {answer.get('error')}")
        pid = int(answer["pid"])
        for fd in fds:  # the pid as we see it (the server may live in another PID namespace)
            pid = _pid_of_pidfd(fd) or pid
            os.close(fd)
        return _ForkHandle(pid, sock, rest)

    async def _message(self, request: LaunchRequest) -> bytes:
        """The request line: the spec inline when it is small, else the path of its file.

        Inline, a job starts with no file written and no thread hop; a large payload
        would not fit the server's read, so it goes as a file as the spawn's does.
        """
        msg: dict[str, Any] = {"spec_inline": request.spec, "cwd": str(request.cwd),
                               "env": {**request.env, "MINER_EVENTS_FD": "3"},
                               "jail": request.jail if self.sandbox is not None else None,
                               "cgroup": request.cgroup_fd is not None}
        line = (json.dumps(msg) + "\n").encode()
        if len(line) <= INLINE_REQUEST_MAX_BYTES:
            return line
        await request.write_spec()
        del msg["spec_inline"]
        msg["spec"] = str(request.spec_path)
        return (json.dumps(msg) + "\n").encode()

    def _send(self, request: LaunchRequest, message: bytes) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.sock_path))
            fds = [os.open(os.devnull, os.O_RDONLY), request.stdout_fd, request.stderr_fd,
                   request.events_fd]
            if request.cgroup_fd is not None:
                fds.append(request.cgroup_fd)
            try:
                socket.send_fds(sock, [message], fds)
            finally:
                os.close(fds[0])
            sock.setblocking(False)
            return sock
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


def sweep_socket_dirs(runtime_dir: Path | None = None) -> list[Path]:
    """Remove the fork-server socket folders that agents killed outright left behind.

    A folder is stale when it is ours (same owner), named after an agent pid that is
    not running (or, an older agent's, after none), holds nothing but the socket, and
    the socket takes no connection: a live server in another PID namespace sharing
    this folder keeps its own. A folder with no socket yet is left a minute, the time
    an agent takes from making it to its server's start. Returns what was removed.
    """
    root = Path(runtime_dir or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        match = _SOCKET_DIR.fullmatch(name)
        if match is None or (match.group(1) is not None and pid_alive(int(match.group(1)))):
            continue
        folder = root / name
        try:
            st = os.lstat(folder)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            entries = os.listdir(folder)
            if set(entries) - {"forkserver.sock"}:
                continue  # not a folder as an agent leaves it: not ours to judge
            if not entries and time.time() - st.st_mtime < _EMPTY_SOCKET_DIR_GRACE_S:
                continue  # an agent starting right now
            if entries and _listening(folder / "forkserver.sock"):
                continue  # a server still serves there
            for entry in entries:
                os.unlink(folder / entry)
            os.rmdir(folder)
        except OSError:
            continue
        removed.append(folder)
    if removed:
        log.info("removed %d fork-server socket folder(s) left by agents that were killed: "
                 "%s", len(removed), ", ".join(str(p) for p in removed))
    return removed


def _listening(path: Path) -> bool:
    """Whether a server accepts on ``path`` (never blocks: a full backlog is a server)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except BlockingIOError:
            return True
        except OSError:
            return False
    return True


async def _receive_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """The fork server's first answer, and the descriptor sent with it."""
    while True:
        await _readable(sock)
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 1)
        except BlockingIOError:
            continue
        return data, fds


def _pid_of_pidfd(fd: int) -> int | None:
    """The pid a pidfd names, in our PID namespace (``/proc/self/fdinfo``)."""
    try:
        info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(info, 4096)
        finally:
            os.close(info)
        for line in text.splitlines():
            if line.startswith(b"Pid:"):
                value = int(line.split()[1])
                return value if value > 0 else None
    except (OSError, ValueError, IndexError):
        pass
    return None


class AutoLauncher:
    """The fork server when it works, a plain spawn when it does not."""

    def __init__(self, env: dict[str, str] | None = None,
                 sandbox: SandboxPolicy | None = None) -> None:
        self.forkserver = ForkServerLauncher(env, sandbox=sandbox)
        self.spawn = SpawnLauncher(sandbox)
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


def make_launcher(kind: LauncherKind, env: dict[str, str] | None = None,
                  sandbox: SandboxPolicy | None = None, *, one_job: bool = False) -> Launcher:
    """A launcher of ``kind``; with ``sandbox``, every job it starts is confined.

    ``one_job`` (``exec``): ``auto`` starts the job directly. The fork server pays
    torch's import and every runtime's once, for many jobs; for one job that is all
    cost (2.4x ``python -c "import torch"`` before the job ran), and a direct start
    imports only what the job's runtime needs.
    """
    if kind == "spawn" or (kind == "auto" and one_job):
        return SpawnLauncher(sandbox)
    if kind == "forkserver":
        return ForkServerLauncher(env, sandbox=sandbox)
    return AutoLauncher(env, sandbox)
