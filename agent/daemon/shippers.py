"""Extensions while a job runs: its logs shipped by offset, its progress, throttled.

Log files on disk are the buffer: the shipper reads what the capture threads
wrote and sends it in chunks keyed by stream and byte offset. A slow or failing
coordinator only delays shipping; it never slows or blocks the job. The offset
the coordinator acknowledged is journaled, and after a crash the coordinator's
own offsets win, so nothing is lost or sent twice.

Each stream has at most one chunk in flight; the streams of a job take turns, chunk
by chunk, and jobs ship side by side. Where the coordinator speaks "logs-binary" a
chunk goes as the raw body, gzip'd at a cheap level when that shrinks it (text logs
shrink to a fifth); else as base64 in JSON. Chunks are read into one reused buffer in
one worker thread (reading and compressing stay off the event loop, and the agent's
memory does not grow with the number of jobs or the speed of their logs); while a full
chunk is on its way the stream's next one is read, so a core left free by the job
compresses while the coordinator stores.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import math
import os
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.coordinator.client import (
    MAX_LOG_CHUNK_BYTES,
    CoordinatorClient,
    LogOffsetConflict,
    LogOffsets,
)
from agent.daemon.journal import Journal
from agent.errors import CoordinatorError
from agent.execution.capture import open_regular_fd
from agent.layout import STREAMS, log_path

log = logging.getLogger(__name__)

# A chunk is sent gzip'd when that makes it at most this fraction of its size; a stream
# whose chunk did not shrink sends the next RAW_RUN chunks as they are, then tries again.
GZIP_LEVEL = 1
WORTH_GZIP = 0.9
RAW_RUN = 16
MIN_GZIP_BYTES = 512
# A link (ELOOP), a file where the folder was (ENOTDIR), a FIFO or a device (EINVAL)
NOT_A_LOG = (errno.ELOOP, errno.ENOTDIR, errno.EINVAL)
# A tick that found at least this much new log (a job logging flat out) looks again
# after BUSY_WAIT_S rather than the ship interval.
BUSY_WAIT_S = 0.05

# What a progress call carries of a job's progress (docs/protocol-extensions.md, progress):
# the protocol's metrics are a flat object of numbers; output.json keeps all it sent.
MAX_STAGE_CHARS = 200
MAX_MESSAGE_CHARS = 1000
MAX_PROGRESS_METRICS = 32
MAX_METRIC_NAME_CHARS = 64

_pool: ThreadPoolExecutor | None = None  # the reading thread, one per process


def _reading_thread() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="log-ship")
    return _pool


class Shipped(enum.Enum):
    """Where one ship left a job's logs."""

    CAUGHT_UP = "caught_up"  # everything written so far is acknowledged
    BUSY = "busy"            # caught up, but the job logged a full chunk or more meanwhile
    BEHIND = "behind"        # the time budget ran out with bytes left: ship again at once
    PAUSED = "paused"        # the coordinator did not take a chunk: wait for the next tick


@dataclass(frozen=True)
class Chunk:
    """A chunk as it goes on the wire: its body, encoding and the log bytes it holds."""

    body: bytes
    encoding: str | None
    length: int


class ChunkReader:
    """Reads chunks of log files into one reused buffer, in one worker thread."""

    def __init__(self, max_chunk_bytes: int, compress: bool) -> None:
        self.max_chunk = max_chunk_bytes
        self.compress = compress
        self._buffer = bytearray(max_chunk_bytes)
        self._raw_left: dict[tuple[str, str], int] = {}
        self._refused: set[tuple[str, str]] = set()

    def read(self, key: tuple[str, str], path: Path,
             offset: int) -> asyncio.Future[Chunk | None]:
        """The chunk of ``path`` from ``offset``; None when there is nothing new (or no
        file yet). Reads run one at a time (the buffer is reused), in one thread."""
        return asyncio.get_running_loop().run_in_executor(
            _reading_thread(), self._read, key, path, offset)

    def forget(self, job_id: str) -> None:
        for stream in STREAMS:
            self._raw_left.pop((job_id, stream), None)
            self._refused.discard((job_id, stream))

    def _read(self, key: tuple[str, str], path: Path, offset: int) -> Chunk | None:
        try:
            fd = open_regular_fd(path)  # a link in its place is not followed, nor read
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno not in NOT_A_LOG:
                raise
            if key not in self._refused:  # nothing to ship: the other stream goes on
                self._refused.add(key)
                log.warning("job %s: its %s log is not a regular file in a folder of its "
                            "own (the job replaced it?): not shipped", *key)
            return None
        try:
            want = min(self.max_chunk, os.fstat(fd).st_size - offset)
            if want <= 0:
                return None
            view = memoryview(self._buffer)[:want]
            n = os.preadv(fd, [view], offset)
        finally:
            os.close(fd)
        return self._encode(key, view[:n])

    def _encode(self, key: tuple[str, str], data: memoryview) -> Chunk:
        if not self.compress or len(data) < MIN_GZIP_BYTES:
            return Chunk(bytes(data), None, len(data))
        raw_left = self._raw_left.get(key, 0)
        if raw_left:
            self._raw_left[key] = raw_left - 1
            return Chunk(bytes(data), None, len(data))
        gz = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        body = gz.compress(data) + gz.flush()
        if len(body) > WORTH_GZIP * len(data):
            self._raw_left[key] = RAW_RUN
            return Chunk(bytes(data), None, len(data))
        return Chunk(body, "gzip", len(data))


