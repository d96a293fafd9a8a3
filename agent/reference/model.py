"""Reference coordinator vocabulary: states, the client-name mapping, dispatch matching.

Pure functions over plain dicts (rows decoded from the store), shared by the store
and the HTTP layer; nothing here touches SQLite or sockets.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent import clock
from agent.jobs import tag_text

QUEUED, RUNNING, COMPLETED = "QUEUED", "RUNNING", "COMPLETED"
FAILED, CANCELED, EXPIRED = "FAILED", "CANCELED", "EXPIRED"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELED, EXPIRED})
EXTENSIONS = ("lease", "progress", "logs", "package", "cancel", "longpoll", "logs-binary")
CLIENT_STATUSES = ("pending", "assigned", "running", "completed", "failed", "canceled",
                   "canceling")


class Problem(Exception):
    """Raised by coordinator logic to answer an HTTP error: status plus a JSON body."""

    def __init__(self, http_status: int, detail: Any, **extra: Any) -> None:
        super().__init__(str(detail))
        self.status = http_status
        self.body: dict[str, Any] = {"detail": detail, **extra}
        self.headers: dict[str, str] = {}


def client_status(state: str, *, cancel_requested: bool = False, started: bool = True) -> str:
    """The one mapping from coordinator states to the client guide's names.

    QUEUED -> pending; RUNNING -> assigned until the miner shows a sign of life
    (progress, logs, lease renewal; a core miner counts as started when it polls),
    then running, or canceling once a cancel waits for the miner's confirmation;
    EXPIRED -> failed (the error says ``expired``).
    """
    if state == QUEUED:
        return "pending"
    if state == RUNNING:
        if cancel_requested:
            return "canceling"
        return "running" if started else "assigned"
    return {COMPLETED: "completed", FAILED: "failed", CANCELED: "canceled",
            EXPIRED: "failed"}.get(state, "failed")


def coordinator_states(client_name: str) -> tuple[str, ...]:
    """The coordinator states a client status filter selects (for ``GET /v1/jobs``)."""
    return {"pending": (QUEUED,), "assigned": (RUNNING,), "running": (RUNNING,),
            "canceling": (RUNNING,), "completed": (COMPLETED,),
            "failed": (FAILED, EXPIRED), "canceled": (CANCELED,)}.get(client_name.lower(),
                                                                    (client_name.upper(),))


def _gpus(capabilities: Mapping[str, Any]) -> list[int]:
    out = []
    for gpu in capabilities.get("gpus") or ():
        mem = gpu.get("memory_mb") if isinstance(gpu, dict) else None
        out.append(int(mem) if isinstance(mem, int | float) else 0)
    return out


def matches(capabilities: Mapping[str, Any], payload: Mapping[str, Any],
            constraints: Mapping[str, Any]) -> bool:
    """Whether a miner with ``capabilities`` may take a job, as dispatch decides.

    Reads gpus[].memory_mb against min_vram_mb (and gpu_count), cuda as a substring,
    the model an inference payload names (and constraints.models) against
    capabilities.models, price against constraints.max_price, and constraints.tags
    against capabilities.tags (each asked tag equal to the miner's).
    """
    min_vram = int(constraints.get("min_vram_mb") or constraints.get("min_vram") or 0)
    gpu_count = int(constraints.get("gpu_count") or constraints.get("gpus") or 0)
    big_enough = [m for m in _gpus(capabilities) if m >= min_vram]
    if (min_vram or gpu_count) and len(big_enough) < max(1, gpu_count):
        return False
    cuda = constraints.get("cuda")
    if cuda and str(cuda) not in str(capabilities.get("cuda") or ""):
        return False
    models = set(capabilities.get("models") or ())
    wanted = list(constraints.get("models") or ())
    if payload.get("type") == "inference" and payload.get("model"):
        wanted.append(payload["model"])
    if any(m not in models for m in wanted):
        return False
    return _within_price(constraints.get("max_price"), capabilities.get("price")) and \
        _has_tags(constraints.get("tags"), capabilities.get("tags"))


def _has_tags(asked: Any, tags: Any) -> bool:
    """Every asked tag equals the miner's, compared as text (``7`` asks for "7"); a miner
    without tags gets no job that asks for one."""
    if not asked:
        return True
    if not isinstance(asked, Mapping) or not isinstance(tags, Mapping):
        return False
    return all(tag_text(value) is not None and tag_text(value) == tag_text(tags.get(name))
               for name, value in asked.items())


def _within_price(max_price: Any, price: Any) -> bool:
    """A job with a max_price goes only to a miner whose price is at or below it: no
    price, no such jobs (as the real server dispatches)."""
    if max_price is None:
        return True
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool)
                  for v in (max_price, price))
    return numbers and bool(price <= max_price)


def iso(ts: float | None) -> str | None:
    """A UTC ISO-8601 timestamp with a Z (the wire's spelling), or None."""
    return clock.iso(ts, timespec="auto", zulu=True)


def parse_iso(text: str, name: str) -> float:
    """An ISO-8601 time from a query (``2026-02-13``, ``2026-02-13T10:00:00Z``, with an
    offset or without: UTC) as seconds since the epoch; 422 if it is not one."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise Problem(422, f"{name} must be an ISO-8601 time, not {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def job_view(job: Mapping[str, Any], package: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A job as clients see it (``GET /v1/jobs/{id}``), in the client guide's vocabulary."""
    progress = job.get("progress") or None
    percent = None
    eta = None
    if isinstance(progress, dict):
        if isinstance(progress.get("fraction"), int | float):
            percent = round(100.0 * float(progress["fraction"]), 1)
        if isinstance(progress.get("eta_s"), int | float):
            eta = iso(float(progress.get("updated_at", 0)) + float(progress["eta_s"]))
    if job["state"] == COMPLETED:  # whatever the last progress post said, it is done
        percent = 100.0
    if job["state"] in TERMINAL:  # an ended job has nothing left to estimate
        eta = None
    error = None
    if job["state"] == EXPIRED:
        error = {"code": "expired", "message": "the job ran past its TTL"}
    elif job.get("error_code"):
        error = {"code": job["error_code"], "message": job.get("error_message") or ""}
    return {
        "job_id": job["job_id"],
        "status": client_status(job["state"], cancel_requested=bool(job.get("cancel_requested_at")),
                                started=job.get("started_at") is not None),
        "state": job["state"], "miner_id": job.get("miner_id"),
        "payload": job.get("payload"), "constraints": job.get("constraints"),
        "created_at": iso(job.get("created_at")), "started_at": iso(job.get("assigned_at")),
        "finished_at": iso(job.get("finished_at")), "expires_at": iso(job.get("expires_at")),
        "progress": percent, "progress_detail": progress, "estimated_completion": eta,
        "result": job.get("result"), "metrics": job.get("metrics"), "error": error,
        "partial": None if job.get("partial") is None else bool(job["partial"]),
        "attempts": job.get("attempts", 0),
        "package": dict(package) if package else None,
    }


@dataclass(frozen=True)
class Settings:
    """What a reference coordinator offers and its limits (see ReferenceCoordinator)."""

    extensions: tuple[str, ...] = EXTENSIONS
    job_ttl_s: float = 900.0
    lease_ttl_s: float = 60.0
    cancel_grace_s: float = 60.0
    max_body_bytes: int = 10 * 1024 * 1024
    max_package_bytes: int = 256 * 1024 * 1024
    receipt_secret: bytes = b"reference-coordinator"
    # Register answers name the upload limit (`limits.max_package_bytes`); off, a miner
    # learns it only from a 413 or, past what the server drains, a reset connection.
    announce_limits: bool = True
