"""Built-in model architectures, built from a plain config dict.

Jobs name an architecture (``"arch": "mlp"``) and give its config; weights come
separately (a safetensors file). :data:`ARCHITECTURES` maps each name to its
builder, so a new architecture is one function plus one entry.

``mlp`` config: ``in_features`` (required), ``out_features`` (required),
``hidden`` (int or list of ints, default ``[64]``), ``activation`` (``relu``,
``gelu``, ``tanh``, ``silu``; default ``relu``), ``dropout`` (default 0).

``cnn`` config: ``in_channels`` (default 1), ``num_classes`` (default 10),
``channels`` (list of ints, default ``[16, 32]``), ``kernel_size`` (default 3),
``activation`` as above. Takes ``(N, C, H, W)`` of any size; a global average
pool before the classifier makes it size-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from runtimes.base import JobFailed
from runtimes.gpt import build_gpt

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
}


def _positive_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise ValueError(f"config.{key} is required")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.{key} must be a positive whole number, not {value!r}")
    return value


def _int_list(config: dict[str, Any], key: str, default: list[int]) -> list[int]:
    value = config.get(key, default)
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"config.{key} must be a positive int or a list of them, not {value!r}")
    return list(values)


def _activation(config: dict[str, Any]) -> type[nn.Module]:
    name = config.get("activation", "relu")
    if name not in _ACTIVATIONS:
        raise ValueError(f"config.activation must be one of {', '.join(_ACTIVATIONS)}, "
                         f"not {name!r}")
    return _ACTIVATIONS[name]


def build_mlp(config: dict[str, Any]) -> nn.Module:
    """A multi-layer perceptron: Linear, activation (and dropout) per hidden layer."""
    in_features = _positive_int(config, "in_features")
    out_features = _positive_int(config, "out_features")
    hidden = _int_list(config, "hidden", [64])
    dropout = float(config.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"config.dropout must be in [0, 1), not {dropout}")
    act = _activation(config)
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), act()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv blocks (conv, batch norm, activation, 2x2 max pool), global pool, linear head."""

    def __init__(self, in_channels: int, num_classes: int, channels: list[int],
                 kernel_size: int, act: type[nn.Module]) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_channels
        for size in channels:
            blocks += [nn.Conv2d(width, size, kernel_size, padding=kernel_size // 2),
                       nn.BatchNorm2d(size), act(), nn.MaxPool2d(2, ceil_mode=True)]
            width = size
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Any) -> Any:
        return self.head(self.pool(self.features(x)).flatten(1))


def build_cnn(config: dict[str, Any]) -> nn.Module:
    """A small image classifier; see the module docstring for its config."""
    kernel = _positive_int(config, "kernel_size", 3)
    if kernel % 2 == 0:
        raise ValueError(f"config.kernel_size must be odd, not {kernel}")
    return SmallCNN(in_channels=_positive_int(config, "in_channels", 1),
                    num_classes=_positive_int(config, "num_classes", 10),
                    channels=_int_list(config, "channels", [16, 32]),
                    kernel_size=kernel, act=_activation(config))


ARCHITECTURES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "gpt": build_gpt,  # runtimes/gpt.py: small causal LM for the training runtime
}


def build_model(arch: str, config: dict[str, Any]) -> nn.Module:
    """Build architecture ``arch`` from ``config``.

    Raises :class:`JobFailed` ("invalid_job") for an unknown architecture or a
    bad config, naming what is wrong.
    """
    builder = ARCHITECTURES.get(arch)
    if builder is None:
        raise JobFailed("invalid_job", f"unknown architecture {arch!r}; this node has: "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    if not isinstance(config, dict):
        raise JobFailed("invalid_job", f"model config for {arch!r} must be a JSON object")
    try:
        return builder(config)
    except (ValueError, TypeError) as exc:
        raise JobFailed("invalid_job", f"bad {arch} config: {exc}") from None
