"""Durable state in SQLite (WAL): each job's phase, log offsets, unacknowledged outcomes.

Phases of a job on this node::

    accepted -> running -> finished -> reported
                     \\          \\-> dropped   (the coordinator canceled it meanwhile)
                      \\-> (agent crash) recovered on restart as failed/agent_restart

``finished`` holds the exact report (``/result`` or ``/fail`` body) that has not
been acknowledged yet; after a crash it is sent once more, never rebuilt. Every
write commits before the agent acts on it, so a SIGKILL at any point leaves a
state the next start can resume from.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    job_json    TEXT NOT NULL,
    lease_id    TEXT,
    phase       TEXT NOT NULL,
    outcome     TEXT,
    report_json TEXT,
    package_dir TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS log_offsets (
    job_id  TEXT NOT NULL,
    stream  TEXT NOT NULL,
    shipped INTEGER NOT NULL,
    PRIMARY KEY (job_id, stream)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""



class Phase(enum.StrEnum):
    """Where a job stands on this node; stored by value, so the spellings are fixed."""

    ACCEPTED = "accepted"  # handed over by poll, not started yet
    RUNNING = "running"  # its process may be running; its package folder is named
    FINISHED = "finished"  # packaged; the report stored here is not acknowledged yet
    REPORTED = "reported"  # the coordinator acknowledged the report
    DROPPED = "dropped"  # not reported, on purpose (canceled or expired meanwhile)
    REJECTED = "rejected"  # the coordinator refused the report for good


OPEN_PHASES = (Phase.ACCEPTED, Phase.RUNNING)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    job: dict[str, Any]
    lease_id: str | None
    phase: Phase
    outcome: str | None
    report: dict[str, Any] | None
    package_dir: str | None


class Journal:
    """A small, synchronous, thread-safe store; every call is one short transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives a crash
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def accept(self, job_id: str, job: dict[str, Any], lease_id: str | None) -> bool:
        """Record a job handed to us; False for a repeat of one we hold.

        A job we finished or dropped that comes back under a new lease is a new attempt
        (the coordinator requeued it after our lease lapsed): its record starts over.
        """
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, job_json, lease_id, phase, created_at, "
                "updated_at) VALUES (?, ?, ?, 'accepted', ?, ?)",
                (job_id, json.dumps(job), lease_id, now, now))
            if cur.rowcount == 1:
                return True
            if lease_id is None:
                return False
            cur = self._db.execute(
                "UPDATE jobs SET job_json = ?, lease_id = ?, phase = 'accepted', outcome = NULL, "
                "report_json = NULL, updated_at = ? WHERE job_id = ? AND lease_id IS NOT ? "
                "AND phase IN ('reported', 'dropped', 'rejected')",
                (json.dumps(job), lease_id, now, job_id, lease_id))
            if cur.rowcount == 1:
                self._db.execute("DELETE FROM log_offsets WHERE job_id = ?", (job_id,))
                return True
            return False

    def set_phase(self, job_id: str, phase: Phase, **fields: Any) -> None:
        sets = ["phase = ?", "updated_at = ?"]
        args: list[Any] = [Phase(phase).value, time.time()]
        for name in ("outcome", "package_dir", "lease_id"):
            if name in fields:
                sets.append(f"{name} = ?")
                args.append(fields[name])
        if "report" in fields:
            sets.append("report_json = ?")
            args.append(json.dumps(fields["report"], default=str))
        self._exec(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?", (*args, job_id))

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._exec("SELECT job_id, job_json, lease_id, phase, outcome, report_json, "
                          "package_dir FROM jobs WHERE job_id = ?", (job_id,))
        return _record(rows[0]) if rows else None

    def in_phase(self, *phases: Phase) -> list[JobRecord]:
        marks = ",".join("?" for _ in phases)
        rows = self._exec("SELECT job_id, job_json, lease_id, phase, outcome, report_json, "
                          f"package_dir FROM jobs WHERE phase IN ({marks}) ORDER BY created_at",
                          tuple(Phase(p).value for p in phases))
        return [_record(r) for r in rows]

    def shipped(self, job_id: str, stream: str) -> int:
        rows = self._exec("SELECT shipped FROM log_offsets WHERE job_id = ? AND stream = ?",
                          (job_id, stream))
        return int(rows[0][0]) if rows else 0

    def set_shipped(self, job_id: str, stream: str, offset: int) -> None:
        self._exec("INSERT INTO log_offsets (job_id, stream, shipped) VALUES (?, ?, ?) "
                   "ON CONFLICT(job_id, stream) DO UPDATE SET shipped = excluded.shipped",
                   (job_id, stream, offset))

    def counts(self) -> dict[str, int]:
        return {phase: n for phase, n in
                self._exec("SELECT phase, COUNT(*) FROM jobs GROUP BY phase")}

    def prune(self, keep_s: float) -> list[str]:
        """Forget reported and dropped jobs older than ``keep_s``; returns their ids."""
        cutoff = time.time() - keep_s
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT job_id FROM jobs WHERE phase IN ('reported', 'dropped') "
                "AND updated_at < ?", (cutoff,))]
            for job_id in ids:
                self._db.execute("DELETE FROM log_offsets WHERE job_id = ?", (job_id,))
                self._db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        return ids


def _record(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(job_id=row[0], job=json.loads(row[1]), lease_id=row[2], phase=Phase(row[3]),
                     outcome=row[4], report=json.loads(row[5]) if row[5] else None,
                     package_dir=row[6])
