"""Folders a job locked, opened back up so the agent can seal and remove them.

A job runs as the agent's user (in the sandbox its user namespace maps to that user),
so every file and folder it makes is the agent's. It can still take the permissions
away from itself: a folder of mode 000 cannot be listed, one of 600 cannot be entered.
A seal then met EACCES at the package's top and failed, and ``rmtree`` left such a
tree behind: a scratch or a package whose space the disk never got back, job after
job. Both run once the job's processes are gone, so nothing changes the tree meanwhile.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path


def unlock_folder(folder: Path | str) -> None:
    """Give the owner read, write and search on ``folder`` where it lacks them.

    Through an O_PATH descriptor opened without following a link: while the job still
    runs (the quotas' walk) it may swap a link in. OSError where ``folder`` is a link,
    is gone, or is not a folder.
    """
    mode = os.lstat(folder).st_mode
    if stat.S_ISDIR(mode) and mode & stat.S_IRWXU == stat.S_IRWXU:
        return  # a folder its owner may use already: one lstat, the usual case
    fd = os.open(folder, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if mode & stat.S_IRWXU != stat.S_IRWXU:
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode) | stat.S_IRWXU)
    finally:
        os.close(fd)


def unlock(path: Path) -> None:
    """:func:`unlock_folder` on ``path`` and every folder under it (no link followed);
    best effort: what cannot be changed is left as it is."""
    stack = [os.fspath(path)]
    while stack:
        folder = stack.pop()
        try:
            unlock_folder(folder)
            with os.scandir(folder) as entries:
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue


def remove_tree(path: Path) -> None:
    """``shutil.rmtree`` (no link followed) that does not leave behind what a job locked:
    where the first pass leaves anything, the tree is unlocked and removed again."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        unlock(path)
        shutil.rmtree(path, ignore_errors=True)
