"""docs/reliability.md lists exactly the rows defined here, and every row can be run."""

from __future__ import annotations

import re
from pathlib import Path

from tests.faults.checks import CHECKS
from tests.faults.rows import ROWS, Check
from tests.faults.table import PAGE, render

ROW_ID = re.compile(r"^\| `([^`]+)` \|", re.MULTILINE)


def test_the_page_lists_exactly_the_suites_rows() -> None:
    assert PAGE.is_file(), f"{PAGE} is missing: run python -m tests.faults.table"
    listed = ROW_ID.findall(PAGE.read_text())
    assert listed == [r.id for r in ROWS], \
        "docs/reliability.md is out of date with tests/faults/rows.py: run " \
        "python -m tests.faults.table"


def test_rows_are_unique_and_each_has_a_runner_and_checks() -> None:
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))
    here = Path(__file__).parent
    for row in ROWS:
        assert (here / f"test_{row.group}.py").is_file(), row
        assert row.checks and len(set(row.checks)) == len(row.checks), row
    assert set(CHECKS) == set(Check)


def test_render_writes_one_line_per_row() -> None:
    page = render(ROWS, {ROWS[0].id: {"outcome": "failed", "why": "a | b"}}, "cmd",
                  "today", 1.0)
    assert ROW_ID.findall(page) == [r.id for r in ROWS]
    assert "**FAIL**: a \\| b" in page
