"""TensorFlow 1 (``LSTMCell`` / ``LSTMBlockCell``) and haste layouts ⇄ lstmkit.

Both order the gates i, g, f, o (TF1 calls g ``j``; see :data:`lstmkit.layout.ORDERS`).

* TF1: one ``kernel`` [I + H, 4H] over ``[x, h]`` and one ``bias`` [4H]; the cell adds
  ``forget_bias`` (default 1.0) to the forget pre-activation *at run time*, so it is not in
  the stored bias: ``bias_f(tf1) = b_f(lstmkit) − forget_bias``.
* haste: ``kernel`` [I, 4H], ``recurrent_kernel`` [H, 4H], ``bias`` [4H]; its forget bias
  is an initial value, already in the stored bias.

Arrays are NumPy, as those frameworks save them: floating (float16/32/64) and finite, checked
before the layer is touched (see :func:`lstmkit.convert._checks.expect_weights`). One layer
and direction at a time; only the vanilla cell without projection exists in these formats.
"""

from __future__ import annotations

import numpy as np
import torch

from lstmkit._param_writes import write_rows
from lstmkit.convert._checks import (
    expect_finite_float,
    expect_weights,
    layer_slot,
    require_plain_lstm,
    require_values,
)
from lstmkit.layout import reorder_gates, suffix
from lstmkit.nn import LSTM

__all__ = ["to_tf1", "from_tf1", "to_haste", "from_haste"]


def _canonical(layer: LSTM, index: int, direction: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_ih (4H, I), W_hh (4H, H) and the summed bias (4H,) of one layer-direction, in the layer's
    dtype — a bfloat16 layer's in float32, which NumPy has (every value exact, the sum and the
    forget_bias shift computed there). A layer on the meta device is refused (no values)."""
    require_values(layer)
    p = {k: v.detach().float() if v.dtype == torch.bfloat16 else v.detach()
         for k, v in layer.layer_params(index, direction).items()}
    w_ih, w_hh = p["weight_ih"], p["weight_hh"]
    b = p["bias_ih"] + p["bias_hh"] if "bias_ih" in p else torch.zeros(w_ih.shape[0], dtype=w_ih.dtype)
    return w_ih, w_hh, b


def _numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a NumPy array of its own (from :func:`_canonical`: never bfloat16)."""
    return t.cpu().resolve_neg().numpy().copy()


