"""Checks every converter shares: what a plain-LSTM format can carry, and the arrays it reads."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from lstmkit._param_writes import require_values
from lstmkit._validate import check_int
from lstmkit.checks import check_dense
from lstmkit.nn import LSTM

__all__ = ["require_plain_lstm", "expect_shape", "expect_weights", "expect_finite_float", "layer_slot",
           "expect_finite_parameters", "expect_dense_float", "native_array", "require_values"]


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


def expect_weights(name: str, a: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``a`` as a NumPy array after checking that it can be weights.

    Checked in this order, each message naming ``name``: ``a`` is an array (a NumPy array,
    or what ``np.asarray`` reads: a list, a CPU tensor that does not require grad) of a
    floating dtype (float16, float32, float64; integers, bools and objects are not
    weights, and are not cast); it has ``shape`` when given; every value is finite.

    Raises:
        TypeError: not an array, or not floating ("kernel: expected a floating array (float16, float32 or
            float64), got int64; ...").
        ValueError: the wrong shape, or a NaN/inf ("kernel: contains NaN or inf (2 of 48 values, first at
            (0, 3))").
    """
    if isinstance(a, torch.Tensor) and a.is_neg():
        a = a.resolve_neg()  # a negative view: its values (NumPy reads its memory)
    try:
        arr = np.asarray(a)
    except Exception as exc:  # a tensor that requires grad, a tensor on a GPU, ...
        raise TypeError(f"{name}: expected a NumPy array, got {type(a).__name__} ({type(exc).__name__}: "
                        f"{exc})"[:300]) from None
    arr = native_array(arr)
    if arr.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{name}: expected a floating array (float16, float32 or float64), got {arr.dtype}; "
                        f"integers and bools are not weights, and are not cast")
    if shape is not None:
        expect_shape(name, arr, shape)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise ValueError(f"{name}: contains NaN or inf ({len(bad)} of {arr.size} values, first at "
                         f"{tuple(int(i) for i in bad[0])})")
    return arr


def native_array(arr: np.ndarray) -> np.ndarray:
    """``arr`` as torch reads a NumPy array without a complaint: in this machine's byte order (a
    big-endian ``>f4`` is float32 all the same), C-ordered with positive strides (``np.flip``'s
    view, a Fortran-ordered array) and writable (a read-only array or memmap) — a copy where it
    is not already so."""
    native = arr.dtype.newbyteorder("=") if arr.dtype.byteorder not in ("=", "|") else arr.dtype
    return np.require(arr, dtype=native, requirements=["C", "W"])


#: The dtypes a weight tensor may come in (float8 and complex tensors are not weights).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def expect_dense_float(name: str, t: torch.Tensor) -> None:
    """Dense with values (:func:`lstmkit.checks.check_dense`), and of a weight dtype (:data:`WEIGHT_DTYPES`)."""
    check_dense(t, name, values=True)
    if t.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor of {[str(d) for d in WEIGHT_DTYPES]}, got {t.dtype}")


def expect_finite_parameters(layer: torch.nn.Module, where: str) -> None:
    """Every parameter of a converted ``layer`` finite: a NaN or inf in the source, or a value beyond
    the layer dtype's range (1e300 stored as float32 is inf), is a ValueError naming the parameter."""
    for name, p in layer.named_parameters():
        finite = torch.isfinite(p)
        if not bool(finite.all()):
            bad = (~finite).nonzero()
            raise ValueError(f"{where}: {name}: contains NaN or inf as {p.dtype} ({len(bad)} of {p.numel()} values, "
                             f"first at {tuple(int(i) for i in bad[0])}; a value beyond the dtype's range becomes inf)")


def expect_finite_float(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite real number (not a bool), else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} ({value!r})"[:300])
    if not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected a finite float, got {value!r}")
    return float(value)


def layer_slot(layer: LSTM, index: Any, direction: Any) -> tuple[int, int]:
    """(index, direction) checked against ``layer``, the messages naming the converters' arguments."""
    return (check_int("index", index, 0, layer.num_layers - 1),
            check_int("direction", direction, 0, layer.num_directions - 1))
