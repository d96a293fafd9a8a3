"""One job's process, parent side: start it, watch it, cancel it, classify and package.

This module never imports torch. A :class:`JobRun` owns one job from "start this
job" to a written package: it makes the job's folders, the capture pipes and the
events channel, the job's cgroup and its jail request, asks a launcher for the
process, follows its events, enforces the hard timeout backstop and the output
quota, cancels on request (SIGTERM to the job's leader at once, SIGKILL to the
whole cgroup, or process group without one, after the grace period), and, once
the process is gone, kills whatever is left of the job and waits until nothing
is, classifies the exit and seals the result package, shielded from
cancellation. The package is sealed only when no process of the job exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from agent.clock import Pace, iso, wait_event, within
from agent.errors import CancelReason, LaunchError, Outcome, PackageError
from agent.execution.capture import DEFAULT_MAX_LOG_BYTES, LineTail, StreamCapture, make_pipe
from agent.execution.cgroups import CgroupTree, JobCgroup, Limits
from agent.execution.environment import environment_info, job_environ
from agent.execution.launcher import Launcher, LaunchRequest, ProcessHandle, make_launcher
from agent.execution.outcome import QUOTA_VERDICTS, Verdict, classify, disk_full, signal_name
from agent.execution.package import InlineSeals, PackageInfo, write_package
from agent.execution.prefetch import find_inputs, prefetch
from agent.execution.reclaim import remove_tree, unlock, unlock_folder
from agent.execution.sandbox import SandboxPolicy
from agent.execution.sealwalk import MAX_FILES, has_entries, small_folder
from agent.jobs import Job
from agent.layout import ARTIFACTS_DIR, LOGS_DIR, RESULT_TEXT, STREAMS, job_folder, log_path
from runtimes.registry import resolve_path

log = logging.getLogger(__name__)
# A job's metrics (its metrics events, merged) land in output.json and in the report:
# a job that sends metrics without end would otherwise grow the agent without end.
MAX_METRICS_BYTES = 64 << 10
# Any program a job runs may write to its events channel, and each line is parsed on the
# agent's event loop: one job writing flat out had the loop parse 587k events in 3 s, a
# whole core, slowing every other job's supervision, heartbeats and polls (measured by
# benchmarks/bench_events.py, which compares this pace with none). Each job's
# events are read at this pace (a line costs one event per EVENT_UNIT_BYTES it holds,
# plus one); a job that writes faster waits on its own writes. The runtimes send about
# 4 a second (progress is throttled), and a burst of EVENTS_BURST passes at once.
EVENTS_PER_S = 200.0
EVENTS_BURST = 2000.0
EVENT_UNIT_BYTES = 4096
EVENT_LINE_MAX = 1 << 16  # a longer line is skipped (the runtimes keep theirs under 4000)

LineCallback = Callable[[str, bytes], None]
EventCallback = Callable[[dict[str, Any]], None]


@dataclass
class ExecutorConfig:
    """How jobs are run on this node (a slice of the agent's config)."""

    out_root: Path
    work_root: Path | None = None
    cancel_grace_s: float = 10.0
    timeout_margin_s: float = 0.5
    extra_runtimes: dict[str, str] = field(default_factory=dict)
    contract_env: dict[str, str] = field(default_factory=dict)
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    make_zip: bool = True
    keep_work_dir: bool = False
    allowed_types: frozenset[str] | None = None  # None: every type with a runtime
    sandbox: SandboxPolicy | None = None  # None: jobs run unconfined (sandbox = "off")
    cgroups: CgroupTree | None = None  # None: the process-group kill
    cgroup_note: str = "no cgroup"  # why there is none, for the package
    limits: Limits = field(default_factory=Limits)
    max_output_bytes: int | None = None  # the package's size cap (max_job_output_mb)
    max_work_bytes: int | None = None  # the work folder's size cap (max_job_work_mb)
    max_files: int | None = MAX_FILES  # files the package may hold (max_job_files)
    max_work_files: int | None = None  # entries the work folder may hold (max_job_work_files)
    quota_check_s: float = 0.25
    events_per_s: float | None = EVENTS_PER_S  # None: unpaced (benchmarks compare)
    inline_seals: InlineSeals = field(default_factory=InlineSeals)  # shared by its runs


@dataclass
class JobReport:
    """The outcome of one run and the package that records it."""

    job_id: str
    outcome: Outcome
    error_code: str | None
    error_message: str | None
    partial: bool
    output: dict[str, Any]
    package: PackageInfo | None

    @property
    def folder(self) -> Path | None:
        return self.package.folder if self.package else None


class JobRun:
    """Runs one job in its own process; ``await run()`` returns its :class:`JobReport`."""

    def __init__(self, job: Job, cfg: ExecutorConfig, launcher: Launcher, *,
                 gpu_ids: list[str] | None = None, gpu_names: list[str] | None = None,
                 on_line: LineCallback | None = None, on_event: EventCallback | None = None,
                 environ: dict[str, str] | None = None, created_at: float | None = None,
                 gpu_devices: list[str] | None = None) -> None:
        self.job = job
        self.cfg = cfg
        self.launcher = launcher
        self.gpu_ids = gpu_ids
        self.gpu_names = gpu_names or []
        self.gpu_devices = gpu_devices
        self.cgroup: JobCgroup | None = None
        self.on_line = on_line
        self.on_event = on_event
        self.environ = dict(os.environ if environ is None else environ)
        self.folder = job_folder(cfg.out_root, job.job_id)
        self.work_dir = (cfg.work_root or cfg.out_root / ".work") / job.job_id
        self.times: dict[str, float | None] = {"created": created_at or time.time(),
                                               "requested": None, "started": None,
                                               "first_progress": None, "finished": None}
        self.cancel_times: dict[str, float | None] = {}
        # Durations (billed as gpu_seconds) come from the monotonic clock: a wall clock set
        # back mid-job once billed -3,588 s. Wall times above are timestamps only.
        self.mono: dict[str, float | None] = {
            "created": time.monotonic() - max(0.0, time.time() - created_at)
            if created_at else time.monotonic()}
        self.cancel_reason: CancelReason | None = None
        self.forced_kill = False
        self._small: bool | None = None  # the package is tiny (small_folder), once known
        self.progress: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self._metrics_full = False  # past MAX_METRICS_BYTES: later metrics are dropped
        self._subscriber_failed = False  # on_event raised once (logged once)
        self.events_seen: dict[str, Any] = {}
        self.handle: ProcessHandle | None = None
        self.captures: dict[str, StreamCapture] = {}
        self._captured: dict[str, asyncio.Event] = {}  # set once a stream's pipe has closed
        self._tails: dict[str, LineTail] = {}
        self._tail_pending: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kill_task: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()

    # -- public -------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle else None

    def log_size(self, stream: str) -> int:
        capture = self.captures.get(stream)
        return capture.size if capture else 0

    def cancel(self, reason: CancelReason = CancelReason.REQUESTED) -> None:
        """Ask the job to stop now: SIGTERM at once, SIGKILL to its group after the grace."""
        if self.cancel_reason is not None or self._exited.is_set():
            return
        self.cancel_reason = reason
        self.cancel_times["requested"] = time.time()
        self.mono["cancel_requested"] = time.monotonic()
        log.info("job %s: cancel requested (%s)", self.job.job_id, reason.value)
        if self.handle is not None:
            self._signal_cancel()

    def kill_now(self) -> None:
        """Skip the grace period (a second Ctrl-C, a second SIGTERM)."""
        if self.cancel_reason is None:
            self.cancel(CancelReason.REQUESTED)
        if self.handle is not None and not self._exited.is_set():
            self.forced_kill = True
            self._kill_group(signal.SIGKILL)

    async def run(self) -> JobReport:
        self._loop = asyncio.get_running_loop()
        try:
            runtime = self._runtime_path()
            self._prepare_dirs()
        except (PackageError, LaunchError) as exc:
            return await self._report_without_process(exc.code, exc.message)
        status, timed_out_task = await self._run_process(runtime)
        return await asyncio.shield(self._finish(status, timed_out_task))

    # -- start ----------------------------------------------------------------------
    def _runtime_path(self) -> str:
        return runtime_for(self.job.type, self.cfg.extra_runtimes, self.cfg.allowed_types)

    def _prepare_dirs(self) -> None:
        if self.folder.exists():
            raise PackageError(f"{self.folder} already exists: a job id runs once per "
                               f"output folder (remove it or choose another --out)")
        self.folder.mkdir(parents=True)
        (self.folder / LOGS_DIR).mkdir()
        (self.folder / ARTIFACTS_DIR).mkdir()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.sandbox is not None:
            (self.work_dir / ".home").mkdir(exist_ok=True)

    def _contract_env(self) -> dict[str, str]:
        # Compile caches are the job's own, never shared with the next job (a compile
        # cache is code) and never in an unwritable HOME (torch.compile would go eager).
        cache = self.work_dir / ".cache"
        private = {"TRITON_CACHE_DIR": str(cache / "triton"),
                   "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
        if self.cfg.sandbox is not None:  # the node's home is read-only in the sandbox
            private.update(HOME=str(self.work_dir / ".home"), XDG_CACHE_HOME=str(cache))
        return {**self.cfg.contract_env, **private, "MINER_JOB_ID": self.job.job_id,
                "MINER_JOB_CACHE_DIR": str(self.work_dir / ".cache"),
                "MINER_PACKAGE_DIR": str(self.folder), "MINER_WORK_DIR": str(self.work_dir),
                "MINER_ARTIFACTS_DIR": str(self.folder / "artifacts"),
                "MINER_RESULT_FILE": str(self.folder / "result.txt")}

    async def _prefetch(self) -> None:
        """In the sandbox the shared cache is read-only: fetch the job's inputs now, outside."""
        cache = self.cfg.contract_env.get("MINER_CACHE_DIR")
        if self.cfg.sandbox is None or not cache or not find_inputs(self.job.payload):
            return
        max_bytes = int(self.cfg.contract_env.get("MINER_CACHE_MAX_BYTES") or 50 << 30)
        result = await asyncio.to_thread(prefetch, self.job.payload, Path(cache), max_bytes,
                                         cancelled=lambda: self.cancel_reason is not None)
        for message in result.errors:  # the job tries again in its own cache dir and says
            log.warning("job %s: prefetch: %s", self.job.job_id, message)

    async def _run_process(self, runtime: str) -> tuple[int | None, bool]:
        await self._prefetch()
        self.times["requested"] = time.time()
        self.mono["requested"] = time.monotonic()
        spec = {"job": self.job.to_dict(), "package_dir": str(self.folder),
                "work_dir": str(self.work_dir), "runtime": runtime, "parent_pid": os.getpid(),
                "t_request": self.times["requested"]}
        env = job_environ(self.environ, self._contract_env(), self.gpu_ids,
                          self.job.payload.get("env"))
        fds = self._open_channels()
        jail = None
        if self.cfg.sandbox is not None:
            jail = self.cfg.sandbox.jail(self.folder, self.work_dir, self.job.type,
                                         self.gpu_devices)
        cgroup_fd = self._make_cgroup()
        request = LaunchRequest(self.work_dir / ".miner-job.json", spec, self.work_dir, env,
                                fds["stdout"], fds["stderr"], fds["events"], jail=jail,
                                cgroup_fd=cgroup_fd)
        try:
            self.handle = await self.launcher.launch(request)
        except LaunchError as exc:
            self._close_child_ends(fds)
            if cgroup_fd is not None:
                os.close(cgroup_fd)
            self._exited.set()
            self.events_seen["launch_error"] = exc.message
            return None, False
        self._close_child_ends(fds)
        if cgroup_fd is not None:
            os.close(cgroup_fd)
        log.info("job %s: started pid %d via %s", self.job.job_id, self.handle.pid,
                 self.handle.via)
        if self.cancel_reason is not None:
            self._signal_cancel()
        return await self._supervise()

    def _make_cgroup(self) -> int | None:
        """The job's cgroup, and the directory descriptor its first process joins by."""
        if self.cfg.cgroups is None:
            return None
        try:
            self.cgroup = self.cfg.cgroups.create(self.job.job_id, self.cfg.limits)
            return self.cgroup.open_fd()
        except OSError as exc:
            log.warning("job %s: no cgroup of its own (%s); the process-group kill applies",
                        self.job.job_id, exc.strerror or exc)
            self.cgroup = None
            return None

    def _open_channels(self) -> dict[str, int]:
        child_ends: dict[str, int] = {}
        for stream in STREAMS:
            read_fd, write_fd = make_pipe()
            child_ends[stream] = write_fd
            self._captured[stream] = ended = asyncio.Event()
            capture = StreamCapture(stream, read_fd, log_path(self.folder, stream),
                                    self._on_data if self.on_line else None,
                                    self.cfg.max_log_bytes, partial(self._from_hub, ended.set))
            self.captures[stream] = capture
            self._tails[stream] = LineTail(capture.path)
            capture.start()
        events_read, events_write = os.pipe()
        child_ends["events"] = events_write
        self._events_read = events_read
        return child_ends

    @staticmethod
    def _close_child_ends(fds: dict[str, int]) -> None:
        for fd in fds.values():
            os.close(fd)

    # -- watch ----------------------------------------------------------------------
    async def _supervise(self) -> tuple[int | None, bool]:
        assert self.handle is not None
        events_task = asyncio.create_task(self._read_events())
        timeout_task = asyncio.create_task(self._timeout_backstop())
        quota_task = asyncio.create_task(self._quota_watch())
        try:
            status = await self.handle.wait()
        finally:
            self._exited.set()
            timeout_task.cancel()
            quota_task.cancel()
        self.times["finished"] = time.time()
        self.mono["finished"] = time.monotonic()
        if self.cancel_reason is not None:
            self.cancel_times["exited"] = self.times["finished"]
        if self._kill_task is not None:
            self._kill_task.cancel()
        # Stragglers still in the job's process group die now; a setsid grandchild that
        # left it is the cgroup's (or the PID namespace's) to end.
        self._kill_group(signal.SIGKILL, quiet=True, leader_gone=True)
        if self.cgroup is not None and not await self.cgroup.kill_and_wait():
            log.error("job %s: processes are still left in %s after cgroup.kill",
                      self.job.job_id, self.cgroup.path)
        with contextlib.suppress(asyncio.TimeoutError):
            await within(events_task, 5)
        if not events_task.done():
            events_task.cancel()
        timed_out = self.cancel_reason is CancelReason.TIMEOUT
        return status, timeout_task.cancelled() is False and timed_out

    async def _read_events(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=EVENT_LINE_MAX, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
            os.fdopen(self._events_read, "rb", buffering=0))
        rate = self.cfg.events_per_s
        pace = Pace(rate, EVENTS_BURST) if rate else None
        try:
            while True:
                try:
                    line = await reader.readline()
                    size = len(line)
                except ValueError:  # an over-long line: skip it, keep the channel
                    size = EVENT_LINE_MAX
                else:
                    if not line:
                        return
                    self._handle_event(line)
                # Paced while the job runs; what is left when it has exited is bounded
                # (the pipe's and the reader's buffers) and read at once.
                wait = pace.take(1 + size // EVENT_UNIT_BYTES) if pace else 0.0
                if wait > 0 and not self._exited.is_set():
                    await wait_event(self._exited, wait)
        finally:
            transport.close()

    def _span_ms(self, since: str, until: str) -> float | None:
        start, end = self.mono.get(since), self.mono.get(until)
        return (end - start) * 1000 if start is not None and end is not None else None

    def _job_monotonic(self, reported: Any) -> float:
        """The job's own monotonic reading (the same clock, system-wide) when plausible."""
        now = time.monotonic()
        requested = self.mono.get("requested") or now
        if isinstance(reported, (int, float)) and requested - 1 <= reported <= now:
            return float(reported)
        return now

    def _handle_event(self, line: bytes) -> None:
        try:  # NaN and Infinity, which JSON lacks (a diverged loss), arrive as null
            event = _EVENTS_JSON.decode(line.decode())
        except ValueError:  # UnicodeDecodeError too
            return
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            return
        kind = event["event"]
        if kind == "started":
            self.times["started"] = time.time()
            self.mono["started"] = self._job_monotonic(event.get("mono"))
        elif kind == "progress":
            if not self.progress:
                self.times["first_progress"] = time.time()
                self.mono["first_progress"] = time.monotonic()
            self.progress = progress_fields(event)
            event = {"event": kind, **self.progress}  # subscribers see it as checked
        elif kind in ("metrics", "finished") and isinstance(event.get("metrics"), dict):
            self._merge_metrics(event["metrics"])
        if kind in ("finished", "partial", "error", "device", "cancel_seen"):
            self.events_seen[kind] = event
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a subscriber's bug never ends the run
                if not self._subscriber_failed:
                    self._subscriber_failed = True
                    log.exception("job %s: an event subscriber failed; the job goes on",
                                  self.job.job_id)

    def _merge_metrics(self, metrics: dict[str, Any]) -> None:
        """Take a metrics event's fields while all of them stay under MAX_METRICS_BYTES."""
        if self._metrics_full:
            return
        merged = {**self.metrics, **metrics}
        if len(json.dumps(merged)) <= MAX_METRICS_BYTES:
            self.metrics = merged
            return
        self._metrics_full = True
        self.metrics["truncated"] = True
        log.warning("job %s: its metrics passed %d bytes; the rest it sends are dropped",
                    self.job.job_id, MAX_METRICS_BYTES)

    async def _timeout_backstop(self) -> None:
        await asyncio.sleep(self.job.constraints.timeout_s + self.cfg.timeout_margin_s)
        if not self._exited.is_set():
            log.warning("job %s: past its timeout of %.1f s", self.job.job_id,
                        self.job.constraints.timeout_s)
            self.cancel(CancelReason.TIMEOUT)

    async def _quota_watch(self) -> None:
        """Kill the job once its package folder holds more than ``max_output_bytes`` or
        ``max_files`` files, or its work folder (scratch, HOME, caches) more than
        ``max_work_bytes`` or ``max_work_files`` files: a flood of empty files there
        would use up the inodes of the disk the journal and every package live on.

        At once, not after the cancel's grace: a job past its quota would only write
        more. The walks' own cost sets the pace (at most ~5 % of one core).
        """
        cfg = self.cfg
        quotas = ((self.folder, cfg.max_output_bytes, cfg.max_files,
                   CancelReason.OUTPUT_TOO_LARGE, CancelReason.TOO_MANY_FILES),
                  (self.work_dir, cfg.max_work_bytes, cfg.max_work_files,
                   CancelReason.WORK_TOO_LARGE, CancelReason.WORK_TOO_MANY_FILES))
        watched = [quota for quota in quotas if quota[1] or quota[2]]
        interval = cfg.quota_check_s
        while watched and not self._exited.is_set():
            await asyncio.sleep(interval)
            t0 = time.perf_counter()
            for folder, max_bytes, max_files, too_large, too_many in watched:
                size, files = await asyncio.to_thread(folder_usage, folder, max_bytes,
                                                      max_files)
                if max_bytes and size > max_bytes:
                    reason = too_large
                elif max_files and files > max_files:
                    reason = too_many
                else:
                    continue
                if not self._exited.is_set():
                    log.warning("job %s: killing it: %s", self.job.job_id,
                                QUOTA_VERDICTS[reason].error_message)
                    self.cancel(reason)
                    self.kill_now()
                return
            interval = max(cfg.quota_check_s, 20 * (time.perf_counter() - t0))

    # -- cancel and kill ----------------------------------------------------------------
    def _signal_cancel(self) -> None:
        assert self.handle is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.handle.pid, signal.SIGTERM)
        self.cancel_times["signalled"] = time.time()
        self._kill_task = asyncio.get_running_loop().create_task(self._kill_after_grace())

    async def _kill_after_grace(self) -> None:
        await asyncio.sleep(self.cfg.cancel_grace_s)
        if not self._exited.is_set():
            log.warning("job %s: still running %.1f s after SIGTERM; killing its process group",
                        self.job.job_id, self.cfg.cancel_grace_s)
            self.forced_kill = True
            self._kill_group(signal.SIGKILL)

    def _kill_group(self, sig: int, quiet: bool = False, leader_gone: bool = False) -> None:
        """Signal the job's whole process group, and any descendant that left it.

        Once the leader is reaped its pid may be another process's: its descendants
        are no longer looked up (an orphan is not the pid's child any more anyway),
        which also spares a scan of /proc at the end of every job. Nor is the cgroup
        killed then: ``kill_and_wait`` comes next, and kills only a cgroup that is not
        empty (a write to ``cgroup.kill`` every job otherwise).
        """
        if self.handle is None:
            return
        if sig == signal.SIGKILL and self.cgroup is not None and not leader_gone:
            self.cgroup.kill()
        pid = self.handle.pid
        descendants: list[psutil.Process] = []
        if not leader_gone:
            with contextlib.suppress(psutil.Error):
                descendants = psutil.Process(pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        for proc in descendants:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        if not quiet:
            log.info("job %s: sent %s to process group %d", self.job.job_id,
                     signal_name(sig), pid)

    # -- lines for subscribers -------------------------------------------------------
    def _from_hub(self, callback: Callable[[], object]) -> None:
        """Called from the capture hub's thread: run ``callback`` on the loop."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(callback)

    def _on_data(self, stream: str, _size: int) -> None:
        """Called from a capture thread: schedule one tail read on the loop."""
        if stream in self._tail_pending or self._loop is None:
            return
        self._tail_pending.add(stream)
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._deliver_lines, stream)

    def _deliver_lines(self, stream: str, final: bool = False) -> None:
        self._tail_pending.discard(stream)
        if self.on_line is None:
            return
        tail = self._tails[stream]
        lines = tail.read_lines(upto=self.captures[stream].size)  # what the agent wrote
        if final:
            lines += tail.flush()
        for line in lines:
            self.on_line(stream, line)

    # -- finish -----------------------------------------------------------------------
    async def _finish(self, status: int | None, _timed_out: bool) -> JobReport:
        for stream, capture in self.captures.items():
            if not await wait_event(self._captured[stream], 10):
                log.error("job %s: %s capture did not end; a process outside the group "
                          "holds the pipe", self.job.job_id, capture.name)
        for stream in self.captures:
            self._deliver_lines(stream, final=True)
        # The job is gone: a package top it locked is opened back up for what reads it
        # next (its result text, the partial check, the seal).
        with contextlib.suppress(OSError):
            unlock_folder(self.folder)
        last_error = self.events_seen.get("error")
        if status is None:
            verdict = Verdict(Outcome.FAILED, "launch_failed",
                              str(self.events_seen.get("launch_error", "launch failed")))
        else:
            verdict = await self._out_of_room(classify(
                status, self.events_seen.get("finished"), self.cancel_reason, last_error))
            verdict = await self._past_quota(verdict)
        return await self._package(verdict, status)

    async def _past_quota(self, verdict: Verdict) -> Verdict:
        """A job that completed with more in its package than its quota fails: more
        entries than the seal takes, or more bytes (the quota's walk may not have come
        round yet: a sparse file of any size takes a job a millisecond). The package
        holds only the first entries, and the files that fit."""
        cap, max_bytes = self.cfg.max_files, self.cfg.max_output_bytes
        if verdict.outcome is not Outcome.COMPLETED or not (cap or max_bytes):
            return verdict
        if (not cap or cap >= 32) and (not max_bytes or max_bytes >= 256 << 10):
            # A tiny package: no thread hop (and the seal need not look again)
            self._small = small_folder(self.folder)
            if self._small:
                return verdict
        size, files = await asyncio.to_thread(folder_usage, self.folder, max_bytes, cap)
        if max_bytes and size > max_bytes:
            verdict = QUOTA_VERDICTS[CancelReason.OUTPUT_TOO_LARGE]
        elif cap and files > cap:
            verdict = QUOTA_VERDICTS[CancelReason.TOO_MANY_FILES]
        else:
            return verdict
        log.error("job %s: %s", self.job.job_id, verdict.error_message)
        return verdict

    async def _out_of_room(self, verdict: Verdict) -> Verdict:
        """A run that filled the disk fails with ``disk_full``. Its scratch goes first, so
        that the package, logs included, has room to be written."""
        try:
            free: int | None = shutil.disk_usage(self.folder).free
        except OSError:
            free = None
        full = disk_full(verdict, self.cancel_reason, free,
                         any(c.disk_full for c in self.captures.values()))
        if full is not verdict:
            log.error("job %s: %s", self.job.job_id, full.error_message)
            if not self.cfg.keep_work_dir:
                await asyncio.to_thread(remove_tree, self.work_dir)
        return full

    def _partial(self, verdict: Verdict) -> bool:
        if verdict.outcome == Outcome.COMPLETED:
            return False
        fin = self.events_seen.get("finished") or {}
        if fin.get("partial") or "partial" in self.events_seen:
            return True
        result = self.folder / RESULT_TEXT
        has_result = result.is_file() and result.stat().st_size > 0
        return has_result or has_entries(self.folder / ARTIFACTS_DIR)

    def build_output(self, verdict: Verdict, status: int | None) -> dict[str, Any]:
        progress = dict(self.progress)
        progress.pop("t", None)
        if verdict.outcome == Outcome.COMPLETED:
            progress["fraction"] = 1.0
        started, finished = self.times["started"], self.times["finished"]
        metrics = dict(self.metrics)
        # Ours, not the runtime's: the bill must not depend on what the job reports.
        for name, since, until, digits in (("duration_ms", "started", "finished", 1),
                                           ("start_latency_ms", "requested", "started", 2),
                                           ("first_progress_ms", "created", "first_progress",
                                            2)):
            span = self._span_ms(since, until)
            if span is not None:
                metrics[name] = round(span, digits)
        return {
            "job_id": self.job.job_id, "type": self.job.type, "status": verdict.outcome.value,
            "partial": self._partial(verdict),
            "created_at": iso(self.times["created"]), "started_at": iso(started),
            "finished_at": iso(finished), "progress": progress, "metrics": metrics,
            "exit": {"code": status if status is not None and status >= 0 else None,
                     "signal": signal_name(-status) if status is not None and status < 0
                     else None,
                     "via": self.handle.via if self.handle else None},
            "error": ({"code": verdict.error_code, "message": verdict.error_message}
                      if verdict.error_code else None),
            "cancel": self._cancel_block(),
            "environment": {**environment_info(self.gpu_names),
                            "cuda_visible_devices": self.gpu_ids,
                            "device": self._device_summary(),
                            "isolation": self._isolation()},
            "logs": {s: {"bytes": c.size, "dropped_bytes": c.dropped}
                     for s, c in self.captures.items()},
        }

    def _device_summary(self) -> dict[str, Any] | None:
        """What the runtime said of its device (its ``device`` event, flat fields)."""
        event = self.events_seen.get("device")
        if not isinstance(event, dict):
            return None
        summary = event.get("summary")  # older runtimes nested it
        fields = summary if isinstance(summary, dict) else event
        return {k: v for k, v in fields.items() if k not in ("event", "t")}

    def _isolation(self) -> dict[str, Any]:
        """How this job was confined: the package says, so a reader need not guess."""
        sandbox = self.cfg.sandbox
        cgroup = self.cgroup
        return {"sandbox": "bwrap" if sandbox is not None else "off",
                "network": sandbox.network_for(self.job.type) if sandbox is not None else True,
                "cgroup": cgroup.path.name if cgroup is not None else None,
                "kill": "cgroup.kill" if cgroup is not None else (
                    "pid namespace and process group" if sandbox is not None
                    else "process group"),
                "cgroup_note": None if cgroup is not None else self.cfg.cgroup_note,
                "limits": dict(cgroup.applied) if cgroup is not None else {}}

    def _cancel_block(self) -> dict[str, Any] | None:
        if self.cancel_reason is None:
            return None
        t = self.cancel_times
        exited, requested = self.mono.get("finished"), self.mono.get("cancel_requested")
        latency = (exited - requested) * 1000 \
            if exited is not None and requested is not None else None
        return {"reason": self.cancel_reason.recorded, "requested_at": iso(t.get("requested")),
                "signalled_at": iso(t.get("signalled")), "exited_at": iso(t.get("exited")),
                "packaged_at": None, "forced_kill": self.forced_kill,
                "latency_ms": round(latency, 1) if latency is not None else None}

    async def _package(self, verdict: Verdict, status: int | None) -> JobReport:
        output = self.build_output(verdict, status)
        if output["cancel"] is not None:
            # The package is written once; "packaged" is when that write begins.
            output["cancel"]["packaged_at"] = iso(time.time())
        if self.cfg.inline_seals.allowed(self.folder, self._small):
            began = time.perf_counter()
            info = self._seal_and_clean(output, scratch_tree=False)
            self.cfg.inline_seals.took(time.perf_counter() - began)
            if not self.cfg.keep_work_dir and self.work_dir.exists():
                # A tiny package says nothing of the scratch: a tree there (a model cache,
                # or a million files) is removed in a thread, never on the loop.
                await asyncio.to_thread(remove_scratch, self.work_dir)
        else:
            info = await asyncio.to_thread(self._seal_and_clean, output)
        if info is not None:
            output = info.output
        log.info("job %s: %s%s", self.job.job_id, verdict.outcome.value,
                 f" ({verdict.error_code})" if verdict.error_code else "")
        return JobReport(self.job.job_id, verdict.outcome, verdict.error_code,
                         verdict.error_message, bool(output["partial"]), output, info)

    def _seal_and_clean(self, output: dict[str, Any],
                        scratch_tree: bool = True) -> PackageInfo | None:
        """Seal the package, then drop the job's cgroup and scratch: one thread hop, or
        none for a tiny package (:class:`InlineSeals`; then, without ``scratch_tree``,
        only an empty scratch goes)."""
        info = self._seal(output)
        if self.cgroup is not None:
            self.cgroup.remove()
        if not self.cfg.keep_work_dir:
            remove_scratch(self.work_dir, tree=scratch_tree)
        return info

    def _seal(self, output: dict[str, Any]) -> PackageInfo | None:
        return seal_unlocking(self.folder, output, self.cfg.make_zip, self.cfg.max_files,
                              self.cfg.max_output_bytes)

    async def _report_without_process(self, code: str, message: str) -> JobReport:
        """A job refused before its process exists still leaves a package."""
        if not self.folder.exists():
            (self.folder / LOGS_DIR).mkdir(parents=True)
            (self.folder / ARTIFACTS_DIR).mkdir()
            for stream in STREAMS:
                log_path(self.folder, stream).touch()
        elif code == "package_error":  # the folder is someone else's: never touch it
            return JobReport(self.job.job_id, Outcome.FAILED, code, message, False, {}, None)
        verdict = Verdict(Outcome.FAILED, code, message)
        return await self._package(verdict, None)


def runtime_for(job_type: str, extra: Mapping[str, str],
                allowed: Collection[str] | None) -> str:
    """The runtime's import path for ``job_type``, or the LaunchError that refuses it.

    One check for the daemon (before any device is reserved) and for the executor.
    """
    path = resolve_path(job_type, extra)
    if path is None:
        raise LaunchError(f"no runtime on this node handles payload type {job_type!r}",
                          code="unsupported_job_type")
    if allowed is not None and job_type not in allowed:
        raise LaunchError(
            f"payload type {job_type!r} is not allowed on this node; the operator allows "
            f"{', '.join(sorted(allowed)) or 'none'} (config field allowed_job_types, "
            "MINER_AGENT_ALLOWED_JOB_TYPES)", code="job_type_not_allowed")
    return path


def _no_constant(_name: str) -> None:
    return None


def _finite_or_none(text: str) -> float | None:
    value = float(text)  # 1e999 is inf
    return value if math.isfinite(value) else None


def seal_unlocking(folder: Path, output: dict[str, Any], make_zip: bool = True,
                   max_files: int | None = MAX_FILES,
                   max_bytes: int | None = None) -> PackageInfo | None:
    """``write_package``, and once more after :func:`unlock` where the job locked its
    package's top (a locked folder inside is skipped, listed as unreadable); None, with
    the reason logged, when it cannot be sealed."""
    for retry in (True, False):
        try:
            return write_package(folder, output, make_zip, max_files, max_bytes)
        except PermissionError as exc:
            if retry:
                log.warning("%s: the job locked its package folder (%s); unlocking it",
                            folder.name, exc)
                unlock(folder)
                continue
            log.error("%s: packaging failed: %s", folder.name, exc)
        except (OSError, PackageError) as exc:
            log.error("%s: packaging failed: %s", folder.name, exc)
            break
    return None


# One decoder for every job's events (json.loads with hooks builds one per call).
_EVENTS_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_or_none)


def progress_fields(event: dict[str, Any]) -> dict[str, Any]:
    """A progress event's fields as output.json, the coordinator and the console read
    them: ``fraction`` a number clamped to 0..1, ``eta_s`` a number of at least 0,
    ``stage`` and ``message`` strings, ``metrics`` an object. A field of another type
    is dropped (the job's events are strangers' JSON); other fields are kept as sent."""
    fields = {k: v for k, v in event.items() if k != "event"}
    for name in ("fraction", "eta_s"):
        value = fields.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            del fields[name]
        elif name == "fraction":
            fields[name] = min(1.0, max(0.0, float(value)))
        else:
            fields[name] = max(0.0, float(value))
    for name, kind in (("stage", str), ("message", str), ("metrics", dict)):
        if name in fields and not isinstance(fields[name], kind):
            del fields[name]
    return fields


def remove_scratch(work_dir: Path, tree: bool = True) -> None:
    """Remove a job's scratch folder: two rmdirs where the job left it empty (most do),
    else, with ``tree``, the whole tree (``rmtree`` never follows a link the job left)."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(work_dir / ".home")
        os.rmdir(work_dir)
    except FileNotFoundError:
        pass
    except OSError:
        if tree:
            remove_tree(work_dir)


def folder_usage(folder: Path, stop_bytes: int | None = None,
                 stop_entries: int | None = None) -> tuple[int, int]:
    """Bytes of the regular files under ``folder`` (no links followed), and how many
    entries of any kind it holds; the walk stops early once either passes its cap.

    A folder the job locked (mode 000, or 600: listed, not entered) would hide what it
    holds from the quota: where a read is refused, the folder is unlocked (the agent's
    user owns it) and read again."""
    total = count = 0
    stack = [folder]
    while stack:
        try:
            path = stack.pop()
            try:
                listing = os.scandir(path)
            except PermissionError:  # mode 000
                unlock_folder(path)
                listing = os.scandir(path)
            with listing as entries:
                for entry in entries:
                    count += 1
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += _size_unlocking(entry, path)
                    except OSError:
                        continue
                    if (stop_bytes and total > stop_bytes) or \
                            (stop_entries and count > stop_entries):
                        return total, count  # within a folder of a million too
        except OSError:
            continue
    return total, count


def _size_unlocking(entry: os.DirEntry[str], folder: Path) -> int:
    try:
        return entry.stat(follow_symlinks=False).st_size
    except PermissionError:  # in a folder listed, not entered
        unlock_folder(folder)
        return entry.stat(follow_symlinks=False).st_size


def run_job_sync(job: Job, out_root: Path, launcher: str = "spawn", **kwargs: Any) -> JobReport:
    """Blocking helper for scripts and tests: run ``job`` and return its report."""
    cfg_keys = {"cancel_grace_s", "contract_env", "extra_runtimes", "make_zip"}
    cfg = ExecutorConfig(Path(out_root), **{k: kwargs.pop(k) for k in list(kwargs)
                                            if k in cfg_keys})

    async def main() -> JobReport:
        chosen = make_launcher(launcher)  # type: ignore[arg-type]
        try:
            return await JobRun(job, cfg, chosen, **kwargs).run()
        finally:
            await chosen.close()

    return asyncio.run(main())
