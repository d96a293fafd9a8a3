"""The typed job model, validated on entry.

A job is what a coordinator's poll answer or a JOB.json file describes:
``{"job_id": ..., "payload": {"type": ..., ...}, "constraints": {...}}``.
Validation happens here once; everything downstream trusts a :class:`Job`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import InvalidJob

# The id becomes a folder name (job_<ID>): no separators, no dot-dot, bounded.
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# A type is only ever a lookup key (runtime registry, allow-list) and is shown with
# repr(): any short printable string is a well-formed type, and one no runtime has
# fails unsupported_job_type (the executor), not invalid_job.
MAX_TYPE_CHARS = 64
MAX_TIMEOUT_S = 7 * 24 * 3600.0
DEFAULT_TIMEOUT_S = 3600.0
# Node labels (config ``tags``, ``constraints.tags``): a short name, a short value.
_TAG_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")
MAX_TAG_VALUE_CHARS = 256
MAX_TAGS = 64


def tag_text(value: object) -> str | None:
    """A tag value as the text tags are compared by: a string as it is, a number or a
    boolean as JSON spells it (``7``, ``0.5``, ``true``); None for anything else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and _finite(value):
        return json.dumps(value)
    return value if isinstance(value, str) else None


def read_tags(raw: object, what: str) -> dict[str, str]:
    """``raw`` as tags (a table of name = value), or ValueError saying what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must be a table of name = value")
    if len(raw) > MAX_TAGS:
        raise ValueError(f"{what} has {len(raw)} tags; at most {MAX_TAGS}")
    out = {}
    for name, value in raw.items():
        text = tag_text(value)
        if not isinstance(name, str) or not _TAG_NAME_RE.match(name):
            raise ValueError(f"{what}: tag name {name!r} must be 1-64 letters, digits, "
                             "'_', '.', ':', '/' or '-', starting with a letter or digit")
        if text is None or len(text) > MAX_TAG_VALUE_CHARS or not text.isprintable():
            raise ValueError(f"{what}.{name} must be a string of at most "
                             f"{MAX_TAG_VALUE_CHARS} printable characters, or a number")
        out[name] = text
    return out


def valid_job_id(job_id: object) -> bool:
    """True when ``job_id`` is safe as a folder name (job_<ID>) and a URL segment."""
    return isinstance(job_id, str) and bool(_JOB_ID_RE.match(job_id)) and ".." not in job_id


def valid_job_type(job_type: object) -> bool:
    """True when ``job_type`` is a well-formed payload type: 1-64 printable characters.

    Printable excludes control and format characters, so a type never splits a log
    line; whether any runtime handles it is the executor's question.
    """
    return isinstance(job_type, str) and 0 < len(job_type) <= MAX_TYPE_CHARS \
        and job_type.isprintable()


@dataclass(frozen=True)
class Constraints:
    """What a job needs from the node, in either dialect.

    Ours: ``gpu_count`` (or ``gpus``), ``min_vram_mb``. The core coordinator's (AITBC):
    ``gpu`` (a GPU name, matched as a substring of the node's GPU names, or a count),
    ``min_vram_gb`` and ``cuda`` (a substring of the node's CUDA version). A job that
    names no GPU count leaves it to its payload type (``agent.daemon.scheduler``).
    ``tags``: node labels the job needs, each equal to the node's (config ``tags``).
    """

    gpu_count: int | None = None  # None: not asked
    min_vram_mb: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    gpu_name: str | None = None
    cuda: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def asks_for_gpu(self) -> bool:
        """Does the job ask for a GPU at all (any dialect), count aside?"""
        return bool(self.gpu_count or self.gpu_name or self.min_vram_mb or self.cuda)

    def tags_missing(self, node_tags: dict[str, str]) -> dict[str, str]:
        """The asked tags this node lacks or has with another value (empty: all match)."""
        return {name: value for name, value in self.tags.items()
                if node_tags.get(name) != value}

    @classmethod
    def from_dict(cls, raw: Any) -> Constraints:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise InvalidJob("constraints must be a JSON object")
        gpu_count, gpu_name = _gpu_fields(raw)
        return cls(gpu_count=gpu_count, min_vram_mb=_vram_field(raw),
                   timeout_s=_timeout_field(raw), gpu_name=gpu_name, cuda=_cuda_field(raw),
                   tags=_tags_field(raw))


def _gpu_fields(raw: dict[str, Any]) -> tuple[int | None, str | None]:
    """``gpu_count``/``gpus``, and the core's ``gpu``: a name, or a count (or true)."""
    count = _int_field(raw, ("gpu_count", "gpus"), None, 0, 64)
    gpu = raw.get("gpu")
    if gpu is None:
        return count, None
    if isinstance(gpu, bool):
        return (count if count is not None else int(gpu)), None
    if isinstance(gpu, int):
        return (count if count is not None else _bounded("gpu", gpu, 0, 64)), None
    if isinstance(gpu, str) and len(gpu) <= 64:
        return count, gpu.strip() or None
    raise InvalidJob("constraints.gpu must be a GPU name (such as 'H200', at most 64 "
                     "characters) or a count")


def _vram_field(raw: dict[str, Any]) -> int:
    mb = _int_field(raw, ("min_vram_mb", "min_vram"), 0, 0, 10_000_000)
    gb = raw.get("min_vram_gb")
    if mb or gb is None:
        return int(mb)
    if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not _finite(gb) \
            or not 0 <= gb <= 10_000:
        raise InvalidJob("constraints.min_vram_gb must be a number of GB (0-10000)")
    return int(gb * 1024)


def _cuda_field(raw: dict[str, Any]) -> str | None:
    cuda = raw.get("cuda")
    if cuda is None:
        return None
    if isinstance(cuda, bool) or not isinstance(cuda, (str, int, float)) or len(str(cuda)) > 32:
        raise InvalidJob("constraints.cuda must be a CUDA version such as '12.4'")
    return str(cuda).strip() or None


def _tags_field(raw: dict[str, Any]) -> dict[str, str]:
    if raw.get("tags") is None:
        return {}
    try:
        return read_tags(raw["tags"], "constraints.tags")
    except ValueError as exc:
        raise InvalidJob(str(exc)) from None


def _timeout_field(raw: dict[str, Any]) -> float:
    timeout = raw.get("timeout_s", raw.get("timeout", DEFAULT_TIMEOUT_S))
    if timeout is None:
        timeout = DEFAULT_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidJob("constraints.timeout_s must be a number of seconds")
    if not _finite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise InvalidJob(f"constraints.timeout_s must be in (0, {MAX_TIMEOUT_S:.0f}]")
    return float(timeout)


def _finite(value: float) -> bool:
    """math.isfinite, where an int too large for a float (10**400) is simply not finite."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _bounded(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise InvalidJob(f"constraints.{name} must be between {lo} and {hi}")
    return value


def _int_field(raw: dict[str, Any], names: tuple[str, ...], default: Any, lo: int,
               hi: int) -> Any:
    for name in names:
        if name in raw and raw[name] is not None:
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidJob(f"constraints.{name} must be a whole number")
            return _bounded(name, value, lo, hi)
    return default


@dataclass(frozen=True)
class Job:
    """One validated job."""

    job_id: str
    payload: dict[str, Any]
    constraints: Constraints = field(default_factory=Constraints)
    lease_id: str | None = None

    @property
    def type(self) -> str:
        return str(self.payload["type"])

    @classmethod
    def from_dict(cls, raw: Any) -> Job:
        """Build a job from a decoded JSON object, or raise :class:`InvalidJob`."""
        if not isinstance(raw, dict):
            raise InvalidJob("a job must be a JSON object with job_id and payload")
        job_id = raw.get("job_id", raw.get("id"))
        if not valid_job_id(job_id):
            raise InvalidJob(
                "job_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-', "
                "starting with a letter or digit"
            )
        payload = raw.get("payload")
        if not isinstance(payload, dict):
            raise InvalidJob("payload must be a JSON object with a 'type'")
        jtype = payload.get("type")
        if not valid_job_type(jtype):
            raise InvalidJob(f"payload.type must be a string of 1-{MAX_TYPE_CHARS} printable "
                             "characters, such as 'inference'")
        constraints = Constraints.from_dict(raw.get("constraints"))
        lease = raw.get("lease_id")
        if lease is not None and not isinstance(lease, str):
            raise InvalidJob("lease_id must be a string")
        return cls(job_id=str(job_id), payload=payload, constraints=constraints, lease_id=lease)

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidJob(f"the job is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> Job:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidJob(f"cannot read job file {path}: {exc.strerror}") from None
        return cls.from_json(data)

    def to_dict(self) -> dict[str, Any]:
        out = {"job_id": self.job_id, "payload": self.payload,
               "constraints": asdict(self.constraints)}
        if self.lease_id is not None:
            out["lease_id"] = self.lease_id
        return out