def _as_layer_dtype(name: str, a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``a`` (checked by :func:`expect_weights`) in the layer's dtype; a value beyond that dtype's range is refused
    rather than stored as inf."""
    t = torch.as_tensor(a).to(dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: values beyond the range of the layer's {str(dtype).removeprefix('torch.')} "
                         f"(largest magnitude {float(np.abs(a).max()):.3g}) would be stored as inf")
    return t


def _store(layer: LSTM, index: int, direction: int, w_ih: torch.Tensor, w_hh: torch.Tensor,
           b: torch.Tensor) -> None:
    """Write one layer-direction's canonical weights into ``layer`` as its calls read them (a
    parametrized weight through its ``right_inverse``, a pruned one refused: write_rows); everything
    is checked before the first write, and a failed write undoes those before it."""
    p = layer.layer_params(index, direction)
    if "bias_ih" not in p and bool(b.abs().max() > 0):
        raise ValueError("bias: the arrays have a non-zero bias but the layer has bias=False")
    values = {"weight_ih": w_ih, "weight_hh": w_hh}
    if "bias_ih" in p:
        values.update(bias_ih=b, bias_hh=torch.zeros_like(b))
    end = suffix(index, direction)
    write_rows(layer, [(base + end, slice(None), v) for base, v in values.items()], "layer")


def to_tf1(layer: LSTM, index: int = 0, direction: int = 0, forget_bias: float = 1.0) -> dict[str, np.ndarray]:
    """TF1 ``kernel`` [I + H, 4H] and ``bias`` [4H] (gate order i, j, f, o) of one layer-direction,
    in the layer's dtype (a bfloat16 layer's as float32: NumPy has no bfloat16).

    Args:
        forget_bias: the value the TF1 cell will add at run time (its default is 1.0).
    """
    require_plain_lstm(layer, "the TF1 layout")
    index, direction = layer_slot(layer, index, direction)
    forget_bias = expect_finite_float("forget_bias", forget_bias)
    w_ih, w_hh, b = _canonical(layer, index, direction)
    H = layer.hidden_size
    kernel = reorder_gates(torch.cat([w_ih, w_hh], dim=1), "lstmkit", "tf1").t()  # (I + H, 4H)
    bias = reorder_gates(b, "lstmkit", "tf1").clone()
    bias[2 * H:3 * H] -= forget_bias  # tf1 order i, j, f, o: f is the third block
    return {"kernel": _numpy(kernel), "bias": _numpy(bias)}


def from_tf1(layer: LSTM, kernel: np.ndarray, bias: np.ndarray, index: int = 0, direction: int = 0,
             forget_bias: float = 1.0) -> LSTM:
    """Load a TF1 cell's ``kernel`` [I + H, 4H] and ``bias`` [4H] into one layer-direction of ``layer`` (in place).

    The arrays must be floating (float16/32/64, converted to the layer's dtype) and finite;
    all of them are checked before the layer is touched.

    Raises:
        TypeError: an array is not floating (integers, bools, objects are not cast), or a wrong argument type.
        ValueError: a wrong shape, a NaN/inf, a value beyond the layer dtype's range, a non-zero bias (or
            ``forget_bias``) for a layer with ``bias=False``; the message names the array.
    """
    require_plain_lstm(layer, "the TF1 layout")
    index, direction = layer_slot(layer, index, direction)
    forget_bias = expect_finite_float("forget_bias", forget_bias)
    H = layer.hidden_size
    n_in = layer.layer_params(index, direction)["weight_ih"].shape[1]
    kernel = expect_weights("kernel", kernel, (n_in + H, 4 * H))
    bias = expect_weights("bias", bias, (4 * H,))
    if forget_bias != 0.0 and "bias_ih" not in layer.layer_params(index, direction) and not np.any(bias):
        raise ValueError(f"forget_bias: the TF1 cell adds forget_bias={forget_bias} to the forget gate at run "
                         f"time, which a layer with bias=False cannot hold; pass forget_bias=0.0 if the cell was "
                         f"built so, else load into a layer with a bias")
    dtype = layer.weight_ih_l0.dtype
    w = reorder_gates(_as_layer_dtype("kernel", kernel, dtype).t(), "tf1", "lstmkit")  # (4H, I + H)
    b = _as_layer_dtype("bias", bias, dtype).clone()
    b[2 * H:3 * H] += forget_bias
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"bias: its forget block plus forget_bias={forget_bias} is beyond the range of the "
                         f"layer's {str(dtype).removeprefix('torch.')}")
    _store(layer, index, direction, w[:, :n_in], w[:, n_in:], reorder_gates(b, "tf1", "lstmkit"))
    return layer


def to_haste(layer: LSTM, index: int = 0, direction: int = 0) -> dict[str, np.ndarray]:
    """haste ``kernel`` [I, 4H], ``recurrent_kernel`` [H, 4H], ``bias`` [4H] (order i, g, f, o), in the
    layer's dtype (a bfloat16 layer's as float32)."""
    require_plain_lstm(layer, "the haste layout")
    index, direction = layer_slot(layer, index, direction)
    w_ih, w_hh, b = _canonical(layer, index, direction)
    return {"kernel": _numpy(reorder_gates(w_ih, "lstmkit", "haste").t()),
            "recurrent_kernel": _numpy(reorder_gates(w_hh, "lstmkit", "haste").t()),
            "bias": _numpy(reorder_gates(b, "lstmkit", "haste"))}


def from_haste(layer: LSTM, kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray,
               index: int = 0, direction: int = 0) -> LSTM:
    """Load haste's ``kernel`` [I, 4H], ``recurrent_kernel`` [H, 4H] and ``bias`` [4H] into one
    layer-direction of ``layer`` (in place), checked as :func:`from_tf1` checks its arrays."""
    require_plain_lstm(layer, "the haste layout")
    index, direction = layer_slot(layer, index, direction)
    H = layer.hidden_size
    n_in = layer.layer_params(index, direction)["weight_ih"].shape[1]
    kernel = expect_weights("kernel", kernel, (n_in, 4 * H))
    recurrent_kernel = expect_weights("recurrent_kernel", recurrent_kernel, (H, 4 * H))
    bias = expect_weights("bias", bias, (4 * H,))
    dtype = layer.weight_ih_l0.dtype
    w_ih = reorder_gates(_as_layer_dtype("kernel", kernel, dtype).t(), "haste", "lstmkit")
    w_hh = reorder_gates(_as_layer_dtype("recurrent_kernel", recurrent_kernel, dtype).t(), "haste", "lstmkit")
    _store(layer, index, direction, w_ih, w_hh, reorder_gates(_as_layer_dtype("bias", bias, dtype), "haste", "lstmkit"))
    return layer
