"""Miner endpoints of the reference coordinator: the core, quirks included, and extensions.

Core quirks reproduced on purpose (the agent must survive them): poll needs a JSON body
and, without ``longpoll``, never waits; register zeroes in-flight; heartbeat 404s and
poll 500s for an unknown miner; /result marks COMPLETED whatever its body says and
whatever the job's state (CANCELED and EXPIRED included) and adds a receipt each call;
/fail keeps the in-flight slot. A miner gets an extension's behaviour only if it
declared it at register (``capabilities.extensions``) and this coordinator offers it.

``longpoll``: an empty poll of a miner that declared it is held up to the body's
``max_wait_seconds`` (at most :data:`MAX_POLL_WAIT_S`) and answered the moment a job
that fits it is queued (submitted, retried, requeued after a lapsed lease) or, if it
was full, a slot of its frees. The wait is a coroutine woken by the store's commits
(:class:`Wakeups`), timed to the next lease lapse; it holds no worker thread. A poller
whose connection has gone is handed nothing: the disconnect is checked in the same
transaction that would assign the job. What remains is a client that leaves after
that commit and before the answer reaches it: the job is RUNNING for a miner that
never saw it, and comes back as any lost answer does, when its lease lapses (with the
``lease`` extension) or at its TTL (without).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from agent.reference.logs_api import LogsAPI
from agent.reference.model import (
    CANCELED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    TERMINAL,
    Problem,
    Settings,
    matches,
)
from agent.reference.server import HTTPApp, Request, Response, Route, held_route, route
from agent.reference.store import Store

MAX_POLL_WAIT_S = 30.0  # the longest a held poll waits, whatever max_wait_seconds says


class Wakeups:
    """Wakes held polls, coroutines on the server's loop, from whichever thread commits.

    Read :attr:`generation` before looking for work, then :meth:`wait` with it: a commit
    between the look and the wait makes the wait return at once, so none is missed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.generation = 0

    def notify(self) -> None:
        """Work may be there: every held poll looks again (any thread)."""
        with self._lock:
            self.generation += 1
            waiting = list(self._waiting)
        for loop, event in waiting:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(event.set)

    async def wait(self, seen: int, timeout_s: float, gone: asyncio.Event) -> None:
        """Until a notify after ``seen``, ``gone`` is set, or ``timeout_s`` passes."""
        woken = asyncio.Event()
        waiter = (asyncio.get_running_loop(), woken)
        with self._lock:
            if self.generation != seen:
                return
            self._waiting.add(waiter)
        waits = [asyncio.ensure_future(e.wait()) for e in (woken, gone)]
        try:
            await asyncio.wait(waits, timeout=max(0.0, timeout_s),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            with self._lock:
                self._waiting.discard(waiter)


class MinerAPI:
    """Handlers for ``/v1/miners/...``; one instance per coordinator."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.logs = LogsAPI(store, settings, self.owned_job)
        self.wakeups = Wakeups()
        store.on_work(self.wakeups.notify)

    def routes(self) -> list[Route]:
        return [
            route("POST", "/v1/miners/register", self.register, "miner"),
            route("POST", "/v1/miners/heartbeat", self.heartbeat, "miner", "heartbeat"),
            route("DELETE", "/v1/miners/{miner_id}", self.deregister, "miner"),
            held_route("POST", "/v1/miners/poll", self.poll, "miner", "poll"),
            route("POST", "/v1/miners/{job_id}/result", self.result, "miner", "result"),
            route("POST", "/v1/miners/{job_id}/fail", self.fail, "miner", "fail"),
            route("POST", "/v1/miners/{miner_id}/jobs", self.running, "miner"),
            route("POST", "/v1/miners/{job_id}/progress", self.progress, "miner", "progress"),
            *self.logs.routes(),
        ]

    # -- helpers --------------------------------------------------------------------------

    def active(self, miner_id: str) -> frozenset[str]:
        """Extensions in force for this miner: offered here and declared by it."""
        miner = self.store.miner(miner_id)
        return frozenset(miner["extensions"]) if miner else frozenset()

    def owned_job(self, req: Request, lease_id: Any) -> dict[str, Any]:
        """The job in the path if this miner may act on it; 409 for a stale lease."""
        job = self.store.job_or_404(req.params["job_id"])
        if lease_id is not None and "lease" in self.active(req.miner_id):
            if lease_id != job.get("lease_id"):
                raise Problem(409, "lease is not current for this job", error="lease_lost")
        if job.get("miner_id") != req.miner_id:
            raise Problem(404, "Job not found")
        return job

    def _receipt(self, job: Mapping[str, Any], miner_id: str,
                 metrics: Mapping[str, Any]) -> dict[str, Any]:
        body = {"receipt_id": uuid.uuid4().hex, "job_id": job["job_id"], "miner_id": miner_id,
                "units": metrics.get("units"), "unit_type": metrics.get("unit_type"),
                "duration_ms": metrics.get("duration_ms"), "issued_at": time.time()}
        text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        body["signature"] = hmac.new(self.settings.receipt_secret, text,
                                     hashlib.sha256).hexdigest()
        return body

    # -- core -----------------------------------------------------------------------------

    def register(self, req: Request) -> Response:
        body = req.json_object()
        caps = body.get("capabilities")
        concurrency = body.get("concurrency", 1)
        if not isinstance(caps, dict) or not isinstance(concurrency, int) or concurrency < 1:
            raise Problem(422, "capabilities must be an object and concurrency an integer >= 1")
        raw = caps.get("extensions")
        declared = raw if isinstance(raw, list) else []
        active = [e for e in self.settings.extensions if e in declared]
        token = self.store.register(req.miner_id, caps, concurrency, body.get("region"), active)
        answer: dict[str, Any] = {"status": "ok", "session_token": token}
        if self.settings.extensions:
            answer["extensions"] = list(self.settings.extensions)
        if "package" in active and self.settings.announce_limits:
            answer["limits"] = {"max_package_bytes": self.settings.max_package_bytes}
        return Response(200, answer)

    def heartbeat(self, req: Request) -> Response:
        body = req.json_object()
        inflight = body.get("inflight", 0)
        if not isinstance(inflight, int) or inflight < 0:
            raise Problem(422, "inflight must be an integer >= 0")
        with self.store.tx():
            miner = self.store.miner(req.miner_id)
            if miner is None:
                raise Problem(404, "Miner not registered")
            self.store.set_inflight(req.miner_id, inflight)
            self.store.update_miner_seen(req.miner_id, body.get("status"), body.get("metadata"))
            answer: dict[str, Any] = {"status": "ok"}
            if "lease" in miner["extensions"]:
                answer["leases"] = self._renew(req.miner_id, body.get("leases"))
            if "cancel" in miner["extensions"]:
                answer["cancel"] = [j["job_id"] for j in self.store.jobs((RUNNING,),
                                    req.miner_id, 1000) if j.get("cancel_requested_at")]
                # `cancel --force` ended these at once: the miner kills them, no grace
                answer["kill"] = self.store.forced_cancels(req.miner_id,
                                                           self.settings.cancel_grace_s)
        return Response(200, answer)

    def deregister(self, req: Request) -> Response:
        """The real server keeps the miner, marked OFFLINE (a register brings it back)."""
        miner_id = req.params["miner_id"]
        with self.store.tx():
            miner = self.store.miner(miner_id)
            if miner is None:
                raise Problem(404, "miner not found")
            self.store.update_miner_seen(miner_id, "OFFLINE", miner["metadata"])
        return Response(200, {"miner_id": miner_id, "status": "deregistered"})

    def _renew(self, miner_id: str, leases: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        now = time.time()
        for item in leases if isinstance(leases, list) else []:
            if not isinstance(item, dict) or not isinstance(item.get("job_id"), str):
                continue
            job = self.store.job(item["job_id"])
            if (job is None or job["state"] != RUNNING or job["miner_id"] != miner_id
                    or job["lease_id"] != item.get("lease_id")):
                out[item["job_id"]] = "lost"
                continue
            self.store.update_job(job["job_id"], lease_expires_at=now + self.settings.lease_ttl_s,
                                  started_at=job["started_at"] or now)
            out[item["job_id"]] = {"ttl_s": self.settings.lease_ttl_s}
        return out

    async def poll(self, req: Request, app: HTTPApp) -> Response:
        """A job (200) or none (204): at once, or after a held wait (``longpoll``)."""
        wait_s = await app.run_sync(self._wait_asked, req)
        until = time.monotonic() + wait_s
        gone = req.gone or asyncio.Event()
        while True:
            seen = self.wakeups.generation  # before looking: a commit after it wakes us
            answer, lapse_s = await app.run_sync(self._take, req)
            left = until - time.monotonic()
            if answer is not None or left <= 0 or gone.is_set():
                return Response(200, answer) if answer is not None else Response(204)
            if self.store.closed:
                raise Problem(503, "the coordinator is stopping")
            # A lapsing lease requeues its job with no request to say so: look then too.
            await self.wakeups.wait(seen, min(left, lapse_s), gone)

    def _wait_asked(self, req: Request) -> float:
        """How long this poll may be held: 0 unless the miner declared ``longpoll``."""
        body = req.json()  # the real server refuses a poll without a JSON body (422)
        miner = self.store.miner(req.miner_id)
        if miner is None:  # the real server crashes on an unknown miner
            raise Problem(500, "Internal Server Error")
        if "longpoll" not in miner["extensions"] or not isinstance(body, dict):
            return 0.0  # the core: the wait is ignored
        wait = body.get("max_wait_seconds")
        if wait is None:
            return 0.0
        if isinstance(wait, bool) or not isinstance(wait, int | float) \
                or not math.isfinite(wait) or wait < 0:
            raise Problem(422, "max_wait_seconds must be a number of seconds >= 0 (held "
                          f"at most {MAX_POLL_WAIT_S:g})")
        return min(float(wait), MAX_POLL_WAIT_S)

    def _take(self, req: Request) -> tuple[dict[str, Any] | None, float]:
        """Assign the oldest job that fits this miner, if it has a free slot and is still
        connected; with it or None, the seconds until the next lease lapses."""
        with self.store.tx():
            self.store.sweep()  # lapsed leases requeue now, full miner or not
            miner = self.store.miner(req.miner_id)
            if miner is None:
                raise Problem(500, "Internal Server Error")
            job = None
            if miner["inflight"] < miner["concurrency"]:
                job = next((j for j in self.store.jobs((QUEUED,), limit=10_000) if matches(
                    miner["capabilities"], j["payload"], j["constraints"])), None)
            if job is not None and not req.left():  # never to a poller already gone
                return self._assign(job, miner), 0.0
            lapse = self.store.next_lapse()
        return None, math.inf if lapse is None else max(0.0, lapse - time.time()) + 0.01

    def _assign(self, job: dict[str, Any], miner: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        exts = miner["extensions"]
        lease_id = uuid.uuid4().hex if "lease" in exts else None
        # A core miner gives no sign of life, so its job counts as running at once.
        started = None if {"progress", "logs", "lease"} & set(exts) else now
        self.store.update_job(job["job_id"], state=RUNNING, miner_id=miner["miner_id"],
                              assigned_at=now, started_at=started, lease_id=lease_id,
                              lease_expires_at=now + self.settings.lease_ttl_s if lease_id
                              else None, attempts=job["attempts"] + 1)
        self.store.set_inflight(miner["miner_id"], delta=1)
        answer = {"job_id": job["job_id"], "payload": job["payload"],
                  "constraints": job["constraints"]}
        if lease_id:
            answer["lease"] = {"id": lease_id, "ttl_s": self.settings.lease_ttl_s}
        return answer

    def running(self, req: Request) -> Response:
        req.json()
        limit = int(req.query.get("limit", "100"))
        state = req.query.get("job_status", "running").upper()
        jobs = self.store.jobs((state,), req.params["miner_id"], limit)
        views = [{"job_id": j["job_id"], "state": j["state"], "payload": j["payload"],
                  "constraints": j["constraints"], "assigned_miner_id": j["miner_id"]}
                 for j in jobs]
        return Response(200, {"jobs": views, "total": len(views), "limit": limit})

    def _final_check(self, req: Request, lease_id: Any) -> dict[str, Any] | None:
        """Lease rules for a final report; returns a stored receipt answer for a replay."""
        job = self.store.job_or_404(req.params["job_id"])
        if lease_id is None or "lease" not in self.active(req.miner_id):
            return None  # core: no checks at all
        if lease_id != job.get("lease_id"):
            raise Problem(409, "lease is not current for this job", error="lease_lost")
        if job["state"] in TERMINAL and job.get("finished_by") == "miner":
            receipts = self.store.receipts(job["job_id"])
            return {"status": "ok", "receipt": receipts[-1] if receipts else None}
        if job["state"] != RUNNING:
            raise Problem(409, f"job is {job['state']}", error="lease_lost")
        return None

    def result(self, req: Request) -> Response:
        body = req.json_object()
        result, metrics = body.get("result"), body.get("metrics") or {}
        if not isinstance(result, dict) or not isinstance(metrics, dict):
            raise Problem(422, "result and metrics must be JSON objects")
        with self.store.tx():
            replay = self._final_check(req, body.get("lease_id"))
            if replay is not None:
                return Response(200, replay)
            job = self.store.job_or_404(req.params["job_id"])
            canceled = "cancel" in self.active(req.miner_id) and result.get("status") == "canceled"
            self.store.update_job(
                job["job_id"], state=CANCELED if canceled else COMPLETED, result=result,
                metrics=metrics, finished_at=time.time(), finished_by="miner",
                lease_expires_at=None, partial=bool(result.get("partial")) if canceled else None)
            self.store.set_inflight(req.miner_id, delta=-1)
            receipt = None if canceled else self._receipt(job, req.miner_id, metrics)
            if receipt is not None:
                self.store.add_receipt(job["job_id"], receipt)
        return Response(200, {"status": "ok", "receipt": receipt})

    def fail(self, req: Request) -> Response:
        body = req.json_object()
        code, metrics = body.get("error_code"), body.get("metrics") or {}
        if not isinstance(code, str) or not code or not isinstance(metrics, dict):
            raise Problem(422, [{"type": "missing", "loc": ["body", "error_code"],
                                 "msg": "Field required"}])
        with self.store.tx():
            replay = self._final_check(req, body.get("lease_id"))
            if replay is not None:
                return Response(200, {"status": "ok"})
            self.store.update_job(req.params["job_id"], state=FAILED, error_code=code,
                                  error_message=str(body.get("error_message") or "")[:4000],
                                  metrics=metrics, finished_at=time.time(),
                                  finished_by="miner", lease_expires_at=None)
        return Response(200, {"status": "ok"})

    # -- progress -------------------------------------------------------------------------

    def progress(self, req: Request) -> Response:
        body = req.json_object()
        progress = _valid_progress(body)
        with self.store.tx():
            job = self.owned_job(req, body.get("lease_id"))
            if job["state"] != RUNNING:
                return Response(200, {"status": "ok",
                                      "cancel": job["state"] not in (COMPLETED, FAILED)})
            now = time.time()
            changes: dict[str, Any] = {"progress": {**progress, "updated_at": now},
                                       "started_at": job["started_at"] or now}
            if job.get("lease_id") and body.get("lease_id") == job["lease_id"]:
                changes["lease_expires_at"] = now + self.settings.lease_ttl_s
            self.store.update_job(job["job_id"], **changes)
        return Response(200, {"status": "ok", "cancel": bool(job.get("cancel_requested_at"))})


def _valid_progress(body: Mapping[str, Any]) -> dict[str, Any]:
    fraction, eta, metrics = body.get("fraction"), body.get("eta_s"), body.get("metrics")
    number = (int, float)
    if fraction is not None and (not isinstance(fraction, number) or not 0 <= fraction <= 1):
        raise Problem(422, "fraction must be a number in [0, 1]")
    if eta is not None and (not isinstance(eta, number) or eta < 0):
        raise Problem(422, "eta_s must be a number >= 0")
    if metrics is not None and not isinstance(metrics, dict):
        raise Problem(422, "metrics must be a JSON object")
    out = {"fraction": fraction, "eta_s": eta,
           "stage": str(body["stage"])[:200] if body.get("stage") is not None else None,
           "message": str(body["message"])[:1000] if body.get("message") is not None else None,
           "metrics": metrics}
    return {k: v for k, v in out.items() if v is not None}
