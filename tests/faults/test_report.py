"""Rows of group ``report``: faults on the finished job's report and package upload."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest

from agent.reference.miner_api import MinerAPI
from tests.faults.checks import verify
from tests.faults.rig import QUICK_JOB, TERMINAL, Rig
from tests.faults.rows import Row, rows_of

pytestmark = pytest.mark.slow


def _answer_late(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> threading.Event:
    """The coordinator's first /result is handled at once and answered ``delay_s`` late
    (a lost or slow answer): a fault the fault layer, which acts before handling, lacks."""
    handle = MinerAPI.result
    first = threading.Event()

    def late(api: MinerAPI, req: Any) -> Any:
        answer = handle(api, req)
        if not first.is_set():
            first.set()
            time.sleep(delay_s)
        return answer

    monkeypatch.setattr(MinerAPI, "result", late)
    return first


@pytest.mark.parametrize("row", rows_of("report"))
def test_report(row: Row, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    p = row.params
    late = threading.Event()
    if "late_answer_s" in p:  # before the coordinator starts: it binds its routes then
        late = _answer_late(monkeypatch, p["late_answer_s"])
    coord = rig.coordinator(core=p.get("core", False), **p.get("coord", {}))
    assert rig.client is not None
    rig.job_id = rig.client.submit(p.get("job", QUICK_JOB))
    if "fault" in p:
        kind, settings = p["fault"]
        getattr(coord.faults, kind)(paths=(rig.path(rig.job_id, "result"),), **settings)
    rig.agent(**p.get("agent", {}))
    if p.get("then") == "second_job":
        # While the first report is refused, a second job takes the free slot
        rig.wait_arrived(rig.job_id, "result")
        second = coord.store.submit(QUICK_JOB, {}, 900.0)
        with contextlib.suppress(AssertionError):
            rig.wait_state(second, TERMINAL, timeout=10)
        rig.facts["slot_free"] = (rig.job(second)["state"] == "COMPLETED"
                                  and not coord.store.receipts(rig.job_id))
        rig.facts["second"] = (f"second job {rig.job(second)['state']} on the coordinator "
                               f"10 s later, run {rig.runs(second)} time(s) on the node")
        coord.faults.clear()
    elif p.get("then") == "expire":
        # While the report is refused, the job runs past its TTL on the coordinator
        rig.wait_arrived(rig.job_id, "result")
        coord.store.update_job(rig.job_id, expires_at=time.time() - 1)
        time.sleep(1.0)
        coord.faults.clear()
    verify(rig, row)
    assert "fault" not in p or coord.faults.injected >= 1, "the report met no fault"
    assert "late_answer_s" not in p or late.is_set(), "no /result was answered late"
    tries = coord.faults.arrived(rig.path(rig.job_id, "result"))
    assert tries >= p.get("tries", 1), f"/result was tried {tries} times"
