"""Log capture keeps every byte, and hands out every line, whatever the job writes."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from agent.errors import Outcome
from agent.execution.capture import LineTail, tail_bytes
from agent.layout import log_path
from tests.agent.conftest import PY, make_job, planted, run

BINARY = r"""
import os, random, sys
rng = random.Random(5)
out = sys.stdout.buffer
for size in (1, 7, 4096, 65536, 1 << 20, 3 << 20):
    out.write(bytes(rng.getrandbits(8) for _ in range(min(size, 4096))) * (size // 4096 or 1))
out.write(b"\x00no newline at the end")
out.flush()
sys.stderr.write("err line\npartial")
"""


def test_binary_output_is_kept_byte_for_byte(out: Path) -> None:
    # Given a job that writes 4+ MiB of arbitrary bytes, ending mid-line, on both streams
    lines: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    report = run(make_job({"type": "command", "argv": [PY, "-c", BINARY]}), out,
                 on_line=lambda stream, line: lines[stream].append(line))
    assert report.outcome == Outcome.COMPLETED
    # Then the log files hold exactly what it wrote, as a direct run shows
    direct = subprocess.run([PY, "-c", BINARY], capture_output=True, check=True)
    logs = out / "job_t1/logs"
    assert (logs / "stdout.log").read_bytes() == direct.stdout
    assert (logs / "stderr.log").read_bytes() == direct.stderr == b"err line\npartial"
    # And the line subscriber saw the same bytes, the unterminated tail included
    assert b"".join(lines["stdout"]) == direct.stdout
    assert lines["stderr"] == [b"err line\n", b"partial"]
    manifest = {m["path"]: m["sha256"] for m in report.output["files"]}
    assert manifest["logs/stdout.log"] == hashlib.sha256(direct.stdout).hexdigest()


def test_log_readers_follow_no_link_and_read_only_regular_files(tmp_path: Path) -> None:
    # Given logs a job swapped for a link to a secret, a link to another job's logs
    # folder, and a FIFO
    linked, moved, fifo = planted(tmp_path)
    # Then the report's tails read none of them (and the FIFO does not block)
    assert tail_bytes(log_path(linked, "stdout"), 1 << 20) == ""
    assert tail_bytes(log_path(moved, "stdout"), 1 << 20) == ""
    assert tail_bytes(log_path(fifo, "stderr"), 1 << 20) == ""
    assert tail_bytes(log_path(linked, "stderr"), 1 << 20) == "its own\n"
    # And the console's line reader neither
    assert LineTail(log_path(linked, "stdout")).read_lines() == []
    assert LineTail(log_path(moved, "stdout")).read_lines() == []
    # And it reads no further than the capture wrote, whatever the file holds
    tail = LineTail(log_path(linked, "stderr"))
    assert tail.read_lines(upto=4) == [] and tail.read_lines(upto=8) == [b"its own\n"]
