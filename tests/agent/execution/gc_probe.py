"""A runtime for tests: what a full collection costs a job forked from the fork server."""

from __future__ import annotations

import gc
from typing import Any

from benchmarks.bench_fork import private_dirty_kb


def run(ctx: Any) -> None:
    before = private_dirty_kb()
    gc.collect()
    ctx.set_metrics(frozen=gc.get_freeze_count(), copied_kb=private_dirty_kb() - before)
