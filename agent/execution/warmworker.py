"""A warm model worker's process, agent side: start it, talk to it, follow its jobs.

See :mod:`agent.execution.warm` for what warm workers are; this is the plumbing. The
worker (``python -m runtimes.warm``) is started in the node's sandbox with no network,
no job folder and its own cgroup, and talks over one socket in length-prefixed JSON
frames (the wire is described in :mod:`runtimes.warm`). A writer thread sends orders;
a reader thread writes each job's frames into the pipes and files the job's own
process would have written (:class:`WarmJob`), and fails the jobs of a worker that
died with ``worker_died``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.clock import within
from agent.errors import LaunchError
from agent.execution.cgroups import JobCgroup
from agent.execution.sandbox import SandboxPolicy
from agent.jobs import Job
from agent.layout import RESULT_TEXT

log = logging.getLogger(__name__)

HEADER = struct.Struct(">I")
MAX_ORDER_BYTES = 64 << 20  # runtimes.warm.MAX_FRAME_BYTES: the worker refuses more
MAX_REPLY_BYTES = 4 << 20  # a frame from the worker past this means a broken worker
FORCED_KILL_GRACE_S = 1.0
RETRY_START_AFTER_S = 60.0
WORKER_DIED = "worker_died"


@dataclass(frozen=True)
class WarmSettings:
    """The pool's own config: where workers keep their scratch and logs, and the cache."""

    root: Path  # <state_dir>/warm: <key>.log and <key>/ (HOME and caches) per worker
    budget_mb: int = 0  # model_memory_budget_mb; 0: a share of the device's memory
    idle_s: float = 600.0  # model_idle_s
    start_timeout_s: float = 120.0


