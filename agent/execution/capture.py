"""Log capture: a job's stdout and stderr copied byte for byte into log files.

Each stream is a pipe from the job's process. One long-lived thread per agent, the
capture hub, waits on every job's pipes at once (epoll) and moves what each has into
``logs/<stream>.log`` in reads of up to 1 MiB into one reused buffer: no thread is
started per job, and a chatty job still runs at nearly the speed it would writing
straight to a file (its pipe holds 1 MiB; benchmarks/bench_core.py measures it).
Bytes of one stream reach its file in order; one pass over the ready pipes moves at
most 1 MiB from each, so a flat-out job cannot starve the others. Readers that want
lines (the terminal view, the coordinator shipper) tail the file: the file on disk is
the buffer, so a slow reader never slows or blocks the job.
A job that flushes every line (print(flush=True), PYTHONUNBUFFERED, progress bars)
would wake the hub once a line; after a busy pass the hub pauses 1 ms so the next read
takes many lines at once (a quarter of the CPU per MiB, bench_core measures it).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
MOVE_BYTES = 1 << 20
DEFAULT_MAX_LOG_BYTES = 4 << 30
NO_LOG_CAP = 1 << 62  # max_job_log_mb = 0: no cap (the disk's own checks still hold)
# After a pass that moved a lot, or moved anything soon after the last one did, the hub
# lets output gather for BATCH_S before it looks again: a chatty job (line-buffered
# prints, a write per line) is then moved in large reads, not one wake-up per line. A
# job that prints a line now and then is read at once; pipes hold 1 MiB, so no writer
# blocks for the pause.
BATCH_S = 0.001
BATCH_BYTES = 4096
BATCH_AFTER_S = 0.005
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


def make_pipe() -> tuple[int, int]:
    """A pipe with a 1 MiB buffer where the kernel allows it (fewer wake-ups)."""
    read_fd, write_fd = os.pipe()
    try:
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return read_fd, write_fd


class StreamCapture:
    """Copies one pipe into one log file until the pipe closes (the hub does the moving).

    ``on_data(name, size)`` is called from the hub's thread after each move and once
    more at the end, after ``done`` is set; ``on_done()`` once, at the end.
    """

    def __init__(self, name: str, read_fd: int, path: Path,
                 on_data: Callable[[str, int], None] | None = None,
                 max_bytes: int = DEFAULT_MAX_LOG_BYTES,
                 on_done: Callable[[], None] | None = None) -> None:
        self.name = name
        self.path = path
        self.size = 0
        self.dropped = 0
        self.disk_full = False  # a write found no room: the log holds what came before
        self.max_bytes = max_bytes
        self.written_at: float | None = None  # monotonic time of the last bytes written
        self.read_fd = read_fd
        self._on_data = on_data
        self._on_done = on_done
        self._out_fd = -1
        self._discard = False  # past the cap or out of room: keep reading, keep nothing
        self.done = threading.Event()

    def start(self) -> None:
        """Open the log (now, before the job can plant a link there) and hand over to the hub."""
        try:
            self._out_fd = os.open(self.path, _LOG_FLAGS, 0o644)
        except OSError as exc:  # the pipe is still drained: the job never blocks on it
            self._stop_writing(exc)
        os.set_blocking(self.read_fd, False)
        _hub().add(self)

    def join(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def move(self, buf: memoryview) -> bool:
        """Move what the pipe holds (up to ``len(buf)``); True once the pipe has closed."""
        want = len(buf) if self._discard else min(len(buf), self.max_bytes - self.size)
        if want <= 0:
            log.warning("log %s reached its cap of %d bytes; dropping the rest", self.name,
                        self.max_bytes)
            self._discard = True
            return False
        try:
            n = os.readv(self.read_fd, [buf[:want]])
        except BlockingIOError:
            return False
        if n == 0:
            return True
        if self._discard:
            self.dropped += n
            return False
        try:
            _write_all(self._out_fd, buf[:n])
        except OSError as exc:
            self._stop_writing(exc)
            return False
        self.size += n
        self.written_at = time.monotonic()
        self._notify(self._on_data, self.name, self.size)
        return False

    def _stop_writing(self, exc: OSError) -> None:
        self.disk_full = exc.errno in DISK_FULL_ERRNOS
        self._discard = True
        log.error("log capture for %s stopped writing: %s", self.name, exc)

    def close(self) -> None:
        """The pipe has closed (or the hub gave up on it): release both ends, tell waiters."""
        if self._out_fd >= 0:
            os.close(self._out_fd)
        os.close(self.read_fd)
        self.done.set()
        self._notify(self._on_data, self.name, self.size)
        self._notify(self._on_done)

    def _notify(self, callback: Callable[..., None] | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # a subscriber's bug must not stop this log or any other
            log.exception("log capture for %s: a callback failed", self.name)


class _Hub:
    """The one thread that moves every job's output: epoll over all capture pipes."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._streams: dict[int, StreamCapture] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, capture: StreamCapture) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="log-capture",
                                                daemon=True)
                self._thread.start()
        # epoll_ctl is safe beside a waiting epoll_wait: the hub sees the pipe at once.
        self._streams[capture.read_fd] = capture
        self._epoll.register(capture.read_fd, select.EPOLLIN)

    def _run(self) -> None:
        buf = memoryview(bytearray(MOVE_BYTES))
        last_moved = 0.0
        while True:
            moved = 0
            for fd, _events in self._epoll.poll():
                capture = self._streams.get(fd)
                if capture is not None:
                    before = capture.size + capture.dropped
                    self._serve(fd, capture, buf)
                    moved += capture.size + capture.dropped - before
            if moved:
                now = time.monotonic()
                if moved >= BATCH_BYTES or now - last_moved < BATCH_AFTER_S:
                    time.sleep(BATCH_S)
                last_moved = now

    def _serve(self, fd: int, capture: StreamCapture, buf: memoryview) -> None:
        try:
            ended = capture.move(buf)
        except Exception:  # never let one stream's surprise stop the thread for all
            log.exception("log capture for %s failed; closing it", capture.name)
            ended = True
        if ended:
            self._epoll.unregister(fd)
            del self._streams[fd]
            capture.close()


