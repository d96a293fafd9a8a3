"""Rows of group ``storm``: bursts of errors, resets or late answers on every endpoint."""

from __future__ import annotations

import pytest

from tests.faults.checks import verify
from tests.faults.rig import Rig
from tests.faults.rows import SHORT_JOB, Row, rows_of

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("row", rows_of("storm"))
def test_storm(row: Row, rig: Rig) -> None:
    # Given a job running, when the storm starts: it meets heartbeats, progress, logs,
    # polls, the upload and the report, whichever comes first
    coord = rig.coordinator()
    rig.job_id = coord.store.submit(SHORT_JOB, {}, 900.0)
    agent = rig.agent()
    agent.wait_log(f"job {rig.job_id}: started pid")
    for kind, settings in row.params["faults"]:
        getattr(coord.faults, kind)(**settings)
    verify(rig, row)
    assert coord.faults.injected >= 1, "the storm met no request"
