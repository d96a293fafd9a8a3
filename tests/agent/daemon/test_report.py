"""Reports: which are built on the event loop (only those that read a few small files),
and that every one fits the coordinator's body limit, cut where it must be."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.coordinator.transport import MAX_BODY_BYTES
from agent.daemon.report import (
    MAX_MANIFEST_BYTES,
    MAX_REPORT_BYTES,
    SMALL_READS_MAX_BYTES,
    Report,
    build_report,
    fit,
    read_text,
    small_reads,
)
from agent.errors import Outcome
from agent.execution.capture import tail_bytes
from agent.execution.executor import JobReport
from agent.execution.package import write_package

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


def sealed(folder: Path, outcome: Outcome = Outcome.COMPLETED) -> JobReport:
    """The run's report of ``folder``, sealed for real (output.json, sums, zip)."""
    output = {"job_id": "t1", "status": outcome.value, "metrics": {"duration_ms": 5.0}}
    code = None if outcome is Outcome.COMPLETED else "nonzero_exit"
    return JobReport("t1", outcome, code, code, False, output, write_package(folder, output))


def encoded(report: Report) -> int:
    return len(json.dumps(report.body, separators=(",", ":")))


@pytest.mark.parametrize("outcome", [Outcome.COMPLETED, Outcome.FAILED])
def test_a_text_and_tails_sized_past_the_body_limit_are_cut_to_fit(
        tmp_path: Path, outcome: Outcome) -> None:
    # Given an operator who reads 4 MiB of result text and 2 MiB of each log's tail, and
    # a job whose text and logs are control bytes, each escaped to six in JSON (36 MiB)
    folder = package(tmp_path)
    (folder / "result.txt").write_bytes(b"\x01" * (4 << 20))
    for stream in ("stdout", "stderr"):
        (folder / f"logs/{stream}.log").write_bytes(b"\x02" * (2 << 20))
    # When its report is built
    report = build_report(sealed(folder, outcome), gpu_count=0, location=None,
                          lease_id="l1", max_text_bytes=4 << 20, log_tail_bytes=2 << 20)
    # Then it fits: the tails are cut first, stdout's before stderr's, then the text (to
    # its start); the manifest is whole
    assert MAX_REPORT_BYTES - 100 < encoded(report) <= MAX_REPORT_BYTES < MAX_BODY_BYTES
    holder = report.body["result"] if report.kind == "result" else report.body["metrics"]
    assert holder["package"]["manifest_truncated"] is False
    assert len(holder["package"]["manifest"]) == 3
    assert holder["logs"]["stdout_tail"] == ""
    if report.kind == "result":
        assert holder["logs"]["stderr_tail"] == ""
        assert holder["output_truncated"] is True
        assert 0 < len(holder["output"]) < 4 << 20 and set(holder["output"]) == {"\x01"}
    else:  # no text: stderr's tail, where a traceback is, keeps what fits
        assert 1 << 20 < len(holder["logs"]["stderr_tail"]) < 2 << 20
    assert report.body["lease_id"] == "l1"


def test_tails_alone_past_the_limit_are_cut_and_the_text_kept_whole(tmp_path: Path) -> None:
    folder = package(tmp_path, result=100)
    for stream in ("stdout", "stderr"):
        (folder / f"logs/{stream}.log").write_bytes(b"a" * (1 << 20) + b"\x02" * (1 << 20))
    report = build_report(sealed(folder), gpu_count=0, location=None, lease_id=None,
                          max_text_bytes=256 << 10, log_tail_bytes=2 << 20)
    assert encoded(report) <= MAX_REPORT_BYTES
    result = report.body["result"]
    assert result["output"] == "r" * 100 and result["output_truncated"] is False
    tails = result["logs"]
    assert tails["stderr_tail"] == "a" * (1 << 20) + "\x02" * (1 << 20)  # whole
    assert 0 < len(tails["stdout_tail"]) < 1 << 20  # stdout's cut, to its end
    assert tails["stdout_tail"] == "\x02" * len(tails["stdout_tail"])


def test_a_manifest_stops_at_its_bytes_of_json_as_at_its_entries(tmp_path: Path) -> None:
    # Given a job that left 300 files 15 folders down, each folder named 80 three-byte
    # characters (7 KiB of JSON a path)
    folder = package(tmp_path)
    deep = folder.joinpath(*["\u20ac" * 80] * 15)
    deep.mkdir(parents=True)
    for i in range(300):
        (deep / f"{i:03}").write_bytes(b"")
    run = sealed(folder)
    # When its report is built
    report = build_report(run, gpu_count=0, location=None, lease_id=None,
                          max_text_bytes=256 << 10, log_tail_bytes=8 << 10)
    # Then it lists the manifest's first entries, within MAX_MANIFEST_BYTES of JSON
    block = report.body["result"]["package"]
    listed = block["manifest"]
    assert block["manifest_truncated"] is True and 0 < len(listed) < len(run.package.manifest)
    assert listed == run.package.manifest[:len(listed)]
    size = len(json.dumps(listed, separators=(",", ":")))
    assert MAX_MANIFEST_BYTES - 10_000 < size <= MAX_MANIFEST_BYTES
    assert block["result_hash"] == run.package.result_hash


def test_a_report_that_fits_is_sent_as_it_is(tmp_path: Path) -> None:
    report = build_report(sealed(package(tmp_path)), gpu_count=0, location=None,
                          lease_id=None, max_text_bytes=256 << 10, log_tail_bytes=8 << 10)
    assert fit(report) is report and fit(report, limit=encoded(report)) is report
    assert report.body["result"]["package"]["manifest_truncated"] is False
    # And a limit it is past cuts it to that limit exactly or under
    cut = fit(report, limit=encoded(report) - 30)
    assert cut is not report and encoded(cut) <= encoded(report) - 30
