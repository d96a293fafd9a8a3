"""Rows of group ``outage``: the coordinator unreachable (connections refused) for a while."""

from __future__ import annotations

import time

import pytest

from tests.agent.daemon.helpers import wait_until
from tests.faults.checks import verify
from tests.faults.rig import MINER_ID, Rig
from tests.faults.rows import Row, rows_of

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("row", rows_of("outage"))
def test_outage(row: Row, rig: Rig) -> None:
    p = row.params
    coord = rig.coordinator(core=p.get("core", False), **p.get("coord", {}))
    assert rig.client is not None
    if p["down_at"] == "registered":
        # Given a registered agent, when the coordinator goes away and a job is queued
        agent = rig.agent()
        agent.wait_log("registered as")
        coord.faults.down()
        rig.job_id = coord.store.submit(p["job"], {}, 900.0)
    else:
        rig.job_id = rig.client.submit(p["job"])
        call = p["down_at"] if p["down_at"] in ("package", "result") else None
        if call is not None:  # hold the call in flight long enough to cut it
            coord.faults.set(status=None, delay_s=1.0, paths=(rig.path(rig.job_id, call),))
        agent = rig.agent()
        if call is not None:
            rig.wait_arrived(rig.job_id, call)
        else:
            agent.wait_log(f"job {rig.job_id}: started pid")
        coord.faults.down()
    if p.get("cancel"):  # what the client's cancel does to a running core job
        coord.store.update_job(rig.job_id, state="CANCELED", finished_at=time.time(),
                               finished_by="client", lease_expires_at=None)
    if p.get("hold_from") == "completed":
        agent.wait_log(f"job {rig.job_id}: completed", timeout=30)
    time.sleep(p["hold_s"])
    if p.get("report_after_requeue"):
        # Back up, only its poll answers at first: the requeued job is handed out again
        # before the first attempt's report (or a heartbeat) can learn the lease is gone
        coord.faults.set(503, count=100_000, paths=(rig.path(rig.job_id, "result"),
                                                    "/v1/miners/heartbeat",
                                                    f"/v1/miners/{MINER_ID}/jobs"))
        coord.store.sweep()  # the lease lapsed: requeued, and its slot is free again
        coord.store.set_inflight(MINER_ID, 0)
        coord.faults.up()
        wait_until(lambda: rig.job(rig.job_id)["attempts"] >= 2, 30,
                   lambda: f"the requeued job was not handed out:\n{rig.log()[-2000:]}")
        coord.faults.clear()
    # Then, once it is back: the row's checks
    coord.faults.up()
    verify(rig, row)
