"""The running node as plain data: what `miner-agent ps` shows and the heartbeat carries.

`ps`: every slot with its GPUs and the job on it (id, type, state, progress, elapsed,
ETA), the agent's state with every drain in force, the GPUs' latest telemetry sample,
the node's labels and the reports still waiting in the outbox. The heartbeat's metadata:
each held job's progress, the sample, and the drain that keeps the node from new work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from agent.config import AgentConfig
from agent.daemon.drains import Drain, DrainKind, Drains
from agent.daemon.held import Active, HeldJobs
from agent.daemon.scheduler import Scheduler


class NodeView:
    """Reads the agent's parts; changes nothing."""

    def __init__(self, *, cfg: Callable[[], AgentConfig], held: HeldJobs, scheduler: Scheduler,
                 sample: Callable[[], dict[str, Any]], drains: Drains,
                 reports_pending: Callable[[], int], registered: Callable[[], bool]) -> None:
        self.cfg = cfg  # the current config (a reload replaces it)
        self.held = held
        self.scheduler = scheduler
        self.sample = sample
        self.drains = drains
        self.reports_pending = reports_pending
        self.registered = registered
        self.started_at = time.time()

    def ps(self) -> dict[str, Any]:
        """The node now, JSON-ready (`miner-agent ps --json` prints it as it is)."""
        cfg, now, drains = self.cfg(), time.time(), self.drains.all()
        jobs = [job_view(a, now) for a in self.held]
        return {
            "miner_id": cfg.miner_id, "pid": os.getpid(), "coordinator": cfg.coordinator_url,
            "registered": self.registered(), "uptime_s": round(now - self.started_at, 1),
            "state": agent_state(drains), "drains": [d.to_dict() for d in drains],
            "slots": slots(jobs, self.scheduler), "capacity": self.scheduler.capacity,
            "gpus": gpus(self.scheduler, self.sample()),
            "tags": dict(getattr(cfg, "tags", None) or {}), "price": cfg.price,
            "allowed_job_types": list(cfg.allowed_job_types),
            "reports_pending": self.reports_pending(),
        }

    def metadata(self) -> dict[str, Any]:
        """The heartbeat's metadata."""
        jobs = {}
        for a in self.held:
            p = dict(a.run.progress) if a.run else {}
            p.pop("t", None)
            jobs[a.job_id] = {"progress": p, "phase": "running" if a.run else "waiting",
                              "gpus": list(a.assignment.gpu_indices) if a.assignment else []}
        drain = self.drains.node_drain()
        out = {"telemetry": self.sample(), "jobs": jobs, "draining": drain is not None,
               "agent": {"pid": os.getpid()}, "reports_pending": self.reports_pending()}
        if drain is not None:
            out["drain_reason"] = drain.reason
            out["drain_kind"] = drain.kind.value
        if (paused := self.drains.low_disk()) is not None:
            out["paused"] = paused
        if self.scheduler.blocked:  # GPUs a finished job's contexts still hold
            out["blocked_gpus"] = {str(i): why for i, why in self.scheduler.blocked.items()}
        return out


def agent_state(drains: list[Drain]) -> str:
    """``stopping`` (SIGTERM), ``draining`` (no new work for the whole node) or ``running``."""
    if any(d.kind is DrainKind.SHUTDOWN for d in drains):
        return "stopping"
    if any(d.gpu is None for d in drains):
        return "draining"
    return "running"


def job_view(active: Active, now: float) -> dict[str, Any]:
    """One held job: waiting for its devices, running, or canceling."""
    run = active.run
    progress = dict(run.progress) if run is not None else {}
    started = run.times.get("started") if run is not None else None
    elapsed = now - (started or active.accepted_at)
    fraction = progress.get("fraction")
    eta = progress.get("eta_s")
    if eta is None and isinstance(fraction, int | float) and 0 < fraction < 1 and started:
        eta = elapsed * (1 - fraction) / fraction
    state = "waiting" if run is None else "running"
    if active.cancel_reason is not None:
        state = "canceling"
    return {"id": active.job_id, "type": active.job.type if active.job else None,
            "state": state, "progress": fraction, "stage": progress.get("stage"),
            "elapsed_s": round(elapsed, 1), "eta_s": round(eta, 1) if eta is not None else None,
            "gpus": list(active.assignment.gpu_indices) if active.assignment else []}


def slots(jobs: list[dict[str, Any]], scheduler: Scheduler) -> list[dict[str, Any]]:
    """One row per slot: the held jobs first, then the free slots with the GPUs they offer."""
    rows = [{"slot": i, "gpus": job["gpus"], "job": job} for i, job in enumerate(jobs)]
    free = []
    load = {i: 0 for i in (d.index for d in scheduler.devices)}
    for assignment in scheduler.held().values():
        # As the scheduler counts: a multi-GPU job takes each of its GPUs whole.
        step = 1 if len(assignment.gpu_indices) == 1 else scheduler.jobs_per_gpu
        for index in assignment.gpu_indices:
            load[index] = load.get(index, 0) + step
    for device in scheduler.devices:
        free += [[device.index]] * max(0, scheduler.jobs_per_gpu - load[device.index])
    for i in range(len(rows), scheduler.capacity):
        gpus_free = free.pop(0) if free else []
        row: dict[str, Any] = {"slot": i, "gpus": gpus_free, "job": None}
        held_back = [scheduler.blocked[g] for g in gpus_free if g in scheduler.blocked]
        if held_back:
            row["held_back"] = held_back[0]
        rows.append(row)
    return rows


def gpus(scheduler: Scheduler, sample: dict[str, Any]) -> list[dict[str, Any]]:
    """Each GPU this agent schedules, with the latest sample's figures."""
    figures = {g.get("index"): g for g in sample.get("gpus") or ()}
    out = []
    for device in scheduler.devices:
        seen = figures.get(device.index, {})
        out.append({"index": device.index, "name": device.name, "uuid": device.uuid,
                    "util_pct": seen.get("util_gpu_pct"), "mem_used_mb": seen.get("mem_used_mb"),
                    "mem_total_mb": seen.get("mem_total_mb") or device.memory_mb,
                    "temp_c": seen.get("temp_c"), "power_w": seen.get("power_w"),
                    "error": seen.get("error"), "held_back": scheduler.blocked.get(device.index)})
    return out
