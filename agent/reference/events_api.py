"""A job's event stream for clients: ``GET /v1/jobs/{id}/events?after=SEQ&wait_s=S``.

What `miner-agent watch` and `logs -f` read. Each change a client can see bumps the
job's sequence number (see :mod:`agent.reference.store`): a change of the job view
(status, progress, stage, ETA, metrics, error) is one ``state`` event carrying the view
as it is now, and each stored log chunk is one ``log`` event. The answer holds the
events after ``after``, in order, as soon as there is one (or the job has ended), else
when ``wait_s`` (at most 30) has passed with nothing new::

    {"events": [{"seq": 7, "type": "log", "stream": "stdout", "offset": 120,
                 "data": "step 3/10\\n"},
                {"seq": 8, "type": "state", "status": "running", "progress": 30.0, ...}],
     "next": 8, "done": false, "more": false}

Pass ``next`` as the following call's ``after``; ``more`` says the answer was cut short
(about 256 KiB of log a call) and the next call has more at once. Intermediate states
between two calls collapse into the latest one (a state event is the view now, not a
history); log chunks are never skipped. ``done`` is true once the job has ended and
every event so far was delivered. ``data`` is the chunk as UTF-8 text (an invalid
sequence, or a character a chunk boundary split, becomes U+FFFD);
``GET /v1/jobs/{id}/logs`` has the exact bytes from ``offset``. A requeued job starts
its logs again at offset 0.
"""

from __future__ import annotations

import time
from typing import Any

from agent.reference.model import TERMINAL, Problem, job_view
from agent.reference.server import Request, Response, Route, route
from agent.reference.store import Store

MAX_WAIT_S = 30.0
MAX_ANSWER_LOG_BYTES = 256 * 1024
# A long-poll looks again at least this often, so time-driven transitions (a TTL, a
# cancel's grace) that no request triggers still show within about a second.
RECHECK_S = 1.0


class EventsAPI:
    """The handler for ``GET /v1/jobs/{job_id}/events``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def routes(self) -> list[Route]:
        return [route("GET", "/v1/jobs/{job_id}/events", self.events, "client")]

    def events(self, req: Request) -> Response:
        after = _number(req.query.get("after", "0"), "after")
        wait_s = min(MAX_WAIT_S, max(0.0, _number(req.query.get("wait_s", "0"), "wait_s")))
        deadline = time.monotonic() + wait_s
        while True:
            generation = self.store.generation  # read before looking: no change is missed
            answer = self.collect(req.params["job_id"], int(after))
            left = deadline - time.monotonic()
            if answer["events"] or answer["done"] or left <= 0:
                return Response(200, answer)
            if not self.store.wait_changed(generation, min(left, RECHECK_S)) and \
                    self.store.closed:
                raise Problem(503, "the coordinator is stopping")

    def collect(self, job_id: str, after: int) -> dict[str, Any]:
        """The events after ``after`` as they stand now (no waiting)."""
        with self.store.tx():
            job = self.store.job_or_404(job_id)
            after = max(0, min(after, int(job["seq"])))  # a cursor from the future: now
            chunks, more = self.store.log_chunks(job_id, after, MAX_ANSWER_LOG_BYTES)
        events: list[dict[str, Any]] = [
            {"seq": c["seq"], "type": "log", "stream": c["stream"], "offset": c["offset"],
             "data": c["data"].decode("utf-8", errors="replace")} for c in chunks]
        upto = chunks[-1]["seq"] if more else int(job["seq"])
        state_seq = int(job["state_seq"])
        if after < state_seq <= upto:
            events.append(state_event(job, state_seq))
            events.sort(key=lambda e: int(e["seq"]))
        done = job["state"] in TERMINAL and upto >= int(job["seq"])
        return {"events": events, "next": upto, "done": done, "more": more}


def state_event(job: dict[str, Any], seq: int) -> dict[str, Any]:
    """The job view's moving parts as one event; ``eta_s`` counts from now."""
    view = job_view(job)
    detail = view["progress_detail"] if isinstance(view["progress_detail"], dict) else {}
    eta = None
    if job["state"] not in TERMINAL and isinstance(detail.get("eta_s"), int | float):
        eta = max(0.0, round(float(detail.get("updated_at", 0)) + float(detail["eta_s"])
                             - time.time(), 1))
    return {"seq": seq, "type": "state", "status": view["status"], "progress": view["progress"],
            "stage": detail.get("stage"), "message": detail.get("message"), "eta_s": eta,
            "metrics": detail.get("metrics"), "error": view["error"],
            "started_at": view["started_at"], "finished_at": view["finished_at"]}


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise Problem(422, f"{name} must be a number") from None
