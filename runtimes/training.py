"""The ``training`` runtime: train a model from a payload, with checkpoints and resume.

``run(ctx)`` validates the payload (see :func:`runtimes.train_spec.parse_spec` for
every key and default), then trains in this process, or, for more than one rank
(``constraints.gpu_count > 1``, ``payload.world_size`` or ``payload.distributed``),
launches DDP ranks through torchrun (:mod:`runtimes.ddp`). Either way the same loop
(:mod:`runtimes.trainloop`) runs, and the package gets:

- ``artifacts/metrics.jsonl``: one line per step (step, loss, lr, grad_norm,
  samples_per_s, elapsed_s, epoch, and tokens_per_s for the GPT);
- ``artifacts/checkpoints/step-XXXXXX/`` and ``artifacts/checkpoints/latest``;
- ``artifacts/loss.png``; ``result.txt``, a short summary; final metrics.

A cancel (SIGTERM, or the job's deadline) stops at the next step boundary, saves a
checkpoint there, writes the plot and marks the package partial.
"""

from __future__ import annotations

import time

from runtimes.base import JobContext
from runtimes.train_spec import parse_spec


def run(ctx: JobContext) -> None:
    """Entry point (registry name ``training``)."""
    started = time.monotonic()
    spec = parse_spec(ctx.payload, ctx.constraints)
    if spec.world_size > 1:
        from runtimes.ddp import launch

        launch(ctx, spec)
        return
    # Imported late on purpose: a bad payload fails before torch loads (seconds on a
    # small node), and the multi-rank path's launcher never needs torch at all.
    from runtimes.device import oom_guard, select_device
    from runtimes.trainloop import build_trainer

    setup = select_device(ctx, spec.device_payload)
    with oom_guard(setup):  # CUDA OOM -> JobFailed("cuda_oom") with figures; exit frees it
        trainer = build_trainer(spec, ctx, setup, ctx.work_dir)
        ctx.set_metrics(startup_s=round(time.monotonic() - started, 3))
        trainer.run()
