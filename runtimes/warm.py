"""The warm model worker: built-in inference in a long-lived process that keeps models loaded.

Started by the agent (``agent.execution.warm``) as ``python -m runtimes.warm fd:N PARENT``,
one per GPU (one for a CPU-only node's slots), in its own sandbox and cgroup. It runs
only :mod:`runtimes.inference`'s code over payload data and never sees a job's folder:
orders come in over a socket and everything a job produces goes back over it; the
agent writes the job's package, so a client sees the same package as from a job's
own process.

Wire: frames of a 4-byte big-endian length and a UTF-8 JSON object.

- agent -> worker: ``{"op": "run", "id": ID, "job": {job_id, payload, constraints}}``,
  ``{"op": "cancel", "id": ID, "reason": R}``, ``{"op": "evict"}``, ``{"op": "stop"}``.
- worker -> agent: ``{"op": "ready", "pid": N, "preload_s": S, "budget_mb": M}``;
  per job ``{"op": "out", "id", "stream": "stdout"|"stderr", "data"}``,
  ``{"op": "result", "id", "data", "replace": bool}`` (result.txt),
  ``{"op": "event", "id", "line"}`` (one events-channel line, as a job's own process
  writes it) and last ``{"op": "done", "id", "status"}`` (the exit code a job's own
  process would have); ``{"op": "note", "message"}`` for the agent's log.

Jobs run one at a time, in order, on one thread; a cancel sets the job's flag, which
the generation loop checks at every token. Models stay loaded (:mod:`runtimes.modelcache`);
the least recently used go when a new one would not fit the memory budget
(``MINER_WARM_BUDGET_MB``, 0: derived from the device) and any left unused for
``MINER_WARM_IDLE_S``. After a CUDA error (not an out-of-memory) the worker exits once
that job is answered: its context cannot be trusted, and the agent starts a fresh one.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import queue
import resource
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from runtimes import host
from runtimes.base import EVENT_LINE_MAX, EventChannel, JobCancelled, JobContext, JobFailed, _shrink
from runtimes.modelcache import ModelCache, default_budget_bytes

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 << 20  # a run order carries the payload (the agent caps answers at 16 MiB)
PRELOAD = ("torch", "transformers", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "transformers.generation",
           "runtimes.device", "runtimes.inference")
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


# -- the wire -----------------------------------------------------------------------

class Wire:
    """Length-prefixed JSON frames on one socket; sends from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._lock = threading.Lock()

    def send(self, frame: dict[str, Any]) -> None:
        data = json.dumps(frame, separators=(",", ":"), default=str).encode()
        with self._lock:
            self._sock.sendall(HEADER.pack(len(data)) + data)

    def receive(self) -> dict[str, Any] | None:
        """The next frame; None once the agent closed its end."""
        head = self._reader.read(HEADER.size)
        if len(head) < HEADER.size:
            return None
        (size,) = HEADER.unpack(head)
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"a frame of {size} bytes is over the {MAX_FRAME_BYTES} limit")
        body = self._reader.read(size)
        if len(body) < size:
            return None
        frame = json.loads(body)
        if not isinstance(frame, dict):
            raise ValueError("a frame must be a JSON object")
        return frame


class FrameChannel(EventChannel):
    """One job's events channel: each event line goes to the agent as a frame."""

    def __init__(self, wire: Wire, job_id: str) -> None:
        super().__init__(None)
        self._wire = wire
        self._job_id = job_id

    def send(self, event: str, **fields: Any) -> None:
        fields["event"] = event
        fields.setdefault("t", time.time())
        line = json.dumps(fields, separators=(",", ":"), default=str)
        if len(line) > EVENT_LINE_MAX:
            line = _shrink(fields)
        try:
            self._wire.send({"op": "event", "id": self._job_id, "line": line})
        except OSError:
            pass  # the agent is gone; the worker ends at its next read


class WarmContext(JobContext):
    """A job's context in the worker: the result text goes to the agent, not to a file."""

    def __init__(self, job: dict[str, Any], scratch: Path, wire: Wire,
                 deadline: float | None) -> None:
        super().__init__(job, scratch, scratch, FrameChannel(wire, job["job_id"]), deadline)
        self._wire = wire

    def append_result(self, text: str) -> None:
        self._wire.send({"op": "result", "id": self.job_id, "data": text, "replace": False})

    def write_result(self, text: str) -> None:
        self._wire.send({"op": "result", "id": self.job_id, "data": text, "replace": True})

    def write_artifact(self, name: str, data: bytes | str) -> Path:
        raise JobFailed("invalid_job", "the warm model worker keeps no artifacts")


class RoutedStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr``: what the job's thread prints goes to that job's log."""

    def __init__(self, name: str, fallback: Any, wire: Wire) -> None:
        self._name, self._fallback, self._wire = name, fallback, wire
        self._local = threading.local()

    def bind(self, job_id: str | None) -> None:
        self._local.job = job_id

    def write(self, text: str) -> int:
        job = getattr(self._local, "job", None)
        if job is None:
            return int(self._fallback.write(text))
        if text:
            self._wire.send({"op": "out", "id": job, "stream": self._name, "data": text})
        return len(text)

    def flush(self) -> None:
        if getattr(self._local, "job", None) is None:
            self._fallback.flush()

    def writable(self) -> bool:
        return True


# -- the worker -----------------------------------------------------------------------

class Worker:
    """Serves run orders one at a time on its job thread; the main thread reads the wire."""

    def __init__(self, wire: Wire, cache: ModelCache, scratch: Path,
                 streams: tuple[RoutedStream, RoutedStream]) -> None:
        self.wire = wire
        self.cache = cache
        self.scratch = scratch
        self.streams = streams
        self.orders: queue.Queue[dict[str, Any]] = queue.Queue()
        self.current: WarmContext | None = None
        self.queued: set[str] = set()  # run orders not yet begun
        self.dropped: set[str] = set()  # queued ones a cancel already answered
        self.broken: str | None = None  # a CUDA error poisons the context: start afresh
        self._lock = threading.Lock()

    # -- the main thread ------------------------------------------------------------
    def dispatch(self, frame: dict[str, Any]) -> bool:
        """Act on one frame from the agent; False on ``stop``."""
        op = frame.get("op")
        if op == "run":
            with self._lock:
                self.queued.add(str(frame.get("id")))
            self.orders.put(frame)
        elif op == "cancel":
            self.cancel(str(frame.get("id")), str(frame.get("reason") or "canceled"))
        elif op == "evict":
            self.orders.put({"op": "evict"})
        elif op == "stop":
            return False
        return True

    def cancel(self, job_id: str, reason: str) -> None:
        """The running job stops at its next token; a queued one is answered at once."""
        with self._lock:
            ctx = self.current
            if ctx is not None and ctx.job_id == job_id:
                ctx.request_cancel(reason)
                return
            if job_id not in self.queued:
                return  # done already
            self.queued.discard(job_id)
            self.dropped.add(job_id)
        outcome = "timed_out" if reason == "timeout" else "canceled"
        self._done(job_id, host.EXIT_TIMED_OUT if outcome == "timed_out" else host.EXIT_CANCELED,
                   outcome=outcome, error_code=None, error_message=None, partial=False)

    # -- the job thread -------------------------------------------------------------
    def job_loop(self) -> None:
        tick = max(0.05, min(self.cache.idle_s / 2, 5.0))
        while True:
            try:
                order = self.orders.get(timeout=tick)
            except queue.Empty:
                self.cache.evict_idle()
                continue
            if order.get("op") == "evict":
                self.cache.clear("the agent asked (another job needs this device)")
                continue
            self.serve(order)
            self.cache.touch_last()  # idle time counts from the job's end, not its start
            if self.broken is not None:
                self.wire.send({"op": "note", "message": f"exiting: {self.broken}"})
                host.exit_now(host.EXIT_FAILED)  # the agent starts a fresh worker
            self.cache.evict_idle()

    def serve(self, order: dict[str, Any]) -> None:
        job_id = str(order.get("id"))
        job = order.get("job")
        ctx = None
        if isinstance(job, dict) and isinstance(job.get("payload"), dict):
            ctx = WarmContext({**job, "job_id": job_id}, self.scratch, self.wire,
                              _deadline(job.get("constraints")))
        with self._lock:  # one step: a cancel finds the job queued or running, never between
            if job_id in self.dropped:  # canceled while it waited: answered already
                self.dropped.discard(job_id)
                return
            self.queued.discard(job_id)
            self.current = ctx
        if ctx is None:
            self._done(job_id, host.EXIT_FAILED, outcome="failed", error_code="invalid_job",
                       error_message="the run order holds no job payload")
            return
        for stream in self.streams:
            stream.bind(job_id)
        try:
            self._run(ctx)
        finally:
            for stream in self.streams:
                stream.bind(None)
            with self._lock:
                self.current = None

    def _run(self, ctx: WarmContext) -> None:
        usage = resource.getrusage(_RUSAGE_THREAD)
        ctx.event("started", pid=os.getpid(), mono=time.monotonic())
        outcome, code, message, details = "completed", None, None, None
        try:
            if not ctx.cancelled:
                run_inference(ctx, self.cache)
        except JobCancelled:
            pass
        except JobFailed as exc:
            outcome, code, message, details = "failed", exc.code, exc.message, exc.details
        except Exception as exc:  # a bug or a bad model: this job fails, the worker lives on
            traceback.print_exc()
            outcome = "failed"
            code, message = host.classify_exception(exc)
            if code == "cuda_oom":
                self.cache.clear("CUDA ran out of memory")
            elif cuda_broken(exc):
                self.broken = f"a CUDA error leaves this process's context unusable: {message}"
        if outcome == "completed" and ctx.cancelled:
            outcome = "timed_out" if ctx.cancel_reason == "timeout" else "canceled"
        after = resource.getrusage(_RUSAGE_THREAD)
        metrics = {**ctx.metrics, "cpu_user_s": round(after.ru_utime - usage.ru_utime, 3),
                   "cpu_system_s": round(after.ru_stime - usage.ru_stime, 3),
                   "minor_page_faults": after.ru_minflt - usage.ru_minflt}
        ctx.event("finished", outcome=outcome, error_code=code, error_message=message,
                  partial=ctx.partial, metrics=metrics, details=details or None)
        status = {"completed": host.EXIT_COMPLETED, "canceled": host.EXIT_CANCELED,
                  "timed_out": host.EXIT_TIMED_OUT}.get(outcome, host.EXIT_FAILED)
        self.wire.send({"op": "done", "id": ctx.job_id, "status": status})

    def _done(self, job_id: str, status: int, **finished: Any) -> None:
        FrameChannel(self.wire, job_id).send("finished", **finished)
        self.wire.send({"op": "done", "id": job_id, "status": status})


def _deadline(constraints: Any) -> float | None:
    """The job's own deadline (``constraints.timeout_s``), from when it starts here."""
    timeout_s = constraints.get("timeout_s") if isinstance(constraints, dict) else None
    if isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s > 0:
        return time.monotonic() + float(timeout_s)
    return None


