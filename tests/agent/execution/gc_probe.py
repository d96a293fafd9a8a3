"""A runtime for tests: what a full collection costs a job forked from the fork server."""

from __future__ import annotations

import gc
from typing import Any


def _private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    return 0


def run(ctx: Any) -> None:
    before = _private_dirty_kb()
    gc.collect()
    ctx.set_metrics(frozen=gc.get_freeze_count(), copied_kb=_private_dirty_kb() - before)
