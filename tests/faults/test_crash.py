"""Rows of group ``crash``: the agent killed or stopped at each journal phase, then restarted."""

from __future__ import annotations

import signal

import pytest

from tests.faults.checks import verify
from tests.faults.rig import QUICK_JOB, Rig
from tests.faults.rows import Row, rows_of

pytestmark = pytest.mark.slow
DRAIN_S, GRACE_S = 2.0, 3.0
STOP_BUDGET_S = DRAIN_S + GRACE_S + 5.0


@pytest.mark.parametrize("row", rows_of("crash"))
def test_crash(row: Row, rig: Rig) -> None:
    p = row.params
    coord = rig.coordinator()
    if p["phase"] == "accepted":
        rig.job_id = rig.seed_accepted()
    else:
        assert rig.client is not None
        rig.job_id = rig.client.submit(p.get("job", QUICK_JOB))
        if p["phase"] == "finished":  # the report is journaled, never acknowledged
            coord.faults.set(503, count=100_000, paths=(rig.path(rig.job_id, "result"),))
        elif p["phase"] == "upload":
            coord.faults.set(None, delay_s=p.get("upload_delay_s", 3.0),
                             paths=(rig.path(rig.job_id, "package"),))
        agent = rig.agent(drain_timeout_s=DRAIN_S, cancel_grace_s=GRACE_S)
        if p["phase"] == "running":
            agent.wait_log(f"job {rig.job_id}: started pid")
        else:
            rig.wait_arrived(rig.job_id, "result" if p["phase"] == "finished" else "package")
        if p.get("signal") == "TERM":
            rig.stop_with_term(agent, STOP_BUDGET_S)
        else:
            agent.signal(signal.SIGKILL)
            agent.proc.wait(10)
        coord.faults.clear()
    # When a new agent starts on the same state dir, it finishes what the crash left
    rig.agent()
    verify(rig, row)
    assert p["phase"] in ("accepted", "running") or coord.faults.injected >= 1
