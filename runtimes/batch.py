"""Batch tensor inference: a model over an input tensor, batch by batch.

Payload::

    {"type": "batch_inference",
     "model": {"format": "torchscript" | "export" | "builtin",
               "uri": "...", "sha256": "...",            # torchscript / export file
               "arch": "mlp" | "cnn", "config": {...},    # builtin (runtimes.models)
               "weights": {"uri": "...", "sha256": "..."}},  # builtin: safetensors
     "inputs": {"uri": "...", "sha256": "...", "key": "inputs",
                "format": "safetensors" | "npz" | "pt"},  # format: else sniffed
     "batch_size": 64, "batches_per_part": 1, "output_key": "outputs",
     "precision": "auto", "seed": 0}

URIs go through :mod:`runtimes.fetch` (http(s) needs ``sha256``). The input
tensor is the file's ``key`` entry (default ``inputs``) or its only tensor;
float64 inputs are cast to float32. Batches run under ``inference_mode`` and
autocast. Every ``batches_per_part`` batches land atomically in
``artifacts/outputs/part-NNNNN.safetensors`` (the output under ``output_key``,
with ``first_sample``/``num_samples`` metadata), so a killed job keeps each
finished part; ``artifacts/outputs/index.json`` lists the parts, rewritten
every few seconds and at the end (``complete`` says whether every sample ran).
A cancel stops at the next batch boundary and keeps what ran (partial).
"""

from __future__ import annotations

import json
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtimes import device as dev
from runtimes.base import JobContext, JobFailed
from runtimes.fetch import cache_dir_from_env, fetch, max_bytes_from_env
from runtimes.models import build_model

FORMATS = ("torchscript", "export", "builtin")
INDEX_INTERVAL_S = 2.0


@dataclass
class BatchSpec:
    """A validated batch_inference payload."""

    model: dict[str, Any]
    inputs: dict[str, Any]
    batch_size: int = 64
    batches_per_part: int = 1
    output_key: str = "outputs"

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> BatchSpec:
        """Validate ``payload``; raises ``JobFailed("invalid_job")`` naming the bad key."""
        model, inputs = payload.get("model"), payload.get("inputs")
        if not isinstance(model, dict) or model.get("format") not in FORMATS:
            raise JobFailed("invalid_job", f"payload.model must be an object with format one of "
                            f"{', '.join(FORMATS)}")
        needs = ("arch", "weights") if model["format"] == "builtin" else ("uri",)
        for key in needs:
            if not model.get(key):
                raise JobFailed("invalid_job", f"payload.model.{key} is required for "
                                f"format {model['format']!r}")
        if not isinstance(inputs, dict) or not inputs.get("uri"):
            raise JobFailed("invalid_job", "payload.inputs must be an object with a uri")
        output_key = payload.get("output_key") or "outputs"
        if not isinstance(output_key, str):
            raise JobFailed("invalid_job", "payload.output_key must be a string")
        return cls(model=model, inputs=inputs, output_key=output_key,
                   batch_size=_count(payload, "batch_size", 64),
                   batches_per_part=_count(payload, "batches_per_part", 1))


def _count(payload: dict[str, Any], key: str, default: int) -> int:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
        raise JobFailed("invalid_job", f"payload.{key} must be a whole number >= 1, "
                        f"not {value!r}")
    return value


# -- inputs and models ------------------------------------------------------------

def fetch_input(ctx: JobContext, ref: dict[str, Any], what: str) -> Path:
    """Fetch ``ref`` ({uri, sha256}) through the node's cache, reporting progress."""
    if not isinstance(ref, dict) or not isinstance(ref.get("uri"), str):
        raise JobFailed("invalid_job", f"payload {what} must be an object with a uri")

    def report(done: int, total: int | None) -> None:
        ctx.progress(done / total if total else None, stage=f"fetching {what}",
                     bytes_done=done)

    return fetch(ref["uri"], ref.get("sha256"), cache_dir_from_env(), max_bytes_from_env(),
                 on_progress=report, cancelled=lambda: ctx.cancelled)


def sniff_format(path: Path, hint: str | None) -> str:
    """``safetensors``, ``npz`` or ``pt``: from the hint, the name, or the bytes."""
    for name in (hint, path.suffix.lstrip(".").lower()):
        if name in ("safetensors", "npz", "pt", "pth"):
            return "pt" if name == "pth" else name
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        return "npz" if names and all(n.endswith(".npy") for n in names) else "pt"
    raise JobFailed("input_error", f"{path.name}: not a safetensors, npz or torch file")