_HUB: _Hub | None = None
_HUB_LOCK = threading.Lock()


def _hub() -> _Hub:
    global _HUB
    with _HUB_LOCK:
        if _HUB is None:
            _HUB = _Hub()
        return _HUB


def _write_all(fd: int, data: bytes | memoryview) -> None:
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
            with open_regular(self.path) as fh:
                fh.seek(self.offset)
                data = fh.read() if upto is None else fh.read(max(0, upto - self.offset))
        except OSError:  # gone, or no longer the agent's regular file
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


def open_regular(path: Path) -> BinaryIO:
    """``path`` open for reading if it is a regular file, else OSError.

    A job writes its own package: where a log or its result text should be, it may
    leave a FIFO (a read would wait forever), a link to ``/dev/zero`` (a read would
    never end) or a link to a file of the agent's (which a report or a shipped log
    would carry off the node). No link is followed, neither the file nor the folder
    it is in (``logs``), and only a regular file is read.
    """
    return os.fdopen(open_regular_fd(path), "rb")


def open_regular_fd(path: Path) -> int:
    """:func:`open_regular` as a bare descriptor (for ``preadv``)."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=folder)
    finally:
        os.close(folder)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def tail_bytes(path: Path, max_bytes: int) -> str:
    """The last ``max_bytes`` of a log as text (for reports), cut at a line start."""
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - max_bytes))
            data = fh.read(max_bytes)
    except OSError:
        return ""
    if size > max_bytes:
        cut = data.find(b"\n")
        data = data[cut + 1:] if 0 <= cut < len(data) - 1 else data
    return data.decode("utf-8", errors="replace")
