"""The training loop, shared by the single-process runtime and every DDP rank.

:func:`build_trainer` turns a :class:`TrainSpec` into a ready :class:`Trainer`
(data, model, optimizer, grad scaler, resumed state); :meth:`Trainer.run` trains
to the last step or to a cancel and then saves the checkpoint, the loss plot,
metrics and result text. Under DDP only rank 0 writes; every rank agrees on when
to stop through one all-reduce per step (see :class:`Ranks`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from runtimes import checkpoint, device
from runtimes.datasets import TrainData, fill_model_config, load_data
from runtimes.models import build_model
from runtimes.plot import write_loss_plot
from runtimes.train_spec import TrainSpec

# torch.optim imports torch._dynamo on the first optimizer built (about 2 s on two
# cores); import it with this module so a preloading fork server pays it once.
importlib.import_module("torch._dynamo")

_MAX_HISTORY = 2000  # loss points kept in meta.json for the plot after a resume
_GPU_DATA_MAX_BYTES = 1 << 30


class Reporter(Protocol):
    """What the loop uses of :class:`runtimes.base.JobContext` (a DDP rank has its own)."""

    artifacts_dir: Path

    @property
    def cancelled(self) -> bool: ...
    def progress(self, fraction: float | None = None, stage: str | None = None,
                 message: str | None = None, eta_s: float | None = None,
                 force: bool = False, **metrics: Any) -> bool: ...
    def event(self, name: str, **fields: Any) -> None: ...
    def set_metrics(self, **metrics: Any) -> None: ...
    def mark_partial(self) -> None: ...
    def write_result(self, text: str) -> None: ...
    def artifact_path(self, name: str) -> Path: ...


@dataclass
class Ranks:
    """This process's place in the job: rank, world size, and the stop agreement."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
        """The mean loss over ranks, and whether any rank wants to stop (one all-reduce)."""
        if self.world == 1:
            return float(loss), stop
        import torch.distributed as dist

        flat = torch.stack([loss.detach().float().reshape(()),
                            torch.tensor(float(stop), device=loss.device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return float(flat[0]) / self.world, bool(flat[1] > 0)


@dataclass
class TrainState:
    """Where training stands: the step and the loss history."""

    step: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)


def lr_at(spec: TrainSpec, step: int, total: int) -> float:
    """The learning rate for ``step`` (0-based) under the spec's warmup and schedule."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.lr
    progress = min(1.0, (step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
    floor = spec.min_lr_ratio
    if spec.schedule == "linear":
        return spec.lr * (1.0 - progress * (1.0 - floor))
    return spec.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _optimizer(spec: TrainSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                               weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def build_trainer(spec: TrainSpec, ctx: Reporter, setup: device.DeviceSetup, work_dir: Path,
                  ranks: Ranks | None = None) -> Trainer:
    """Load the data, build model and optimizer, and restore a checkpoint when asked."""
    ranks = ranks or Ranks()
    ctx.progress(0.0, stage="load_data", force=True)
    data = load_data(spec.dataset, spec.arch, spec.model_config)
    config = fill_model_config(spec.arch, spec.model_config, data)
    raw = build_model(spec.arch, config).to(setup.device)
    optimizer = _optimizer(spec, raw)
    state = TrainState()
    scaler = torch.amp.GradScaler(setup.kind, enabled=setup.amp_dtype == torch.float16)
    if spec.resume_from is not None:
        ctx.progress(0.0, stage="resume", force=True)
        folder = checkpoint.resolve_resume(spec.resume_from, work_dir)
        meta = checkpoint.load_checkpoint(folder, raw, optimizer)
        state = TrainState(int(meta["step"]), [(int(s), float(v)) for s, v in
                                               meta.get("losses", [])])
        if meta.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(meta["scaler"])
        ctx.event("resumed", step=state.step, checkpoint=folder.name)
    model: torch.nn.Module = raw
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [setup.device.index] if setup.kind == "cuda" else None
        model = DistributedDataParallel(raw, device_ids=ids)
    model = device.maybe_compile(model, setup, spec.device_payload)
    return Trainer(spec, ctx, setup, data, raw, model, optimizer, scaler, state, ranks, config)


class Trainer:
    """Runs the steps; saves, plots and reports at the end or on a cancel."""

    def __init__(self, spec: TrainSpec, ctx: Reporter, setup: device.DeviceSetup,
                 data: TrainData, raw: torch.nn.Module, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 state: TrainState, ranks: Ranks, model_config: dict[str, Any]) -> None:
        self.spec, self.ctx, self.setup, self.data = spec, ctx, setup, data
        self.raw, self.model, self.optimizer, self.scaler = raw, model, optimizer, scaler
        self.state, self.ranks, self.model_config = state, ranks, model_config
        self.global_batch = spec.batch_size * spec.grad_accum * ranks.world
        self.steps_per_epoch = max(1, len(data) // self.global_batch)
        self.total_steps = spec.steps or (spec.epochs or 1) * self.steps_per_epoch
        self._perm: tuple[int, torch.Tensor] | None = None
        if setup.kind == "cuda" and data.x.nbytes + data.y.nbytes < _GPU_DATA_MAX_BYTES:
            data.x, data.y = data.x.to(setup.device), data.y.to(setup.device)

    # -- data ---------------------------------------------------------------------
    def batch_indices(self, step: int) -> torch.Tensor:
        """This rank's sample ids for ``step``, shaped ``[grad_accum, batch_size]``.

        The order is a pure function of seed, epoch and step, so a resumed run sees
        the batches it would have seen without the interruption.
        """
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.data), generator=gen))
        spots = (torch.arange(self.global_batch) + pos * self.global_batch) % len(self.data)
        ids = self._perm[1][spots].view(self.spec.grad_accum, self.ranks.world, -1)
        return ids[:, self.ranks.rank]

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.data.task == "regress":
            return F.mse_loss(out.float().reshape(y.shape), y)
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))

    # -- one step -------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[torch.Tensor, float]:
        """Forward, backward over ``grad_accum`` micro-batches, clip, optimizer step."""
        lr = lr_at(self.spec, step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.setup.device)
        micro_batches = self.batch_indices(step)
        for i, ids in enumerate(micro_batches):
            ids = ids.to(self.data.x.device)
            x = self.data.x[ids].to(self.setup.device, non_blocking=True)
            y = self.data.y[ids].to(self.setup.device, non_blocking=True)
            last = i == len(micro_batches) - 1
            no_sync = getattr(self.model, "no_sync", None)
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync:
                with device.autocast(self.setup):
                    loss = self._loss(self.model(x), y) / self.spec.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(),
                                              self.spec.clip_grad_norm or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, float(norm)

    # -- the loop -------------------------------------------------------------------
    def run(self) -> None:
        """Train from the current step to the end or to a cancel, then finish."""
        start = self.state.step
        stopped = self.ctx.cancelled and self.ranks.world == 1
        device.reset_peak_memory(self.setup)
        t0 = time.monotonic()
        metrics_path = self.ctx.artifact_path("metrics.jsonl") if self.ranks.main else None
        with device.oom_guard(self.setup):
            while not stopped and self.state.step < self.total_steps:
                step_loss, norm = self.train_step(self.state.step)
                loss, stopped = self.ranks.agree(step_loss, self.ctx.cancelled)
                self.state.step += 1
                self._after_step(loss, norm, start, t0, metrics_path)
                every = self.spec.checkpoint_every
                if every and self.state.step % every == 0 and self.ranks.main \
                        and self.state.step < self.total_steps:
                    self.save()
        device.synchronize(self.setup)
        self.finish(start, time.monotonic() - t0, stopped)

    def _after_step(self, loss: float, norm: float, start: int, t0: float,
                    metrics_path: Path | None) -> None:
        step, done = self.state.step, self.state.step - start
        self.state.history.append((step, loss))
        if metrics_path is None:
            return
        elapsed = time.monotonic() - t0
        rate = done * self.global_batch / elapsed if elapsed > 0 else 0.0
        line = {"step": step, "loss": round(loss, 6),
                "lr": lr_at(self.spec, step - 1, self.total_steps),
                "grad_norm": round(norm, 6) if math.isfinite(norm) else str(norm),
                "samples_per_s": round(rate, 2), "elapsed_s": round(elapsed, 3),
                "epoch": (step - 1) // self.steps_per_epoch}
        if self.spec.arch == "gpt":
            line["tokens_per_s"] = round(rate * self.data.tokens_per_sample, 1)
        with open(metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        eta = elapsed / done * (self.total_steps - step) if done else None
        self.ctx.progress(step / self.total_steps, stage="train", eta_s=eta, step=step,
                          loss=round(loss, 5))

    # -- saving and reporting ---------------------------------------------------------
    def save(self) -> Path:
        """Write the checkpoint for the current step (rank 0 only)."""
        history = self.state.history
        stride = max(1, len(history) // _MAX_HISTORY)
        meta = {"epoch": self.state.step // self.steps_per_epoch,
                "model": {"arch": self.spec.arch, "config": self.model_config},
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "world_size": self.ranks.world, "total_steps": self.total_steps,
                "config": self.spec.device_payload,
                "losses": [[s, round(v, 6)] for s, v in history[::stride]]}
        root = self.ctx.artifact_path("checkpoints")
        folder = checkpoint.save_checkpoint(root, self.state.step, self.raw, self.optimizer,
                                            meta, keep=self.spec.keep_checkpoints)
        self.ctx.event("checkpoint", step=self.state.step, path=f"checkpoints/{folder.name}")
        return folder

    def finish(self, start: int, train_time_s: float, stopped: bool) -> None:
        """Save, plot, and report: the same on completion and on a cancel."""
        if not self.ranks.main:
            return
        folder = self.save()
        steps = [float(s) for s, _ in self.state.history]
        write_loss_plot(self.ctx.artifact_path("loss.png"), steps,
                        [v for _, v in self.state.history])
        done = self.state.step - start
        final_loss = self.state.history[-1][1] if self.state.history else None
        rate = done * self.global_batch / train_time_s if train_time_s > 0 else 0.0
        metrics: dict[str, Any] = {
            "steps": done, "final_step": self.state.step, "total_steps": self.total_steps,
            "final_loss": final_loss, "samples_per_s": round(rate, 2),
            "train_time_s": round(train_time_s, 3), "world_size": self.ranks.world,
            "checkpoint": f"artifacts/checkpoints/{folder.name}",
            **device.peak_memory_metrics(self.setup)}
        if self.spec.arch == "gpt":
            metrics["tokens_per_s"] = round(rate * self.data.tokens_per_sample, 1)
        self.ctx.set_metrics(**metrics)
        self.ctx.write_result(self._summary(metrics, start, stopped))
        if stopped:
            self.ctx.mark_partial()
        self.ctx.progress(self.state.step / self.total_steps, stage="done", force=True)

    def _summary(self, metrics: dict[str, Any], start: int, stopped: bool) -> str:
        how = "stopped by cancel" if stopped else "completed"
        loss = metrics["final_loss"]
        loss_text = f"{loss:.6f}" if isinstance(loss, float) else "n/a (no steps run)"
        return (f"training {how}: {self.spec.arch} on {self.setup.kind} "
                f"x{self.ranks.world}, steps {start} -> {self.state.step} "
                f"of {self.total_steps}\n"
                f"final loss: {loss_text}\n"
                f"checkpoint: {metrics['checkpoint']} (resume with "
                f"payload.resume_from)\n"
                f"throughput: {metrics['samples_per_s']} samples/s over "
                f"{metrics['train_time_s']} s\n")
