"""xLSTM's sLSTM (Beck et al. 2024) → lstmkit: a state dict of its ``sLSTMCell`` or ``sLSTMLayer``.

The cell (``xlstm.blocks.slstm.cell``) keeps two parameters, in a layout that depends on the
backend it was built for (``vanilla``: the PyTorch loop; ``cuda``: its kernel), with ``NH``
heads of ``D`` units (H = NH·D), gate order i, f, z, o (lstmkit's i, f, g, o):

=========================  ========================  ====================================
parameter                  ``vanilla``               ``cuda``
=========================  ========================  ====================================
``_recurrent_kernel_``     (NH, 4D, D): [j, g·D+o, i]  (NH, D, 4D): [j, i, g·D+o]
``_bias_``                 (4H,): gate, head, unit   (4H,): head, gate, unit
=========================  ========================  ====================================

(``[j, …, i]``: head j, output unit o of gate g, input unit i.) The two kernel shapes tell the
backends apart (4D ≠ D), and so which bias layout a state dict has. The cell's input is the gate
pre-activations (B, T, 4H) in lstmkit's order (gate, head, unit): a converted cell is an lstmkit
layer with ``input_size = 4H`` and the identity as ``weight_ih``.

The layer (``xlstm.blocks.slstm.layer.sLSTMLayer``) adds head-wise input projections — its
``LinearHeadwiseExpand`` modules, block-diagonal ``(NH, D, D)`` each, which lstmkit's dense
``weight_ih`` holds exactly — and two things outside lstmkit's cell, refused with the reason:
a causal convolution with SiLU on the input of the i and f gates (``conv1d_kernel_size > 0``,
its default 4) and a per-head layer norm of the output (``group_norm``, always there; pass
``drop_group_norm=True`` to convert the rest and apply the norm yourself). Note that the layer
feeds its ``fgate`` module's output to the input gate and its ``igate`` module's to the forget
gate (``i, f = self.fgate(x), self.igate(x)``): the converter follows what the layer computes.

xLSTM's sLSTM is lstmkit's ``slstm`` (no floor on n; docs/slstm.md lists every difference from
FlashRNN's and lstmkit's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lstmkit._validate import check_bool
from lstmkit.checks import check_dtype
from lstmkit.convert._checks import expect_dense_float, expect_finite_parameters
from lstmkit.layout import GATES
from lstmkit.nn import LSTM

__all__ = ["from_xlstm_slstm"]

_CELL = ("_recurrent_kernel_", "_bias_")
_PROJECTIONS = {"i": "fgate.weight", "f": "igate.weight", "g": "zgate.weight", "o": "ogate.weight"}


def _get(state: Mapping[str, Any], key: str) -> Tensor:
    t = state[key]
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"state_dict[{key!r}]: expected a floating tensor, got {type(t).__name__}"
                        + (f" of {t.dtype}" if isinstance(t, Tensor) else ""))
    expect_dense_float(f"state_dict[{key!r}]", t)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"state_dict[{key!r}]: contains NaN or inf")
    return t.detach()


def from_xlstm_slstm(state_dict: Mapping[str, Any], *, drop_group_norm: bool = False,
                     dtype: torch.dtype | None = None, batch_first: bool = True) -> LSTM:
    """The lstmkit layer computing an xLSTM sLSTM cell or layer from its state dict.

    Args:
        state_dict: of an ``sLSTMCell`` (keys ``_recurrent_kernel_``, ``_bias_``) or an
            ``sLSTMLayer`` (``slstm_cell.…``, ``fgate.weight``, ``igate.weight``, ``zgate.weight``,
            ``ogate.weight``, ``group_norm.weight``; any common prefix, e.g. a block's).
        drop_group_norm: convert a layer without its output's per-head layer norm (which lstmkit's
            cell does not compute): the lstmkit layer's output is then the xLSTM layer's before
            ``group_norm``.
        dtype: of the layer (default: the state dict's, float32 for bfloat16/float16 ones).
        batch_first: the layer's layout (xLSTM's is batch-first).

    Returns:
        ``LSTM(I, H, cell="slstm", heads=NH)``: I = 4H for a cell (its input: the pre-activations,
        ``weight_ih`` the identity), the layer's embedding dimension for a layer. Its state
        ``(h, c, n, m)`` is xLSTM's ``state[0], …, state[3]`` (its state is (4, B, H)), each
        with the layer's leading dimension: ``tuple(state[:, None])``, four (1, B, H).

    Raises:
        ValueError: what lstmkit cannot carry, with the reason (the causal convolution, the group
            norm without ``drop_group_norm``, unknown keys), or inconsistent shapes.
        TypeError: not a mapping of floating tensors.
    """
    check_bool("drop_group_norm", drop_group_norm)
    check_bool("batch_first", batch_first)
    check_dtype(dtype)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    keys = list(state_dict)
    if not all(isinstance(k, str) for k in keys):
        others = [k for k in keys if not isinstance(k, str)]
        raise TypeError(f"state_dict: expected names (str) as keys, got {others[:4]}")
    kernel_keys = [k for k in keys if k.endswith("_recurrent_kernel_")]
    if len(kernel_keys) != 1:
        raise ValueError(f"state_dict: expected one sLSTM cell ('…_recurrent_kernel_'), found {len(kernel_keys)} "
                         f"among {keys[:8]}")
    cell_prefix = kernel_keys[0][: -len("_recurrent_kernel_")]  # "" or "…slstm_cell."
    prefix = cell_prefix.removesuffix("slstm_cell.") if cell_prefix.endswith("slstm_cell.") else cell_prefix
    is_layer = cell_prefix.endswith("slstm_cell.") and f"{prefix}fgate.weight" in state_dict
    if any(k.startswith(f"{prefix}conv1d.") for k in keys):
        raise ValueError("state_dict: the sLSTM layer has a causal convolution (conv1d_kernel_size > 0) with SiLU on "
                         "the input of its i and f gates; lstmkit's gates read x_t itself. Convert a layer built "
                         "with conv1d_kernel_size=0")
    if is_layer and not drop_group_norm:
        raise ValueError("state_dict: the sLSTM layer normalises the cell's output per head (group_norm), outside "
                         "the cell that lstmkit computes; pass drop_group_norm=True to convert the rest (the "
                         "output is then the layer's before group_norm) and apply the norm yourself")
    known = {cell_prefix + k for k in _CELL}
    if is_layer:
        known |= {prefix + k for k in _PROJECTIONS.values()} | {f"{prefix}group_norm.weight"}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"state_dict: keys lstmkit's sLSTM cannot carry: {unknown[:6]} (expected {sorted(known)})")
    missing = sorted(known - {f"{prefix}group_norm.weight"} - set(keys))
    if missing:
        raise ValueError(f"state_dict: missing {missing} (an sLSTM {'layer' if is_layer else 'cell'} has "
                         f"{sorted(known)})")
    R = _get(state_dict, cell_prefix + "_recurrent_kernel_")
    bias = _get(state_dict, cell_prefix + "_bias_")
    if R.dim() != 3:
        raise ValueError(f"_recurrent_kernel_: expected 3 dimensions, got shape {tuple(R.shape)}")
    NH, a, c = R.shape
    if a != 4 * c and c != 4 * a:
        raise ValueError(f"_recurrent_kernel_: expected (NH, 4D, D) (vanilla) or (NH, D, 4D) (cuda), got "
                         f"{tuple(R.shape)}")
    D = min(a, c)
    H = NH * D
    if bias.numel() != 4 * H:
        raise ValueError(f"_bias_: expected {4 * H} values (4 gates × H = {H}), got shape {tuple(bias.shape)}")
    if a == 4 * c:  # vanilla: (NH, 4D, D), [j, g·D + o, i]
        blocks = R.reshape(NH, 4, D, D).permute(1, 0, 2, 3)  # (4, NH, D_out, D_in)
        b = bias.reshape(4, NH, D)  # gate, head, unit
    else:  # cuda: (NH, D, 4D), [j, i, g·D + o]
        blocks = R.reshape(NH, D, 4, D).permute(2, 0, 3, 1)  # (4, NH, D_out, D_in)
        b = bias.reshape(NH, 4, D).permute(1, 0, 2)  # head, gate, unit -> gate, head, unit
    if dtype is None:
        dtype = R.dtype if R.dtype in (torch.float32, torch.float64) else torch.float32
    w_ih = torch.eye(4 * H, dtype=dtype)
    if is_layer:
        parts = []
        for g in GATES:  # weight_ih's row blocks, in lstmkit's gate order
            w = _get(state_dict, prefix + _PROJECTIONS[g])  # (NH, D_out, D_in): head-wise
            if tuple(w.shape) != (NH, D, D):
                raise ValueError(f"{prefix + _PROJECTIONS[g]}: expected (NH, D, D) = {(NH, D, D)} like the cell, "
                                 f"got {tuple(w.shape)}")
            parts.append(torch.block_diag(*w.unbind(0)))  # (H, H): head j reads x's j-th D units
        w_ih = torch.cat(parts, dim=0).to(dtype)  # (4H, E)
    layer = LSTM(w_ih.shape[1], H, cell="slstm", heads=NH, batch_first=batch_first, dtype=dtype)
    with torch.no_grad():
        layer.weight_ih_l0.copy_(w_ih)
        layer.weight_hh_l0.copy_(blocks.reshape(4 * H, D))
        layer.bias_ih_l0.copy_(b.reshape(4 * H))
        layer.bias_hh_l0.zero_()
    expect_finite_parameters(layer, "state_dict")
    return layer
