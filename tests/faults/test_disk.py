"""Rows of group ``disk``: ENOSPC on the state dir, a small tmpfs (skipped without root)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.faults.checks import verify
from tests.faults.rig import Rig
from tests.faults.rows import MID_JOB, MID_JOB_S, Row, rows_of

pytestmark = pytest.mark.slow
FILL = {"type": "command", "argv": ["sh", "-c", "echo before-the-fill; "
                                    "dd if=/dev/zero of=fill bs=64k 2>/dev/null; exit 0"]}


def _fill(path: Path) -> None:
    """Write ``path`` until its filesystem has no byte left."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (64 << 10))
                fh.flush()
        except OSError:
            pass


@pytest.mark.parametrize("row", rows_of("disk"))
def test_disk(row: Row, small_disk: Path, tmp_path: Path) -> None:
    rig = Rig(tmp_path, state=small_disk)
    try:
        _run(rig, row)
    finally:
        rig.close()


def _run(rig: Rig, row: Row) -> None:
    rig.coordinator()
    assert rig.client is not None
    if row.params["mode"] == "job_fills":
        rig.job_id = rig.client.submit(FILL)
        rig.agent(min_free_disk_mb=1, allowed_job_types="command,sleep")
        verify(rig, row)
        return
    # Given a running job, when the state dir's filesystem fills up from outside
    rig.job_id = rig.client.submit(MID_JOB)
    agent = rig.agent(min_free_disk_mb=1)
    agent.wait_log(f"job {rig.job_id}: started pid")
    filler = rig.state / "filler"
    _fill(filler)
    assert shutil.disk_usage(rig.state).free < (64 << 10)
    time.sleep(MID_JOB_S + 2.0)  # the job ends on a full disk; its report waits
    # Then, once space returns, the job's report goes out once and the agent serves on
    os.unlink(filler)
    verify(rig, row)
