"""Extensions while a job runs: its logs shipped by offset, its progress, throttled.

Log files on disk are the buffer: the shipper reads what the capture threads
wrote and sends it in chunks keyed by stream and byte offset. A slow or failing
coordinator only delays shipping; it never slows or blocks the job. The offset
the coordinator acknowledged is journaled, and after a crash the coordinator's
own offsets win, so nothing is lost or sent twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from agent.coordinator.client import CoordinatorClient, LogOffsetConflict
from agent.daemon.journal import Journal
from agent.errors import CoordinatorError
from agent.layout import STREAMS, log_path

log = logging.getLogger(__name__)


class LogShipper:
    """Ships the new bytes of each job's log files to the coordinator."""

    def __init__(self, client: CoordinatorClient, journal: Journal, max_chunk_bytes: int,
                 on_shipped: Callable[[int], None] | None = None) -> None:
        self.client = client
        self.journal = journal
        self.max_chunk = max_chunk_bytes
        self.on_shipped = on_shipped
        self._offsets: dict[tuple[str, str], int] = {}
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
            self._offsets[(job_id, stream)] = offsets.of(stream)
            self.journal.set_shipped(job_id, stream, offsets.of(stream))

    def forget(self, job_id: str) -> None:
        """Drop a job's offsets once it has left the node (the journal keeps them); a
        ship still in flight for it stops at its next step."""
        for stream in STREAMS:
            self._offsets.pop((job_id, stream), None)
        self._locks.pop(job_id, None)

    async def ship(self, job_id: str, folder: Path) -> bool:
        """Send what is new; True when both streams are fully shipped."""
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            done = True
            for stream in STREAMS:
                if self._locks.get(job_id) is not lock:
                    return True  # forgotten meanwhile: the job left the node
                done = await self._ship_stream(job_id, stream, log_path(folder, stream),
                                               lock) and done
            return done

    async def _ship_stream(self, job_id: str, stream: str, path: Path,
                           lock: asyncio.Lock) -> bool:
        key = (job_id, stream)
        if key not in self._offsets:
            self._offsets[key] = self.journal.shipped(job_id, stream)
        try:
            size = (await aiofiles.os.stat(path)).st_size
        except FileNotFoundError:
            return True
        while (offset := self._offsets.get(key, size)) < size:  # gone: forgotten meanwhile
            # Off the loop: a chunk is up to max_log_chunk_bytes, every tick, per job
            async with aiofiles.open(path, "rb") as fh:
                await fh.seek(offset)
                data = await fh.read(min(self.max_chunk, size - offset))
            try:
                answer = await self.client.ship_logs(job_id, stream, offset, data)  # type: ignore[arg-type]
                new = answer.of(stream)
            except LogOffsetConflict as exc:
                new = exc.offsets.of(stream)
            except CoordinatorError as exc:
                log.warning("job %s: log shipping paused (%s); the file keeps the bytes",
                            job_id, exc)
                return False
            if new > offset and self.on_shipped is not None:
                self.on_shipped(new - offset)
            if self._locks.get(job_id) is not lock:
                return True  # forgotten while the chunk was on its way
            self._offsets[key] = new
            self.journal.set_shipped(job_id, stream, new)
            if new <= offset and new < size:
                return False  # the coordinator did not move forward; try on the next tick
        return True


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
        metrics = progress.get("metrics") if isinstance(progress.get("metrics"), dict) else None
        try:
            return await self.client.progress(
                job_id, lease_id=lease_id, fraction=progress.get("fraction"),
                stage=progress.get("stage"), message=progress.get("message"),
                eta_s=progress.get("eta_s"), metrics=metrics)
        except CoordinatorError as exc:
            log.warning("job %s: progress not sent: %s", job_id, exc)
            return False

    def forget(self, job_id: str) -> None:
        self._last.pop(job_id, None)
