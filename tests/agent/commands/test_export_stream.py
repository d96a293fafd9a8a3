"""`miner-agent export` writes each job as it arrives: a coordinator's whole history (a
job view carries its payload) is never held in memory at once, as it was."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from agent.commands.history import CSV_COLUMNS, write_export

JOBS = [{"job_id": f"j{i}", "status": "completed", "payload": {"type": "sleep", "text": "a\nb"},
         "progress": 100, "package": None} for i in range(3)]


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_each_job_is_written_before_the_next_is_read(fmt: str) -> None:
    out = io.StringIO()
    written_before: list[bool] = []

    def jobs() -> Iterator[dict[str, Any]]:
        for job in JOBS:
            yield job
            written_before.append(job["job_id"] in out.getvalue())

    assert write_export(jobs(), fmt, out) == 3
    assert written_before == [True, True, True]
    if fmt == "json":  # the same text as json.dumps of the whole list
        assert out.getvalue() == json.dumps(JOBS, indent=2) + "\n"
    else:
        rows = list(csv.DictReader(io.StringIO(out.getvalue())))
        assert [r["job_id"] for r in rows] == ["j0", "j1", "j2"]
        assert list(rows[0]) == list(CSV_COLUMNS)


def test_no_jobs_is_an_empty_list_or_a_header() -> None:
    for fmt, text in (("json", "[]\n"), ("csv", ",".join(CSV_COLUMNS) + "\n")):
        out = io.StringIO()
        assert write_export(iter([]), fmt, out) == 0 and out.getvalue() == text
