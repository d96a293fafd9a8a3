"""Node benchmark, torch side: what this node's devices actually deliver.

Run as ``python -m runtimes.nodebench [--quick] [--device auto|cpu|cuda|cuda:N]``
by ``miner-agent bench`` (``agent/node/bench.py``), which never imports torch. Writes
JSON lines on stdout: ``{"event": "progress", "done", "total", "task"}`` before
each measurement and one ``{"event": "result", "result": {...}}`` at the end.

Per device: matmul TFLOP/s for fp32, tf32, bf16 and fp16 (a sweep of sizes, the
best kept: small sizes do not reach the plateau), device memory bandwidth (a copy,
counting read and write), host-to-device and device-to-host bandwidth from pinned
memory (GPU only), and reference training and inference throughput of a small
MLP built by :mod:`runtimes.models`. GPU timings use CUDA events after warm-up.
Every figure of GPU N is measured with GPU N made current (:func:`placement`):
CUDA events, the default stream and kernels launched without an explicit device
all follow the current device, so timing GPU N from GPU 0's stream would time
nothing and report figures many times the spec peak.
Each measurement is one function taking ``(device, quick)`` so that later ones
can drive a real runtime instead of the reference model.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from runtimes.models import build_model

BENCH_VERSION = 1
Result = dict[str, Any]


@dataclass(frozen=True)
class Placement:
    """Where the figures of one device are measured: tensors on ``device``, inside ``context()``."""

    device: torch.device
    cuda_index: int | None  # the GPU made current while measuring; None on the CPU

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.cuda.device(N)`` for GPU N, so events and streams land on it; else nothing."""
        if self.cuda_index is None:
            return contextlib.nullcontext()
        return torch.cuda.device(self.cuda_index)


def placement(device: torch.device) -> Placement:
    """The placement for measuring ``device``; pure (no CUDA call), so tests run on a CPU.

    Raises ValueError for a CUDA device without an index: "whichever GPU is current"
    is exactly the ambiguity that timed GPU 0 while measuring GPU N.
    """
    if device.type != "cuda":
        return Placement(device, None)
    if device.index is None:
        raise ValueError(f"measure one GPU (cuda:N), not {device}")
    return Placement(device, device.index)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_iter(fn: Callable[[], object], device: torch.device, target_s: float,
                  warmup: int = 2, max_iters: int = 10_000) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls, timed over about ``target_s``.

    On a GPU, call it inside ``placement(device).context()`` (as :func:`run_task` does):
    ``fn`` launches its kernels on the current device's stream, which is where the
    events are recorded.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    estimate = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(1, target_s / estimate)))
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(iters):
            fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


@contextlib.contextmanager
def _fp32_precision(mode: str) -> Iterator[None]:
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)  # "high" lets fp32 matmuls use TF32 tensor cores
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _matmul_skip(device: torch.device, kind: str) -> str | None:
    if device.type == "cpu":
        if kind in ("fp16", "tf32"):
            return f"{kind} matmul has no fast path on CPU"
        return None
    major, _minor = torch.cuda.get_device_capability(device)
    if kind in ("bf16", "tf32") and major < 8:
        return f"{kind} needs compute capability 8.0 (Ampere) or newer"
    return None


def _matmul_sizes(device: torch.device, kind: str, quick: bool) -> list[int]:
    if device.type == "cuda":
        return [4096, 8192] if quick else [2048, 4096, 8192]
    if kind == "bf16":  # CPUs without AMX run bf16 matmuls at a crawl
        return [128, 256] if quick else [256, 512]
    return [256, 512] if quick else [512, 1024, 2048]


def matmul_tflops(device: torch.device, kind: str, quick: bool) -> Result:
    """Best dense matmul TFLOP/s over a sweep of square sizes for one precision."""
    skip = _matmul_skip(device, kind)
    if skip:
        return {"skipped": skip}
    dtype = {"fp32": torch.float32, "tf32": torch.float32,
             "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
    target = 0.15 if quick else 0.3
    sweep: dict[str, float] = {}
    with _fp32_precision("high" if kind == "tf32" else "highest"):
        for n in _matmul_sizes(device, kind, quick):
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            seconds = time_per_iter(functools.partial(torch.mm, a, b), device, target)
            sweep[str(n)] = round(2 * n**3 / seconds / 1e12, 4)
            del a, b
    best = max(sweep, key=lambda k: sweep[k])
    return {"tflops": sweep[best], "size": int(best), "sweep": sweep}


def memory_bandwidth(device: torch.device, quick: bool) -> Result:
    """Device memory bandwidth of a large copy, read plus write, in GB/s."""
    mib = (256 if quick else 1024) if device.type == "cuda" else 64
    n = mib * 1024 * 1024
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = time_per_iter(lambda: dst.copy_(src), device, 0.2 if quick else 0.5)
    return {"gbs": round(2 * n / seconds / 1e9, 2), "bytes": n}


def _transfer(device: torch.device, quick: bool, to_device: bool) -> Result:
    n = (128 if quick else 512) * 1024 * 1024
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    if to_device:
        seconds = time_per_iter(lambda: dev.copy_(host, non_blocking=True), device, 0.3)
    else:
        seconds = time_per_iter(lambda: host.copy_(dev, non_blocking=True), device, 0.3)
    return {"gbs": round(n / seconds / 1e9, 2), "bytes": n, "pinned": True}


def h2d_bandwidth(device: torch.device, quick: bool) -> Result:
    """Host-to-device copy bandwidth from pinned memory (GPU only)."""
    if device.type != "cuda":
        return {"skipped": "no host/device transfer on CPU"}
    return _transfer(device, quick, to_device=True)


def d2h_bandwidth(device: torch.device, quick: bool) -> Result:
    """Device-to-host copy bandwidth into pinned memory (GPU only)."""
    if device.type != "cuda":
        return {"skipped": "no host/device transfer on CPU"}
    return _transfer(device, quick, to_device=False)


def _reference_mlp(device: torch.device) -> tuple[torch.nn.Module, int, int]:
    if device.type == "cuda":
        width, classes, depth = 1024, 1000, [4096, 4096]
    else:
        width, classes, depth = 256, 10, [512, 512]
    model = build_model("mlp", {"in_features": width, "out_features": classes,
                                "hidden": depth, "activation": "gelu"})
    return model.to(device), width, classes


def _autocast(device: torch.device) -> tuple[contextlib.AbstractContextManager[Any], str]:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), "bf16-autocast"
    return contextlib.nullcontext(), "fp32"


