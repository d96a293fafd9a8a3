"""Which reports are built on the event loop: only those that read a few small files."""

from __future__ import annotations

import os
from pathlib import Path

from agent.daemon.report import SMALL_READS_MAX_BYTES, read_text, small_reads
from agent.execution.capture import tail_bytes

BOUNDS = {"max_text_bytes": 256 << 10, "log_tail_bytes": 8 << 10}


def package(tmp_path: Path, result: int | None = 10, log: int = 100) -> Path:
    """A package folder with a ``result`` bytes long result text and logs of ``log`` bytes."""
    folder = tmp_path / "job_t1"
    (folder / "logs").mkdir(parents=True)
    if result is not None:
        (folder / "result.txt").write_bytes(b"r" * result)
    for stream in ("stdout", "stderr"):
        (folder / f"logs/{stream}.log").write_bytes(b"line\n" * (log // 5))
    return folder


def test_a_tiny_package_is_read_on_the_loop(tmp_path: Path) -> None:
    assert small_reads(package(tmp_path), **BOUNDS)
    assert small_reads(package(tmp_path / "none", result=None), **BOUNDS)
    assert small_reads(None, **BOUNDS)


def test_a_large_result_text_keeps_its_thread_unless_the_read_is_bounded_small(
        tmp_path: Path) -> None:
    # Given a result text larger than the loop's share
    folder = package(tmp_path, result=SMALL_READS_MAX_BYTES + 1)
    # Then it is read in a thread, unless only a small part of it is read
    assert not small_reads(folder, **BOUNDS)
    assert small_reads(folder, max_text_bytes=16 << 10, log_tail_bytes=8 << 10)


def test_long_logs_count_by_their_tails(tmp_path: Path) -> None:
    folder = package(tmp_path, log=1 << 20)
    assert small_reads(folder, **BOUNDS)
    assert not small_reads(folder, max_text_bytes=256 << 10, log_tail_bytes=1 << 20)


def test_what_a_job_left_that_is_not_a_regular_file_is_read_in_a_thread(tmp_path: Path) -> None:
    # Given a job that left a FIFO for its result text, and one whose log is a device
    fifo = package(tmp_path / "fifo", result=None)
    os.mkfifo(fifo / "result.txt")
    device = package(tmp_path / "device")
    (device / "logs/stdout.log").unlink()
    (device / "logs/stdout.log").symlink_to("/dev/zero")
    # Then neither read is made on the loop (either could wait, or never end)
    assert not small_reads(fifo, **BOUNDS)
    assert not small_reads(device, **BOUNDS)


def test_a_fifo_or_a_device_link_in_the_package_reads_as_empty_at_once(
        tmp_path: Path) -> None:
    # Given a job that left a FIFO as its result text and /dev/zero as its stdout log
    folder = package(tmp_path)
    (folder / "result.txt").unlink()
    os.mkfifo(folder / "result.txt")
    (folder / "logs/stdout.log").unlink()
    (folder / "logs/stdout.log").symlink_to("/dev/zero")
    # Then neither is read (a read would wait, or never end), in a thread or not
    assert read_text(folder / "result.txt", 1 << 20) == ("", False)
    assert tail_bytes(folder / "logs/stdout.log", 1 << 20) == ""
    assert tail_bytes(folder / "logs/stderr.log", 8) == "line\n"


def test_a_log_tail_reads_at_most_its_bound(tmp_path: Path) -> None:
    folder = package(tmp_path, log=1 << 20)
    tail = tail_bytes(folder / "logs/stdout.log", 1000)
    assert 0 < len(tail) <= 1000 and tail.startswith("line\n")
