"""FlashRNN (Pöppel et al. 2025) ⇄ lstmkit: its ``lstm`` and ``slstm`` functions with heads.

FlashRNN is a function, not a module: ``flashrnn(Wx, R, b, states, function=…)`` runs the
recurrence on pre-computed input pre-activations ``Wx`` (B, T, 4, NH, D) with a recurrent
weight ``R`` (4, NH, D, D) and a bias ``b`` (4, NH, D) (its default layouts ``GHDP`` and
``GHD``: gate, head, output unit, input unit), gate order i, f, z, o (lstmkit's i, f, g, o).
``R[g, j]`` is block j of gate g's recurrent matrix, which is how lstmkit stores heads: its
``weight_hh`` (4H, D) is ``R`` with the first three axes flattened, row ``g·H + j·D + d`` (gate,
head, unit), and ``Wx`` flattened over its last three axes is lstmkit's gate pre-activation in
lstmkit's order. The input projection that makes ``Wx`` is the user's: a (4H, I) matrix ``W``
(and FlashRNN has one bias, lstmkit's ``bias_ih``; ``bias_hh`` is 0).

What FlashRNN computes: ``function="lstm"`` is the vanilla LSTM with ``heads = NH``;
``function="slstm"`` is lstmkit's ``slstm+n_clamp`` (its normaliser is kept ≥ 1; the other
differences from xLSTM's sLSTM are listed in docs/slstm.md). One layer and direction at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lstmkit._validate import check_bool
from lstmkit.convert._checks import (
    expect_dense_float,
    expect_finite_parameters,
    layer_slot,
    native_array,
    require_values,
)
from lstmkit.nn import LSTM
from lstmkit.spec import CellSpec

__all__ = ["to_flashrnn", "from_flashrnn", "FUNCTIONS"]

#: FlashRNN's functions lstmkit computes, as lstmkit cells (heads are the layer's).
FUNCTIONS: dict[str, CellSpec] = {"lstm": CellSpec(), "slstm": CellSpec(slstm=True, n_clamp=True)}


def _tensor(name: str, a: Any, ndim: int) -> Tensor:
    """``a`` as a detached floating tensor of ``ndim`` dimensions with finite values, else the error naming ``name``."""
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(native_array(a))
    if not isinstance(a, Tensor):
        raise TypeError(f"{name}: expected a tensor (or a NumPy array), got {type(a).__name__}")
    if not a.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {a.dtype}; integers and bools are not weights")
    expect_dense_float(name, a)
    if a.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return a.detach()


def from_flashrnn(R: Any, b: Any, W: Any = None, function: str = "lstm", *, batch_first: bool = True) -> LSTM:
    """The lstmkit layer computing ``flashrnn(x Wᵀ viewed (B, T, 4, NH, D), R, b, function=function)``.

    Args:
        R: (4, NH, D, D) recurrent weights, FlashRNN's ``GHDP`` layout.
        b: (4, NH, D) bias, ``GHD``.
        W: (4H, I) the input projection whose output is FlashRNN's ``Wx`` (H = NH·D), or None:
            then the layer's input is ``Wx`` itself, flattened to (B, T, 4H) (``weight_ih`` is the
            identity).
        function: ``"lstm"`` or ``"slstm"``.
        batch_first: the layer's layout; FlashRNN's is batch-first.

    Returns:
        ``LSTM(I, H, heads=NH, cell=…)`` in ``R``'s dtype: ``"vanilla"`` for ``lstm``,
        ``"slstm+n_clamp"`` for ``slstm``. Its state is ``(h, c)`` or ``(h, c, n, m)``: FlashRNN's
        ``states[0], states[1], …`` (each (B, NH, D) flattened to (B, H)).

    Raises:
        ValueError: a function lstmkit does not compute (``gru``, ``elman``), inconsistent shapes, NaN.
        TypeError: not floating tensors.
    """
    check_bool("batch_first", batch_first)
    if not isinstance(function, str) or function not in FUNCTIONS:
        raise ValueError(f"function: lstmkit computes FlashRNN's {sorted(FUNCTIONS)}, not {function!r} (FlashRNN's "
                         f"gru and elman cells have no lstmkit layer)")
    R = _tensor("R", R, 4)
    G, NH, D, P = R.shape
    if G != 4 or D != P or NH == 0 or D == 0:
        raise ValueError(f"R: expected (4, NH, D, D) (gates, heads, units, units: FlashRNN's GHDP; NH, D >= 1), "
                         f"got {tuple(R.shape)}")
    b = _tensor("b", b, 3)
    if tuple(b.shape) != (4, NH, D):
        raise ValueError(f"b: expected (4, NH, D) = {(4, NH, D)} like R, got {tuple(b.shape)}")
    H = NH * D
    if W is not None:
        W = _tensor("W", W, 2)
        if W.shape[0] != 4 * H or W.shape[1] == 0:
            raise ValueError(f"W: expected (4H, I) with 4H = {4 * H} and I >= 1, got {tuple(W.shape)}")
    I = 4 * H if W is None else W.shape[1]
    layer = LSTM(I, H, cell=FUNCTIONS[function].replace(heads=NH), batch_first=batch_first, dtype=R.dtype,
                 device=R.device)
    with torch.no_grad():
        layer.weight_ih_l0.copy_(torch.eye(4 * H, dtype=R.dtype) if W is None else W)
        layer.weight_hh_l0.copy_(R.reshape(4 * H, D))  # rows: gate, head, unit; columns: the head's units
        layer.bias_ih_l0.copy_(b.reshape(4 * H))
        layer.bias_hh_l0.zero_()
    expect_finite_parameters(layer, "from_flashrnn")
    return layer


def to_flashrnn(layer: LSTM, index: int = 0, direction: int = 0) -> dict[str, Any]:
    """FlashRNN's arrays of one layer-direction of ``layer``.

    Returns:
        ``{"R": (4, NH, D, D), "b": (4, NH, D), "W": (4H, I), "function": "lstm" | "slstm"}``:
        ``flashrnn((x @ W.T).view(B, T, 4, NH, D), R, b, function=function)`` computes the layer
        (tensors, detached copies; ``b`` is ``bias_ih + bias_hh``).

    Raises:
        ValueError: what FlashRNN cannot compute, with the reason: variants other than the
            vanilla LSTM and the sLSTM (with heads), a projection, the exponential forget gate.
            The sLSTM without ``n_clamp`` is accepted: FlashRNN keeps ``n ≥ 1``, which changes
            nothing for any state the layer reaches from the zero state (there ``n_t ≥ 1``
            already; docs/slstm.md) — only a given initial ``n_0`` below 1 differs.
    """
    if not isinstance(layer, LSTM):
        raise TypeError(f"layer: expected an lstmkit LSTM, got {type(layer).__name__}")
    index, direction = layer_slot(layer, index, direction)
    require_values(layer)
    spec = layer.spec.without_init().replace(heads=1)
    function = "slstm" if spec.slstm else "lstm"
    if spec.slstm and spec.forget_activation != "sigmoid":
        raise ValueError("layer: FlashRNN's sLSTM has a sigmoid forget gate (log f = log σ(f̃)); this layer's is "
                         "exponential (forget_act=exp)")
    if spec not in (CellSpec(), CellSpec(slstm=True), CellSpec(slstm=True, n_clamp=True)):
        raise ValueError(f"layer: FlashRNN computes the vanilla LSTM and the sLSTM (with heads); this layer is "
                         f"{layer.spec.name!r}")
    if layer.proj_size:
        raise ValueError(f"layer: FlashRNN has no projection; this layer has proj_size={layer.proj_size}")
    p = layer.layer_params(index, direction)
    H, NH = layer.hidden_size, layer.spec.heads
    D = H // NH
    w_hh = p["weight_hh"].detach()
    b = (p["bias_ih"] + p["bias_hh"]).detach() if "bias_ih" in p else torch.zeros(4 * H, dtype=w_hh.dtype)
    return {"R": w_hh.reshape(4, NH, D, D).clone(), "b": b.reshape(4, NH, D).clone(),
            "W": p["weight_ih"].detach().clone(), "function": function}
