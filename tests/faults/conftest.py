"""Fixtures of the fault matrix, and the record of each row's outcome.

With ``FAULT_MATRIX_RESULTS=<file>`` in the environment, the run writes each row's
outcome (passed, failed, skipped), the first line of why, and its seconds to that file
as JSON; ``python -m tests.faults.table`` turns it into ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.daemon.helpers import tmpfs
from tests.faults.rig import Rig
from tests.faults.rows import Row

RESULTS_ENV = "FAULT_MATRIX_RESULTS"
TMPFS_MB = 8
_outcomes: dict[str, dict[str, Any]] = {}
_RANK = {"passed": 0, "skipped": 1, "failed": 2}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A row's coordinator, agents and servers, all stopped afterwards."""
    world = Rig(tmp_path)
    try:
        yield world
    finally:
        world.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A state dir on its own 8 MiB tmpfs (root only: skipped where mount fails)."""
    with tmpfs(tmp_path / "state", TMPFS_MB) as mount:
        yield mount


def _row_of(item: pytest.Item) -> Row | None:
    callspec = getattr(item, "callspec", None)
    row = callspec.params.get("row") if callspec is not None else None
    return row if isinstance(row, Row) else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    row = _row_of(item)
    if row is None:
        return report
    why = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        why = str(report.longrepr[2]).removeprefix("Skipped: ")
    elif report.failed and call.excinfo is not None:
        text = str(call.excinfo.value).strip() or call.excinfo.typename
        why = text.splitlines()[0]
    outcome = "skipped" if report.skipped else report.outcome
    entry = _outcomes.setdefault(row.id, {"outcome": "passed", "why": "", "seconds": 0.0})
    entry["seconds"] += report.duration
    if _RANK[outcome] > _RANK[entry["outcome"]]:
        entry.update(outcome=outcome, why=why[:300])
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path and _outcomes:
        Path(path).write_text(json.dumps({"finished_at": time.time(), "rows": _outcomes},
                                         indent=1))