def train_throughput(device: torch.device, quick: bool) -> Result:
    """Samples/s of a reference MLP training loop (forward, loss, backward, AdamW step)."""
    model, width, classes = _reference_mlp(device)
    batch = 1024 if device.type == "cuda" else 64
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cast, dtype = _autocast(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with cast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    seconds = time_per_iter(step, device, 0.5 if quick else 1.5, warmup=3)
    return {"samples_s": round(batch / seconds, 1), "batch": batch, "dtype": dtype,
            "model": "mlp"}


def infer_throughput(device: torch.device, quick: bool) -> Result:
    """Samples/s of batched inference with the same reference MLP."""
    model, width, _classes = _reference_mlp(device)
    model.eval()
    batch = 8192 if device.type == "cuda" else 256
    x = torch.randn(batch, width, device=device)
    cast, dtype = _autocast(device)

    def forward() -> None:
        with torch.inference_mode(), cast:
            model(x)

    seconds = time_per_iter(forward, device, 0.3 if quick else 1.0, warmup=3)
    return {"samples_s": round(batch / seconds, 1), "batch": batch, "dtype": dtype,
            "model": "mlp"}


TASKS: list[tuple[str, Callable[[torch.device, bool], Result]]] = [
    *[(f"matmul_{k}", lambda d, q, k=k: matmul_tflops(d, k, q))
      for k in ("fp32", "tf32", "bf16", "fp16")],
    ("mem_bw", memory_bandwidth),
    ("h2d", h2d_bandwidth),
    ("d2h", d2h_bandwidth),
    ("train_mlp", train_throughput),
    ("infer_mlp", infer_throughput),
]


def resolve_devices(wanted: str) -> list[torch.device]:
    """``auto``: every CUDA device, else the CPU; or exactly ``cpu``, ``cuda``, ``cuda:N``."""
    if wanted == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    device = torch.device(wanted)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {wanted}: torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", 0)
    return [device]


def describe(device: torch.device) -> Result:
    """Name, memory and capability of ``device`` (the CPU's model name on CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        uuid = str(getattr(props, "uuid", "") or "")  # as NVML and nvidia-smi name the GPU
        if uuid and not uuid.startswith(("GPU-", "MIG-")):
            uuid = f"GPU-{uuid}"
        return {"device": str(device), "kind": "cuda", "name": props.name,
                "uuid": uuid or None,
                "memory_mb": props.total_memory // (1024 * 1024),
                "capability": f"{props.major}.{props.minor}"}
    name = "cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                    name)
    return {"device": "cpu", "kind": "cpu", "name": name, "threads": torch.get_num_threads()}


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout for the parent (``agent/node/bench.py``)."""
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def run_task(fn: Callable[[torch.device, bool], Result], device: torch.device,
             quick: bool) -> Result:
    """One measurement of ``device``, with that GPU current while it runs.

    An exception (out of memory, a missing kernel) is recorded, not raised.
    """
    where = placement(device)
    t0 = time.perf_counter()
    with where.context():
        try:
            out = fn(where.device, quick)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            out = {"error": f"{type(exc).__name__}: {first}"}
        finally:
            if where.cuda_index is not None:
                torch.cuda.empty_cache()
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def run(devices: list[torch.device], quick: bool) -> Result:
    """Every task on every device, with progress lines; the result document."""
    started = time.time()
    total = len(devices) * len(TASKS)
    reports = []
    done = 0
    for device in devices:
        report = describe(device)
        report["results"] = {}
        for name, fn in TASKS:
            emit("progress", done=done, total=total, task=f"{device} {name}")
            report["results"][name] = run_task(fn, device, quick)
            done += 1
        reports.append(report)
    emit("progress", done=done, total=total, task="done")
    return {
        "version": BENCH_VERSION,
        "quick": quick,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 2),
        "devices": reports,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m runtimes.nodebench``."""
    parser = argparse.ArgumentParser(prog="python -m runtimes.nodebench")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter timings")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    devices = resolve_devices(args.device)
    emit("result", result=run(devices, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