def load_tensors(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Every tensor in a safetensors, npz or torch file, by name (a bare tensor is "")."""
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if fmt == "npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as data:
                return {k: torch.from_numpy(data[k]) for k in data.files}
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except JobFailed:
        raise
    except Exception as exc:  # each library raises its own kinds on a bad file
        raise JobFailed("input_error", f"{path.name}: cannot read as {fmt}: "
                        f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if isinstance(loaded, torch.Tensor):
        return {"": loaded}
    if isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return {str(k): v for k, v in loaded.items()}
    raise JobFailed("input_error", f"{path.name}: a torch file must hold a tensor or a dict "
                    "of tensors")


def pick_input(tensors: dict[str, torch.Tensor], key: str | None) -> torch.Tensor:
    """The input tensor: ``key``, else ``inputs``, else the only one."""
    if key is not None and key not in tensors:
        raise JobFailed("input_error", f"inputs file has no {key!r}; it has: "
                        f"{', '.join(sorted(tensors)) or 'nothing'}")
    if key is None:
        key = "inputs" if "inputs" in tensors else (next(iter(tensors)) if len(tensors) == 1
                                                    else None)
    if key is None:
        raise JobFailed("input_error", f"inputs file has {', '.join(sorted(tensors))}; "
                        "name one with inputs.key")
    tensor = tensors[key]
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise JobFailed("input_error", "the input tensor needs a non-empty first (batch) axis")
    return tensor.float() if tensor.dtype == torch.float64 else tensor


def load_batch_model(ctx: JobContext, spec: dict[str, Any], setup: dev.DeviceSetup) -> Any:
    """The model on the setup's device, in eval mode."""
    fmt = spec["format"]
    if fmt == "builtin":
        model = build_model(spec["arch"], spec.get("config") or {})
        weights = load_tensors(fetch_input(ctx, spec["weights"], "weights"), "safetensors")
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise JobFailed("input_error", f"weights do not fit {spec['arch']}: "
                            f"{str(exc).splitlines()[0][:300]}") from None
        return model.to(setup.device).eval()
    path = fetch_input(ctx, spec, "model")
    try:
        if fmt == "torchscript":
            with warnings.catch_warnings():  # TorchScript is deprecated but still served
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location=setup.device).eval()
        program = torch.export.load(str(path))
    except Exception as exc:  # a file that is not what it claims to be
        raise JobFailed("input_error", f"model file is not a loadable {fmt} file: "
                        f"{type(exc).__name__}: {str(exc)[:200]}") from None
    # An exported program's graph has devices baked into its nodes: `.module().to(...)`
    # moves the weights but not those (a CPU export would then fail on CUDA inputs).
    # torch's pass rewrites both.
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, setup.device).module()


# -- outputs ----------------------------------------------------------------------

@dataclass
class PartWriter:
    """Writes output parts atomically and keeps ``index.json`` in step."""

    ctx: JobContext
    output_key: str
    batches_per_part: int
    parts: list[dict[str, Any]] = field(default_factory=list)
    _pending: list[dict[str, torch.Tensor]] = field(default_factory=list)
    _first_sample: int = 0
    _pending_samples: int = 0
    _last_index: float = 0.0

    @property
    def samples_written(self) -> int:
        return self._first_sample

    def add(self, outputs: dict[str, torch.Tensor]) -> None:
        """Queue one batch's outputs; writes a part every ``batches_per_part`` batches."""
        self._pending.append(outputs)
        self._pending_samples += next(iter(outputs.values())).shape[0]
        if len(self._pending) >= self.batches_per_part:
            self.flush()

    def flush(self) -> None:
        """Write the queued batches as one part (no-op when none are queued)."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        merged = {k: torch.cat([b[k] for b in self._pending]).contiguous()
                  for k in self._pending[0]}
        name = f"part-{len(self.parts):05d}.safetensors"
        path = self.ctx.artifact_path(f"outputs/{name}")
        tmp = path.with_name(f".{name}.tmp")
        save_file(merged, str(tmp), metadata={"first_sample": str(self._first_sample),
                                              "num_samples": str(self._pending_samples)})
        os.replace(tmp, path)
        self.parts.append({"file": name, "first_sample": self._first_sample,
                           "num_samples": self._pending_samples})
        self._first_sample += self._pending_samples
        self._pending, self._pending_samples = [], 0
        if time.monotonic() - self._last_index >= INDEX_INTERVAL_S:
            self.write_index(complete=False)

    def write_index(self, complete: bool, **extra: Any) -> None:
        self._last_index = time.monotonic()
        index = {"output_key": self.output_key, "samples": self._first_sample,
                 "complete": complete, "parts": self.parts, **extra}
        self.ctx.write_artifact("outputs/index.json", json.dumps(index, indent=1))


def as_outputs(result: Any, output_key: str) -> dict[str, torch.Tensor]:
    """A model's output as named CPU tensors: a tensor, a tuple/list, or a dict of them."""
    if isinstance(result, torch.Tensor):
        named = {output_key: result}
    elif isinstance(result, (tuple, list)):
        named = {f"{output_key}_{i}": r for i, r in enumerate(result)}
    elif isinstance(result, dict):
        named = {f"{output_key}.{k}": v for k, v in result.items()}
    else:
        raise JobFailed("runtime_error", f"the model returned {type(result).__name__}, "
                        "not tensors")
    if not all(isinstance(v, torch.Tensor) for v in named.values()):
        raise JobFailed("runtime_error", "the model returned something other than tensors")
    return {k: v.detach().cpu() for k, v in named.items()}


