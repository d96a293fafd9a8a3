"""The seal's walk: every file beneath a job folder, opened without following a link.

The folder is opened with O_DIRECTORY|O_NOFOLLOW, each directory relative to its
parent's descriptor the same way, each file relative to its directory's descriptor with
O_NOFOLLOW, and ``fstat`` on the opened descriptor has the last word. No path is
resolved twice, so a directory swapped for a symlink, however fast, fails to open
(listed as "changed during sealing") and is never followed. Left out, and listed with
the reason: symlinks, hard links (a second name of a file that may live outside the
folder), FIFOs, sockets and devices, names that ``sha256sum`` would need escaped,
entries the agent may not read, and directories more than MAX_DEPTH levels down.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from agent.errors import PackageError
from agent.layout import CHECKSUMS, OUTPUT_JSON

MAX_DEPTH = 64

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after listing must not hang the open (no effect on files).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# The entry was there when listed and is something else, or gone, when opened.
_CHANGED_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}


class Skip(StrEnum):
    """Why an entry of the folder is not in the package (output.json's ``skipped``)."""

    SYMLINK = "symlink"
    HARD_LINK = "hard link"
    NOT_REGULAR = "not a regular file"
    NEEDS_ESCAPING = "name needs escaping"
    CHANGED = "changed during sealing"
    UNREADABLE = "unreadable"
    TOO_DEEP = "too deep"


# Names the seal writes at the top of the folder; a previous seal's copies are replaced.
_OURS = {OUTPUT_JSON, CHECKSUMS, f".{OUTPUT_JSON}.tmp", f".{CHECKSUMS}.tmp"}


def _safe_name(rel: str) -> bool:
    if "\n" in rel or "\\" in rel or "\r" in rel:
        return False
    try:
        rel.encode()  # a name that is not UTF-8 arrives with surrogates
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Opened:
    """A regular file the walk opened; its descriptor is the consumer's to close."""

    rel: str
    fd: int
    st: os.stat_result


class Walk:
    """Sorted, depth-first, no-follow walk beneath a folder, by descriptors only.

    ``files()`` yields each packageable file already opened; everything left out is in
    ``skipped``. The root and every directory descriptor are closed on leaving the block.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root_fd = -1
        self.skipped: list[dict[str, str]] = []
        self._files: Generator[Opened, None, None] | None = None

    def __enter__(self) -> Walk:
        try:
            self.root_fd = os.open(self.folder, DIR_FLAGS)
        except FileNotFoundError as exc:
            raise PackageError(f"package folder {self.folder} does not exist") from exc
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            raise PackageError(f"package folder {self.folder} is not a directory "
                               "(a symlink is never followed)") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self._files is not None:
            self._files.close()
        os.close(self.root_fd)

    def files(self) -> Iterator[Opened]:
        self._files = self._dir(self.root_fd, "", 0)
        return self._files

    def _skip(self, rel: str, reason: Skip) -> None:
        self.skipped.append({"path": rel, "reason": reason.value})

    def _dir(self, dir_fd: int, prefix: str, depth: int) -> Generator[Opened, None, None]:
        for name in sorted(os.listdir(dir_fd)):
            if not prefix and name in _OURS:
                continue
            rel = prefix + name
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                self._skip(rel, Skip.CHANGED)
                continue
            if stat.S_ISLNK(mode):
                self._skip(rel, Skip.SYMLINK)
            elif stat.S_ISDIR(mode):
                yield from self._subdir(dir_fd, name, rel, depth + 1)
            elif not stat.S_ISREG(mode):
                self._skip(rel, Skip.NOT_REGULAR)
            elif not _safe_name(rel):
                self._skip(rel.encode("unicode_escape").decode(), Skip.NEEDS_ESCAPING)
            elif (opened := self._open_file(dir_fd, name, rel)) is not None:
                yield opened

    def _subdir(self, parent_fd: int, name: str, rel: str, depth: int) -> Iterator[Opened]:
        if depth > MAX_DEPTH:
            self._skip(rel, Skip.TOO_DEEP)
            return
        fd = self._open(parent_fd, name, rel, DIR_FLAGS)
        if fd is None:
            return
        try:
            yield from self._dir(fd, rel + "/", depth)
        finally:
            os.close(fd)

    def _open_file(self, dir_fd: int, name: str, rel: str) -> Opened | None:
        fd = self._open(dir_fd, name, rel, _FILE_FLAGS)
        if fd is None:
            return None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return Opened(rel, fd, st)
        os.close(fd)
        self._skip(rel, Skip.NOT_REGULAR if not stat.S_ISREG(st.st_mode) else Skip.HARD_LINK)
        return None

    def _open(self, dir_fd: int, name: str, rel: str, flags: int) -> int | None:
        try:
            return os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in _CHANGED_ERRNOS:
                self._skip(rel, Skip.CHANGED)
            elif exc.errno in _DENIED_ERRNOS:
                self._skip(rel, Skip.UNREADABLE)
            else:
                raise
            return None
