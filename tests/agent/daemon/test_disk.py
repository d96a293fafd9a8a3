"""A full disk: the real daemon on a tiny tmpfs state dir, against the reference coordinator."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.daemon.helpers import (
    AgentProcess,
    Client,
    start_coordinator,
    tmpfs,
    use_inodes,
    wait_until,
)

SLEEP = {"type": "sleep", "steps": 3, "step_s": 0.02, "print_every": 1}
TMPFS_MB = 16


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A state dir on its own 16 MiB tmpfs (root only: skipped where mount fails)."""
    with tmpfs(tmp_path / "state", TMPFS_MB) as mount:
        yield mount


@pytest.fixture
def coord(tmp_path: Path) -> Iterator[ReferenceCoordinator]:
    coordinator = start_coordinator(tmp_path / "coordinator", extensions=())
    yield coordinator
    coordinator.stop()


def paused_reason(coord: ReferenceCoordinator) -> str:
    """Why miner-1's last heartbeat says it takes no job ("" while it polls)."""
    miner = coord.store.miner("miner-1") or {}
    return str((miner.get("metadata") or {}).get("paused") or "")


def _fill(path: Path, leave_mb: int) -> None:
    """Write a file until only ``leave_mb`` MiB stay free on ``path``'s filesystem."""
    size = shutil.disk_usage(path.parent).free - (leave_mb << 20)
    with open(path, "wb") as fh:
        fh.write(b"\0" * max(0, size))


def test_low_disk_pauses_polling_until_space_returns(
        small_disk: Path, coord: ReferenceCoordinator, agents: list[AgentProcess]) -> None:
    # Given a state dir with 4 MiB free, a floor of 8 MiB, and a queued job
    filler = small_disk / "filler"
    _fill(filler, leave_mb=4)
    client = Client(coord)
    job_id = client.submit(SLEEP)
    agent = AgentProcess(coord.base_url, small_disk, min_free_disk_mb=8)
    agents.append(agent)

    # When the agent runs, it takes no job and the heartbeat says why
    wait_until(lambda: paused_reason(coord).startswith("low disk: "), 30,
               lambda: f"no pause in the heartbeat:\n{agent.log()[-3000:]}")
    assert "< min_free_disk_mb 8" in paused_reason(coord)
    assert client.job(job_id)["status"] == "pending"  # not handed out
    # When space returns, polling resumes and the job completes
    filler.unlink()
    assert client.wait_status(job_id, "completed", "failed", timeout=60)["status"] == "completed"
    wait_until(lambda: paused_reason(coord) == "", 30,
               lambda: f"still paused: {paused_reason(coord)}")


def test_a_job_that_fills_the_disk_fails_with_disk_full(
        small_disk: Path, coord: ReferenceCoordinator, agents: list[AgentProcess]) -> None:
    # Given a command job that prints a line, then writes until the disk is full
    client = Client(coord)
    fill = client.submit({"type": "command", "argv": [
        "sh", "-c", "echo before-the-fill; dd if=/dev/zero of=fill bs=64k 2>/dev/null; "
        "echo after-the-fill; exit 0"]})
    agent = AgentProcess(coord.base_url, small_disk, min_free_disk_mb=2,
                         allowed_job_types="command,sleep")
    agents.append(agent)
    # When it runs, it ends failed with disk_full (not completed), though it exited 0
    job = client.wait_status(fill, "completed", "failed", timeout=90)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "disk_full", job
    assert "the disk holding the job's folder is full" in job["error"]["message"]
    # And its logs keep what they had before the disk filled
    stdout = small_disk / "jobs" / f"job_{fill}" / "logs" / "stdout.log"
    assert "before-the-fill" in stdout.read_text()
    # And the agent keeps serving: the next job runs to completion
    after = client.submit(SLEEP)
    assert client.wait_status(after, "completed", "failed", timeout=60)["status"] == "completed"
    assert agent.proc.poll() is None


def test_a_package_without_room_for_its_zip_is_sealed_as_a_folder(
        small_disk: Path, coord: ReferenceCoordinator, agents: list[AgentProcess]) -> None:
    # Given a job that leaves 9 MB on a 16 MiB disk: no room for the zip's copy of it
    # (the seal failed: no package at all, and the report lost the text and the logs)
    client = Client(coord)
    job_id = client.submit({"type": "command", "argv": ["sh", "-c", (
        "echo printed; head -c 9000000 /dev/urandom > $MINER_ARTIFACTS_DIR/big; "
        "echo done > $MINER_RESULT_FILE")]})
    agent = AgentProcess(coord.base_url, small_disk, min_free_disk_mb=1,
                         allowed_job_types="command,sleep")
    agents.append(agent)
    # Then it completes, its report whole: text, logs, and the folder as its package
    job = client.wait_status(job_id, "completed", "failed", timeout=60)
    assert job["status"] == "completed", job
    result = job["result"]
    assert result["output"] == "done\n"
    assert result["logs"]["stdout_tail"] == "printed\n"
    folder = small_disk / "jobs" / f"job_{job_id}"
    package = result["package"]
    assert package["zip_sha256"] is None and package["location"] == folder.as_uri()
    assert {m["path"] for m in package["manifest"]} >= {"artifacts/big", "result.txt"}
    # And the folder is sealed: its output.json says why there is no zip, and it verifies
    output = json.loads((folder / "output.json").read_text())
    assert output["zip_error"].startswith("no room on the node's disk for the zip")
    assert not folder.with_suffix(".zip").exists()
    assert not any(p.name.endswith(".tmp") for p in folder.parent.iterdir())
    check = subprocess.run(["sha256sum", "-c", "--strict", "output.sha256"], cwd=folder,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Exception ignored" not in agent.log()
    # And the agent keeps serving
    after = client.submit(SLEEP)
    assert client.wait_status(after, "completed", "failed", timeout=60)["status"] == "completed"


def test_no_inodes_left_pauses_polling_as_low_disk_does(
        tmp_path: Path, coord: ReferenceCoordinator, agents: list[AgentProcess]) -> None:
    # Given a state dir on a filesystem of 2,000 inodes, all but 30 taken by empty files
    # (plenty of bytes free), and a queued job
    with tmpfs(tmp_path / "state", TMPFS_MB, inodes=2000) as state:
        flood = state / "flood"
        use_inodes(flood, leave=30)
        client = Client(coord)
        job_id = client.submit(SLEEP)
        agent = AgentProcess(coord.base_url, state, min_free_disk_mb=1)
        agents.append(agent)

        # When the agent runs, it takes no job, and the heartbeat says it is the inodes
        wait_until(lambda: "inodes free" in paused_reason(coord), 30,
                   lambda: f"no pause in the heartbeat:\n{agent.log()[-3000:]}")
        assert "< 64 (1 % of 2000)" in paused_reason(coord), paused_reason(coord)
        assert client.job(job_id)["status"] == "pending"
        # When the files go, polling resumes and the job completes
        shutil.rmtree(flood)
        view = client.wait_status(job_id, "completed", "failed", timeout=60)
        assert view["status"] == "completed", view
        agent.stop()
