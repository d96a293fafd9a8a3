"""Room on a filesystem: free bytes, and free inodes, which a flood of empty files uses
up long before the bytes (one ``statvfs`` each)."""

from __future__ import annotations

import os
from pathlib import Path

INODE_FLOOR_SHARE = 100  # fewer than 1/100 of a filesystem's inodes free: too few
INODE_FLOOR_MIN = 64


def inode_shortage(st: os.statvfs_result) -> str | None:
    """``"N inodes free < F (1 % of T)"`` when under 1 % (at least 64) of the inodes are
    free; None otherwise, and where the filesystem has no inode limit (btrfs: 0)."""
    floor = max(INODE_FLOOR_MIN, st.f_files // INODE_FLOOR_SHARE)
    if st.f_files and st.f_favail < floor:
        return f"{st.f_favail} inodes free < {floor} (1 % of {st.f_files})"
    return None


def low_disk(path: Path, floor_mb: int) -> str | None:
    """Why the filesystem holding ``path`` is too full to take a job, or None: fewer
    than ``floor_mb`` MiB free, or too few inodes. None where it cannot be read."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize >> 20
    if free < floor_mb:
        return f"low disk: {free} MiB free < min_free_disk_mb {floor_mb}"
    short = inode_shortage(st)
    return f"low disk: {short}" if short else None
