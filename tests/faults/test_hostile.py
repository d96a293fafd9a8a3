"""Rows of group ``hostile``: a coordinator whose answers are too big, too deep, mistyped,
out of range, HTML, or redirects to another host."""

from __future__ import annotations

import dataclasses

import pytest

from tests.faults.checks import verify
from tests.faults.hostile import build
from tests.faults.rig import QUICK_JOB, Rig
from tests.faults.rows import Check, Row, rows_of

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("row", rows_of("hostile"))
def test_hostile(row: Row, rig: Rig) -> None:
    p = row.params
    hostile, witness = rig.hostile_coordinator()
    elsewhere = f"{witness.base_url}/v1/miners/elsewhere"
    for endpoint in ("register", "heartbeat", "running", "poll"):
        answers = [build(spec, elsewhere) for spec in p.get(endpoint, ())]
        if endpoint == "poll" and Check.FAILED_INVALID in row.checks:
            # its bad answer hands the job out all the same: listed as running from then
            answers = [dataclasses.replace(a, hands_out=p["bad_id"]) for a in answers]
        hostile.queue(endpoint, *answers)
    if "job" in p:  # the row's own job, handed out after the bad answers
        rig.job_id = "subject-1"
        hostile.hand_out(rig.job_id, p["job"])
        hostile.queue(f"result:{rig.job_id}",
                      *(build(spec, elsewhere) for spec in p.get("result", ())))
    rig.fresh_id = "fresh-1"
    hostile.hand_out(rig.fresh_id, QUICK_JOB)
    rig.agent()
    verify(rig, row)
    assert any(s.hostile for s in hostile.requests()), "no bad answer was served"
