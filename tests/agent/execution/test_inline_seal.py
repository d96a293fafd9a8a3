"""Which packages are sealed on the event loop, and the scratch folder's quick removal:
real jobs, real files, the event loop's own thread observed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from pathlib import Path

import pytest

import agent.execution.executor as executor_module
from agent.errors import Outcome
from agent.execution.executor import ExecutorConfig, JobRun, remove_scratch
from agent.execution.launcher import make_launcher
from agent.execution.package import InlineSeals
from agent.execution.sealwalk import small_folder
from tests.agent.conftest import PY, make_job

TINY = "print('hi')"
BIG = ("import os; open(os.path.join(os.environ['MINER_ARTIFACTS_DIR'], 'big.bin'), 'wb')"
       ".write(os.urandom(1 << 20))")


def seal_thread(out: Path, script: str, seals: InlineSeals) -> tuple[Outcome, bool]:
    """Run a job; its outcome and whether its package was sealed on the loop's thread."""
    sealed_on: list[int] = []
    real = executor_module.write_package

    def watched(*args: object, **kwargs: object) -> object:
        sealed_on.append(threading.get_ident())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    async def main() -> tuple[Outcome, bool]:
        launcher = make_launcher("spawn")
        cfg = ExecutorConfig(out, cancel_grace_s=5, inline_seals=seals)
        try:
            report = await JobRun(make_job({"type": "command", "argv": [PY, "-c", script]}),
                                  cfg, launcher).run()
        finally:
            await launcher.close()
        return report.outcome, sealed_on == [threading.get_ident()]

    executor_module.write_package = watched  # type: ignore[assignment]
    try:
        return asyncio.run(main())
    finally:
        executor_module.write_package = real


def test_a_tiny_package_is_sealed_on_the_loop_and_checks_out(tmp_path: Path) -> None:
    outcome, on_loop = seal_thread(tmp_path, TINY, InlineSeals())
    assert outcome is Outcome.COMPLETED and on_loop
    check = subprocess.run(["sha256sum", "-c", "output.sha256"], cwd=tmp_path / "job_t1",
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert subprocess.run(["sha256sum", "-c", "job_t1.zip.sha256"], cwd=tmp_path).returncode == 0
    assert (tmp_path / ".work").is_dir() and not (tmp_path / ".work/t1").exists()


def test_a_package_past_the_bounds_is_sealed_in_a_thread(tmp_path: Path) -> None:
    outcome, on_loop = seal_thread(tmp_path, BIG, InlineSeals())
    assert outcome is Outcome.COMPLETED and not on_loop
    assert (tmp_path / "job_t1/artifacts/big.bin").stat().st_size == 1 << 20


def test_a_slow_seal_sends_the_next_ones_to_a_thread(tmp_path: Path) -> None:
    # Given seals that count any time on the loop as slow, judged on the last one
    seals = InlineSeals(slow_s=0.0, backoff_s=60, window=1)
    # When a tiny job is sealed on the loop
    assert seal_thread(tmp_path / "a", TINY, seals) == (Outcome.COMPLETED, True)
    # Then the next tiny one goes to a thread
    assert seal_thread(tmp_path / "b", TINY, seals) == (Outcome.COMPLETED, False)


def test_one_blip_keeps_seals_on_the_loop_but_a_slow_run_or_a_stall_does_not(
        tmp_path: Path) -> None:
    (tmp_path / "out.txt").write_text("x")
    # One seal past slow_s among fast ones: a preempted loop, not a slow disk
    seals = InlineSeals(slow_s=0.02, window=5, stall_s=0.25)
    for took in (0.001, 0.030, 0.001, 0.002, 0.001, 0.001):
        seals.took(took)
    assert seals.allowed(tmp_path)
    # Most of the last five slow: the disk is, and the seals go to a thread
    for took in (0.030, 0.040, 0.025):
        seals.took(took)
    assert not seals.allowed(tmp_path)
    # A single stall past stall_s is enough on its own
    stalled = InlineSeals(slow_s=0.02, window=5, stall_s=0.25)
    stalled.took(0.3)
    assert not stalled.allowed(tmp_path)


def test_small_folder_stops_at_the_first_sign_of_more(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    (folder / "logs").mkdir(parents=True)
    (folder / "logs/stdout.log").write_bytes(b"x" * 100)
    assert small_folder(folder)
    assert not small_folder(folder, max_bytes=99)
    for i in range(5):
        (folder / f"f{i}").write_bytes(b"")
    assert small_folder(folder, max_entries=7) and not small_folder(folder, max_entries=6)
    (folder / "link").symlink_to("/dev/zero")
    assert not small_folder(folder)
    (folder / "link").unlink()
    os.mkfifo(folder / "fifo")
    assert not small_folder(folder)
    assert not small_folder(tmp_path / "missing")


@pytest.mark.parametrize("left", ["nothing", "files", "home link"])
def test_scratch_goes_whatever_the_job_left_and_no_link_is_followed(
        tmp_path: Path, left: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    work = tmp_path / "work"
    (work / ".home").mkdir(parents=True)
    if left == "files":
        (work / ".home/.bashrc").write_text("x")
        (work / "data").mkdir()
        (work / "data/a.bin").write_bytes(b"1")
    elif left == "home link":
        (work / ".home").rmdir()
        (work / ".home").symlink_to(outside)
    remove_scratch(work)
    remove_scratch(work)  # gone already: nothing to do
    assert not work.exists() and (outside / "keep.txt").read_text() == "mine"
