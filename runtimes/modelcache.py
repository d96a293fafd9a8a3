"""The warm worker's loaded models: kept by key, least recently used first, within a budget.

A model is keyed by name, folder, device and dtype (a payload asking for another
precision gets its own copy). Before a load, the least recently used models go until
the new one's estimate (its weight files, scaled to the dtype) fits the budget; one
that still runs out of CUDA memory while loading drops every other model and tries
once more. Models unused for ``idle_s`` go at the worker's next tick. Unloading runs
the garbage collector and hands CUDA's cached blocks back to the driver, so another
process on the GPU can use them.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.base import JobFailed

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CPU_BUDGET_SHARE = 0.5  # of host RAM, when no budget is configured
GPU_BUDGET_SHARE = 0.8  # of the GPU's memory: the rest is for the KV cache and activations


@dataclass
class Entry:
    """One loaded model and what it takes."""

    name: str
    tokenizer: Any
    model: Any
    nbytes: int
    last_used: float


class ModelCache:
    """Loaded models, least recently used first; see the module docstring for eviction."""

    def __init__(self, budget_bytes: int, idle_s: float,
                 note: Callable[[str], None]) -> None:
        self.budget_bytes = budget_bytes
        self.idle_s = idle_s
        self._note = note
        self._entries: OrderedDict[tuple[str, ...], Entry] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, folder: Path, setup: Any) -> Any:
        """The model, loaded now or kept from before; an ``inference.Loaded``."""
        from runtimes import inference

        key = (name, str(folder), str(setup.device), str(setup.weights_dtype))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.last_used = time.monotonic()
            return inference.Loaded(name, entry.tokenizer, entry.model, 0.0, {
                "model_cached": True, "model_load_ms": 0.0, **self._figures()})
        evicted = self._make_room(estimate_bytes(folder, setup), f"{name} needs room")
        t0 = time.monotonic()
        tokenizer, model = self._load(name, folder, setup, evicted)
        load_s = time.monotonic() - t0
        self._entries[key] = Entry(name, tokenizer, model, model_bytes(model), time.monotonic())
        return inference.Loaded(name, tokenizer, model, load_s, {
            "model_cached": False, "model_load_ms": round(load_s * 1000, 1),
            "models_evicted": evicted, **self._figures()})

    def _load(self, name: str, folder: Path, setup: Any, evicted: list[str]) -> tuple[Any, Any]:
        """Load; on running out of device memory, drop every other model and try once more."""
        from runtimes import device as dev
        from runtimes import inference

        try:
            return inference.load_model(name, folder, setup)
        except Exception as exc:
            if not self._entries or not _is_oom(exc):
                raise
            evicted += self.clear(f"{name} did not fit beside them")
            with dev.oom_guard(setup):
                return inference.load_model(name, folder, setup)

    def _figures(self) -> dict[str, Any]:
        return {"models_resident": len(self._entries),
                "model_cache_mb": round(self.used_bytes / (1 << 20), 1),
                "model_budget_mb": round(self.budget_bytes / (1 << 20), 1)}

    def _make_room(self, need: int, why: str) -> list[str]:
        evicted = []
        while self._entries and self.used_bytes + need > self.budget_bytes:
            _, entry = self._entries.popitem(last=False)
            evicted.append(entry.name)
            self._note(f"evicted {entry.name} (least recently used): {why}")
        if evicted:
            release_memory()
        return evicted

    def touch_last(self) -> None:
        """The last model used was in use until now (a job just ended with it)."""
        if self._entries:
            next(reversed(self._entries.values())).last_used = time.monotonic()

    def evict_idle(self) -> list[str]:
        now = time.monotonic()
        stale = [k for k, e in self._entries.items() if now - e.last_used >= self.idle_s]
        for key in stale:
            entry = self._entries.pop(key)
            self._note(f"evicted {entry.name}: unused for {now - entry.last_used:.1f} s "
                       f"(model_idle_s {self.idle_s:g})")
        if stale:
            release_memory()
        return [k[0] for k in stale]

    def clear(self, why: str) -> list[str]:
        names = [e.name for e in self._entries.values()]
        self._entries.clear()
        if names:
            self._note(f"evicted {', '.join(names)}: {why}")
            release_memory()
        return names


def estimate_bytes(folder: Path, setup: Any) -> int:
    """What a model will take once loaded, from its weight files (scaled to the dtype)."""
    total = 0
    try:
        for path in folder.iterdir():
            if path.suffix in WEIGHT_SUFFIXES and path.is_file():
                total += path.stat().st_size
    except OSError:
        return 0
    # Checkpoints are mostly fp32 or 16-bit; loading to 16 bits halves an fp32 file.
    return total // 2 if "16" in str(setup.weights_dtype) else total


def model_bytes(model: Any) -> int:
    try:
        return int(model.get_memory_footprint())
    except Exception:
        return sum(p.numel() * p.element_size() for p in model.parameters())


def release_memory() -> None:
    """Hand freed weights back: to the allocator, and CUDA's cache back to the driver."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, JobFailed) and exc.code == "cuda_oom")


def default_budget_bytes() -> int:
    """The visible GPU's memory (a share), else the host's RAM (a share)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory * GPU_BUDGET_SHARE)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * CPU_BUDGET_SHARE)
