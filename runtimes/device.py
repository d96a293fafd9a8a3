"""Device handling for every torch runtime, in one place.

A runtime calls :func:`select_device` once at the start. It picks CUDA when the
process sees a device (the agent narrows what it sees with
``CUDA_VISIBLE_DEVICES``) and CPU otherwise, settles precision, TF32 and the
seed from the payload, and states the choice (with the reason, when it is the
CPU) in a ``device`` event and in the job's metrics, so a slow CPU run is
never a silent surprise.

Payload keys read here (all optional):

``device``         ``"auto"`` (default) or ``"cpu"`` to force the CPU.
``precision``      ``"auto"`` (default), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
``tf32``           bool, default true; only takes effect on Ampere or newer.
``seed``           int; seeds ``random``, numpy and torch (all devices).
``deterministic``  bool, default false; deterministic algorithms (warn only).
``compile``        bool, default false; see :func:`maybe_compile`.
``compile_mode``, ``compile_backend``  passed to ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import re
import resource
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from runtimes.base import JobFailed

if TYPE_CHECKING:
    from runtimes.base import JobContext

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_MIB = float(1 << 20)


@dataclass
class DeviceSetup:
    """The device a job runs on and how: precision, TF32, seed, and why."""

    device: torch.device
    kind: Literal["cuda", "cpu"]
    names: list[str]
    amp_dtype: torch.dtype | None
    tf32: bool
    seed: int | None
    reason: str
    precision: str = "fp32"  # the precision in effect: fp32, bf16 or fp16
    notes: list[str] = field(default_factory=list)  # fallbacks taken, in words

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype to hold inference weights in (the autocast dtype, else fp32)."""
        return self.amp_dtype or torch.float32

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description for events, metrics and result text."""
        return {"kind": self.kind, "device": str(self.device), "names": self.names,
                "precision": self.precision, "tf32": self.tf32, "seed": self.seed,
                "reason": self.reason, "notes": self.notes, "torch": torch.__version__}


def select_device(ctx: JobContext, payload: dict[str, Any]) -> DeviceSetup:
    """Choose the device, precision, TF32 and seed for this job and announce them.

    Raises :class:`JobFailed` ("invalid_job") on an unknown precision or device.
    """
    device, kind, names, reason = _pick_device(payload.get("device", "auto"))
    notes: list[str] = []
    precision, amp_dtype = _resolve_precision(payload.get("precision", "auto"), kind, notes)
    tf32 = _apply_tf32(bool(payload.get("tf32", True)), device, notes)
    seed = _apply_seed(payload.get("seed"), bool(payload.get("deterministic", False)), kind)
    setup = DeviceSetup(device=device, kind=kind, names=names, amp_dtype=amp_dtype, tf32=tf32,
                        seed=seed, reason=reason, precision=precision, notes=notes)
    summary = setup.summary()
    ctx.event("device", **summary)
    ctx.set_metrics(device=summary)
    if kind == "cpu":
        print(f"[miner] running on CPU: {reason}", file=sys.stderr, flush=True)
    for note in notes:
        print(f"[miner] {note}", file=sys.stderr, flush=True)
    return setup


def _pick_device(wanted: Any) -> tuple[torch.device, Literal["cuda", "cpu"], list[str], str]:
    if wanted not in ("auto", "cpu", "cuda", None):
        raise JobFailed("invalid_job", f"payload.device must be 'auto', 'cuda' or 'cpu', "
                        f"not {wanted!r}")
    if wanted == "cpu":
        return torch.device("cpu"), "cpu", ["cpu"], "the payload asked for the CPU"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        count = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(count)]
        return torch.device("cuda", 0), "cuda", names, f"{count} CUDA device(s) visible"
    reason = cpu_reason()
    if wanted == "cuda":
        raise JobFailed("no_capacity", f"the payload asked for CUDA but {reason}")
    given = gpus_given()
    if given:
        # The agent gave this job GPUs (and bills their time): the CPU in their place
        # would be a silent, many times slower run. A node fault, said as one.
        raise JobFailed("gpu_unavailable", f"this job was given GPU(s) {','.join(given)} but "
                        f"{reason}{cuda_init_error()}; on the node: `miner-agent doctor`, and "
                        "a CUDA build of torch")
    return torch.device("cpu"), "cpu", ["cpu"], reason


def gpus_given() -> list[str]:
    """The devices CUDA_VISIBLE_DEVICES names, up to an entry that names none."""
    given: list[str] = []
    for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(","):
        entry = entry.strip()
        if entry in ("", "-1", "none", "NoDevFiles"):
            break
        given.append(entry)
    return given


def cuda_init_error() -> str:
    """What CUDA's initialisation says when it fails (torch's own words), or ""."""
    if torch.version.cuda is None:
        return ""
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - only its words are wanted
        return f" (CUDA says: {str(exc).strip()[:300]})"
    return ""


def cpu_reason() -> str:
    """Why this process cannot use CUDA, in words."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not gpus_given():
        return f"no CUDA device visible (CUDA_VISIBLE_DEVICES={visible!r})"
    if torch.version.cuda is None:
        return f"this torch build has no CUDA support (torch {torch.__version__})"
    shown = "unset" if visible is None else repr(visible)
    return f"torch.cuda.is_available() is False (CUDA_VISIBLE_DEVICES {shown})"


