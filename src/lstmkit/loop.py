"""The general path's loop over layers and directions: stacking, reversal, dropout, state carry.

One other loop stacks layers: a kept signature's fast path on the compiled CPU kernel
(:class:`lstmkit.kernels.fused.PreparedStep`), for forward-only directions, which draws dropout
and zoneout masks as this one does, in the same order, so that a seed gives the same masks on
either path (a test compares them bit for bit).

Each layer-direction is handed to a kernel (:mod:`lstmkit.kernels`), which runs the
time loop — or the whole stack, to a row whose operator runs every layer and direction in
one call (:meth:`lstmkit.kernels.Kernel.run_layers`: torch's). Inputs here are already
time-major, padded and validated (:mod:`lstmkit.nn` does that); ``lengths`` is None when every
sequence has the full length.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmkit import cell, kernels
from lstmkit.kernels import ops
from lstmkit.spec import CellSpec

__all__ = ["StackOut", "run_stack", "reverse_within_lengths"]


class StackOut(NamedTuple):
    """Result of a whole stack of layers."""

    y: Tensor              # (T, B, D·H_out) output of the last layer
    h_n: Tensor            # (L·D, B, H_out)
    c_n: Tensor | None     # (L·D, B, S·H) the cell states side by side (LSTM: c; sLSTM: c, n, m), None for the RNN
    traces: list[list[dict[str, Tensor]]] | None  # [layer][direction] -> per-step activations
    kernel: kernels.Kernel | None = None  # the row that ran the layers


def reverse_within_lengths(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence of ``x`` (T, B, F) within its own length; padding stays put.

    The map is its own inverse, so it also flips a reversed output back.
    """
    if lengths is None:
        return x.flip(0)
    T, B = x.shape[0], x.shape[1]
    t = torch.arange(T).unsqueeze(1)  # (T, 1)
    n = lengths.unsqueeze(0)  # (1, B)
    src = torch.where(t < n, n - 1 - t, t).to(x.device)  # (T, B)
    return x.gather(0, src.unsqueeze(-1).expand(T, B, x.shape[-1]))


def _workload(spec: CellSpec, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
              params: list[list[dict[str, Tensor]]], hidden_size: int) -> kernels.Workload | None:
    """The call as :func:`lstmkit.kernels.select` weighs it; None unless plain eager tensors (under
    compile, export, functorch or autocast every row keeps its device default)."""
    tensors = [x, h0, *(t for layer in params for p in layer for t in p.values())]
    if c0 is not None:
        tensors.append(c0)
    if not ops.plain_eager(tensors):
        return None
    gradient = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return kernels.Workload(kind=spec.kind, steps=x.shape[0], batch=x.shape[1], hidden=hidden_size, dtype=x.dtype,
                            gradient=gradient, lengths=lengths is not None, projection="weight_hr" in params[0][0])


def run_stack(x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
              params: list[list[dict[str, Tensor]]], spec: CellSpec, hidden_size: int,
              dropout: float = 0.0, training: bool = False, backend: str | None = None,
              record: bool = False) -> StackOut:
    """Run ``len(params)`` layers of ``len(params[0])`` directions over ``x``.

    Args:
        x: (T, B, I) time-major, zero-padded input.
        lengths: (B,) int64 on the CPU, or None (all sequences have length T).
        h0: (L·D, B, H_out); c0: (L·D, B, S·H), the cell states side by side
            (:func:`lstmkit.variants.cell_states`), or None for the RNN.
        params: ``params[layer][direction]`` maps names without suffix to tensors.
        dropout: probability of dropout on the input of every layer but the first.
        backend: force a kernel by registry name.
        record: collect per-step activations from the kernels.
    """
    num_dirs = len(params[0])
    forced = backend is not None and not record  # select then returns the named row: no workload to weigh
    workload = None if forced else _workload(spec, x, lengths, h0, c0, params, hidden_size)
    kernel = kernels.select(spec, x.device, x.dtype, backend, record, workload)
    if not record and not spec.has_zoneout:
        whole = kernel.run_layers(x, lengths, h0, c0, params, spec, hidden_size, dropout, training)
        if whole is not None:  # the row ran every layer and direction in one call
            return StackOut(*whole, None, kernel)
    h_out, c_out, traces = [], [], []
    layer_in = x
    for layer, directions in enumerate(params):
        if layer > 0 and dropout > 0.0 and training:
            layer_in = F.dropout(layer_in, p=dropout, training=True)
        ys, layer_traces = [], []
        for direction, p in enumerate(directions):
            k = layer * num_dirs + direction
            inp = layer_in if direction == 0 else reverse_within_lengths(layer_in, lengths)
            keep = None
            if training and spec.has_zoneout:  # (T, B, H), (T, B, H_out)
                T, B = inp.shape[0], inp.shape[1]
                keep = cell.zoneout_masks(spec, (T, B, hidden_size), (T, B, h0.shape[-1]), inp)
            out = kernel.run(inp, lengths, h0[k], None if c0 is None else c0[k], p, spec,
                             hidden_size, record=record, keep=keep)
            y = out.y if direction == 0 else reverse_within_lengths(out.y, lengths)
            ys.append(y)
            h_out.append(out.h_n)
            c_out.append(out.c_n)
            if record:
                trace = out.trace or {}
                if direction == 1:
                    trace = {key: reverse_within_lengths(v, lengths) for key, v in trace.items()}
                layer_traces.append(trace)
        traces.append(layer_traces)
        layer_in = ys[0] if num_dirs == 1 else torch.cat(ys, dim=-1)  # (T, B, D·H_out)
    # (L·D, B, ·) tensors of their own, as nn.LSTM's (a one-layer stack's as views of its kernel's
    # outputs refused h_n.detach_(), which TBPTT loops written for nn.LSTM call)
    h_n, c_n = torch.stack(h_out), None if c0 is None else torch.stack(c_out)
    return StackOut(layer_in, h_n, c_n, traces if record else None, kernel)
