"""One DDP rank, started by torchrun: ``python -m runtimes.ddp_worker SPEC.json``.

Each rank builds a :class:`runtimes.base.JobContext` of its own. Rank 0's writes
its events to the relay file that the job's process replays (see
:mod:`runtimes.ddp`); the other ranks' contexts send nothing. A failing rank
appends one ``rank_failed`` line there whatever its rank, so the job fails with
the first real cause rather than with torchrun's "a child failed".
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from runtimes.base import EventChannel, JobContext, JobFailed, install_cancel_handler
from runtimes.host import classify_exception, die_with_parent, exit_now

# The rank's trainer (and its DDP Reducer) must never be freed before os._exit: the
# Reducer's destructor joins gloo's worker thread while holding the GIL, and that
# thread may be waiting for the GIL to drop a tensor. Seen as a hang at the end of
# about one run in four. Keeping a reference here means nothing is torn down.
_KEEP_ALIVE: list[Any] = []


def _channel(path: str) -> EventChannel:
    return EventChannel(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))


def rank_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's environment."""
    return (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
            int(os.environ["WORLD_SIZE"]))


def train_rank(ctx: JobContext, local_rank: int, rank: int, world: int) -> None:
    """Set up this rank's device and process group, then run the shared loop."""
    import torch
    import torch.distributed as dist

    from runtimes.device import oom_guard, select_device
    from runtimes.train_spec import parse_spec
    from runtimes.trainloop import Ranks, build_trainer

    started = time.monotonic()
    spec = parse_spec(ctx.payload, ctx.constraints)
    setup = select_device(ctx, spec.device_payload)
    if setup.kind == "cuda":
        held = torch.cuda.device_count()
        if local_rank >= held:  # else: "invalid device ordinal", deep in NCCL
            raise JobFailed("no_capacity", f"rank {rank} of {world} needs a GPU of its own "
                            f"(cuda:{local_rank}) but the job holds {held}; ask for "
                            f"gpu_count = {world} or fewer ranks")
        setup.device = torch.device("cuda", local_rank)
        torch.cuda.set_device(setup.device)
    backend = spec.backend or ("nccl" if setup.kind == "cuda" else "gloo")
    if backend == "nccl" and setup.kind != "cuda":
        raise JobFailed("invalid_job", "distributed.backend 'nccl' needs CUDA devices")
    kwargs: dict[str, Any] = {"device_id": setup.device} if backend == "nccl" else {}
    dist.init_process_group(backend, **kwargs)
    try:
        with oom_guard(setup):
            trainer = build_trainer(spec, ctx, setup, ctx.work_dir, Ranks(rank, world))
            _KEEP_ALIVE.append(trainer)
            ctx.set_metrics(startup_s=round(time.monotonic() - started, 3), backend=backend)
            trainer.run()
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    """Run one rank; returns its exit code."""
    spec = json.loads(Path(argv[0]).read_text())
    die_with_parent(None)  # torchrun gone means the job is gone: do not linger
    rank, local_rank, world = rank_env()
    events = _channel(spec["events"])
    ctx = JobContext(spec["job"], Path(spec["package_dir"]), Path(spec["work_dir"]),
                     events if rank == 0 else EventChannel(None))
    install_cancel_handler(ctx)
    try:
        train_rank(ctx, local_rank, rank, world)
    except JobFailed as exc:
        events.send("rank_failed", rank=rank, code=exc.code, message=exc.message)
        return 1
    except Exception as exc:  # report the cause; torchrun only knows "a child failed"
        traceback.print_exc()
        code, message = classify_exception(exc)
        events.send("rank_failed", rank=rank, code=code, message=message)
        return 1
    return 0


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