def _resolve_precision(wanted: Any, kind: str,
                       notes: list[str]) -> tuple[str, torch.dtype | None]:
    if wanted is None:
        wanted = "auto"
    if wanted not in PRECISIONS:
        raise JobFailed("invalid_job", f"payload.precision must be one of {', '.join(PRECISIONS)},"
                        f" not {wanted!r}")
    cuda_bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
    if wanted == "auto":
        if kind == "cpu":
            return "fp32", None
        return ("bf16", torch.bfloat16) if cuda_bf16 else ("fp16", torch.float16)
    if wanted == "bf16":
        if kind == "cpu" or cuda_bf16:
            return "bf16", torch.bfloat16
        notes.append("bf16 requested but this GPU does not support it; using fp32")
    elif wanted == "fp16":
        if kind == "cuda":
            return "fp16", torch.float16
        notes.append("fp16 requested but fp16 autocast needs CUDA; using fp32 on the CPU")
    return "fp32", None


def _apply_tf32(wanted: bool, device: torch.device, notes: list[str]) -> bool:
    enabled = False
    if device.type == "cuda":
        major, _minor = torch.cuda.get_device_capability(device)
        enabled = wanted and major >= 8
        if wanted and not enabled:
            notes.append(f"tf32 needs compute capability 8.0+, this GPU has {major}.{_minor}")
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    return enabled


def _apply_seed(seed: Any, deterministic: bool, kind: str) -> int | None:
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise JobFailed("invalid_job", f"payload.seed must be a whole number, not {seed!r}")
        seed = seed % (2**32)  # numpy only takes 32-bit seeds
        random.seed(seed)
        torch.manual_seed(seed)  # seeds every CUDA device too
        try:
            import numpy as np
        except ImportError:  # numpy is optional for the torch runtimes
            pass
        else:
            np.random.seed(seed)
    if deterministic:
        if kind == "cuda":
            # cuBLAS needs a fixed workspace for reproducible results; set before first use.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return seed


def autocast(setup: DeviceSetup) -> contextlib.AbstractContextManager[Any]:
    """Autocast to the setup's precision; a no-op context for fp32."""
    if setup.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=setup.kind, dtype=setup.amp_dtype)


def maybe_compile(model: torch.nn.Module, setup: DeviceSetup,
                  payload: dict[str, Any]) -> torch.nn.Module:
    """``torch.compile`` the model when the payload says ``compile: true``.

    A compile that fails up front (unknown backend, no compiler) falls back to
    the eager model with a warning on stderr. Failures that only show at the
    first call also fall back to eager, through dynamo's ``suppress_errors``.
    Note that a compiled module's ``state_dict`` keys gain an ``_orig_mod.``
    prefix; save the original module.
    """
    if not payload.get("compile", False):
        return model
    kwargs: dict[str, Any] = {}
    if payload.get("compile_mode"):
        kwargs["mode"] = payload["compile_mode"]
    if payload.get("compile_backend"):
        kwargs["backend"] = payload["compile_backend"]
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        compiled = torch.compile(model, **kwargs)
    except Exception as exc:  # any compile failure: eager still gives the right answer
        print(f"[miner] warning: torch.compile failed on {setup.kind}, running eager: "
              f"{type(exc).__name__}: {str(exc).strip()[:300]}", file=sys.stderr, flush=True)
        setup.notes.append("torch.compile failed; ran eager")
        return model
    setup.notes.append("torch.compile enabled")
    return compiled  # type: ignore[return-value]


