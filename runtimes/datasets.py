"""Training data held in memory as two tensors, from a file or made up on the spot.

Files: ``safetensors`` and ``npz`` hold ``x`` and ``y`` (also spelt ``inputs`` /
``targets``), or a 1-D ``tokens`` stream for the GPT; ``jsonl`` holds one
``{"text": ...}`` per line, tokenized byte by byte (vocab 256). Token streams are
cut into non-overlapping windows of ``block_size + 1`` so that ``y`` is ``x``
shifted by one. Synthetic sets are small, seeded and learnable, for smoke tests
and benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runtimes.train_spec import fail

SEPARATOR = 10  # "\n" between JSONL records in the byte stream
_WORDS = ("the", "cat", "dog", "sat", "ran", "on", "under", "a", "mat", "log", "red", "big")


@dataclass
class TrainData:
    """Inputs ``x`` and targets ``y`` (first dimension: samples) and what they are."""

    x: torch.Tensor
    y: torch.Tensor
    task: str  # "classify" (integer targets, cross-entropy) or "regress" (float, MSE)
    num_classes: int | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def tokens_per_sample(self) -> int:
        """Target tokens per sample: the sequence length for a language model, else 1."""
        return int(self.y[0].numel())


def load_data(dataset: dict[str, Any], arch: str, model_config: dict[str, Any],
              cache_dir: Path | None = None) -> TrainData:
    """Load or make the dataset described by a validated ``payload.dataset``."""
    block = int(model_config.get("block_size", 64)) if arch == "gpt" else 0
    if "synthetic" in dataset:
        tensors = synthetic(dataset["synthetic"])
    else:
        path = _fetch(dataset, cache_dir)
        tensors = _read(path, dataset["format"])
    if arch == "gpt":
        return _lm_data(tensors, block)
    if "tokens" in tensors:
        raise fail(f"a token dataset needs model.arch 'gpt', not {arch!r}")
    data = _supervised(tensors)
    if arch == "mlp":
        data.x = data.x.flatten(1)
    return data


def _fetch(dataset: dict[str, Any], cache_dir: Path | None) -> Path:
    from runtimes.fetch import cache_dir_from_env, fetch, max_bytes_from_env

    return fetch(dataset["uri"], dataset.get("sha256"), cache_dir or cache_dir_from_env(),
                 max_bytes_from_env())


def _read(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if fmt == "npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in npz.files}
        return {"tokens": read_jsonl_tokens(path)}
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise fail(f"cannot read the {fmt} dataset: {type(exc).__name__}: {exc}") from None


def read_jsonl_tokens(path: Path) -> torch.Tensor:
    """Byte-level tokens of every ``text`` in a JSONL file, records joined by newlines."""
    chunks: list[bytes] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise fail(f"dataset line {number} is not JSON: {exc.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise fail(f"dataset line {number} needs a string 'text' field")
            chunks.append(record["text"].encode("utf-8") + bytes([SEPARATOR]))
    return encode_bytes(b"".join(chunks))


def encode_bytes(data: bytes) -> torch.Tensor:
    """Bytes to a 1-D int64 token tensor (vocab 256)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)


def _pick(tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor | None:
    for name in names:
        if name in tensors:
            return tensors[name]
    return None


def _supervised(tensors: dict[str, torch.Tensor]) -> TrainData:
    x = _pick(tensors, ("x", "inputs", "input"))
    y = _pick(tensors, ("y", "targets", "labels", "target"))
    if x is None or y is None:
        raise fail(f"dataset needs 'x' and 'y' tensors, found {sorted(tensors)}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise fail(f"dataset x and y disagree on samples: {tuple(x.shape)} vs {tuple(y.shape)}")
    x = x.float()
    if y.is_floating_point():
        return TrainData(x=x, y=y.float(), task="regress")
    y = y.long().reshape(-1)
    if y.numel() != x.shape[0] or int(y.min()) < 0:
        raise fail("integer targets must be one non-negative class id per sample")
    return TrainData(x=x, y=y, task="classify", num_classes=int(y.max()) + 1)


def _lm_data(tensors: dict[str, torch.Tensor], block: int) -> TrainData:
    tokens = _pick(tensors, ("tokens", "x"))
    if tokens is None:
        raise fail(f"a gpt dataset needs a 'tokens' stream, found {sorted(tensors)}")
    if tokens.is_floating_point():
        raise fail("gpt tokens must be integers")
    stream = tokens.reshape(-1).long()
    windows = (stream.numel() - 1) // block
    if windows < 1:
        raise fail(f"dataset has {stream.numel()} tokens; block_size {block} needs "
                   f"at least {block + 1}")
    x = stream[: windows * block].view(windows, block)
    y = stream[1: windows * block + 1].view(windows, block)
    return TrainData(x=x, y=y, task="classify", num_classes=int(stream.max()) + 1)


def synthetic(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A seeded synthetic set: ``classification``, ``images`` or ``text``."""
    where = "payload.dataset.synthetic"
    gen = torch.Generator().manual_seed(int(raw.get("seed", 0)))
    samples = int(raw.get("samples", 512))
    classes = _small_int(raw, "classes", 4, 2, 1000, where)
    if raw["kind"] == "classification":
        features = _small_int(raw, "features", 16, 1, 65536, where)
        _limit(samples * features)
        centers = torch.randn(classes, features, generator=gen) * 2.0
        y = torch.randint(0, classes, (samples,), generator=gen)
        return {"x": centers[y] + torch.randn(samples, features, generator=gen), "y": y}
    if raw["kind"] == "images":
        return _images(raw, samples, classes, gen)
    words = [_WORDS[int(i)] for i in torch.randint(0, len(_WORDS), (samples * 6,),
                                                   generator=gen)]
    lines = [" ".join(words[i: i + 6]) + ".\n" for i in range(0, len(words), 6)]
    return {"tokens": encode_bytes("".join(lines).encode())}


def _images(raw: dict[str, Any], samples: int, classes: int,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
    where = "payload.dataset.synthetic"
    channels = _small_int(raw, "channels", 1, 1, 16, where)
    size = _small_int(raw, "size", 8, 4, 512, where)
    _limit(samples * channels * size * size)
    y = torch.randint(0, classes, (samples,), generator=gen)
    x = torch.randn(samples, channels, size, size, generator=gen) * 0.5
    # Each class lights up its own horizontal band: easy to learn, not trivial.
    band = max(1, size // classes)
    for cls in range(classes):
        rows = slice((cls * band) % size, (cls * band) % size + band)
        x[y == cls, :, rows, :] += 2.0
    return {"x": x, "y": y}


def _small_int(raw: dict[str, Any], key: str, default: int, lo: int, hi: int,
               where: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise fail(f"{where}.{key} must be a whole number in [{lo}, {hi}], not {value!r}")
    return value


def _limit(elements: int) -> None:
    if elements > 200_000_000:
        raise fail(f"synthetic dataset too large ({elements} elements, limit 200M)")


def fill_model_config(arch: str, config: dict[str, Any], data: TrainData) -> dict[str, Any]:
    """The model config with input and output sizes taken from the data where not given."""
    filled = dict(config)
    if arch == "mlp":
        filled.setdefault("in_features", int(data.x[0].numel()))
        out = data.num_classes if data.task == "classify" else int(data.y[0].numel())
        filled.setdefault("out_features", out)
    elif arch == "cnn":
        if data.x.dim() != 4:
            raise fail(f"cnn needs images shaped (N, C, H, W), not {tuple(data.x.shape)}")
        filled.setdefault("in_channels", int(data.x.shape[1]))
        filled.setdefault("num_classes", data.num_classes or 1)
    return filled