# -- the runtime ------------------------------------------------------------------

def run(ctx: JobContext) -> None:
    """Run the payload's model over its inputs; see the module docstring."""
    spec = BatchSpec.from_payload(ctx.payload)
    setup = dev.select_device(ctx, ctx.payload)
    with dev.oom_guard(setup):
        model = load_batch_model(ctx, spec.model, setup)
    path = fetch_input(ctx, spec.inputs, "inputs")
    inputs = pick_input(load_tensors(path, sniff_format(path, spec.inputs.get("format"))),
                        spec.inputs.get("key"))
    ctx.check_cancel()
    writer = PartWriter(ctx, spec.output_key, spec.batches_per_part)
    dev.reset_peak_memory(setup)
    t_start = time.monotonic()
    with dev.oom_guard(setup):
        latencies = run_batches(ctx, model, inputs, spec.batch_size, setup, writer)
    writer.flush()
    elapsed = time.monotonic() - t_start
    total = int(inputs.shape[0])
    complete = writer.samples_written == total
    metrics = _metrics(latencies, writer.samples_written, elapsed, total)
    metrics.update(dev.peak_memory_metrics(setup))
    writer.write_index(complete=complete, total_samples=total, batch_size=spec.batch_size,
                       model_format=spec.model["format"])
    ctx.set_metrics(**metrics)
    if not complete:
        ctx.mark_partial()
    ctx.write_result(_summary(metrics, total, spec.batch_size, setup, len(writer.parts)))
    if complete:
        ctx.progress(1.0, stage="done")


def run_batches(ctx: JobContext, model: Any, inputs: torch.Tensor, batch_size: int,
                setup: dev.DeviceSetup, writer: PartWriter) -> list[float]:
    """Run every batch (stopping at a batch boundary on cancel); returns latencies in ms."""
    total = int(inputs.shape[0])
    n_batches = -(-total // batch_size)
    latencies: list[float] = []
    with torch.inference_mode():
        for b, start in enumerate(range(0, total, batch_size)):
            if ctx.cancelled:
                break
            t0 = time.perf_counter()
            x = inputs[start:start + batch_size].to(setup.device, non_blocking=True)
            with dev.autocast(setup):
                result = model(x)
            outputs = as_outputs(result, writer.output_key)  # .cpu() waits for the device
            latencies.append((time.perf_counter() - t0) * 1000)
            writer.add(outputs)
            ctx.progress((b + 1) / n_batches, stage="batches", batches=b + 1,
                         samples=min(start + batch_size, total))
    return latencies


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def _metrics(latencies: list[float], samples: int, elapsed: float,
             total: int) -> dict[str, Any]:
    return {"batches": len(latencies), "samples": samples, "total_samples": total,
            "samples_per_s": round(samples / elapsed, 2) if elapsed > 0 else None,
            "batch_latency_p50_ms": _percentile(latencies, 0.50),
            "batch_latency_p95_ms": _percentile(latencies, 0.95),
            "elapsed_s": round(elapsed, 3)}


def _summary(m: dict[str, Any], total: int, batch_size: int, setup: dev.DeviceSetup,
             parts: int) -> str:
    state = "complete" if m["samples"] == total else f"PARTIAL ({m['samples']} of {total})"
    return (f"batch_inference {state}: {m['samples']} samples in {m['batches']} batches of "
            f"{batch_size} on {setup.kind} ({setup.precision}); {m['samples_per_s']} samples/s; "
            f"batch latency p50 {m['batch_latency_p50_ms']} ms, p95 {m['batch_latency_p95_ms']}"
            f" ms; outputs in artifacts/outputs/ ({parts} parts, index.json)\n")
