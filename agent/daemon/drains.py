"""Every reason this node, or one of its GPUs, takes no new work, in one place.

Four kinds, each shown by `miner-agent ps` and, when the whole node takes nothing, in
the heartbeat (``DRAINING``, the reason in ``drain_reason``):

- ``shutdown``: SIGTERM (or a burst run with no work left): drain, then exit.
- ``operator``: `miner-agent drain`: running jobs finish, the agent stays up and keeps
  heartbeating, and takes work again at `miner-agent resume`. It is kept in
  ``<state_dir>/drain.json`` so that it survives a restart of the agent.
- ``low_disk``: the poll loop's pause while the state dir's filesystem is short of space.
- ``gpu``: one GPU held back by the release gate (a finished job's processes still hold
  it) or lost to NVML; the node drains only when every GPU is held back.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

log = logging.getLogger(__name__)
DRAIN_FILE = "drain.json"


class DrainKind(enum.StrEnum):
    """Why no new work is taken (see the module docstring)."""

    SHUTDOWN = "shutdown"
    OPERATOR = "operator"
    LOW_DISK = "low_disk"
    GPU = "gpu"


@dataclass(frozen=True)
class Drain:
    """One reason no new work is taken; ``gpu`` set when it holds back that GPU only."""

    kind: DrainKind
    reason: str
    since: float | None = None
    by: str | None = None
    gpu: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("kind", self.kind.value), ("reason", self.reason),
                                  ("since", self.since), ("by", self.by), ("gpu", self.gpu))
                if v is not None}


class Drains:
    """The node's drains: the operator's own (kept in a file) and those read from others."""

    def __init__(self, path: Path, *, stopping: Callable[[], str | None],
                 low_disk: Callable[[], str | None], blocked: Callable[[], Mapping[int, str]],
                 gpu_count: int) -> None:
        self.path = path
        self.stopping = stopping  # the shutdown's reason while the agent stops
        self.low_disk = low_disk  # the poll loop's pause reason
        self.blocked = blocked  # GPU index -> why the scheduler gives it to no job
        self.gpu_count = gpu_count
        self.operator: Drain | None = None

    async def load(self) -> None:
        """An operator drain from before a restart holds until it is resumed."""
        try:
            async with aiofiles.open(self.path) as fh:
                text = await fh.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            text = f"unreadable: {exc.strerror}"
        try:
            data = json.loads(text)
            self.operator = Drain(DrainKind.OPERATOR, str(data["reason"]),
                                  float(data["since"]), data.get("by"))
        except (ValueError, KeyError, TypeError):
            # Safer drained than not: the operator meant this node out of rotation.
            self.operator = Drain(DrainKind.OPERATOR, f"operator drain ({self.path} is "
                                  "unreadable; `miner-agent resume` clears it)", time.time())
        log.warning("drained by the operator since before this start: %s (`miner-agent "
                    "resume` takes work again)", self.operator.reason)

    async def drain(self, reason: str, by: str | None = None) -> Drain:
        """Take no new work until :meth:`resume`; running jobs go on. Kept across restarts."""
        since = self.operator.since if self.operator else time.time()
        drain = Drain(DrainKind.OPERATOR, reason, since, by)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        async with aiofiles.open(tmp, "w") as fh:
            await fh.write(json.dumps({"reason": reason, "since": since, "by": by}))
        await aiofiles.os.replace(tmp, self.path)
        self.operator = drain
        log.info("drained by the operator (%s): %s; running jobs go on", by or "?", reason)
        return drain

    async def resume(self, by: str | None = None) -> Drain | None:
        """End the operator's drain; the drain it ended, or None when there was none."""
        ended, self.operator = self.operator, None
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(self.path)
        if ended is not None:
            log.info("resumed by the operator (%s): taking work again", by or "?")
        return ended

    def operator_paused(self) -> bool:
        """For the poll loop: no poll while the operator's drain holds."""
        return self.operator is not None

    def all(self) -> list[Drain]:
        """Every drain in force, the one that matters most first."""
        found = []
        if (stopping := self.stopping()) is not None:
            found.append(Drain(DrainKind.SHUTDOWN, stopping))
        if self.operator is not None:
            found.append(self.operator)
        if (low := self.low_disk()) is not None:
            found.append(Drain(DrainKind.LOW_DISK, low))
        found += [Drain(DrainKind.GPU, why, gpu=index)
                  for index, why in sorted(self.blocked().items())]
        return found

    def node_drain(self) -> Drain | None:
        """The drain that keeps the whole node from new work (the heartbeat's DRAINING)."""
        drains = self.all()
        whole = [d for d in drains if d.gpu is None]
        if whole:
            return whole[0]
        held_back = {d.gpu for d in drains}
        if self.gpu_count and len(held_back) >= self.gpu_count:
            return Drain(DrainKind.GPU, "every GPU is held back: " + "; ".join(
                d.reason for d in drains))
        return None


def drain_path(state_dir: Path) -> Path:
    """Where the operator's drain is kept."""
    return state_dir / DRAIN_FILE
