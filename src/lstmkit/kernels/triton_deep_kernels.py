"""The deep gates' MLPs as Triton kernels, one launch per step each way, for the common shape:
every computed gate deep, each with one hidden layer of the same width n_1 and no layer norm
(``deep=32``; :class:`lstmkit.kernels.triton_deep.DeepGates` decides and runs the others in
torch).

Imported only when such a layer runs on a Triton row (importing it imports triton). The math is
:func:`lstmkit.cell.step`'s, as in :class:`~lstmkit.kernels.triton_deep.DeepGates`: gate k's
first layer is its n_1 columns ``k·n_1 …`` of ``xg`` and ``r = h W_hhᵀ`` (so R = G·n_1), then
``a = φ(xg + r)`` (B, n_1), ``u = a W_kᵀ + b_k`` (B, H) into columns ``k·H …`` of the cell's
pre-activations (B, G·H). ``W_k`` (H × n_1) then ``b_k`` (H) sit gate after gate in the flat
``mlp`` param, WSTRIDE elements apart. Backward: ``da = du_k W_k`` (B, n_1), ``dz = φ'(da, a)``
into ``dxg``'s columns ``k·n_1 …``; the weights' gradients are large GEMMs after the loop.

Constexpr arguments: N1 (n_1) and N1P (n_1 padded to a power of two, at least 16: ``tl.dot``'s
least size), SIGMOID / IDENTITY / RELU (the hidden activation; none: tanh), HAS_BIAS,
KEEP (the forward keeps ``a`` for backward), HAS_LEN (rows past their length keep zeros, as the
CPU kernel's buffer), OP / MMA / CT (the GEMM operand dtype, what ``tl.dot`` sees, the compute
dtype: as :mod:`lstmkit.kernels.triton_kernels`), block sizes BB (batch rows) and BH (cells).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lstmkit.kernels.triton_cell import act, act_grad, dot, sigmoid

__all__ = ["deep_forward", "deep_backward"]


@triton.jit
def _phi(z, SIGMOID: tl.constexpr, IDENTITY: tl.constexpr, RELU: tl.constexpr):
    """The hidden activation: σ, or the cell's own tanh / identity / relu (``triton_cell.act``)."""
    if SIGMOID:
        a = sigmoid(z)
    else:
        a = act(z, IDENTITY, RELU)
    return a


@triton.jit
def _phi_grad(d, a, SIGMOID: tl.constexpr, IDENTITY: tl.constexpr, RELU: tl.constexpr):
    """dL/dz of :func:`_phi` from d = dL/da and a = φ(z)."""
    if SIGMOID:
        dz = d * a * (1.0 - a)
    else:
        dz = act_grad(d, a, IDENTITY, RELU)
    return dz


@triton.jit
def _block(B, N1: tl.constexpr, BB: tl.constexpr, N1P: tl.constexpr):
    """This program's BB batch rows (index, in range, as int64) and the N1P first-layer columns
    (index, real: < N1)."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    k = tl.arange(0, N1P)
    return rows, rows < B, rows.to(tl.int64), k, k < N1


@triton.jit(do_not_specialize=["t"])
def deep_forward(xg, xg_ld, r, w, a_kept, rz, lengths, t, B, H, WSTRIDE,
                 N1: tl.constexpr, N1P: tl.constexpr, SIGMOID: tl.constexpr, IDENTITY: tl.constexpr,
                 RELU: tl.constexpr, HAS_BIAS: tl.constexpr,
                 KEEP: tl.constexpr, HAS_LEN: tl.constexpr, OP: tl.constexpr, MMA: tl.constexpr,
                 CT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Step t (grid: cdiv(B, BB) × cdiv(H, BH) × G): ``xg`` this step's (B, R) rows, xg_ld apart;
    ``r`` (B, R) CT; ``w`` the flat ``mlp`` param; ``a_kept`` this step's (B, G·n_1) rows of the
    ``MLP`` buffer (KEEP; written by the first cell block); ``rz`` (B, G·H) CT, written."""
    g = tl.program_id(2)
    rows, rm, r64, k, km = _block(B, N1, BB, N1P)
    m = rm[:, None] & km[None, :]
    R = tl.num_programs(2) * N1
    col = g * N1 + k[None, :]
    z = tl.load(xg + r64[:, None] * xg_ld + col, mask=m, other=0.0).to(CT) \
        + tl.load(r + r64[:, None] * R + col, mask=m, other=0.0).to(CT)
    a = tl.where(m, _phi(z, SIGMOID, IDENTITY, RELU), 0.0)                                        # (BB, N1P); padding 0
    if KEEP:
        if tl.program_id(1) == 0:
            kept = a
            if HAS_LEN:
                lens = tl.load(lengths + rows, mask=rm, other=0)
                kept = tl.where((t < lens)[:, None], a, 0.0)
            tl.store(a_kept + r64[:, None] * R + col, kept, mask=m)
    hc = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = hc < H
    wt = tl.load(w + g * WSTRIDE + hc[None, :] * N1 + k[:, None], mask=km[:, None] & hm[None, :], other=0.0)
    u = dot(a, wt, OP, MMA).to(CT)                                            # (BB, BH) = a W_kᵀ
    if HAS_BIAS:
        u += tl.load(w + g * WSTRIDE + H * N1 + hc, mask=hm, other=0.0).to(CT)[None, :]
    tl.store(rz + r64[:, None] * (tl.num_programs(2) * H) + g * H + hc[None, :], u, mask=rm[:, None] & hm[None, :])


@triton.jit
def deep_backward(du, w, a_kept, dxg, B, H, WSTRIDE,
                  N1: tl.constexpr, N1P: tl.constexpr, SIGMOID: tl.constexpr, IDENTITY: tl.constexpr,
                  RELU: tl.constexpr, OP: tl.constexpr, MMA: tl.constexpr,
                  CT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Step t backwards (grid: cdiv(B, BB) × G): from the cell kernel's ``du`` (B, G·H) CT and the
    kept ``a`` (B, G·n_1), ``dxg`` (B, G·n_1) CT = φ'(du_k W_k, a) per gate k."""
    g = tl.program_id(1)
    rows, rm, r64, k, km = _block(B, N1, BB, N1P)
    GH = tl.num_programs(1) * H
    da = tl.zeros((BB, N1P), dtype=CT)
    for h0 in range(0, H, BH):
        hc = h0 + tl.arange(0, BH)
        hm = hc < H
        d = tl.load(du + r64[:, None] * GH + g * H + hc[None, :], mask=rm[:, None] & hm[None, :], other=0.0)
        wk = tl.load(w + g * WSTRIDE + hc[:, None] * N1 + k[None, :], mask=hm[:, None] & km[None, :], other=0.0)
        da += dot(d, wk, OP, MMA).to(CT)                                      # (BB, N1P) += d W_k[hc]
    R = tl.num_programs(1) * N1
    m = rm[:, None] & km[None, :]
    a = tl.load(a_kept + r64[:, None] * R + g * N1 + k[None, :], mask=m, other=0.0).to(CT)
    tl.store(dxg + r64[:, None] * R + g * N1 + k[None, :], _phi_grad(da, a, SIGMOID, IDENTITY, RELU), mask=m)