class WarmJob:
    """One job in a worker: the :class:`ProcessHandle` its :class:`WarmRun` waits on.

    Its pipes and files are written and closed only by the worker's reader thread.
    """

    via = "warm"

    def __init__(self, worker: Worker, job_id: str, fds: dict[str, int], folder: Path,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.job_id = job_id
        self.pid = worker.pid or 0
        self.generation = worker.generation
        self._fds = dict(fds)  # stdout, stderr, events: write ends, ours
        self._folder = folder
        self._loop = loop
        self._status: asyncio.Future[int] = loop.create_future()
        self._forced: asyncio.TimerHandle | None = None
        self.first_text_at: float | None = None  # monotonic: the job's first output reached us

    async def wait(self) -> int:
        return await asyncio.shield(self._status)

    def cancel(self, reason: str) -> None:
        self.worker.send({"op": "cancel", "id": self.job_id, "reason": reason})

    def force(self) -> None:
        """A forced stop: cancel now, and kill the worker if the job is not gone in a second."""
        self.cancel("canceled")
        if self._forced is None and not self._status.done():
            self._forced = self._loop.call_later(FORCED_KILL_GRACE_S, self._kill_worker)

    def _kill_worker(self) -> None:
        if not self._status.done():
            self.worker.kill(f"job {self.job_id} did not stop when told to")

    # -- the reader thread ----------------------------------------------------------
    def deliver(self, frame: dict[str, Any]) -> bool:
        """Write one frame where the job's own process would have; True once it is done."""
        op, data = frame.get("op"), frame.get("data")
        if op == "out" and isinstance(data, str) and frame.get("stream") in ("stdout", "stderr"):
            if self.first_text_at is None and frame["stream"] == "stdout":
                self.first_text_at = time.monotonic()
            _write_all(self._fds[str(frame["stream"])], data.encode(errors="replace"))
        elif op == "event" and isinstance(frame.get("line"), str) and "\n" not in frame["line"]:
            _write_all(self._fds["events"], (frame["line"] + "\n").encode(errors="replace"))
        elif op == "result" and isinstance(data, str):
            self._result(data, bool(frame.get("replace")))
        elif op == "done":
            status = frame.get("status")
            self.end(status if isinstance(status, int) and not isinstance(status, bool) else 1)
            return True
        return False

    def _result(self, text: str, replace_all: bool) -> None:
        path = self._folder / RESULT_TEXT
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (
            os.O_TRUNC if replace_all else os.O_APPEND)
        fd = os.open(path, flags, 0o644)
        try:
            _write_all(fd, text.encode(errors="replace"))
        finally:
            os.close(fd)

    def end(self, status: int, died: str | None = None) -> None:
        """Close the job's pipes (its EOF) and hand the status to the loop."""
        if died is not None:
            line = json.dumps({"event": "finished", "t": time.time(), "outcome": "failed",
                               "error_code": WORKER_DIED, "error_message": died})
            with contextlib.suppress(OSError):
                _write_all(self._fds["events"], (line + "\n").encode())
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._settle, status)

    def _settle(self, status: int) -> None:
        if self._forced is not None:
            self._forced.cancel()
        if not self._status.done():
            self._status.set_result(status)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _frame(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(len(data)) + data


class Worker:
    """One ``runtimes.warm`` process: started on demand, its wire, and the jobs in it."""

    def __init__(self, key: str, settings: WarmSettings, env: dict[str, str],
                 sandbox: SandboxPolicy | None, cgroup: JobCgroup | None,
                 gpu_devices: list[str] | None = None) -> None:
        self.key = key
        self.gpu_devices = gpu_devices  # its GPU's /dev/nvidiaN (None: as the sandbox binds)
        self.broken_until = 0.0  # after a failed start, jobs take the per-job path a while
        self._stopping = False  # stop() asked it to go: its end is no news
        self.settings = settings
        self.env = env
        self.sandbox = sandbox
        self.cgroup = cgroup
        self.pid: int | None = None
        self.info: dict[str, Any] = {}
        self.jobs: dict[str, WarmJob] = {}
        self.starts = 0
        self.generation = 0  # one per process started: a late reader fails only its own jobs
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._lock = threading.Lock()  # self.jobs, between the loop and the reader thread
        self._start_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self._sock is not None

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    # -- start ------------------------------------------------------------------------
    async def start(self) -> None:
        async with self._start_lock:
            if self.alive:
                return
            self._loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            await self._spawn()
            assert self._ready is not None
            try:
                self.info = await within(asyncio.shield(self._ready),
                                         self.settings.start_timeout_s)
            except (TimeoutError, LaunchError) as exc:
                self.kill("it did not start")
                self.broken_until = time.monotonic() + RETRY_START_AFTER_S
                raise LaunchError(f"the warm model worker ({self.key}) did not start: "
                                  f"{exc or 'timed out'}; see {self._log_path()}") from None
            self.starts += 1
            log.info("warm model worker %s ready in %.2f s (pid %s, model budget %s MiB, "
                     "idle eviction after %s s)", self.key, time.perf_counter() - t0, self.pid,
                     self.info.get("budget_mb"), self.info.get("idle_s"))

    def _log_path(self) -> Path:
        return self.settings.root / f"{self.key}.log"

    async def _spawn(self) -> None:
        assert self._loop is not None
        scratch = self.settings.root / self.key
        (scratch / "cache").mkdir(parents=True, exist_ok=True)
        jobs_dir = scratch / "job"  # the worker's jobs' folder: fresh for each process
        shutil.rmtree(jobs_dir, ignore_errors=True)
        jobs_dir.mkdir(exist_ok=True)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "runtimes.warm", f"fd:{child.fileno()}",
                "0" if self.sandbox else str(os.getpid())]
        env = {**self.env, "HOME": str(scratch), "XDG_CACHE_HOME": str(scratch / "cache"),
               "TRITON_CACHE_DIR": str(scratch / "cache" / "triton"),
               "TORCHINDUCTOR_CACHE_DIR": str(scratch / "cache" / "inductor"),
               "MINER_WARM_BUDGET_MB": str(self.settings.budget_mb),
               "MINER_WARM_IDLE_S": str(self.settings.idle_s),
               "MINER_WARM_JOB_DIR": str(jobs_dir)}
        pass_fds = [child.fileno()]
        cgroup_fd = self.cgroup.open_fd() if self.cgroup is not None else None
        if cgroup_fd is not None:
            env["MINER_CGROUP_FD"] = str(cgroup_fd)
            pass_fds.append(cgroup_fd)
        info_read = info_write = None
        if self.sandbox is not None:
            env["MINER_WARM_SANDBOX"] = "1"
            info_read, info_write = os.pipe()
            pass_fds.append(info_write)
            argv = only_gpus(worker_policy(self.sandbox, scratch).argv(argv), self.gpu_devices)
            argv[1:1] = ["--unshare-net", "--info-fd", str(info_write)]
        self._ready = self._loop.create_future()
        self._stopping = False
        try:
            with open(self._log_path(), "wb") as log_file:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                    pass_fds=pass_fds, start_new_session=True, env=env)
        except OSError as exc:
            parent.close()
            if info_read is not None:
                os.close(info_read)
            raise LaunchError(f"cannot start the warm model worker: {exc}") from exc
        finally:
            for fd in (child.detach(), cgroup_fd, info_write):
                if fd is not None:
                    os.close(fd)
        self.pid = self._proc.pid
        if info_read is not None:  # bubblewrap names the worker's pid (PID 1 inside)
            self.pid = await asyncio.to_thread(_child_pid, info_read) or self.pid
        self._sock = parent
        self._outbox = queue.Queue()
        self.generation += 1
        threading.Thread(target=self._read, args=(parent, self._outbox, self.generation),
                         daemon=True,
                         name=f"warm-{self.key}-read").start()
        threading.Thread(target=self._write, args=(parent, self._outbox), daemon=True,
                         name=f"warm-{self.key}-write").start()

    # -- jobs ---------------------------------------------------------------------------
    async def submit(self, job: Job, fds: dict[str, int], folder: Path) -> WarmJob:
        """Hand ``job`` to the worker (started first if need be); its fds become ours."""
        await self.start()
        order = _frame({"op": "run", "id": job.job_id, "job": job.to_dict()})
        if len(order) > MAX_ORDER_BYTES:
            raise LaunchError(f"the job's payload is over {MAX_ORDER_BYTES >> 20} MiB, more "
                              "than the warm model worker takes", code="invalid_job")
        assert self._loop is not None
        handle = WarmJob(self, job.job_id, fds, folder, self._loop)
        with self._lock:
            if not self.alive:
                raise LaunchError(f"the warm model worker ({self.key}) died just now",
                                  code=WORKER_DIED)
            self.jobs[job.job_id] = handle
        self._outbox.put(order)
        return handle

    def send(self, frame: dict[str, Any]) -> None:
        self._outbox.put(_frame(frame))

    # -- threads --------------------------------------------------------------------------
    @staticmethod
    def _write(sock: socket.socket, outbox: queue.Queue[bytes | None]) -> None:
        try:
            while (data := outbox.get()) is not None:
                sock.sendall(data)
        except OSError:
            pass  # the worker is gone: the reader sees it and fails its jobs
        finally:
            sock.close()  # the descriptor goes once the reader's file is closed too

    def _read(self, sock: socket.socket, outbox: queue.Queue[bytes | None],
              generation: int) -> None:
        reader = sock.makefile("rb")
        why = "its connection closed"
        broken = False
        try:
            while (frame := _read_frame(reader)) is not None:
                self._on_frame(frame)
        except (OSError, ValueError) as exc:
            why, broken = f"its connection broke: {exc}", True
        except Exception as exc:  # a frame nested past the parser's depth, or a bad field:
            why, broken = f"it sent an unusable frame: {exc!r}"[:500], True  # never hang
        finally:
            reader.close()
            outbox.put(None)
            if broken and generation == self.generation:  # its jobs fail below: stop it
                self.kill(why)
            self._gone(generation, why)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "ready":
            self._resolve_ready(frame)
            return
        if op == "note":
            log.info("warm model worker %s: %s", self.key, str(frame.get("message"))[:500])
            return
        with self._lock:
            handle = self.jobs.get(str(frame.get("id")))
        if handle is None:
            return  # a job we no longer follow
        try:
            done = handle.deliver(frame)
        except OSError as exc:  # its pipes or folder: the job loses this piece, not the worker
            log.warning("job %s: cannot write what the warm worker sent: %s", handle.job_id, exc)
            done = op == "done"
            if done:
                handle.end(1)
        if done:
            with self._lock:
                self.jobs.pop(handle.job_id, None)

    def _resolve_ready(self, frame: dict[str, Any]) -> None:
        if self._loop is not None and self._ready is not None:
            ready = self._ready
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_settle, ready, frame, None)

    def _gone(self, generation: int, why: str) -> None:
        """The worker's connection ended: fail what it held; the next job starts a new one."""
        with self._lock:
            jobs = [h for h in self.jobs.values() if h.generation == generation]
            for handle in jobs:
                del self.jobs[handle.job_id]
            if self.generation == generation:
                self._sock = None
        message = (f"the warm model worker ({self.key}) died while running this job ({why}); "
                   f"the next job gets a fresh worker; its log is {self._log_path()}")
        for handle in jobs:
            handle.end(1, died=message)
        if jobs:
            log.error("warm model worker %s died (%s) with %d job(s) in it", self.key, why,
                      len(jobs))
        elif not self._stopping and generation == self.generation:
            log.warning("warm model worker %s exited (%s); the next job starts a fresh one "
                        "(its log: %s)", self.key, why, self._log_path())
        ready = self._ready
        if self._loop is not None and ready is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_settle, ready, None, LaunchError(why))

    # -- stop ---------------------------------------------------------------------------
    def kill(self, why: str) -> None:
        """SIGKILL the worker now; its jobs fail ``worker_died`` (their reader sees EOF)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        log.warning("killing warm model worker %s (pid %s): %s", self.key, self.pid, why)
        for pid in {self.pid, proc.pid}:
            if pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()

    async def stop(self, why: str) -> None:
        """Stop the worker (its models go with it) and wait until it is gone."""
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        if proc.returncode is None:
            log.info("stopping warm model worker %s: %s", self.key, why)
            self._outbox.put(_frame({"op": "stop"}))
            try:
                await within(proc.wait(), 5)
            except TimeoutError:
                self.kill("it did not stop when told to")
                await proc.wait()
        self._outbox.put(None)
        if self.cgroup is not None:
            await self.cgroup.kill_and_wait()
        self._proc = None


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _read_frame(reader: Any) -> dict[str, Any] | None:
    head = reader.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_REPLY_BYTES:
        raise ValueError(f"a {size}-byte frame, over the {MAX_REPLY_BYTES}-byte limit")
    body = reader.read(size)
    if len(body) < size:
        return None
    frame = json.loads(body)
    if not isinstance(frame, dict):
        raise ValueError("a frame that is not a JSON object")
    return frame


def _child_pid(fd: int) -> int | None:
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(1 << 16)
    try:
        return int(json.loads(raw)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def only_gpus(argv: list[str], gpu_devices: list[str] | None) -> list[str]:
    """bubblewrap's ``argv`` without the binds of other GPUs' device nodes."""
    if gpu_devices is None:
        return argv
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--dev-bind" and i + 2 < len(argv) and \
                argv[i + 1][len("/dev/nvidia"):].isdigit() and argv[i + 1] not in gpu_devices:
            i += 3
            continue
        out.append(argv[i])
        i += 1
    return out


def worker_policy(sandbox: SandboxPolicy, scratch: Path) -> SandboxPolicy:
    """The node's sandbox for the worker: no job's folder, its own scratch writable."""
    return replace(sandbox, jobs_root=scratch, work_root=scratch,
                   hidden=(*sandbox.hidden, sandbox.jobs_root, sandbox.work_root))
