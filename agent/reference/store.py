"""SQLite storage of the reference coordinator: miners, jobs, receipts, logs, packages.

One connection in WAL mode shared by the server's threads behind a re-entrant lock;
:meth:`Store.tx` makes a group of statements one transaction, so check-then-act
logic (claim a job, check a lease) cannot interleave with another request.
Time-driven transitions (TTL expiry, lease expiry, cancel grace) happen in
:meth:`Store.sweep`, run at the start of every transaction that reads jobs.

Every job carries a sequence number for its event stream (``GET /v1/jobs/{id}/events``):
``seq`` is bumped by each change a client can see (``state_seq`` records the last such
change of the job row) and by each stored log chunk (tagged with its own ``seq``). A
committed bump wakes :meth:`Store.wait_changed`, which long-polls wait on.

Work for miners is signalled apart: a commit that queued a job (submitted, retried,
requeued after its lease lapsed) or lowered a miner's in-flight count calls the
listeners given to :meth:`Store.on_work`, after the commit, so a held poll that wakes
finds what woke it. :meth:`Store.next_lapse` says when the next lease runs out, the one
time-driven change that makes work without a request.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

from agent.reference.model import (
    CANCELED,
    COMPLETED,
    EXPIRED,
    FAILED,
    QUEUED,
    RUNNING,
    Problem,
)

log = logging.getLogger(__name__)
RETAIN_EVERY_S = 60.0  # retention runs with the sweep, at most this often

SCHEMA = """
CREATE TABLE IF NOT EXISTS miners (
    miner_id TEXT PRIMARY KEY, capabilities TEXT NOT NULL, concurrency INTEGER NOT NULL,
    region TEXT, inflight INTEGER NOT NULL DEFAULT 0, session_token TEXT NOT NULL,
    status TEXT, metadata TEXT, extensions TEXT NOT NULL, registered_at REAL, last_seen REAL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, payload TEXT NOT NULL, constraints TEXT NOT NULL,
    state TEXT NOT NULL, miner_id TEXT, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    assigned_at REAL, started_at REAL, finished_at REAL, finished_by TEXT,
    result TEXT, metrics TEXT, error_code TEXT, error_message TEXT, partial INTEGER,
    lease_id TEXT, lease_expires_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested_at REAL, progress TEXT);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, body TEXT NOT NULL, created_at REAL);
CREATE TABLE IF NOT EXISTS logs (
    job_id TEXT NOT NULL, stream TEXT NOT NULL, start INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (job_id, stream, start));
CREATE TABLE IF NOT EXISTS packages (
    job_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, data BLOB NOT NULL,
    created_at REAL);
-- A package's bytes in pieces of PACKAGE_PIECE_BYTES: an upload is stored and a download
-- read a piece at a time, never whole. (One blob read at an offset walks its overflow
-- pages from the start: 200 MB in 1 MiB reads took 4.2 s.) Rows from before keep
-- packages.data, which is empty for packages stored in pieces.
CREATE TABLE IF NOT EXISTS package_pieces (
    job_id TEXT NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, n));
CREATE TRIGGER IF NOT EXISTS package_pieces_gone AFTER DELETE ON packages BEGIN
    DELETE FROM package_pieces WHERE job_id = OLD.job_id;
END;
CREATE TABLE IF NOT EXISTS presigned (
    token TEXT PRIMARY KEY, data BLOB, sha256 TEXT, created_at REAL);
CREATE TABLE IF NOT EXISTS checkpoints (
    token TEXT PRIMARY KEY, job_id TEXT NOT NULL, sha256 TEXT NOT NULL, data BLOB NOT NULL,
    created_at REAL);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
