"""The GPU release gate: a GPU goes to the next job only once the last one let go of it.

After a job's processes are gone, the driver may still hold their CUDA contexts for a
moment (or, on a misbehaving driver, for good). Before its GPUs are handed on, the
agent asks NVML, off the event loop, until no process of the finished job holds a
context there: a pid of the job, or a pid that no longer exists (a context whose
process died). The wait is measured and reported with the result
(``gpu_release_ms``). A GPU still held after ``timeout_s`` is blocked in the
scheduler with the reason (shown in the heartbeat) and checked again in the
background until it is free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

from agent.clock import within

log = logging.getLogger(__name__)

PidsOf = Callable[[int], "list[int] | None"]  # NVML's compute pids of one GPU


@dataclass
class Release:
    """How one job's GPUs came free: the wait in ms, and any GPU still held (pids)."""

    ms: float | None = None
    held: dict[int, list[int]] = field(default_factory=dict)
    checked: bool = False  # False: NVML could not say (nothing was waited for)

    def metrics(self) -> dict[str, object]:
        if not self.checked:
            return {}
        out: dict[str, object] = {"gpu_release_ms": self.ms}
        if self.held:
            out["gpu_still_held"] = {str(i): pids for i, pids in self.held.items()}
        return out


class ReleaseGate:
    """Waits for a finished job's GPUs to be released (see the module docstring)."""

    def __init__(self, pids_of: PidsOf, timeout_s: float = 30.0, poll_s: float = 0.05,
                 call_timeout_s: float = 5.0) -> None:
        self.pids_of = pids_of
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.call_timeout_s = call_timeout_s

    async def wait(self, gpu_indices: Iterable[int], job_pids: set[int]) -> Release:
        indices = list(gpu_indices)
        if not indices:
            return Release()
        t0 = time.monotonic()
        while True:
            held = await self._holders(indices, job_pids)
            if held is None:
                return Release()
            if not held:
                return Release(round((time.monotonic() - t0) * 1000, 1), checked=True)
            if time.monotonic() - t0 > self.timeout_s:
                return Release(None, held, checked=True)
            await asyncio.sleep(self.poll_s)

    async def _holders(self, indices: list[int], job_pids: set[int]
                       ) -> dict[int, list[int]] | None:
        try:
            answers = await within(
                asyncio.to_thread(lambda: [self.pids_of(i) for i in indices]),
                self.call_timeout_s)
        except TimeoutError:
            log.error("NVML did not answer within %.0f s while checking GPU release",
                      self.call_timeout_s)
            return None
        if any(a is None for a in answers):
            return None
        held = {}
        for index, pids in zip(indices, answers, strict=True):
            mine = [p for p in pids or () if p in job_pids or not psutil.pid_exists(p)]
            if mine:
                held[index] = mine
        return held

    async def still_held(self, index: int) -> bool:
        """For a blocked GPU: does a dead process still hold a context there?"""
        held = await self._holders([index], set())
        return bool(held)