class LogShipper:
    """Ships the new bytes of each job's log files to the coordinator."""

    def __init__(self, client: CoordinatorClient, journal: Journal, max_chunk_bytes: int,
                 on_shipped: Callable[[int], None] | None = None, *,
                 binary: bool = False) -> None:
        self.client = client
        self.journal = journal
        self.max_chunk = max(1, min(max_chunk_bytes, MAX_LOG_CHUNK_BYTES))  # what the client sends
        self.on_shipped = on_shipped
        self.binary = binary
        self._reader = ChunkReader(self.max_chunk, compress=binary)
        self._offsets: dict[tuple[str, str], int] = {}
        self._journaled: dict[tuple[str, str], int] = {}
        # The next chunk of a stream, read while the one before it is on its way
        self._ahead: dict[tuple[str, str], tuple[int, asyncio.Future[Chunk | None]]] = {}
        # One ship at a time per job: the ship loop's tick and the final ship in the
        # flow otherwise race on the same offsets (and one may outlive forget()).
        self._locks: dict[str, asyncio.Lock] = {}  # replaced on forget(): a new attempt

    async def resume(self, job_id: str) -> None:
        """After a restart, start from where the coordinator's copy ends."""
        try:
            offsets = await self.client.log_offsets(job_id)
        except CoordinatorError as exc:
            log.warning("job %s: cannot read the coordinator's log offsets: %s", job_id, exc)
            return
        for stream in STREAMS:
            key = (job_id, stream)
            self._offsets[key] = self._journaled[key] = offsets.of(stream)
            self.journal.set_shipped(job_id, stream, offsets.of(stream))

    def forget(self, job_id: str) -> None:
        """Drop a job's offsets once it has left the node (the journal keeps them); a
        ship still in flight for it stops at its next step."""
        for stream in STREAMS:
            self._offsets.pop((job_id, stream), None)
            self._journaled.pop((job_id, stream), None)
            _, ahead = self._ahead.pop((job_id, stream), (0, None))
            if ahead is not None:  # let it finish in the thread; its error is nobody's
                ahead.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._locks.pop(job_id, None)
        self._reader.forget(job_id)

    async def ship(self, job_id: str, folder: Path) -> bool:
        """Send everything written so far; True when both streams are fully shipped."""
        return await self.ship_for(job_id, folder) is not Shipped.PAUSED

    async def ship_for(self, job_id: str, folder: Path,
                       budget_s: float | None = None) -> Shipped:
        """Send what is new, the streams taking turns, for up to ``budget_s`` seconds
        (None: until caught up or the coordinator stops taking chunks)."""
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            deadline = None if budget_s is None else time.monotonic() + budget_s
            pending, sent = list(STREAMS), 0
            try:
                while pending:
                    for stream in list(pending):
                        if self._locks.get(job_id) is not lock:
                            return Shipped.CAUGHT_UP  # forgotten meanwhile: it left the node
                        step = await self._ship_chunk(job_id, stream,
                                                      log_path(folder, stream), lock)
                        if step is None:
                            return Shipped.PAUSED
                        moved, more = step
                        if not more:
                            pending.remove(stream)
                        sent += moved
                    if pending and deadline is not None and time.monotonic() >= deadline:
                        return Shipped.BEHIND
            finally:
                self._journal_offsets(job_id, lock)
            return Shipped.BUSY if sent >= self.max_chunk else Shipped.CAUGHT_UP

    async def _ship_chunk(self, job_id: str, stream: str, path: Path,
                          lock: asyncio.Lock) -> tuple[int, bool] | None:
        """Ship one chunk: the bytes it moved the coordinator's end by and whether there
        may be more to send; None when the coordinator did not take it (the file keeps
        the bytes)."""
        key = (job_id, stream)
        if key not in self._offsets:
            self._offsets[key] = self._journaled[key] = self.journal.shipped(job_id, stream)
        offset = self._offsets[key]
        try:
            chunk = await self._chunk_at(key, path, offset)
        except OSError as exc:
            log.warning("job %s: cannot read its %s log to ship it: %s", job_id, stream, exc)
            return None
        if chunk is None or self._locks.get(job_id) is not lock:
            return 0, False
        if chunk.length == self.max_chunk:  # a full chunk: likely more behind it
            self._ahead[key] = (offset + chunk.length,
                                self._reader.read(key, path, offset + chunk.length))
        try:
            new = (await self._send(job_id, stream, offset, chunk)).of(stream)
        except LogOffsetConflict as exc:
            new = exc.offsets.of(stream)
        except CoordinatorError as exc:
            log.warning("job %s: log shipping paused (%s); the file keeps the bytes",
                        job_id, exc)
            return None
        if new > offset and self.on_shipped is not None:
            self.on_shipped(new - offset)
        if self._locks.get(job_id) is not lock:
            return 0, False  # forgotten while the chunk was on its way
        self._offsets[key] = new
        if new == offset:
            return None  # it did not move forward: try on the next tick
        # Past our offset: moved; behind it (its copy ends earlier): resend from there.
        return max(0, new - offset), True

    async def _chunk_at(self, key: tuple[str, str], path: Path, offset: int) -> Chunk | None:
        """The chunk from ``offset``: the one read ahead if it starts there (the
        coordinator took the last one whole), else read now."""
        at, ahead = self._ahead.pop(key, (-1, None))
        if ahead is not None:
            try:
                chunk = await ahead
            except OSError:
                chunk = None  # read again below, where the error is not swallowed
            if at == offset and chunk is not None:
                return chunk
        return await self._reader.read(key, path, offset)

    async def _send(self, job_id: str, stream: str, offset: int, chunk: Chunk) -> LogOffsets:
        if self.binary:
            return await self.client.ship_log_chunk(job_id, stream, offset,  # type: ignore[arg-type]
                                                    chunk.body, encoding=chunk.encoding)
        return await self.client.ship_logs(job_id, stream, offset, chunk.body)  # type: ignore[arg-type]

    def _journal_offsets(self, job_id: str, lock: asyncio.Lock) -> None:
        """Once per ship, not per chunk: a journaled offset behind the coordinator's only
        resends bytes it drops (and a restart asks the coordinator anyway)."""
        if self._locks.get(job_id) is not lock:
            return
        for stream in STREAMS:
            key = (job_id, stream)
            offset = self._offsets.get(key)
            if offset is not None and offset != self._journaled.get(key):
                self.journal.set_shipped(job_id, stream, offset)
                self._journaled[key] = offset


