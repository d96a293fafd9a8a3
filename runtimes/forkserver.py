"""The fork server: a process that has imported torch and the runtimes, and forks jobs.

Started by the agent (``agent.execution.launcher``) as ``python -m runtimes.forkserver
SOCKET PARENT_PID``. It imports torch and every runtime once, never touches
CUDA, and then, for each request on its Unix socket, forks a fresh process that
becomes its own session leader with the job's stdout, stderr and events pipes
(passed over the socket with SCM_RIGHTS), its own environment and work dir. A
job starts in tens of milliseconds instead of the ~2 s a fresh interpreter
spends importing torch. The server reaps each job and sends its wait status back
on the request's connection.

Wire format, one JSON line each way: request ``{"spec_inline": {...}, "env": {...},
"cwd": DIR, "jail": {...} or null, "cgroup": bool}`` (at most 64 KiB; a larger spec
goes as a file, named by ``"spec": PATH`` instead of ``spec_inline``) with 4 fds
(stdin, stdout, stderr, events) and a fifth, the job's cgroup directory, when
``cgroup`` is true; answers ``{"pid": N}`` with a pidfd of the process
(SCM_RIGHTS; N is the pid in the server's namespace), then ``{"pid": N, "status":
WAITSTATUS}``, or ``{"error": MESSAGE}`` for a request it refuses.

With ``jail``, the server runs inside the node's sandbox and forks the job as PID 1
of a PID namespace of its own, where it confines itself before any job code runs
(``runtimes.jail``); ``pid`` is the job's, as the agent sees it.

The listening socket is handed over by the agent (``--listen-fd``), bound in a
folder that no job can see, so no job can ask for a process of its own.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any

from runtimes import host, jail, registry
from runtimes.base import EventChannel

EVENTS_FD = 3
MAX_REQUEST_BYTES = 1 << 16
REQUEST_READ_TIMEOUT_S = 10.0
PRELOAD_EXTRA = ("runtimes.device", "runtimes.trainloop")


class ForkServer:
    """Accepts job requests and forks a process for each."""

    def __init__(self, listener: socket.socket) -> None:
        self.sel = selectors.DefaultSelector()
        self.listener = listener
        self.listener.setblocking(True)
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self.children: dict[int, tuple[socket.socket, int]] = {}
        self._forker: jail.PidNamespaceForker | None = None

    def _pid_namespaces(self) -> jail.PidNamespaceForker:
        if self._forker is None:
            self._forker = jail.PidNamespaceForker()
        return self._forker

    @classmethod
    def bind(cls, sock_path: str) -> ForkServer:
        """A server on its own socket (by hand; the agent hands one over instead)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        old_umask = os.umask(0o177)
        try:
            listener.bind(sock_path)
        finally:
            os.umask(old_umask)
        listener.listen(64)
        return cls(listener)

    def serve_forever(self) -> None:
        while True:
            for key, _ in self.sel.select():
                key.data(key.fileobj)

    def _accept(self, _sock: object) -> None:
        conn, _ = self.listener.accept()
        conn.setblocking(True)
        try:
            self._handle(conn)
        except Exception as exc:  # one bad request must not take the server down
            with contextlib.suppress(OSError):  # nor an agent that hung up meanwhile
                _send(conn, {"error": f"{type(exc).__name__}: {exc}"})
            conn.close()

    def _handle(self, conn: socket.socket) -> None:
        line, fds = _receive(conn)
        try:
            request = _parse(line)
            want = 5 if request.get("cgroup") else 4
            if len(fds) != want:
                raise ValueError(f"expected {want} file descriptors, got {len(fds)}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        if request.get("jail") is not None:
            pid = self._pid_namespaces().fork()  # the job is PID 1 of a namespace of its own
        else:
            pid = os.fork()
        if pid == 0:
            self._child(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (conn, pid)
        self.sel.register(pidfd, selectors.EVENT_READ, self._reap)
        # The pidfd goes along: in the sandbox our pids are not the agent's, and a pidfd
        # names the process safely in any namespace (the agent reads its pid there).
        socket.send_fds(conn, [(json.dumps({"pid": pid}) + "\n").encode()], [pidfd])

    def _reap(self, pidfd: Any) -> None:
        conn, pid = self.children.pop(pidfd)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        try:
            _send(conn, {"pid": pid, "status": status})
        except OSError:
            pass  # the agent stopped listening; nothing else to tell
        conn.close()

    def _child(self, request: dict[str, Any], fds: list[int]) -> None:
        """The forked process: the job itself (confined first, in a jail)."""
        code = host.EXIT_FAILED
        try:
            self.sel.close()
            self.listener.close()
            for conn, _ in self.children.values():
                conn.close()
            os.setsid()
            cgroup_fd = fds.pop() if len(fds) == 5 else None
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in fds:
                if fd > EVENTS_FD:
                    os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if request.get("jail") is not None:
                host.die_with_parent(None)  # the server gone (agent killed): the job goes
                if not self._confine(request, cgroup_fd):
                    host.exit_now(host.EXIT_FAILED)
            else:
                if cgroup_fd is not None:
                    host.join_cgroup(cgroup_fd)
                host.take_group_down_with_parent(None)
            code = self._run_job(request)
        except BaseException:
            import traceback

            traceback.print_exc()
        host.exit_now(code)

    @staticmethod
    def _confine(request: dict[str, Any], cgroup_fd: int | None) -> bool:
        try:
            jail.confine(jail.JailRequest.from_dict(request["jail"]), cgroup_fd)
        except (OSError, KeyError, ValueError) as exc:
            message = f"the job's sandbox could not be made: {exc}"
            print(f"miner-agent: {message}", file=sys.stderr, flush=True)
            EventChannel(EVENTS_FD).send("error", code="sandbox_error", message=message)
            return False
        return True

    @staticmethod
    def _run_job(request: dict[str, Any]) -> int:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        _reseed()
        spec = request.get("spec_inline")
        if spec is None:
            with open(request["spec"]) as fh:
                spec = json.load(fh)
        return host.run_spec(spec)


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One request line and its descriptors.

    A long line arrives in pieces (the kernel queues about 36 KiB per piece), the
    descriptors with the first; the rest is read until the newline, within bounds.
    """
    msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST_BYTES, 5)
    if b"\n" in msg:
        return msg.split(b"\n", 1)[0], fds
    try:
        conn.settimeout(REQUEST_READ_TIMEOUT_S)  # the server serves one request at a time
        while b"\n" not in msg:
            if len(msg) >= MAX_REQUEST_BYTES:
                raise ValueError(f"a request over {MAX_REQUEST_BYTES} bytes")
            more = conn.recv(MAX_REQUEST_BYTES - len(msg))
            if not more:
                raise ValueError("the request ended before its newline")
            msg += more
        conn.settimeout(None)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return msg.split(b"\n", 1)[0], fds


def _parse(line: bytes) -> dict[str, Any]:
    """A request, checked for what the server relies on before it forks."""
    request = json.loads(line)
    if not isinstance(request, dict):
        raise ValueError("a request must be a JSON object")
    if "spec_inline" in request:
        if not isinstance(request["spec_inline"], dict):
            raise ValueError("spec_inline must be a JSON object")
    elif not isinstance(request.get("spec"), str):
        raise ValueError("a request names its spec: spec_inline or spec")
    if not isinstance(request.get("env"), dict) or not isinstance(request.get("cwd"), str):
        raise ValueError("a request carries env (an object) and cwd (a path)")
    return request


def _reseed() -> None:
    """Forked children would share the server's torch RNG state: give each its own."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    conn.sendall((json.dumps(obj) + "\n").encode())


def preload() -> dict[str, Any]:
    """Import torch and the runtimes; report what that took."""
    t0 = time.perf_counter()
    try:
        importlib.import_module("torch")  # the point of this process
    except ImportError:
        pass

    failed = registry.preload()
    for module in PRELOAD_EXTRA:  # imported lazily by their runtimes, seconds each
        try:
            importlib.import_module(module)
        except Exception:
            failed.append(module)
    return {"preload_s": round(time.perf_counter() - t0, 3), "runtimes_failed": failed}


def freeze_preloaded() -> None:
    """Put what the preload left alive out of the cyclic collector's reach.

    A forked job shares the server's pages until it writes to them, and a collection
    in the job writes to the header of every object it walks. Unfrozen, a job's first
    full collection walked the ~290k objects torch's import leaves and copied their
    pages: 170-260 ms of CPU and 72 MB of private memory per job here; frozen, 0.04 ms
    and 0.1 MB (``benchmarks/bench_fork.py``; ``tests/agent/execution/test_launcher.py``
    checks it). Collected first,
    so no garbage is kept for good. What Python's ``gc.freeze`` documentation advises
    for a process that forks without exec.
    """
    gc.collect()
    gc.freeze()


MADV_COLLAPSE = 25  # Linux 6.1+; not in Python 3.11's mmap module
HUGE_PAGE = 2 << 20
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def collapse_to_huge_pages() -> dict[str, Any]:
    """Back the server's anonymous memory with 2 MiB pages, where the kernel can.

    A fork copies one page-table entry per 4 KiB page of the parent's anonymous memory
    (220 MB here after torch's import: 8-10 ms of the server's CPU a job) and the job's
    exit frees as many; with 2 MiB pages it is one per 512. A job that writes to one
    then copies 4 KiB of it, as before (Linux 5.8 and later split the huge page's
    mapping in that process only). ``MADV_COLLAPSE`` (Linux 6.1+) rebuilds the
    regions already in use, once; no region is marked for huge pages later on, so
    neither the server nor a job gets a 2 MiB page where it did not have memory
    already. Skipped where THP is set to ``never`` (the operator's choice). Measured
    by ``benchmarks/bench_fork.py``: 1.6-2.9 ms against 7.7-9.6 ms of the server's
    CPU a fork, a job's whole CPU 5-7 ms against 10-14.
    """
    try:
        with open(THP_SETTING) as fh:
            if "[never]" in fh.read():
                return {"huge_pages": "off (transparent_hugepage is never)"}
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as fh:
            maps = fh.read().splitlines()
    except (OSError, AttributeError) as exc:
        return {"huge_pages": f"off ({exc})"}
    started = time.perf_counter()
    collapsed = 0
    for line in maps:
        fields = line.split()
        if fields[1] != "rw-p" or (len(fields) > 5 and fields[5] != "[heap]"):
            continue  # private anonymous memory (and the C heap) only
        low, high = (int(x, 16) for x in fields[0].split("-"))
        start = -(-low // HUGE_PAGE) * HUGE_PAGE
        end = high // HUGE_PAGE * HUGE_PAGE
        if end - start < HUGE_PAGE:
            continue
        # Refused (EINVAL) by a kernel without it or for a region it cannot back so,
        # EAGAIN/ENOMEM where no huge page was free: that region stays as it was.
        if madvise(start, end - start, MADV_COLLAPSE) == 0:
            collapsed += end - start
    return {"huge_pages_mb": collapsed >> 20,
            "huge_pages_s": round(time.perf_counter() - started, 3)}


def main() -> None:
    if len(sys.argv) != 3:
        print("usage: python -m runtimes.forkserver SOCKET|fd:N PARENT_PID (started by "
              "miner-agent; PARENT_PID 0 inside its sandbox, whose bwrap watches the agent)",
              file=sys.stderr)
        raise SystemExit(2)
    where, parent = sys.argv[1], int(sys.argv[2])
    host.die_with_parent(parent or None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when we stop
    info = preload()
    freeze_preloaded()
    info.update(collapse_to_huge_pages())
    if where.startswith("fd:"):
        server = ForkServer(socket.socket(fileno=int(where[3:])))
    else:
        server = ForkServer.bind(where)
    print(json.dumps({"ready": True, "pid": os.getpid(), **info}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
