"""What a job wrote, shown to a person: never an escape sequence the terminal acts on.

A real pseudo-terminal stands for the operator's, a real sealed package for a
stranger's job, and `miner-agent verify` runs as a real process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.commands.client import Target, summary
from agent.commands.console import JobConsole
from agent.execution.package import write_package
from agent.text import printable

# Retitle the window, then erase the screen: what a hostile job would print
ATTACK = "\x1b]0;owned\x07\x1b[2J"
SHOWN = "\\x1b]0;owned\\x07\\x1b[2J"


def test_printable_shows_every_control_character_and_keeps_the_text() -> None:
    assert printable(f"loss 0.5\t{ATTACK}é\n") == f"loss 0.5\t{SHOWN}é\n"
    assert printable("a\nb", one_line=True) == "a\\x0ab"
    assert printable("\x9b2J\x7f") == "\\x9b2J\\x7f"  # C1's one-byte CSI, DEL
    # A redrawn line (tqdm's) shows as a terminal would show it: its last state
    assert printable(" 10%|#\r 20%|##\r 30%|###", overwrite=True) == " 30%|###"


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_the_console_on_a_terminal_shows_a_jobs_escapes_and_a_file_gets_them_raw(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the console of `exec` and `watch` writing to a real terminal, wide enough
    # for the whole bar
    monkeypatch.setenv("COLUMNS", "400")
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            console = JobConsole("j1", tty)
            assert console.tty
            # When a job prints an escape sequence, and reports it as its stage
            console.line("stdout", f"step 1 {ATTACK}\n".encode())
            console.event({"event": "progress", "fraction": 0.5, "stage": ATTACK,
                           "metrics": {ATTACK: 1.0}})
            console.note(f"status: {ATTACK}")
            console.close()
        shown = read_all(master).decode()
    finally:
        os.close(master)
        os.close(slave)
    # Then the terminal got it as text; the only escape is the console's own bar clear
    assert f"step 1 {SHOWN}" in shown and f"status: {SHOWN}" in shown
    assert shown.count(SHOWN) == 4  # line, stage, metric, note
    assert "\x1b]" not in shown and "\x07" not in shown
    assert shown.replace("\r\x1b[K", "").count("\x1b") == 0
    # And written to a file (not a terminal), the job's line is as it printed it
    plain = io.StringIO()
    JobConsole("j1", plain).line("stdout", f"step 1 {ATTACK}\n".encode())
    assert plain.getvalue() == f"step 1 {ATTACK}\n"


def test_status_shows_a_jobs_error_and_output_without_their_escapes() -> None:
    job = {"job_id": "j1", "status": "failed", "progress": 50.0,
           "progress_detail": {"stage": ATTACK, "message": "m\nm"},
           "error": {"code": "nonzero_exit", "message": ATTACK},
           "result": {"output": f"line 1\n{ATTACK}"}}
    lines = summary(job, Target("http://127.0.0.1:9", "k", "key", False))
    assert lines[0] == f"j1: failed 50% {SHOWN} m\\x0am"
    assert lines[1] == f"error: nonzero_exit: {SHOWN}"
    assert lines[2] == f"line 1\n{SHOWN}"
    assert all("\x1b" not in line for line in lines)


def test_verify_names_a_changed_file_without_acting_on_its_name(tmp_path: Path) -> None:
    # Given a sealed package holding a file a job named with an escape sequence, since
    # changed (so `verify` names it)
    folder = tmp_path / "job_j1"
    (folder / "artifacts").mkdir(parents=True)
    name = f"a{ATTACK}b.txt"
    (folder / "artifacts" / name).write_text("before\n")
    write_package(folder, {"job_id": "j1", "status": "completed"})
    files = json.loads((folder / "output.json").read_text())["files"]
    assert f"artifacts/{name}" in {f["path"] for f in files}
    (folder / "artifacts" / name).write_text("after\n")
    # When the operator verifies it
    done = subprocess.run([sys.executable, "-m", "agent", "verify", str(folder)],
                          capture_output=True)
    # Then it fails, naming the file as text: no escape reaches the terminal
    assert done.returncode != 0
    assert f"artifacts/a{SHOWN}b.txt".encode() in done.stdout, done.stdout
    assert b"\x1b" not in done.stdout + done.stderr
