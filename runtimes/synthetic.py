"""The ``sleep`` runtime: a step loop with no real work, for checks and benchmarks.

Payload: ``{"type": "sleep", "steps": 100, "step_s": 0.01, "print_every": 0,
"fail_at": null, "torch": false}``. With ``"torch": true`` it imports torch
first, as every real workload does (free in the fork server, ~2 s in a spawn).
Each step sleeps ``step_s``, reports progress, and honours a cancel at the step
boundary, writing a partial artifact of the steps done. It measures the agent's
own overhead (start, cancel, progress) without a model in the way.
"""

from __future__ import annotations

import importlib
import json
import time

from runtimes.base import JobContext, JobFailed


def _number(payload: dict[str, object], key: str, default: float, lo: float, hi: float) -> float:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise JobFailed("invalid_job", f"payload.{key} must be a number in [{lo}, {hi}]")
    return float(value)


def run(ctx: JobContext) -> None:
    steps = int(_number(ctx.payload, "steps", 10, 0, 10_000_000))
    step_s = _number(ctx.payload, "step_s", 0.01, 0, 3600)
    print_every = int(_number(ctx.payload, "print_every", 0, 0, 10_000_000))
    fail_at = ctx.payload.get("fail_at")
    if ctx.payload.get("torch"):
        importlib.import_module("torch")
    ctx.progress(0.0, stage="start", force=True)
    t0 = time.monotonic()
    done = 0
    for step in range(steps):
        if ctx.cancelled:
            break
        if step_s:
            time.sleep(step_s)
        done = step + 1
        if fail_at is not None and done == fail_at:
            raise JobFailed("runtime_error", f"failed at step {done} as the payload asked")
        if print_every and done % print_every == 0:
            print(f"step {done}/{steps}", flush=True)
        elapsed = time.monotonic() - t0
        ctx.progress(done / steps, stage="steps", eta_s=elapsed / done * (steps - done),
                     step=done)
    ctx.write_artifact("steps.json", json.dumps({"done": done, "of": steps}))
    ctx.write_result(f"{done} of {steps} steps\n")
    ctx.set_metrics(steps=done, step_s=step_s)
    if done < steps:
        ctx.mark_partial()
