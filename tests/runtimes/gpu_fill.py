"""A test-only runtime: fill the job's GPU to a known free amount, then train.

The CUDA OOM test needs a GPU with little free memory, whatever GPU the node has.
Sizing the request to the whole device does not work: a model as large as an H200
breaks the payload's caps and is built in host memory first. So this wrapper holds
all but :data:`LEAVE_FREE_MIB` of the device in one tensor, in the job's own process
(after its CUDA context exists, so the context cannot be what fails), and then runs
the real training runtime, which a modest model then overflows.

Runs as ``tests.runtimes.gpu_fill:run`` through ``python -m runtimes.host``.
"""

from __future__ import annotations

from runtimes.base import JobContext

LEAVE_FREE_MIB = 256
_MIB = 1 << 20


def run(ctx: JobContext) -> None:
    """Hold all but LEAVE_FREE_MIB of GPU 0, report the figures, then run ``training``."""
    import torch

    from runtimes import training

    device = torch.device("cuda", 0)
    free, total = torch.cuda.mem_get_info(device)  # creates this process's context
    filler = torch.empty(max(0, free - LEAVE_FREE_MIB * _MIB), dtype=torch.uint8,
                         device=device)
    left, _ = torch.cuda.mem_get_info(device)
    ctx.event("gpu_filled", held_mib=filler.numel() // _MIB, free_mib=left // _MIB,
              total_mib=total // _MIB)
    training.run(ctx)  # ``filler`` stays allocated until this returns or raises