def synchronize(setup: DeviceSetup) -> None:
    """Wait for queued GPU work (before reading a timer); no-op on the CPU."""
    if setup.kind == "cuda":
        torch.cuda.synchronize(setup.device)


def reset_peak_memory(setup: DeviceSetup) -> None:
    """Start a new peak-memory window (CUDA only; the CPU's peak RSS cannot reset)."""
    if setup.kind == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)


def peak_memory_mb(setup: DeviceSetup) -> float | None:
    """Peak memory in MiB: CUDA bytes allocated, or the process's peak RSS on the CPU.

    :func:`peak_memory_metrics` names which one it is.
    """
    if setup.kind == "cuda":
        return round(torch.cuda.max_memory_allocated(setup.device) / _MIB, 1)
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    # Linux reports KiB, macOS bytes.
    return round(rss / (_MIB if sys.platform == "darwin" else 1024.0), 1)


def peak_memory_metrics(setup: DeviceSetup) -> dict[str, float]:
    """``{"peak_cuda_allocated_mb": x}`` or ``{"peak_rss_mb": x}``; empty when unknown."""
    value = peak_memory_mb(setup)
    if value is None:
        return {}
    return {"peak_cuda_allocated_mb" if setup.kind == "cuda" else "peak_rss_mb": value}


@contextlib.contextmanager
def oom_guard(setup: DeviceSetup) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into ``JobFailed("cuda_oom", ...)`` with figures.

    The figures (MiB): allocated and reserved at the failure, total and free
    after emptying the cache, and the requested size parsed from the message.
    """
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise oom_failure(setup, exc) from None


def oom_failure(setup: DeviceSetup, exc: BaseException) -> JobFailed:
    """Build the ``cuda_oom`` failure for ``exc``, freeing cached memory first."""
    text = str(exc)
    figures: dict[str, Any] = {"device": str(setup.device),
                               "requested_mib": parse_requested_mib(text)}
    if setup.kind == "cuda" and torch.cuda.is_available():
        figures["allocated_mib"] = round(torch.cuda.memory_allocated(setup.device) / _MIB, 1)
        figures["reserved_mib"] = round(torch.cuda.memory_reserved(setup.device) / _MIB, 1)
        # The traceback's frames still hold the failed step's tensors: clear them first.
        traceback.clear_frames(exc.__traceback__)
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(setup.device)
        figures["free_mib"] = round(free / _MIB, 1)
        figures["total_mib"] = round(total / _MIB, 1)
    parts = [f"{key.removesuffix('_mib')} {value:.0f} MiB" for key, value in figures.items()
             if key.endswith("_mib") and value is not None]
    first = text.strip().splitlines()[0] if text.strip() else "CUDA out of memory"
    message = f"CUDA out of memory on {setup.device}" + (f" ({', '.join(parts)})" if parts else "")
    return JobFailed("cuda_oom", f"{message}: {first[:300]}", **figures)


_REQUEST_RE = re.compile(r"Tried to allocate ([\d.]+) ?(GiB|MiB|KiB|GB|MB|KB|B)\b")
_UNIT_MIB = {"GiB": 1024.0, "GB": 1024.0, "MiB": 1.0, "MB": 1.0, "KiB": 1 / 1024,
             "KB": 1 / 1024, "B": 1 / _MIB}


def parse_requested_mib(message: str) -> float | None:
    """The ``Tried to allocate N UNIT`` size in a CUDA OOM message, in MiB."""
    match = _REQUEST_RE.search(message)
    if match is None:
        return None
    return round(float(match.group(1)) * _UNIT_MIB[match.group(2)], 2)