def cuda_broken(exc: BaseException) -> bool:
    """A CUDA error after which this process's context cannot be trusted (not an OOM)."""
    text = str(exc)
    return type(exc).__name__ == "AcceleratorError" or "CUDA error" in text or \
        "CUBLAS_STATUS" in text or "cuDNN error" in text


def run_inference(ctx: JobContext, cache: ModelCache) -> None:
    """The inference runtime's steps, with the model from the cache."""
    from runtimes import device as dev
    from runtimes import inference

    request = inference.GenerationRequest.from_payload(ctx.payload)
    name, folder = inference.resolve_model(ctx.payload, os.environ)
    setup = dev.select_device(ctx, ctx.payload)
    ctx.progress(0.0, stage="loading", message=f"loading {name}")
    with dev.oom_guard(setup):
        loaded = cache.get(name, folder, setup)
    inference.generate_for(ctx, request, loaded, setup)


# -- start ----------------------------------------------------------------------------

def preload() -> float:
    """Import what every job needs once (torch, transformers, the inference runtime)."""
    t0 = time.perf_counter()
    for module in PRELOAD:
        importlib.import_module(module)
    return round(time.perf_counter() - t0, 3)


def confine() -> None:
    """Join the worker's cgroup (a descriptor the agent opened) and, in the sandbox, drop
    the capabilities bubblewrap keeps for the fork server: the worker needs none."""
    cgroup_fd = os.environ.pop("MINER_CGROUP_FD", "")
    if cgroup_fd.isdigit():
        host.join_cgroup(int(cgroup_fd))
    if os.environ.pop("MINER_WARM_SANDBOX", "") == "1":
        from runtimes import jail

        jail.drop_privileges()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[0].startswith("fd:") or not args[1].isdigit():
        print("usage: python -m runtimes.warm fd:N PARENT_PID (started by miner-agent; "
              "PARENT_PID 0 inside its sandbox, whose bwrap watches the agent)", file=sys.stderr)
        raise SystemExit(2)
    host.die_with_parent(int(args[1]) or None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when we stop
    confine()
    host.tune_allocator()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    wire = Wire(socket.socket(fileno=int(args[0][3:])))
    # Before the imports: a logging handler made at import time writes to these, so what
    # a library logs during a job lands in that job's stderr, as in a job's own process.
    streams = (RoutedStream("stdout", sys.stdout, wire), RoutedStream("stderr", sys.stderr, wire))
    sys.stdout, sys.stderr = streams  # type: ignore[assignment]
    preload_s = preload()
    budget_mb = int(os.environ.get("MINER_WARM_BUDGET_MB") or 0)
    budget = budget_mb << 20 if budget_mb > 0 else default_budget_bytes()
    idle_s = float(os.environ.get("MINER_WARM_IDLE_S") or 600)

    def note(message: str) -> None:
        wire.send({"op": "note", "message": message})

    # The jobs' folder: the agent's own scratch for this worker (it names it), so that
    # nothing is left in the system's temporary folder when the worker is killed.
    given = os.environ.get("MINER_WARM_JOB_DIR", "")
    scratch = Path(given) if given else Path(tempfile.mkdtemp(prefix="warm-job-"))
    scratch.mkdir(parents=True, exist_ok=True)
    worker = Worker(wire, ModelCache(budget, idle_s, note), scratch, streams)
    threading.Thread(target=worker.job_loop, name="warm-jobs", daemon=True).start()
    wire.send({"op": "ready", "pid": os.getpid(), "preload_s": preload_s,
               "budget_mb": budget >> 20, "idle_s": idle_s})
    while True:
        frame = wire.receive()
        if frame is None or not worker.dispatch(frame):
            break
    if not given:
        shutil.rmtree(scratch, ignore_errors=True)
    host.exit_now(0)


if __name__ == "__main__":
    main()
