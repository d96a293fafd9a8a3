"""Durable state in SQLite (WAL): each job's phase, log offsets, unacknowledged outcomes.

Phases of a job on this node::

    accepted -> running -> finished -> reported
                     \\          \\-> dropped   (the coordinator canceled it meanwhile)
                      \\-> (agent crash) recovered on restart as failed/agent_restart

``finished`` holds the exact report (``/result`` or ``/fail`` body) that has not
been acknowledged yet, and its delivery state (tries, last error, whether an answer
was lost after a send, the package upload's state); the outbox
(:mod:`agent.daemon.outbox`) retries it while the agent runs, and after a crash it is
sent once more, never rebuilt.

Durability, grouped: every write is committed to the write-ahead log at once (a SIGKILL
at any point leaves a state the next start can resume from), and :meth:`Journal.durable`
flushes it for a power loss: one ``fdatasync`` for all who wait meanwhile, in the
journal's own thread, never on the event loop. The daemon awaits it before a report or
upload leaves; a started job's records are flushed within a second
(:meth:`Journal.durable_within`: usually by the next report's flush), and other records
(``reported``, log offsets, tries) reach the disk with the next flush. That thread also
checkpoints.

Retention: a finished job's package is pruned (by age or by the size cap, see
:mod:`agent.daemon.recovery`) while its row stays, marked ``pruned_at``, with its outcome
and the report (result and zip hashes); its job payload shrinks to the id and its log
offsets go. Rows of pruned packages are deleted later (see :meth:`Journal.forget`).
Ages are clock-jump safe: each write stores the monotonic time and the boot id beside
``updated_at``; a row written in this boot ages by the monotonic clock, another by the
wall clock, and an age is never negative.

A full disk is the exception (``database or disk is full``, or an I/O error from a
write that found no room): the write is kept in memory, in order, and tried again
before every later call, so the agent keeps serving. While writes wait, what they
record (a phase, an unacknowledged report, a log offset) is lost if the agent dies
before space returns; a restart then sees the job's last written phase.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MAX_PENDING = 10_000  # writes kept in memory while the disk is full; older ones are dropped
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
CHECKPOINT_BYTES = 4 << 20  # the write-ahead log is copied into the database past this
SIZE_EVERY = 16  # flushes between looks at the log's size (and whether it is still there)
WAL_KEEP_BYTES = 1 << 20
BACKSTOP_PAGES = 5000  # about 20 MiB of log
DONE_PHASES = ("reported", "dropped", "rejected")  # a package of these may be pruned
# A row's age in seconds, given (this boot's id, monotonic now, wall now): by the
# monotonic clock when the row was written in this boot, else by the wall clock; >= 0.
_AGE_SQL = ("MAX(0, CASE WHEN boot_id = ? AND updated_mono IS NOT NULL THEN ? - updated_mono "
            "ELSE ? - updated_at END)")

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
    delivery: dict[str, Any] | None = None  # the report's tries, last error, upload state


# Columns added after the first release, by an idempotent migration on open.
# (never in SCHEMA, so one path makes them for new and old journals alike; old rows get
# NULL): a report's delivery state, and retention's marks and clock-safe ages.
ADDED_COLUMNS = {"jobs": {"delivery_json": "TEXT", "pruned_at": "REAL", "updated_mono": "REAL",
                          "boot_id": "TEXT", "package_bytes": "INTEGER"}}


def _add_columns(db: sqlite3.Connection, added: dict[str, dict[str, str]]) -> None:
    """ALTER TABLE ... ADD COLUMN for each column an older journal lacks."""
    for table, columns in added.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, decl in columns.items():
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")


@dataclass(frozen=True)
class _FlushRequest:
    """One flush asked of the flushing thread: every write up to ``upto``, its outcome
    for ``future`` (on the loop that asked)."""

    future: asyncio.Future[None]
    upto: int


class Journal:
    """A small, synchronous, thread-safe store; every call is one short transaction."""

    def __init__(self, path: Path, *, checkpoint_bytes: int = CHECKPOINT_BYTES) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.checkpoint_bytes = checkpoint_bytes
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, tuple[Any, ...]]] = []  # writes the full disk refused
        self._kept_leases: dict[str, str | None] = {}  # accepted while the disk was full
        self._db.execute("PRAGMA journal_mode=WAL")
        # Commits reach the log without a flush; durable() flushes for everyone at once.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # The flushing thread checkpoints; SQLite's own is the backstop for unawaited writes.
        self._db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        # A log that starts over after a checkpoint is cut back to this size.
        self._db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        self._db.executescript(SCHEMA)
        _add_columns(self._db, ADDED_COLUMNS)
        self.boot_id = current_boot_id()
        self.wal_path = Path(f"{path}-wal")
        self._wal_fd: int | None = None  # kept open by the flushing thread (_flush_log)
        self._until_size = 0  # flushes left before the next look at the log's size
        self._written = 0  # writes committed to the log so far
        self._flushed = 0  # of those, how many a flush has made durable
        self._flush: asyncio.Future[None] | None = None  # the flush asked for, not done
        # Its own thread, fed by a queue: a flush never waits behind other work in the
        # loop's pool (see _flusher_main).
        self._requests: queue.SimpleQueue[_FlushRequest | None] = queue.SimpleQueue()
        self._flush_timer: asyncio.TimerHandle | None = None  # see durable_within
        self._flush_timer_loop: asyncio.AbstractEventLoop | None = None
        self._flusher: threading.Thread | None = None
        self._checkpointer: sqlite3.Connection | None = None  # the worker's own connection
        self._dir_synced = False
        self._flushing = threading.Lock()
        self.flushes = 0  # fdatasync calls made (tests and benchmarks count them)
        self.closed = False
        self.sync()  # the schema and migrations, before anything relies on them

    @property
    def pending(self) -> int:
        """Writes kept in memory because the disk was full (0 when all are on disk)."""
        return len(self._pending)

    def close(self) -> None:
        with self._lock, self._flushing:
            self.closed = True
            self._flush_pending()
            if self._pending:
                log.error("journal: %d write(s) never reached the disk (it is full); a "
                          "restart sees older job phases and re-ships some log lines",
                          len(self._pending))
            if self._flush_timer is not None:
                self._flush_timer.cancel()  # close flushes everything itself
                self._flush_timer = None
            if self._flusher is not None:
                self._requests.put(None)  # it ends once the flush it may be in is done
            if self._checkpointer is not None:
                self._checkpointer.close()
            self._close_wal()
            # The last connection's close checkpoints the log, flushing it and the database.
            self._db.close()

    # -- durability: one flush for every write made so far (group commit) --------------
    async def durable(self) -> None:
        """Return once every write made before this call is on disk.

        Callers that come while a flush runs share the next one: however many records
        wait, it is one ``fdatasync``, in the journal's own thread. Once the journal is
        closed (its close checkpointed and flushed everything) it returns at once.
        """
        target = self._written
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        while self._flushed < target:
            flush = self._flush
            if flush is None or flush.get_loop() is not loop:  # (a loop that went away)
                flush = self._request_flush(loop)
            await asyncio.shield(flush)  # a canceled caller leaves the flush to the rest

    def durable_within(self, delay_s: float) -> None:
        """Have every write made so far on disk within ``delay_s``, without waiting.

        A flush that someone awaits meanwhile covers them (with many jobs, the next
        job's report comes first); else one is made when the time is up. A timer already
        set covers them too (callers pass one delay, so it is due no later).
        """
        if self.closed or self._flushed >= self._written:
            return
        loop = asyncio.get_running_loop()
        if self._flush_timer is not None and self._flush_timer_loop is loop:
            return
        self._flush_timer = loop.call_later(delay_s, self._flush_if_behind, loop)
        self._flush_timer_loop = loop  # (a timer of a loop that went away never fires)

    def _flush_if_behind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_timer = None
        if self.closed or self._flushed >= self._written:
            return
        flush = self._request_flush(loop)
        flush.add_done_callback(_log_failed_flush)

    def _request_flush(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Ask the flushing thread for one flush of every write made so far.

        A queue and ``call_soon_threadsafe``, not ``run_in_executor``: on a busy 2-core
        node the executor's futures, work items and locks cost the loop about 75 us of
        CPU a flush more (``benchmarks/bench_journal.py``), and a job waits for two.
        """
        flush: asyncio.Future[None] = loop.create_future()
        self._flush = flush
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flusher_main, name="journal-flush",
                                             daemon=True)
            self._flusher.start()
        self._requests.put(_FlushRequest(flush, self._written))
        return flush

    def _flusher_main(self) -> None:
        """The flushing thread: one flush per request, its outcome handed to the loop."""
        while (request := self._requests.get()) is not None:
            error: BaseException | None = None
            try:
                self._locked_flush()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiters
                error = exc
            try:
                request.future.get_loop().call_soon_threadsafe(self._flushed_to, request, error)
            except RuntimeError:
                pass  # that loop is closed: nobody waits for this flush any more

    def _flushed_to(self, request: _FlushRequest, error: BaseException | None) -> None:
        """On the loop: a flush is done; wake everyone who waited for it."""
        if self._flush is request.future:
            self._flush = None
        if error is None:
            self._flushed = max(self._flushed, request.upto)
        if request.future.done():
            return
        if error is None:
            request.future.set_result(None)
        else:
            request.future.set_exception(error)

    def sync(self) -> None:
        """:meth:`durable` for callers outside the event loop (blocks)."""
        upto = self._written
        self._locked_flush()
        self._flushed = max(self._flushed, upto)

    def _flush_log(self) -> None:
        """fdatasync the write-ahead log (any descriptor of the file flushes its pages),
        then checkpoint it once it is large. A failed flush is logged, never raised: the
        agent goes on, and a power loss may lose what it held.

        The log's descriptor stays open between flushes, and its size is looked at every
        ``SIZE_EVERY`` flushes: each system call here hands the GIL back and forth with
        the event loop, and on a busy node each such hand-over is a context switch.
        SQLite removes the log only when its last connection closes, and this journal's
        own stays open until :meth:`close`; a log found removed all the same is opened
        afresh and flushed at once.
        """
        self.flushes += 1
        try:
            if self._wal_fd is None:
                self._wal_fd = os.open(self.wal_path, os.O_RDONLY | os.O_CLOEXEC)
                self._until_size = 0
            os.fdatasync(self._wal_fd)
            self._until_size -= 1
            if self._until_size > 0:
                return
            self._until_size = SIZE_EVERY
            info = os.fstat(self._wal_fd)
        except FileNotFoundError:
            return  # no log: every commit is checkpointed into the database, flushed
        except OSError as exc:
            log.error("journal: flushing its log failed (%s); a power loss may lose the "
                      "latest records", exc)
            return
        if info.st_nlink == 0:  # removed behind our back: the live log is another file
            self._close_wal()
            self._flush_log()
            return
        if not self._dir_synced:  # the log's own name, once
            self._dir_synced = _fsync_dir(self.path.parent)
        if info.st_size > self.checkpoint_bytes:
            self._checkpoint()

    def _close_wal(self) -> None:
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def _locked_flush(self) -> None:
        with self._flushing:  # the worker's flush and a blocking sync() never overlap
            if self.closed:  # close flushed everything; the log may be gone
                return
            self._flush_log()

    def _checkpoint(self) -> None:
        """Copy the log into the database without waiting for anyone (the writer goes
        on); the log starts over at a later write once every frame is copied."""
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.path, check_same_thread=False,
                                                     isolation_level=None)
                self._checkpointer.execute("PRAGMA synchronous=NORMAL")
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("journal: checkpoint failed (%s); tried again at the next flush", exc)

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            self._flush_pending()
            return self._db.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        """One write, or, when the disk is full, kept to be tried again in order."""
        with self._lock:
            self._flush_pending()
            if self._pending:
                self._keep(sql, args)
                return
            try:
                self._db.execute(sql, args)
                self._written += 1
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    raise
                log.error("journal: cannot write (%s); keeping writes in memory until space "
                          "returns: they are lost if the agent stops before then", exc)
                self._keep(sql, args)

    def _keep(self, sql: str, args: tuple[Any, ...]) -> None:
        self._pending.append((sql, args))
        if len(self._pending) > MAX_PENDING:
            self._pending.pop(0)
            log.error("journal: more than %d writes wait for disk space; the oldest is "
                      "dropped", MAX_PENDING)

    def _flush_pending(self) -> None:
        """Replay the writes the full disk refused, oldest first (the lock is held)."""
        while self._pending:
            sql, args = self._pending[0]
            try:
                self._db.execute(sql, args)
                self._written += 1
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    log.error("journal: a kept write failed and is dropped: %s", exc)
                    self._pending.pop(0)
                    continue
                return
            self._pending.pop(0)
            if not self._pending:
                log.info("journal: the writes kept while the disk was full are on disk")

    def accept(self, job_id: str, job: dict[str, Any], lease_id: str | None) -> bool:
        """Record a job handed to us; False for a repeat of one we hold.

        A job we finished or dropped that comes back under a new lease is a new attempt
        (the coordinator requeued it after our lease lapsed): its record starts over.
        On a full disk the job is taken (True) and its record kept to be written later.
        """
        try:
            return self._accept(job_id, job, lease_id)
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc):
                raise
        if self._held_already(job_id, lease_id):
            return False
        log.error("journal: job %s accepted without a record on disk (it is full); a crash "
                  "before space returns forgets it", job_id)
        self._kept_leases[job_id] = lease_id
        now, mono, boot = self._stamp()
        self._write("INSERT OR REPLACE INTO jobs (job_id, job_json, lease_id, phase, "
                    "created_at, updated_at, updated_mono, boot_id) "
                    "VALUES (?, ?, ?, 'accepted', ?, ?, ?, ?)",
                    (job_id, json.dumps(job), lease_id, now, now, mono, boot))
        return True

    def _held_already(self, job_id: str, lease_id: str | None) -> bool:
        """The repeat test of ``accept``, by reading (which a full disk allows)."""
        if job_id in self._kept_leases and (lease_id is None
                                            or self._kept_leases[job_id] == lease_id):
            return True
        rows = self._exec("SELECT lease_id, phase FROM jobs WHERE job_id = ?", (job_id,))
        if not rows:
            return False
        held_lease, phase = rows[0]
        return lease_id is None or held_lease == lease_id or phase not in (
            Phase.REPORTED, Phase.DROPPED, Phase.REJECTED)

    def _accept(self, job_id: str, job: dict[str, Any], lease_id: str | None) -> bool:
        now, mono, boot = self._stamp()
        with self._lock:
            self._flush_pending()
            if self._pending:  # its rows may be among the kept writes: decide after them
                raise sqlite3.OperationalError("database or disk is full")
            cur = self._db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, job_json, lease_id, phase, created_at, "
                "updated_at, updated_mono, boot_id) VALUES (?, ?, ?, 'accepted', ?, ?, ?, ?)",
                (job_id, json.dumps(job), lease_id, now, now, mono, boot))
            self._written += 1
            if cur.rowcount == 1:
                return True
            if lease_id is None:
                return False
            cur = self._db.execute(
                "UPDATE jobs SET job_json = ?, lease_id = ?, phase = 'accepted', outcome = NULL, "
                "report_json = NULL, delivery_json = NULL, updated_at = ? WHERE job_id = ? "
                "AND lease_id IS NOT ? AND phase IN ('reported', 'dropped', 'rejected')",
                (json.dumps(job), lease_id, now, job_id, lease_id))
            if cur.rowcount == 1:
                # A new attempt: its package will be a new one, not pruned, not measured yet
                self._db.execute("UPDATE jobs SET updated_mono = ?, boot_id = ?, pruned_at = NULL, "
                                 "package_bytes = NULL WHERE job_id = ?", (mono, boot, job_id))
                self._db.execute("DELETE FROM log_offsets WHERE job_id = ?", (job_id,))
                self._written += 1
                return True
            return False

    def set_phase(self, job_id: str, phase: Phase, **fields: Any) -> None:
        sets = ["phase = ?", "updated_at = ?", "updated_mono = ?", "boot_id = ?"]
        args: list[Any] = [Phase(phase).value, *self._stamp()]
        for name in ("outcome", "package_dir", "lease_id"):
            if name in fields:
                sets.append(f"{name} = ?")
                args.append(fields[name])
        if "report" in fields:
            sets.append("report_json = ?")
            args.append(json.dumps(fields["report"], default=str))
        if "delivery" in fields:
            sets.append("delivery_json = ?")
            args.append(json.dumps(fields["delivery"], default=str))
        self._write(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?", (*args, job_id))

    def set_delivery(self, job_id: str, delivery: dict[str, Any],
                     report: dict[str, Any] | None = None,
                     lease_id: str | None = None) -> None:
        """Record a pending report's tries and upload state (the phase stays finished);
        ``report``/``lease_id`` replace the stored ones (an upload's location, a new lease)."""
        sets = ["delivery_json = ?", "updated_at = ?", "updated_mono = ?", "boot_id = ?"]
        args: list[Any] = [json.dumps(delivery, default=str), *self._stamp()]
        if report is not None:
            sets.append("report_json = ?")
            args.append(json.dumps(report, default=str))
        if lease_id is not None:
            sets.append("lease_id = ?")
            args.append(lease_id)
        self._write(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?", (*args, job_id))

    def _stamp(self) -> tuple[float, float, str | None]:
        """What a write stores beside ``updated_at``: wall time, monotonic time, boot id."""
        return time.time(), time.monotonic(), self.boot_id

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._exec(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return _record(rows[0]) if rows else None

    def in_phase(self, *phases: Phase) -> list[JobRecord]:
        marks = ",".join("?" for _ in phases)
        rows = self._exec(f"SELECT {_COLUMNS} FROM jobs WHERE phase IN ({marks}) "
                          "ORDER BY created_at", tuple(Phase(p).value for p in phases))
        return [_record(r) for r in rows]

    def shipped(self, job_id: str, stream: str) -> int:
        rows = self._exec("SELECT shipped FROM log_offsets WHERE job_id = ? AND stream = ?",
                          (job_id, stream))
        return int(rows[0][0]) if rows else 0

    def set_shipped(self, job_id: str, stream: str, offset: int) -> None:
        self._write("INSERT INTO log_offsets (job_id, stream, shipped) VALUES (?, ?, ?) "
                   "ON CONFLICT(job_id, stream) DO UPDATE SET shipped = excluded.shipped",
                   (job_id, stream, offset))

    def counts(self) -> dict[str, int]:
        return {phase: n for phase, n in
                self._exec("SELECT phase, COUNT(*) FROM jobs GROUP BY phase")}

    def expired(self, keep_s: float) -> list[str]:
        """Jobs done (reported, dropped, rejected) more than ``keep_s`` ago, package kept.

        A row from another boot stamped in the future (the wall clock was set back since)
        is stamped now instead, so it ages from here on rather than being kept until the
        wall clock catches up.
        """
        now, mono, boot = self._stamp()
        self._write("UPDATE jobs SET updated_at = ?, updated_mono = ?, boot_id = ? "
                    "WHERE updated_at > ? AND boot_id IS NOT ?", (now, mono, boot, now, boot))
        return [r[0] for r in self._exec(
            f"SELECT job_id FROM jobs WHERE phase IN {DONE_PHASES} AND pruned_at IS NULL "
            f"AND {_AGE_SQL} > ? ORDER BY updated_at", (boot, mono, now, keep_s))]

    def kept_packages(self) -> list[tuple[str, float, int | None]]:
        """(id, updated_at, size measured or None) of done jobs whose package is kept,
        oldest first."""
        return [(r[0], float(r[1]), r[2]) for r in self._exec(
            "SELECT job_id, updated_at, package_bytes FROM jobs WHERE phase IN "
            f"{DONE_PHASES} AND pruned_at IS NULL ORDER BY updated_at")]

    def set_package_bytes(self, job_id: str, size: int) -> None:
        """Remember a done job's package size (it no longer changes), so it is measured once."""
        self._write("UPDATE jobs SET package_bytes = ? WHERE job_id = ?", (size, job_id))

    def mark_pruned(self, job_id: str) -> None:
        """Record that a done job's package is gone: the row keeps its outcome and report
        (with the result and zip hashes); its payload shrinks to the id, its offsets go."""
        self._write("UPDATE jobs SET pruned_at = ?, job_json = json_object('job_id', job_id) "
                    f"WHERE job_id = ? AND phase IN {DONE_PHASES}", (time.time(), job_id))
        self._write("DELETE FROM log_offsets WHERE job_id = ?", (job_id,))

    def pruned_at(self, job_id: str) -> float | None:
        """When the job's package was pruned; None while it is kept, or with no row."""
        rows = self._exec("SELECT pruned_at FROM jobs WHERE job_id = ?", (job_id,))
        return rows[0][0] if rows else None

    def forget(self, keep_s: float) -> list[str]:
        """Delete the rows of pruned packages older than ``keep_s``; returns their ids."""
        now, mono, boot = self._stamp()
        ids = [r[0] for r in self._exec(
            f"SELECT job_id FROM jobs WHERE pruned_at IS NOT NULL AND {_AGE_SQL} > ?",
            (boot, mono, now, keep_s))]
        for job_id in ids:
            self._write("DELETE FROM log_offsets WHERE job_id = ?", (job_id,))
            self._write("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        return ids


def _log_failed_flush(flush: asyncio.Future[None]) -> None:
    """A flush nobody awaits (:meth:`Journal.durable_within`): its error is only logged."""
    if not flush.cancelled() and flush.exception() is not None:
        log.error("journal: a timed flush failed: %r", flush.exception())


def _fsync_dir(path: Path) -> bool:
    """Flush a folder's entries (a new file's name); False where it cannot be done."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def current_boot_id() -> str | None:
    """This boot's id (Linux), to tell monotonic times of this boot from older ones."""
    try:
        return BOOT_ID_PATH.read_text().strip() or None
    except OSError:
        return None


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_FULL, or SQLITE_IOERR, which a write that finds no room can also give."""
    text = str(exc).lower()
    return "disk is full" in text or "disk i/o error" in text


_COLUMNS = "job_id, job_json, lease_id, phase, outcome, report_json, package_dir, delivery_json"


def _record(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(job_id=row[0], job=json.loads(row[1]), lease_id=row[2], phase=Phase(row[3]),
                     outcome=row[4], report=json.loads(row[5]) if row[5] else None,
                     package_dir=row[6], delivery=json.loads(row[7]) if row[7] else None)
