"""Checks every converter shares: what a plain-LSTM format can carry, and array shapes."""

from __future__ import annotations

import numpy as np

from lstmkit.nn import LSTM

__all__ = ["require_plain_lstm", "expect_shape"]


def require_plain_lstm(layer: object, fmt: str) -> None:
    """Raise unless ``layer`` is an lstmkit LSTM computing the vanilla cell without projection.

    Args:
        fmt: the target format's name, for the message.
    """
    if not isinstance(layer, LSTM):
        raise TypeError(f"layer: expected an lstmkit LSTM, got {type(layer).__name__}")
    if not layer.spec.is_vanilla or layer.proj_size:
        name = layer.spec.name + (f" with proj_size={layer.proj_size}" if layer.proj_size else "")
        raise ValueError(f"layer: {fmt} computes only the vanilla LSTM without projection; this layer is {name!r}")


def expect_shape(name: str, a: np.ndarray, shape: tuple[int, ...]) -> None:
    """Raise a ValueError naming ``name`` unless ``a`` has ``shape``."""
    if tuple(a.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(a.shape)}")
