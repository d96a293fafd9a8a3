"""The training payload, validated once into a frozen :class:`TrainSpec`.

Every bad value fails the job with ``JobFailed("invalid_job", ...)`` naming the
key, before any data is fetched or a device is touched. The keys and their
defaults are listed in docs form on :func:`parse_spec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from runtimes.base import JobFailed

ARCHS = ("mlp", "cnn", "gpt")
FORMATS = ("safetensors", "npz", "jsonl")
SYNTHETIC_KINDS = ("classification", "images", "text")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
BACKENDS = ("gloo", "nccl")
MAX_WORLD = 64
_BIG = 10**9


@dataclass(frozen=True)
class TrainSpec:
    """Everything the training loop needs from the payload, checked and defaulted."""

    arch: str
    model_config: dict[str, Any]
    dataset: dict[str, Any]
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    resume_from: dict[str, Any] | None = None
    world_size: int = 1
    backend: str | None = None
    device_payload: dict[str, Any] = field(default_factory=dict)


def fail(message: str) -> JobFailed:
    """The ``invalid_job`` failure for ``message``."""
    return JobFailed("invalid_job", message)


def _int(raw: dict[str, Any], key: str, default: int | None, lo: int,
         hi: int = _BIG, where: str = "payload") -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(f"{where}.{key} must be a whole number, not {value!r}")
    if not lo <= value <= hi:
        raise fail(f"{where}.{key} must be between {lo} and {hi}, not {value}")
    return value


def _float(raw: dict[str, Any], key: str, default: float | None, lo: float, hi: float,
           where: str = "payload") -> float | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise fail(f"{where}.{key} must be a finite number, not {value!r}")
    if not lo <= value <= hi:
        raise fail(f"{where}.{key} must be between {lo:g} and {hi:g}, not {value:g}")
    return float(value)


def _choice(raw: dict[str, Any], key: str, default: str | None, choices: tuple[str, ...],
            where: str = "payload") -> str | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if value not in choices:
        raise fail(f"{where}.{key} must be one of {', '.join(choices)}, not {value!r}")
    return str(value)


def _obj(raw: dict[str, Any], key: str, where: str = "payload",
         required: bool = False) -> dict[str, Any]:
    value = raw.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise fail(f"{where}.{key} must be a JSON object")
    return value


def parse_spec(payload: Any, constraints: dict[str, Any] | None = None) -> TrainSpec:
    """Validate a training payload.

    Keys (defaults): ``model.arch`` (required: mlp, cnn, gpt), ``model.config`` ({}),
    ``dataset`` (required: ``{uri, sha256, format}`` or ``{synthetic: {...}}``),
    ``optimizer.{name: adamw, lr: 1e-3, weight_decay: 0.01 (adamw) / 0 (sgd), momentum:
    0.9}``, ``schedule.{name: constant, warmup_steps: 0, min_lr_ratio: 0}``, ``steps`` or
    ``epochs`` (epochs 1 when neither), ``batch_size`` (32, per rank), ``grad_accum`` (1),
    ``clip_grad_norm`` (none), ``seed`` (0), ``checkpoint_every`` (0: only at the end and on
    cancel), ``keep_checkpoints`` (3, 0 keeps all), ``resume_from`` ({uri, sha256}),
    ``world_size`` / ``distributed.{nproc, backend}`` (else ``constraints.gpu_count``), and
    ``precision``, ``device``, ``compile``, ``tf32``, ``deterministic`` (see runtimes.device).
    """
    if not isinstance(payload, dict):
        raise fail("payload must be a JSON object")
    model = _obj(payload, "model", required=True)
    arch = _choice(model, "arch", None, ARCHS, "payload.model")
    if arch is None:
        raise fail(f"payload.model.arch is required (one of {', '.join(ARCHS)})")
    steps = _int(payload, "steps", None, 1)
    epochs = _int(payload, "epochs", None, 1, 100_000)
    if steps is not None and epochs is not None:
        raise fail("give payload.steps or payload.epochs, not both")
    world, backend = _parse_world(payload, constraints or {})
    seed = _int(payload, "seed", 0, -(2**63), 2**63 - 1)
    return TrainSpec(
        arch=arch, model_config=_obj(model, "config", "payload.model"),
        dataset=_parse_dataset(payload), steps=steps,
        epochs=epochs if epochs is not None or steps is not None else 1,
        batch_size=_int(payload, "batch_size", 32, 1, 1 << 20) or 32,
        grad_accum=_int(payload, "grad_accum", 1, 1, 4096) or 1,
        clip_grad_norm=_float(payload, "clip_grad_norm", None, 1e-12, 1e12),
        seed=seed or 0, checkpoint_every=_int(payload, "checkpoint_every", 0, 0) or 0,
        keep_checkpoints=_int(payload, "keep_checkpoints", 3, 0, 10_000) or 0,
        resume_from=_parse_resume(payload), world_size=world, backend=backend,
        device_payload={**payload, "seed": seed or 0}, **_parse_optim(payload),
        **_parse_schedule(payload))


def _parse_optim(payload: dict[str, Any]) -> dict[str, Any]:
    where = "payload.optimizer"
    raw = _obj(payload, "optimizer")
    name = _choice(raw, "name", "adamw", OPTIMIZERS, where) or "adamw"
    decay_default = 0.01 if name == "adamw" else 0.0
    return {"optimizer": name, "lr": _float(raw, "lr", 1e-3, 0.0, 100.0, where),
            "weight_decay": _float(raw, "weight_decay", decay_default, 0.0, 10.0, where),
            "momentum": _float(raw, "momentum", 0.9, 0.0, 0.999999, where)}


def _parse_schedule(payload: dict[str, Any]) -> dict[str, Any]:
    where = "payload.schedule"
    raw = _obj(payload, "schedule")
    return {"schedule": _choice(raw, "name", "constant", SCHEDULES, where),
            "warmup_steps": _int(raw, "warmup_steps", 0, 0, where=where),
            "min_lr_ratio": _float(raw, "min_lr_ratio", 0.0, 0.0, 1.0, where)}


def _parse_dataset(payload: dict[str, Any]) -> dict[str, Any]:
    raw = _obj(payload, "dataset", required=True)
    if "synthetic" in raw:
        synth = _obj(raw, "synthetic", "payload.dataset")
        _choice(synth, "kind", None, SYNTHETIC_KINDS, "payload.dataset.synthetic")
        if "kind" not in synth:
            raise fail("payload.dataset.synthetic.kind is required "
                       f"(one of {', '.join(SYNTHETIC_KINDS)})")
        _int(synth, "samples", 512, 1, 10_000_000, "payload.dataset.synthetic")
        return {"synthetic": dict(synth)}
    uri = raw.get("uri")
    if not isinstance(uri, str) or not uri:
        raise fail("payload.dataset needs a 'uri' (with 'sha256' for http) or 'synthetic'")
    fmt = raw.get("format") or _format_from_uri(uri)
    _choice({"format": fmt}, "format", None, FORMATS, "payload.dataset")
    sha = raw.get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise fail("payload.dataset.sha256 must be a string of 64 hex digits")
    if uri.startswith(("http://", "https://")) and sha is None:
        raise fail("payload.dataset.sha256 is required for an http(s) uri")
    return {**raw, "format": fmt}


def _format_from_uri(uri: str) -> str | None:
    path = uri.split("?", 1)[0].lower()
    for fmt in FORMATS:
        if path.endswith("." + fmt):
            return fmt
    return None


def _parse_resume(payload: dict[str, Any]) -> dict[str, Any] | None:
    raw = payload.get("resume_from")
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"uri": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("uri"), str) or not raw["uri"]:
        raise fail("payload.resume_from must be {'uri': ..., 'sha256': ...}")
    if raw["uri"].startswith(("http://", "https://")) and not raw.get("sha256"):
        raise fail("payload.resume_from.sha256 is required for an http(s) uri")
    return dict(raw)


def _parse_world(payload: dict[str, Any],
                 constraints: dict[str, Any]) -> tuple[int, str | None]:
    dist = _obj(payload, "distributed")
    nproc = _int(dist, "nproc", None, 1, MAX_WORLD, "payload.distributed")
    if nproc is None:
        nproc = _int(payload, "world_size", None, 1, MAX_WORLD)
    if nproc is None:
        gpus = constraints.get("gpu_count") or 0
        nproc = gpus if isinstance(gpus, int) and not isinstance(gpus, bool) and gpus > 1 else 1
    backend = _choice(dist, "backend", None, BACKENDS, "payload.distributed")
    return nproc, backend