"""
# Columns added after the first release: a database from before gets them on open. Rows
# from before start at seq 1, so a client reading events from 0 sees them.
_ADDED_COLUMNS = (("jobs", "seq", "INTEGER NOT NULL DEFAULT 1"),
                  ("jobs", "state_seq", "INTEGER NOT NULL DEFAULT 1"),
                  ("logs", "seq", "INTEGER NOT NULL DEFAULT 1"),
                  ("jobs", "cancel_force", "INTEGER NOT NULL DEFAULT 0"))
# Job columns whose change a client sees in the job view: a change bumps the job's seq.
_VISIBLE = frozenset({"state", "miner_id", "assigned_at", "started_at", "finished_at",
                      "result", "error_code", "error_message", "partial", "progress",
                      "cancel_requested_at", "attempts"})
_BUMP_STATE = "seq=seq+1, state_seq=seq+1"
_HALF_US = 5e-7
PACKAGE_PIECE_BYTES = 1 << 20  # a stored package's rows (package_pieces)
# A job's log chunks after an event, in event order: read row by row along the
# logs_seq index (made on open), so a page costs its own chunks, not the log's.
LOG_CHUNKS_SQL = ("SELECT seq, stream, start, data FROM logs WHERE job_id=? AND seq > ? "
                  "ORDER BY seq")
# The client guide's statuses as SQL over the coordinator's columns: the same mapping as
# agent.reference.model.client_status (tests check that the two agree).
STATUS_WHERE = {
    "pending": "state='QUEUED'",
    "assigned": "state='RUNNING' AND cancel_requested_at IS NULL AND started_at IS NULL",
    "running": "state='RUNNING' AND cancel_requested_at IS NULL AND started_at IS NOT NULL",
    "canceling": "state='RUNNING' AND cancel_requested_at IS NOT NULL",
    "completed": "state='COMPLETED'",
    "failed": "state IN ('FAILED', 'EXPIRED')",
    "canceled": "state='CANCELED'",
}
_JSON_COLUMNS = ("payload", "constraints", "result", "metrics", "progress", "capabilities",
                 "metadata", "extensions")


def decode(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for key in _JSON_COLUMNS:
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    return out


def dumps(value: Any) -> str | None:
    """JSON text for a column, or None for None."""
    return None if value is None else json.dumps(value, separators=(",", ":"))


class Store:
    """The coordinator's state; every public method is atomic and thread-safe."""

    def __init__(self, path: str, *, cancel_grace_s: float = 60.0,
                 retain_days: float | None = None, retain_bytes: int | None = None) -> None:
        self.path = path
        self.cancel_grace_s = cancel_grace_s
        self.retain_s = None if retain_days is None else retain_days * 86400
        self.retain_bytes = retain_bytes
        self._retained_at = float("-inf")  # monotonic time of the last retention pass
        self._lock = threading.RLock()
        self._depth = 0
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._add_columns()
        # LOG_CHUNKS_SQL's order: without it each page of events sorted every chunk left,
        # blobs and all (a client read a 100 MB log's events in 19 s; with it, 1.6 s)
        self._db.execute("CREATE INDEX IF NOT EXISTS logs_seq ON logs(job_id, seq)")
        self._changed = threading.Condition()
        self._generation = 0  # bumped (and waiters woken) by each commit that bumped a seq
        self._dirty = False
        self._closed = False
        self._work = False  # this transaction made work for some miner
        self._work_listeners: list[Callable[[], None]] = []

    def _add_columns(self) -> None:
        for table, column, decl in _ADDED_COLUMNS:
            have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._tell_work()  # held polls wake, and see the store closed

    def on_work(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the committing thread) after each commit that queued a
        job or freed a miner's slot, and at close."""
        self._work_listeners.append(listener)

    def _tell_work(self) -> None:
        for listener in list(self._work_listeners):
            listener()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def generation(self) -> int:
        """A counter that moves whenever a job's seq moved; read it before looking."""
        return self._generation

    def wait_changed(self, generation: int, timeout_s: float) -> bool:
        """Wait until some job changed after ``generation`` was read (True), the timeout
        passes or the store closes (False)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._generation != generation or self._closed,
                timeout=max(0.0, timeout_s)) and not self._closed

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (nested calls join the outer one), under the store's lock."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self._db
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                    self._dirty = self._work = False
                raise
            self._depth -= 1
            if outer:
                self._db.execute("COMMIT")
                self._notify()
                if self._work:
                    self._work = False
                    self._tell_work()

    def _notify(self) -> None:
        """After a commit: wake long-polls if the transaction bumped a job's seq."""
        if not self._dirty:
            return
        self._dirty = False
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    # -- time-driven transitions ----------------------------------------------------------

    def sweep(self, now: float | None = None) -> None:
        """Expire jobs past their TTL, requeue jobs whose lease ran out, end stale cancels."""
        now = time.time() if now is None else now
        with self.tx() as db:
            ended = db.execute(f"UPDATE jobs SET state=?, finished_at=?, finished_by='server', "
                               f"lease_expires_at=NULL, {_BUMP_STATE} WHERE state IN (?, ?) "
                               "AND expires_at <= ?", (EXPIRED, now, QUEUED, RUNNING, now))
            self._dirty |= ended.rowcount > 0
            ended = db.execute(f"UPDATE jobs SET state=?, finished_at=?, finished_by='server', "
                               f"lease_expires_at=NULL, {_BUMP_STATE} WHERE state=? AND "
                               "cancel_requested_at <= ?",
                               (CANCELED, now, RUNNING, now - self.cancel_grace_s))
            self._dirty |= ended.rowcount > 0
            lapsed = [r["job_id"] for r in db.execute(
                "SELECT job_id FROM jobs WHERE state=? AND lease_expires_at <= ?",
                (RUNNING, now))]
            for job_id in lapsed:
                self.requeue(job_id)
        if time.monotonic() - self._retained_at >= RETAIN_EVERY_S:
            self._retained_at = time.monotonic()
            self.retain(now)

    def retain(self, now: float | None = None) -> list[str]:
        """Drop finished jobs' packages and logs (and checkpoints, presigned objects) past
        ``retain_days``, then the oldest finished jobs' until the packages and logs kept
        total at most ``retain_bytes``.

        A job's package and logs go together (its package holds its logs too); their
        age is the package's upload, else the job's end. Job records and receipts stay;
        a job whose outputs went shows no package, its download answers 404 and its log
        is empty. Returns the job ids whose outputs went.
        """
        now = time.time() if now is None else now
        gone: list[str] = []
        with self.tx() as db:
            states = (COMPLETED, FAILED, CANCELED, EXPIRED)
            finished = {r["job_id"]: r["finished_at"] for r in db.execute(
                "SELECT job_id, finished_at FROM jobs WHERE state IN (?, ?, ?, ?)", states)}
            kept: dict[str, list[Any]] = {  # job -> [bytes, age's start]
                r["job_id"]: [int(r["size"]), r["created_at"] or 0.0]
                for r in db.execute("SELECT job_id, size, created_at FROM packages")}
            for r in db.execute("SELECT job_id, SUM(length(data)) AS n FROM logs "
                                "GROUP BY job_id"):  # length() reads no log bytes
                kept.setdefault(r["job_id"], [0, None])[0] += int(r["n"] or 0)
            outputs = sorted(((job_id, size, at if at is not None
                               else finished.get(job_id) or now)
                              for job_id, (size, at) in kept.items()),
                             key=lambda o: o[2], reverse=True)  # newest first
            if self.retain_s is not None:
                cutoff = now - self.retain_s
                gone += [job_id for job_id, _, at in outputs
                         if job_id in finished and at < cutoff]
                db.execute("DELETE FROM checkpoints WHERE created_at < ?", (cutoff,))
                db.execute("DELETE FROM presigned WHERE created_at < ?", (cutoff,))
            if self.retain_bytes is not None:
                total = 0  # a running job's outputs count, and stay
                for job_id, size, _ in outputs:
                    if job_id in gone:
                        continue
                    total += size
                    if total > self.retain_bytes and job_id in finished:
                        gone.append(job_id)
                        total -= size
            for job_id in gone:
                db.execute("DELETE FROM packages WHERE job_id=?", (job_id,))
                db.execute("DELETE FROM logs WHERE job_id=?", (job_id,))
        if gone:
            log.info("retention: removed the packages and logs of %d finished job(s)",
                     len(gone))
        return gone

    def forced_cancels(self, miner_id: str, within_s: float) -> list[str]:
        """Jobs of ``miner_id`` a client force-canceled in the last ``within_s``."""
        with self.tx() as db:
            return [r["job_id"] for r in db.execute(
                "SELECT job_id FROM jobs WHERE miner_id=? AND state=? AND cancel_force=1 "
                "AND finished_at >= ?", (miner_id, CANCELED, time.time() - within_s))]

    def requeue(self, job_id: str) -> None:
        """Put a job whose lease lapsed back in the queue as a fresh attempt."""
        with self.tx() as db:
            db.execute("UPDATE jobs SET state=?, miner_id=NULL, lease_id=NULL, "
                       "lease_expires_at=NULL, assigned_at=NULL, started_at=NULL, "
                       f"progress=NULL, {_BUMP_STATE} WHERE job_id=?", (QUEUED, job_id))
            self._dirty = self._work = True
            db.execute("DELETE FROM logs WHERE job_id=?", (job_id,))
            db.execute("DELETE FROM packages WHERE job_id=?", (job_id,))

    # -- miners ---------------------------------------------------------------------------

    def register(self, miner_id: str, capabilities: Mapping[str, Any], concurrency: int,
                 region: str | None, extensions: list[str]) -> str:
        """Create or replace a miner; its in-flight count starts at 0. Returns a token."""
        token = uuid.uuid4().hex
        now = time.time()
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO miners (miner_id, capabilities, concurrency, region, "
                "inflight, session_token, status, metadata, extensions, registered_at, "
                "last_seen) VALUES (?, ?, ?, ?, 0, ?, 'ONLINE', '{}', ?, ?, ?)",
                (miner_id, dumps(dict(capabilities)), concurrency, region, token,
                 dumps(extensions), now, now))
            self._work = True  # its in-flight count starts again at 0
        return token

    def miner(self, miner_id: str) -> dict[str, Any] | None:
        with self.tx() as db:
            return decode(db.execute("SELECT * FROM miners WHERE miner_id=?",
                                      (miner_id,)).fetchone())

    def update_miner_seen(self, miner_id: str, status: Any, metadata: Any) -> None:
        """Store a heartbeat's status and free-form metadata."""
        with self.tx() as db:
            db.execute("UPDATE miners SET status=?, metadata=?, last_seen=? WHERE miner_id=?",
                       (str(status or "ONLINE"), dumps(metadata if isinstance(metadata, dict)
                                                       else {}), time.time(), miner_id))

    def set_inflight(self, miner_id: str, inflight: int | None = None, delta: int = 0) -> None:
        """Overwrite (heartbeat) or adjust (poll, result) a miner's in-flight count."""
        with self.tx() as db:
            if inflight is not None:
                old = db.execute("SELECT inflight FROM miners WHERE miner_id=?",
                                 (miner_id,)).fetchone()
                lowered = old is not None and inflight < old["inflight"]
                db.execute("UPDATE miners SET inflight=? WHERE miner_id=?", (inflight, miner_id))
            else:
                lowered = delta < 0
                db.execute("UPDATE miners SET inflight=MAX(0, inflight + ?) WHERE miner_id=?",
                           (delta, miner_id))
            self._work |= bool(lowered)  # a slot freed: a held poll of this miner may go on

    # -- jobs -----------------------------------------------------------------------------

    def submit(self, payload: Mapping[str, Any], constraints: Mapping[str, Any],
               ttl_s: float, job_id: str | None = None) -> str:
        """Queue a job under ``job_id`` (a fresh one when None); 409 when it is taken."""
        job_id = job_id or uuid.uuid4().hex
        now = time.time()
        with self.tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE job_id=?", (job_id,)).fetchone():
                raise Problem(409, f"job id {job_id!r} is taken; submit without a job_id "
                              "for a fresh one")
            db.execute("INSERT INTO jobs (job_id, payload, constraints, state, created_at, "
                       "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, dumps(dict(payload)), dumps(dict(constraints)), QUEUED, now,
                        now + ttl_s))
            self._work = True
        return job_id

    def next_lapse(self) -> float | None:
        """When (``time.time()``) the next running job's lease runs out, or None."""
        with self.tx() as db:
            row = db.execute("SELECT MIN(lease_expires_at) AS t FROM jobs WHERE state=?",
                             (RUNNING,)).fetchone()
        return None if row is None or row["t"] is None else float(row["t"])

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self.tx() as db:
            self.sweep()
            return decode(db.execute("SELECT * FROM jobs WHERE job_id=?",
                                      (job_id,)).fetchone())

    def job_or_404(self, job_id: str) -> dict[str, Any]:
        job = self.job(job_id)
        if job is None:
            raise Problem(404, "Job not found")
        return job

    def jobs(self, states: tuple[str, ...] = (), miner_id: str | None = None,
             limit: int = 100) -> list[dict[str, Any]]:
        """Jobs oldest first, optionally filtered by state(s) and miner."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", list[Any]()
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        if miner_id is not None:
            sql += " AND miner_id=?"
            args.append(miner_id)
        with self.tx() as db:
            self.sweep()
            rows = db.execute(sql + " ORDER BY rowid LIMIT ?", (*args, limit)).fetchall()
        return [j for j in map(decode, rows) if j is not None]

    def client_jobs(self, statuses: tuple[str, ...] = (), job_type: str | None = None,
                    since: float | None = None, until: float | None = None,
                    limit: int = 100, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """A page of jobs newest first (``created_at`` desc) and how many match in all.

        ``statuses`` are client names (keys of :data:`STATUS_WHERE`); ``since`` and
        ``until`` bound ``created_at`` (seconds since the epoch, until exclusive).
        """
        where, args = ["1=1"], list[Any]()
        if statuses:
            where.append("(" + " OR ".join(f"({STATUS_WHERE[s]})" for s in statuses) + ")")
        if job_type is not None:
            where.append("json_extract(payload, '$.type') = ?")
            args.append(job_type)
        # Half a microsecond of slack: a time read back from the wire's ISO form (to the
        # microsecond, rounded) still selects the job it was copied from.
        if since is not None:
            where.append("created_at >= ?")
            args.append(since - _HALF_US)
        if until is not None:
            where.append("created_at < ?")
            args.append(until - _HALF_US)
        sql = " AND ".join(where)
        with self.tx() as db:
            self.sweep()
            total = int(db.execute(f"SELECT COUNT(*) FROM jobs WHERE {sql}", args).fetchone()[0])
            rows = db.execute(f"SELECT * FROM jobs WHERE {sql} ORDER BY created_at DESC, "
                              "rowid DESC LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return [j for j in map(decode, rows) if j is not None], total

    def delete_job(self, job_id: str) -> None:
        """Remove a job and everything kept for it: logs, package, receipts, checkpoints."""
        with self.tx() as db:
            for table in ("logs", "packages", "receipts", "checkpoints", "jobs"):
                db.execute(f"DELETE FROM {table} WHERE job_id=?", (job_id,))
            self._dirty = True  # a long-poll on it wakes and answers 404

    def update_job(self, job_id: str, **columns: Any) -> None:
        """Set columns of one job; dicts and lists are stored as JSON. A change a client
        can see (not a lease renewal) bumps the job's seq."""
        stored = {k: dumps(v) if isinstance(v, dict | list) else v for k, v in columns.items()}
        names = ", ".join(f"{k}=?" for k in stored)
        with self.tx() as db:
            if self._visible_change(db, job_id, stored):
                names += f", {_BUMP_STATE}"
                self._dirty = True
            db.execute(f"UPDATE jobs SET {names} WHERE job_id=?", (*stored.values(), job_id))

    @staticmethod
    def _visible_change(db: sqlite3.Connection, job_id: str, stored: dict[str, Any]) -> bool:
        visible = sorted(_VISIBLE & stored.keys())
        if not visible:
            return False
        row = db.execute(f"SELECT {', '.join(visible)} FROM jobs WHERE job_id=?",
                         (job_id,)).fetchone()
        return row is not None and any(row[k] != stored[k] for k in visible)

    def add_receipt(self, job_id: str, body: Mapping[str, Any]) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO receipts VALUES (?, ?, ?, ?)",
                       (body["receipt_id"], job_id, dumps(dict(body)), time.time()))

    def receipts(self, job_id: str) -> list[dict[str, Any]]:
        with self.tx() as db:
            rows = db.execute("SELECT body FROM receipts WHERE job_id=? ORDER BY rowid",
                              (job_id,)).fetchall()
        return [json.loads(r["body"]) for r in rows]

    # -- logs and packages ----------------------------------------------------------------

    def log_ends(self, job_id: str) -> dict[str, int]:
        with self.tx() as db:
            rows = db.execute("SELECT stream, MAX(start + length(data)) AS n FROM logs "
                              "WHERE job_id=? GROUP BY stream", (job_id,)).fetchall()
        ends = {"stdout": 0, "stderr": 0}
        ends.update({r["stream"]: int(r["n"]) for r in rows})
        return ends

    def append_log(self, job_id: str, stream: str, start: int, data: bytes) -> None:
        """Store a chunk that begins exactly at the stream's current end."""
        with self.tx() as db:
            db.execute("UPDATE jobs SET seq=seq+1 WHERE job_id=?", (job_id,))
            db.execute("INSERT INTO logs (job_id, stream, start, data, seq) VALUES "
                       "(?, ?, ?, ?, (SELECT seq FROM jobs WHERE job_id=?))",
                       (job_id, stream, start, data, job_id))
            self._dirty = True

    def read_log(self, job_id: str, stream: str, offset: int = 0,
                 limit: int | None = None) -> bytes:
        """The stream's bytes from ``offset`` to its end, or ``limit`` bytes at most (only
        the chunks those bytes lie in are read)."""
        stop = None if limit is None else offset + max(0, limit)
        with self.tx() as db:
            rows = db.execute("SELECT start, data FROM logs WHERE job_id=? AND stream=? "
                              "AND start + length(data) > ? AND start < ? ORDER BY start",
                              (job_id, stream, offset, stop if stop is not None else 1 << 62)
                              ).fetchall()
        if not rows:
            return b""
        begin = max(0, offset - rows[0]["start"])
        data = b"".join(bytes(r["data"]) for r in rows)
        return data[begin:] if stop is None else data[begin:begin + (stop - offset)]

    def log_chunks(self, job_id: str, after: int, max_bytes: int) -> tuple[list[dict[str, Any]],
                                                                            bool]:
        """Log chunks stored after event ``after``, in seq order, about ``max_bytes`` at most
        (one chunk at least); True with them when more are left."""
        chunks: list[dict[str, Any]] = []
        size = 0
        with self.tx() as db:  # rows are read one at a time: a long log is not loaded whole
            for row in db.execute(LOG_CHUNKS_SQL, (job_id, after)):
                if chunks and size + len(row["data"]) > max_bytes:
                    return chunks, True
                chunks.append({"seq": int(row["seq"]), "stream": row["stream"],
                               "offset": int(row["start"]), "data": bytes(row["data"])})
                size += len(row["data"])
        return chunks, False

    def put_checkpoint(self, token: str, job_id: str, sha256: str, data: bytes) -> None:
        """Keep a checkpoint archive that ``job_id``'s payload fetches by ``token``."""
        with self.tx() as db:
            db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                       (token, job_id, sha256, data, time.time()))

    def checkpoint(self, token: str) -> tuple[str, bytes] | None:
        """A kept checkpoint archive: (sha256, bytes), or None."""
        with self.tx() as db:
            row = db.execute("SELECT sha256, data FROM checkpoints WHERE token=?",
                             (token,)).fetchone()
        return (row["sha256"], bytes(row["data"])) if row is not None else None

    def put_package(self, job_id: str, sha256: str, data: bytes) -> None:
        self.put_package_file(job_id, sha256, io.BytesIO(data), len(data))

    def put_package_file(self, job_id: str, sha256: str, src: BinaryIO, size: int) -> None:
        """Store ``size`` bytes read from ``src`` as the job's package, a piece at a time."""
        with self.tx() as db:
            db.execute("DELETE FROM package_pieces WHERE job_id=?", (job_id,))  # a REPLACE
            db.execute("INSERT OR REPLACE INTO packages VALUES (?, ?, ?, X'', ?)",  # fires
                       (job_id, sha256, size, time.time()))                  # no trigger
            for n in itertools.count():
                piece = src.read(PACKAGE_PIECE_BYTES)
                if not piece:
                    break
                db.execute("INSERT INTO package_pieces VALUES (?, ?, ?)", (job_id, n, piece))

    def read_package(self, job_id: str, sha256: str, offset: int, size: int) -> bytes:
        """``size`` bytes of the job's package from ``offset``; fewer (none) once the
        package is gone or was replaced by another (``sha256`` no longer its own)."""
        with self.tx() as db:
            row = db.execute("SELECT rowid, size, length(data) AS old FROM packages "
                             "WHERE job_id=? AND sha256=?", (job_id, sha256)).fetchone()
            if row is None or size <= 0:
                return b""
            if row["old"]:  # stored whole, before pieces
                with db.blobopen("packages", "data", row["rowid"], readonly=True) as blob:
                    blob.seek(min(offset, row["old"]))
                    return blob.read(size)
            first, last = offset // PACKAGE_PIECE_BYTES, (offset + size - 1) // PACKAGE_PIECE_BYTES
            data = b"".join(r["data"] for r in db.execute(
                "SELECT data FROM package_pieces WHERE job_id=? AND n BETWEEN ? AND ? "
                "ORDER BY n", (job_id, first, last)))
        start = offset - first * PACKAGE_PIECE_BYTES
        return data[start:start + size]

    def package_info(self, job_id: str) -> dict[str, Any] | None:
        with self.tx() as db:
            row = db.execute("SELECT sha256, size FROM packages WHERE job_id=?",
                             (job_id,)).fetchone()
        return dict(row) if row is not None else None

    def package_data(self, job_id: str) -> bytes | None:
        """The whole package (a checkpoint is taken out of it); a download reads it in
        pieces (:meth:`read_package`)."""
        with self.tx() as db:
            row = db.execute("SELECT sha256, size FROM packages WHERE job_id=?",
                             (job_id,)).fetchone()
        if row is None:
            return None
        return self.read_package(job_id, row["sha256"], 0, int(row["size"]))

    def presign(self) -> str:
        token = uuid.uuid4().hex
        with self.tx() as db:
            db.execute("INSERT INTO presigned VALUES (?, NULL, NULL, ?)", (token, time.time()))
        return token

    def presigned(self, token: str) -> dict[str, Any] | None:
        with self.tx() as db:
            row = db.execute("SELECT * FROM presigned WHERE token=?", (token,)).fetchone()
        return dict(row) if row is not None else None

    def put_presigned(self, token: str, sha256: str, data: bytes) -> None:
        with self.tx() as db:
            db.execute("UPDATE presigned SET data=?, sha256=? WHERE token=?",
                       (data, sha256, token))
