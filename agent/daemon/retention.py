"""How long finished jobs' packages stay on disk, and their journal rows after them.

- A package of a job not reported yet (accepted, running, finished) is never removed.
- A done job's package (reported, dropped or rejected) is removed ``keep_packages_days``
  after the job's last journal update, or sooner, oldest first, while the kept ones
  (earlier attempts set aside under ``superseded/`` included) total more than
  ``keep_packages_max_mb``: at the default 10 GiB, well before the low-disk pause
  (``min_free_disk_mb``) on any state dir worth running on.
- An earlier attempt under ``superseded/`` goes with its job's current package (it is
  older), or sooner, by the size cap.
- The journal row of a removed package stays, marked pruned, with its outcome and its
  report (result hash, zip sha256), for ``ROW_KEEP_FACTOR`` times ``keep_packages_days``
  (at least ``ROW_KEEP_MIN_S``): long enough to answer "what did this node return for
  job X" well after the bytes are gone, bounded so the journal does not grow forever.

Ages come from the journal, clock-jump safe (see :mod:`agent.daemon.journal`); the
size cap's "oldest first" orders by the wall-clock stamps, where a jump only reorders.
Files go first, then the journal records it: a crash between the two leaves a row that
the next pass prunes again (a no-op on disk), never a package nobody will remove.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from agent.daemon.journal import Journal
from agent.execution.reclaim import remove_tree
from agent.layout import FOLDER_PREFIX, job_folder, package_paths

log = logging.getLogger(__name__)

SUPERSEDED_DIR = "superseded"  # earlier attempts of requeued jobs (flow.set_aside_earlier_attempt)
ROW_KEEP_FACTOR = 10
ROW_KEEP_MIN_S = 30 * 86400.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class Kept:
    """One package that counts toward the size cap."""

    stamp: float  # wall-clock time of its last update: the order, nothing more
    size: int
    job_id: str | None  # None: an earlier attempt under superseded/
    aside: Path | None = None  # that attempt's folder


class Retention:
    """Prunes done jobs' packages by age and by total size (see the module docstring)."""

    def __init__(self, journal: Journal, out_root: Path, *, keep_s: float,
                 max_bytes: int) -> None:
        self.journal = journal
        self.out_root = out_root
        self.keep_s = keep_s
        self.max_bytes = max_bytes  # 0: no size cap

    def prune(self) -> None:
        """One pass: by age, then by size, then the rows of long-pruned packages."""
        aged = self.journal.expired(self.keep_s)
        for job_id in aged:
            self._remove_package(job_id)
        for attempt in self._superseded():
            if not self._job_package_kept(attempt.job_id):
                self._remove(attempt)  # older than its job's package, which is gone
        capped, freed = self._cap() if self.max_bytes > 0 else (0, 0)
        forgotten = self.journal.forget(max(ROW_KEEP_FACTOR * self.keep_s, ROW_KEEP_MIN_S))
        if aged or capped or forgotten:
            log.info("retention: %d package(s) past keep_packages_days and %d over "
                     "keep_packages_max_mb removed (%.1f MiB); %d journal row(s) deleted",
                     len(aged), capped, freed / MIB, len(forgotten))

    def _job_package_kept(self, job_id: str | None) -> bool:
        return (job_id is not None and self.journal.get(job_id) is not None
                and self.journal.pruned_at(job_id) is None)

    def _cap(self) -> tuple[int, int]:
        """Remove the oldest kept packages until they total at most the cap."""
        kept = sorted(self._kept_packages() + self._superseded(), key=lambda k: k.stamp)
        total = sum(k.size for k in kept)
        removed = freed = 0
        for item in kept:
            if total <= self.max_bytes:
                break
            self._remove(item)
            total -= item.size
            removed, freed = removed + 1, freed + item.size
        return removed, freed

    def _kept_packages(self) -> list[Kept]:
        kept = []
        for job_id, stamp, size in self.journal.kept_packages():
            if size is None:  # a done job's package no longer changes: measure it once
                size = sum(disk_usage(p) for p in package_paths(job_folder(self.out_root,
                                                                           job_id)))
                self.journal.set_package_bytes(job_id, size)
            kept.append(Kept(stamp, size, job_id))
        return kept

    def _superseded(self) -> list[Kept]:
        """Earlier attempts, named ``job_<id>-<ms since the epoch>`` when set aside."""
        root = self.out_root / SUPERSEDED_DIR
        if not root.is_dir():
            return []
        found = []
        for aside in root.iterdir():
            job_id, _, ms = aside.name.removeprefix(FOLDER_PREFIX).rpartition("-")
            stamp = int(ms) / 1000 if ms.isdigit() else aside.lstat().st_mtime
            found.append(Kept(stamp, disk_usage(aside), job_id or None, aside))
        return found

    def _remove(self, item: Kept) -> None:
        if item.aside is not None:
            remove_tree(item.aside)
        elif item.job_id is not None:
            self._remove_package(item.job_id)

    def _remove_package(self, job_id: str) -> None:
        folder, *files = package_paths(job_folder(self.out_root, job_id))
        remove_tree(folder)
        for path in files:
            path.unlink(missing_ok=True)
        self.journal.mark_pruned(job_id)


def disk_usage(path: Path) -> int:
    """Bytes ``path`` takes on disk (allocated blocks, as ``du`` counts); 0 if missing."""
    try:
        total = path.lstat().st_blocks * 512
    except OSError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return total
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue  # gone meanwhile
    return total
