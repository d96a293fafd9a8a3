"""The capture hub: one thread moves every job's output, each stream whole and in order."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.execution.capture import (
    BATCH_AFTER_S,
    BATCH_S,
    DEFAULT_MAX_LOG_BYTES,
    StreamCapture,
    make_pipe,
)

# Each writer prints its own numbered records in small, uneven writes, so many pipes
# are ready at once and any loss, duplication or reordering shows in the file.
WRITER = """import os, sys
tag = sys.argv[1].encode()
for i in range(int(sys.argv[2])):
    os.write(1, tag + b":%d:" % i + bytes([i % 256]) * (i % 300) + b"\\n")
"""


def _expected(tag: str, records: int) -> bytes:
    return b"".join(tag.encode() + b":%d:" % i + bytes([i % 256]) * (i % 300) + b"\n"
                    for i in range(records))


def _start(path: Path, max_bytes: int = DEFAULT_MAX_LOG_BYTES,
           on_data: Callable[[str, int], None] | None = None,
           on_done: Callable[[], None] | None = None) -> tuple[StreamCapture, int]:
    read_fd, write_fd = make_pipe()
    capture = StreamCapture("stdout", read_fd, path, on_data, max_bytes, on_done)
    capture.start()
    return capture, write_fd


def _spawn(write_fd: int, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, *args], stdout=write_fd)
    os.close(write_fd)
    return proc


def _hub_threads() -> int:
    return sum(t.name == "log-capture" for t in threading.enumerate())


def test_many_jobs_at_once_share_one_thread_and_keep_every_byte(tmp_path: Path) -> None:
    # Given twelve writers at once, each on its own captured pipe
    records = 2000
    started = [_start(tmp_path / f"{n}.log") for n in range(12)]
    procs = [_spawn(w, "-c", WRITER, f"job{n}", str(records))
             for n, (_c, w) in enumerate(started)]
    # When they have all finished
    for proc in procs:
        assert proc.wait(30) == 0
    for capture, _w in started:
        assert capture.join(10)
    # Then one thread did the moving, and each log is its writer's bytes in order
    assert _hub_threads() == 1
    for n, (capture, _w) in enumerate(started):
        expected = _expected(f"job{n}", records)
        assert (tmp_path / f"{n}.log").read_bytes() == expected
        assert capture.size == len(expected) and capture.dropped == 0


def test_a_capped_log_keeps_its_cap_and_never_blocks_the_job(tmp_path: Path) -> None:
    # Given a log capped at 10,000 bytes and a job that writes 3 MiB, more than its pipe
    capture, write_fd = _start(tmp_path / "capped.log", max_bytes=10_000)
    proc = _spawn(write_fd, "-c", "import os\nfor _ in range(48): os.write(1, b'x' * 65536)")
    # Then the job finishes, the log holds exactly the cap and the rest is counted
    assert proc.wait(30) == 0
    assert capture.join(10)
    assert (tmp_path / "capped.log").read_bytes() == b"x" * 10_000
    assert capture.size == 10_000 and capture.dropped == 48 * 65536 - 10_000


def test_callbacks_see_growing_sizes_then_the_end_once(tmp_path: Path) -> None:
    # Given a subscriber whose first call raises (a bug of its own)
    seen: list[int] = []
    done: list[bool] = []

    def on_data(_stream: str, size: int) -> None:
        seen.append(size)
        if len(seen) == 1:
            raise RuntimeError("subscriber bug")

    capture, write_fd = _start(tmp_path / "cb.log", on_data=on_data,
                               on_done=lambda: done.append(capture.done.is_set()))
    proc = _spawn(write_fd, "-c", WRITER, "cb", "500")
    assert proc.wait(30) == 0
    assert capture.join(10)
    # Then capture went on, sizes only grew, the last call gave the final size after the
    # end, and on_done ran once with the capture already done
    assert (tmp_path / "cb.log").read_bytes() == _expected("cb", 500)
    assert seen == sorted(seen) and seen[-1] == capture.size
    assert done == [True]


def test_a_log_that_cannot_be_opened_still_drains_the_pipe(tmp_path: Path) -> None:
    # Given a log path whose folder is gone
    capture, write_fd = _start(tmp_path / "missing" / "x.log")
    proc = _spawn(write_fd, "-c", "import os\nfor _ in range(32): os.write(1, b'y' * 65536)")
    # Then the job is never blocked on its full pipe, and what it wrote is counted dropped
    assert proc.wait(30) == 0
    assert capture.join(10)
    assert capture.size == 0 and capture.dropped == 32 * 65536


def test_a_symlink_planted_at_the_log_path_is_never_written_through(tmp_path: Path) -> None:
    # Given a link where the log should be, pointing at a file outside the job
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me\n")
    (tmp_path / "job.log").symlink_to(outside)
    capture, write_fd = _start(tmp_path / "job.log")
    proc = _spawn(write_fd, "-c", "print('evil')")
    assert proc.wait(30) == 0
    assert capture.join(10)
    # Then the outside file is untouched; the output was dropped, not written through
    assert outside.read_bytes() == b"keep me\n"
    assert capture.size == 0 and capture.dropped == len(b"evil\n")


def test_a_line_flushing_job_is_moved_in_batches_not_line_by_line(tmp_path: Path) -> None:
    # Given a job that flushes every line (PYTHONUNBUFFERED, print(flush=True), tqdm)
    lines = 100_000
    script = (f"for i in range({lines}):\n"
              "    print(f'line {i} of a chatty job', flush=True)\n")
    moves = [0]

    def count(_name: str, _size: int) -> None:
        moves[0] += 1

    capture, write_fd = _start(tmp_path / "out.log", on_data=count)
    began = time.monotonic()
    proc = _spawn(write_fd, "-c", script)
    # When it has finished
    assert proc.wait(60) == 0
    assert capture.join(10)
    elapsed = time.monotonic() - began
    # Then every line is there, in order, moved in at most one read per pause (plus one
    # per quiet gap): not one wake-up per line
    assert (tmp_path / "out.log").read_bytes() == b"".join(
        b"line %d of a chatty job\n" % i for i in range(lines))
    passes_allowed = elapsed / BATCH_S + elapsed / BATCH_AFTER_S + 2
    assert moves[0] <= passes_allowed, (moves[0], passes_allowed)
    assert moves[0] < lines / 10
