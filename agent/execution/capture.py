"""Log capture: a job's stdout and stderr copied byte for byte into log files.

Each stream is a pipe from the job's process. A thread per stream moves the bytes
into ``logs/<stream>.log`` with ``splice(2)`` (kernel to kernel, no copy through
Python) in up-to-1-MiB moves, so a chatty job runs at nearly the speed it would
writing straight to a file. Readers that want lines (the terminal view, the
coordinator shipper) tail the file: the file on disk is the buffer, so a slow
reader never slows or blocks the job.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
MOVE_BYTES = 1 << 20
DEFAULT_MAX_LOG_BYTES = 4 << 30
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def make_pipe() -> tuple[int, int]:
    """A pipe with a 1 MiB buffer where the kernel allows it (fewer wake-ups)."""
    read_fd, write_fd = os.pipe()
    try:
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return read_fd, write_fd


class StreamCapture:
    """Copies one pipe into one log file until the pipe closes."""

    def __init__(self, name: str, read_fd: int, path: Path,
                 on_data: Callable[[str, int], None] | None = None,
                 max_bytes: int = DEFAULT_MAX_LOG_BYTES) -> None:
        self.name = name
        self.path = path
        self.size = 0
        self.dropped = 0
        self.disk_full = False  # a write found no room: the log holds what came before
        self.max_bytes = max_bytes
        self._read_fd = read_fd
        self._on_data = on_data
        self._thread = threading.Thread(target=self._run, name=f"capture-{name}", daemon=True)
        self.done = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        out_fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            self._copy(out_fd)
        except OSError as exc:  # disk full or similar: keep draining so the job never blocks
            self.disk_full = exc.errno in DISK_FULL_ERRNOS
            log.error("log capture for %s stopped writing: %s", self.name, exc)
            self._drain()
        finally:
            os.close(out_fd)
            os.close(self._read_fd)
            self.done.set()
            if self._on_data is not None:
                self._on_data(self.name, self.size)

    def _copy(self, out_fd: int) -> None:
        use_splice = hasattr(os, "splice")
        while self.size < self.max_bytes:
            want = min(MOVE_BYTES, self.max_bytes - self.size)
            if use_splice:
                try:
                    moved = os.splice(self._read_fd, out_fd, want)
                except OSError as exc:
                    if exc.errno in DISK_FULL_ERRNOS:
                        raise
                    use_splice = False  # filesystem without splice support
                    continue
            else:
                data = os.read(self._read_fd, min(want, 1 << 16))
                moved = len(data)
                if moved:
                    _write_all(out_fd, data)
            if moved == 0:
                return
            self.size += moved
            if self._on_data is not None:
                self._on_data(self.name, self.size)
        log.warning("log %s reached its cap of %d bytes; dropping the rest", self.name,
                    self.max_bytes)
        self._drain()

    def _drain(self) -> None:
        while True:
            data = os.read(self._read_fd, 1 << 16)
            if not data:
                return
            self.dropped += len(data)

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class LineTail:
    """Reads a growing log file from an offset and hands out complete lines."""

    def __init__(self, path: Path, offset: int = 0, max_line: int = 64 * 1024) -> None:
        self.path = path
        self.offset = offset
        self._partial = b""
        self._max_line = max_line

    def read_lines(self, upto: int | None = None) -> list[bytes]:
        """New complete lines (with their newline) since the last call."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read() if upto is None else fh.read(max(0, upto - self.offset))
        except FileNotFoundError:
            return []
        self.offset += len(data)
        buf = self._partial + data
        lines = buf.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self._max_line:  # a line without end: hand it out in pieces
            lines.append(self._partial)
            self._partial = b""
            return [line + b"\n" for line in lines[:-1]] + [lines[-1]]
        return [line + b"\n" for line in lines]

    def flush(self) -> list[bytes]:
        """The unterminated last line, once the stream has ended."""
        rest, self._partial = self._partial, b""
        return [rest] if rest else []


def tail_bytes(path: Path, max_bytes: int) -> str:
    """The last ``max_bytes`` of a log as text (for reports), cut at a line start."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    if size > max_bytes:
        cut = data.find(b"\n")
        data = data[cut + 1:] if 0 <= cut < len(data) - 1 else data
    return data.decode("utf-8", errors="replace")
