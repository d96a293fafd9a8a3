"""The runtime registry: payload type to the import path of its ``run(ctx)``.

The parent side (the agent) uses this table only as strings, so it never imports
a runtime (and never torch). Operators add their own entries in the agent's
config (``[runtimes]`` table), which override these.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

BUILTIN_RUNTIMES: dict[str, str] = {
    "command": "runtimes.command:run",
    "sleep": "runtimes.synthetic:run",
    "inference": "runtimes.inference:run",
    "batch_inference": "runtimes.batch:run",
    "training": "runtimes.training:run",
}


def resolve_path(job_type: str, extra: Mapping[str, str] | None = None) -> str | None:
    """The import path for ``job_type``, or None when this node has no runtime for it."""
    table = dict(BUILTIN_RUNTIMES)
    if extra:
        table.update(extra)
    return table.get(job_type)


def load(path: str) -> Callable[[Any], None]:
    """Import ``module:function`` and return the function."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"runtime path {path!r} must look like 'package.module:function'")
    module = importlib.import_module(module_name)
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"runtime {path!r} is not callable")
    return fn  # type: ignore[no-any-return]


def preload(paths: Mapping[str, str] | None = None) -> list[str]:
    """Import every runtime module (for the fork server); returns those that failed."""
    failed = []
    for name, path in (paths or BUILTIN_RUNTIMES).items():
        try:
            importlib.import_module(path.partition(":")[0])
        except Exception:  # an optional runtime's library may be missing on this node
            failed.append(name)
    return failed
