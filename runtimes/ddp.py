"""Multi-rank training: launch torchrun from the job's process, relay, forward a cancel.

The job's process (which never imports torch on this path) starts::

    python -m runtimes.ddp PARENT_PID --standalone --nproc_per_node N \\
        -m runtimes.ddp_worker SPEC.json

``runtimes.ddp`` as ``__main__`` is a thin wrapper round ``torch.distributed.run``
that first asks the kernel to kill it when the job's process dies. torchrun runs
in its own session, for two reasons: it starts every rank in a new session of its
own anyway (so a group signal to the job never reaches the ranks), and a second
SIGTERM while it is shutting its ranks down aborts that shutdown, orphaning them.
So exactly one SIGTERM reaches torchrun, from the cancel hook here; torchrun passes
it to each rank; the ranks agree on a stopping step (:class:`runtimes.trainloop.Ranks`),
rank 0 saves a checkpoint there and everyone exits. Should the job's process die
instead, the kernel kills torchrun, and each rank (same trick) dies with it.

Ranks cannot write to the job's events channel: torchrun closes inherited file
descriptors. Rank 0 writes its events as JSON lines to ``work_dir/ddp/events.jsonl``
and this process replays them through its own :class:`JobContext`, so metrics and
the partial flag end up in the job's ``finished`` event as for a one-process run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import runtimes
from runtimes.base import JobContext, JobFailed
from runtimes.train_spec import TrainSpec

POLL_S = 0.2
CANCEL_GRACE_S = 60.0  # torchrun itself gives ranks 30 s after SIGTERM before SIGKILL
RELAYED_NAMES = ("progress", "metrics", "partial", "rank_failed", "cancel_seen", "started")


class Relay:
    """Replays rank 0's event lines into the job's context; keeps the first rank failure."""

    def __init__(self, ctx: JobContext, path: Path) -> None:
        self.ctx = ctx
        self.path = path
        self.offset = 0
        self.failure: dict[str, Any] | None = None

    def pump(self) -> None:
        """Handle every complete line written since the last call."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                self._handle(record)

    def _handle(self, record: dict[str, Any]) -> None:
        name = str(record.pop("event", ""))
        record.pop("t", None)
        if name == "progress":
            metrics = record.pop("metrics", None) or {}
            self.ctx.progress(force=True, **record, **metrics)
        elif name == "metrics":
            self.ctx.set_metrics(**(record.get("metrics") or {}))
        elif name == "partial":
            self.ctx.mark_partial()
        elif name == "rank_failed":
            if self.failure is None:
                self.failure = record
        elif name and name not in RELAYED_NAMES:
            self.ctx.event(name, **record)


def worker_spec(ctx: JobContext, spec: TrainSpec, events: Path) -> dict[str, Any]:
    """What each rank reads: the job, its folders, and where rank 0 writes events."""
    return {"job": {"job_id": ctx.job_id, "payload": ctx.payload,
                    "constraints": ctx.constraints},
            "package_dir": str(ctx.package_dir), "work_dir": str(ctx.work_dir),
            "events": str(events), "world_size": spec.world_size}


def torchrun_command(nproc: int, spec_path: Path) -> list[str]:
    """The command line that starts ``nproc`` ranks of :mod:`runtimes.ddp_worker`.

    torchrun's own folder (per-rank log and error-file folders) goes beside the spec, in
    the job's scratch, which goes with the job: left to itself torchrun makes a
    ``torchelastic_*`` folder in the temporary folder and never removes it, and
    without the sandbox's private /tmp that is the node's.
    """
    return [sys.executable, "-m", "runtimes.ddp", str(os.getpid()), "--standalone",
            "--nproc_per_node", str(nproc), "--log-dir", str(spec_path.parent / "torchelastic"),
            "-m", "runtimes.ddp_worker", str(spec_path)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(runtimes.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MINER_EVENTS_FD", None)  # closed in the ranks anyway; say so plainly
    return env


def launch(ctx: JobContext, spec: TrainSpec) -> None:
    """Run ``spec.world_size`` ranks under torchrun and wait, relaying events and cancel."""
    folder = ctx.work_dir / "ddp"
    folder.mkdir(parents=True, exist_ok=True)
    events = folder / "events.jsonl"
    events.write_bytes(b"")
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(worker_spec(ctx, spec, events)))
    ctx.progress(0.0, stage="launch", message=f"starting {spec.world_size} ranks", force=True)
    proc = subprocess.Popen(torchrun_command(spec.world_size, spec_path), env=_env(),
                            cwd=ctx.work_dir, start_new_session=True)
    ctx.event("ddp_started", pid=proc.pid, world_size=spec.world_size)
    relay = Relay(ctx, events)
    code = _wait(ctx, proc, relay)
    relay.pump()
    if ctx.cancelled:
        return
    if relay.failure is not None:
        failure = relay.failure
        raise JobFailed(str(failure.get("code") or "runtime_error"),
                        f"rank {failure.get('rank')}: {failure.get('message')}",
                        rank=failure.get("rank"))
    if code != 0:
        raise JobFailed("ddp_failed", f"torchrun exited with status {code} and no rank "
                        "reported why (see the job's log)")


def _wait(ctx: JobContext, proc: subprocess.Popen[bytes], relay: Relay) -> int:
    sent: list[float] = []

    def forward() -> None:
        if not sent and proc.poll() is None:
            sent.append(time.monotonic())
            _kill(proc, signal.SIGTERM, group=False)

    ctx.on_cancel(forward)
    while proc.poll() is None:
        if ctx.cancelled:  # also notices the job's deadline, which fires the hook
            forward()
            if sent and time.monotonic() - sent[0] > CANCEL_GRACE_S:
                _kill(proc, signal.SIGKILL, group=True)
        relay.pump()
        time.sleep(POLL_S)
    return proc.returncode


def _kill(proc: subprocess.Popen[bytes], sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass  # already gone


def _torchrun_main(argv: list[str]) -> None:
    """``python -m runtimes.ddp PARENT_PID TORCHRUN_ARGS...``: torchrun, tied to the job."""
    from runtimes.host import die_with_parent

    die_with_parent(int(argv[0]))
    from torch.distributed.run import main

    main(argv[1:])


if __name__ == "__main__":
    _torchrun_main(sys.argv[1:])