class ProgressSender:
    """Sends a job's latest progress at most once per interval; reports cancels."""

    def __init__(self, client: CoordinatorClient, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, Any]] = {}

    async def maybe_send(self, job_id: str, lease_id: str | None,
                         progress: dict[str, Any]) -> bool:
        """True when the coordinator answered "cancel"."""
        if not progress:
            return False
        now = time.monotonic()
        sent_at, sent = self._last.get(job_id, (0.0, None))
        if sent == progress or now - sent_at < self.interval_s:
            return False
        self._last[job_id] = (now, dict(progress))
        try:
            return await self.client.progress(
                job_id, lease_id=lease_id, fraction=progress.get("fraction"),
                stage=_cut(progress.get("stage"), MAX_STAGE_CHARS),
                message=_cut(progress.get("message"), MAX_MESSAGE_CHARS),
                eta_s=progress.get("eta_s"), metrics=wire_metrics(progress.get("metrics")))
        except CoordinatorError as exc:
            log.warning("job %s: progress not sent: %s", job_id, exc)
            return False

    def forget(self, job_id: str) -> None:
        self._last.pop(job_id, None)


def wire_metrics(metrics: Any) -> dict[str, int | float] | None:
    """A job's progress metrics as the protocol carries them: only finite numbers (not
    booleans), named in at most MAX_METRIC_NAME_CHARS, the first MAX_PROGRESS_METRICS."""
    if not isinstance(metrics, dict):
        return None
    numbers: dict[str, int | float] = {}
    for name, value in metrics.items():
        if len(numbers) >= MAX_PROGRESS_METRICS:
            break
        if isinstance(name, str) and len(name) <= MAX_METRIC_NAME_CHARS and \
                isinstance(value, (int, float)) and not isinstance(value, bool) and \
                math.isfinite(value):
            numbers[name] = value
    return numbers


def _cut(text: Any, limit: int) -> str | None:
    return text[:limit] if isinstance(text, str) else None
