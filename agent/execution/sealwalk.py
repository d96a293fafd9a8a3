"""The seal's walk: every file beneath a job folder, opened without following a link.

The folder is opened with O_DIRECTORY|O_NOFOLLOW, each directory relative to its
parent's descriptor the same way, each file relative to its directory's descriptor with
O_NOFOLLOW, and ``fstat`` on the opened descriptor has the last word. No path is
resolved twice, so a directory swapped for a symlink, however fast, fails to open
(listed as "changed during sealing") and is never followed. Left out, and listed with
the reason: symlinks, hard links (a second name of a file that may live outside the
folder), FIFOs, sockets and devices, names that ``sha256sum`` would need escaped,
entries the agent may not read, and directories more than MAX_DEPTH levels down.

A job can make files faster than any seal can take them (200,000 empty ones cost a
seal 9.8 s and 368 MB: ``benchmarks/bench_seal.py``), so the walk is bounded too: it
stops at the first entry past ``max_files`` (files, folders, links and the rest all
count; listed as "past max_job_files", every later entry left out unlisted), then
takes the agent's own logs and result.txt wherever the stop fell; and it lists at most
MAX_SKIPPED left-out entries, then one line of how many more there were.

So are its bytes: a job can make a file of any size at no cost (``truncate -s 1T``
makes a sparse one in a millisecond, and exits before the quota's walk comes round),
and the seal would read and zip all of it (20 GiB took it 2 minutes and 21 GB of disk).
Past ``max_bytes`` in all, a file is left out ("past max_job_output_mb"); result.txt's
share is set aside first, and the agent's logs (bounded where they are written) are
always taken.
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
from agent.layout import CHECKSUMS, LOGS_DIR, OUTPUT_JSON, RESULT_TEXT, STREAMS

MAX_DEPTH = 64
MAX_FILES = 20_000  # max_job_files' default: entries one package may hold
MAX_SKIPPED = 1_000  # left-out entries listed one by one; past this, only counted

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
    TOO_MANY = "past max_job_files: this and every later entry left out"
    TOO_LARGE = "past max_job_output_mb: left out"


# What a package always holds, past max_files too: what the agent itself wrote.
LOGS = tuple(f"{LOGS_DIR}/{stream}.log" for stream in STREAMS)
KEPT = (RESULT_TEXT, *LOGS)
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

    def __init__(self, folder: Path, max_files: int | None = MAX_FILES,
                 max_bytes: int | None = None) -> None:
        self.folder = folder
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._bytes_left = max_bytes or 0
        self._result_share = 0  # set aside for result.txt, wherever the walk meets it
        self.root_fd = -1
        self.skipped: list[dict[str, str]] = []
        self.seen = 0  # entries walked: files, folders, links and the rest
        self.full = False  # stopped at max_files: the package holds only the first ones
        self._unlisted = 0
        self._kept_seen: set[str] = set()
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
        if self.max_bytes is not None:
            self._set_aside_result()
        return self

    def _set_aside_result(self) -> None:
        try:
            st = os.stat(RESULT_TEXT, dir_fd=self.root_fd, follow_symlinks=False)
        except OSError:
            return
        if stat.S_ISREG(st.st_mode) and st.st_size <= self._bytes_left:
            self._result_share = st.st_size
            self._bytes_left -= st.st_size

    def _within_bytes(self, rel: str, size: int) -> bool:
        """Whether a file of ``size`` bytes fits what is left of ``max_bytes`` (taken)."""
        if self.max_bytes is None or rel in LOGS:
            return True
        if rel == RESULT_TEXT:
            self._bytes_left += self._result_share
            self._result_share = 0
        if size > self._bytes_left:
            return False
        self._bytes_left -= size
        return True

    def __exit__(self, *exc: object) -> None:
        if self._files is not None:
            self._files.close()
        os.close(self.root_fd)

    def files(self) -> Iterator[Opened]:
        self._files = self._all()
        return self._files

    def _all(self) -> Generator[Opened, None, None]:
        yield from self._dir(self.root_fd, "", 0)
        if self.full:
            yield from self._kept()
        if self._unlisted:
            self.skipped.append({"path": "...", "reason": f"{self._unlisted} more entries "
                                 f"left out (only the first {MAX_SKIPPED} are listed)"})

    def _kept(self) -> Iterator[Opened]:
        """The agent's own files the stop at ``max_files`` fell before."""
        for rel in KEPT:
            if rel in self._kept_seen:
                continue
            parent, _, name = rel.rpartition("/")
            try:
                dir_fd = os.open(parent, DIR_FLAGS, dir_fd=self.root_fd) if parent \
                    else self.root_fd
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode) \
                        and (opened := self._open_file(dir_fd, name, rel)) is not None:
                    yield opened
            except FileNotFoundError:
                pass
            finally:
                if dir_fd != self.root_fd:
                    os.close(dir_fd)

    def _skip(self, rel: str, reason: Skip) -> None:
        if len(self.skipped) < MAX_SKIPPED:
            self.skipped.append({"path": rel, "reason": reason.value})
        else:
            self._unlisted += 1

    def _dir(self, dir_fd: int, prefix: str, depth: int) -> Generator[Opened, None, None]:
        for name in sorted(os.listdir(dir_fd)):
            if not prefix and name in _OURS:
                continue
            if self.full:
                return
            rel = prefix + name
            if self.max_files is not None and self.seen >= self.max_files:
                self.full = True
                self.skipped.append({"path": rel, "reason": Skip.TOO_MANY.value})
                return
            self.seen += 1  # every entry: a million links or folders cost a walk as much
            mode = self._mode(dir_fd, name, rel)
            if mode is None:
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
                if rel in KEPT:
                    self._kept_seen.add(rel)
                yield opened

    def _mode(self, dir_fd: int, name: str, rel: str) -> int | None:
        """The entry's mode (its own, not a link's target); None when skipped."""
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            self._skip(rel, Skip.CHANGED)
        except PermissionError:  # in a folder the job can list but not enter (mode 600)
            self._skip(rel, Skip.UNREADABLE)
        return None

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
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and self._within_bytes(rel, st.st_size):
            return Opened(rel, fd, st)
        os.close(fd)
        self._skip(rel, Skip.NOT_REGULAR if not stat.S_ISREG(st.st_mode) else
                   Skip.HARD_LINK if st.st_nlink != 1 else Skip.TOO_LARGE)
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


def has_entries(folder: Path) -> bool:
    """Whether ``folder`` holds anything: one read of its first entries, where
    ``any(folder.iterdir())`` lists every name first (a million, in a job's folder)."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


def small_folder(folder: Path, max_entries: int = 32, max_bytes: int = 256 << 10) -> bool:
    """At most ``max_entries`` entries under ``folder``, regular files of ``max_bytes`` in
    all, nothing else but folders: a walk that stops at the first sign of more."""
    entries = total = 0
    stack = [str(folder)]
    while stack:
        try:
            with os.scandir(stack.pop()) as found:
                for entry in found:
                    entries += 1
                    if entries > max_entries:
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                        if total > max_bytes:
                            return False
                    else:  # a link, a FIFO, a device: the thread's walk deals with it
                        return False
        except OSError:
            return False
    return True
