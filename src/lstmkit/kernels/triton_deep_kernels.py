"""The deep gates' MLPs as Triton kernels, one launch per step each way, for the common shapes:
every deep gate with one hidden layer, all of the same width n_1, no layer norm — every computed
gate (``deep=32``) or some (``gate_hidden={"f": (32,)}``, the others shallow) —
(:class:`lstmkit.kernels.triton_deep.DeepGates` decides and runs the others in torch).

Imported only when such a layer runs on a Triton row (importing it imports triton). The math is
:func:`lstmkit.cell.step`'s, as in :class:`~lstmkit.kernels.triton_deep.DeepGates`. The computed
gates sit in ``R`` slot by slot, a deep gate n_1 columns wide, a shallow one H (so R = D·n_1 +
(G − D)·H for D deep gates of G). A deep gate's first layer is its n_1 columns of ``xg`` and
``r = h W_hhᵀ``, then ``a = φ(xg + r)`` (B, n_1), ``u = a W_kᵀ + b_k`` (B, H) into columns
``slot·H …`` of the cell's pre-activations (B, G·H); a shallow gate's ``u`` is its ``xg + r``.
The d-th deep gate's ``W_d`` (H × n_1) then ``b_d`` (H) sit WSTRIDE·d elements into the flat
``mlp`` param, its ``a`` in columns ``d·n_1 …`` of the ``MLP`` buffer (ATOT = D·n_1 wide).
Backward: ``da = du_d W_d`` (B, n_1), ``dz = φ'(da, a)`` into ``dxg``'s columns; a shallow gate's
``dxg`` is its ``du``; the weights' gradients are large GEMMs after the loop.

Constexpr arguments: N1 (n_1) and N1P (n_1 padded to a power of two, at least 16: ``tl.dot``'s
least size), DEEP (bit s set: the gate in slot s is deep) and SHALLOW (some computed gate is not:
without, no branch is compiled), SIGMOID / IDENTITY / RELU (the hidden activation; none: tanh),
HAS_BIAS, KEEP (the forward keeps ``a`` for backward), HAS_LEN (rows past their length keep
zeros, as the CPU kernel's buffer), OP / MMA / CT (the GEMM operand dtype, what ``tl.dot`` sees,
the compute dtype: as :mod:`lstmkit.kernels.triton_kernels`), block sizes BB (batch rows) and BH
(cells).
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
def _gate(g, H, N1: tl.constexpr, DEEP: tl.constexpr):
    """The gate in slot g (a runtime index): its first column in R, its index d among the deep
    gates, and whether it is deep (1) or shallow (0)."""
    col = g * 0
    d = g * 0
    deep = g * 0
    for k in tl.static_range(4):
        if (DEEP >> k) & 1:
            col += tl.where(g > k, N1, 0)
            d += tl.where(g > k, 1, 0)
            deep += tl.where(g == k, 1, 0)
        else:
            col += tl.where(g > k, H, 0)
    return col, d, deep


@triton.jit
def _deep_forward_tile(xg, xg_ld, r, w, a_kept, rz, lengths, t, g, rows, rm, r64, col0, d, H, R, ATOT, WSTRIDE,
                       N1: tl.constexpr, N1P: tl.constexpr, SIGMOID: tl.constexpr, IDENTITY: tl.constexpr,
                       RELU: tl.constexpr, HAS_BIAS: tl.constexpr, KEEP: tl.constexpr, HAS_LEN: tl.constexpr,
                       OP: tl.constexpr, MMA: tl.constexpr, CT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """A deep gate's (BB, BH) tile of u = φ(xg + r) W_dᵀ + b_d (its first layer's columns col0 …) into
    columns g·H … of rz (B, G·H) (the store's addresses made at the end: held through the dot, a
    (BB, BH) block of pointers would take registers)."""
    k = tl.arange(0, N1P)
    km = k < N1
    m = rm[:, None] & km[None, :]
    col = col0 + k[None, :]
    z = tl.load(xg + r64[:, None] * xg_ld + col, mask=m, other=0.0).to(CT) \
        + tl.load(r + r64[:, None] * R + col, mask=m, other=0.0).to(CT)
    a = tl.where(m, _phi(z, SIGMOID, IDENTITY, RELU), 0.0)                                        # (BB, N1P); padding 0
    if KEEP:
        if tl.program_id(1) == 0:
            kept = a
            if HAS_LEN:
                lens = tl.load(lengths + rows, mask=rm, other=0)
                kept = tl.where((t < lens)[:, None], a, 0.0)
            tl.store(a_kept + r64[:, None] * ATOT + d * N1 + k[None, :], kept, mask=m)
    hc = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = hc < H
    wt = tl.load(w + d * WSTRIDE + hc[None, :] * N1 + k[:, None], mask=km[:, None] & hm[None, :], other=0.0)
    u = dot(a, wt, OP, MMA).to(CT)                                            # (BB, BH) = a W_dᵀ
    if HAS_BIAS:
        u += tl.load(w + d * WSTRIDE + H * N1 + hc, mask=hm, other=0.0).to(CT)[None, :]
    tl.store(rz + r64[:, None] * (tl.num_programs(2) * H) + g * H + hc[None, :], u, mask=rm[:, None] & hm[None, :])


@triton.jit(do_not_specialize=["t"])
def deep_forward(xg, xg_ld, r, w, a_kept, rz, lengths, t, B, H, R, ATOT, WSTRIDE,
                 N1: tl.constexpr, N1P: tl.constexpr, DEEP: tl.constexpr, SHALLOW: tl.constexpr,
                 SIGMOID: tl.constexpr, IDENTITY: tl.constexpr,
                 RELU: tl.constexpr, HAS_BIAS: tl.constexpr,
                 KEEP: tl.constexpr, HAS_LEN: tl.constexpr, OP: tl.constexpr, MMA: tl.constexpr,
                 CT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Step t (grid: cdiv(B, BB) × cdiv(H, BH) × G): ``xg`` this step's (B, R) rows, xg_ld apart;
    ``r`` (B, R) CT; ``w`` the flat ``mlp`` param; ``a_kept`` this step's (B, ATOT) rows of the
    ``MLP`` buffer (KEEP; written by the first cell block); ``rz`` (B, G·H) CT, written."""
    g = tl.program_id(2)
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    rm = rows < B
    r64 = rows.to(tl.int64)
    if SHALLOW:
        col0, d, deep = _gate(g, H, N1, DEEP)
        if deep == 0:  # a shallow gate: u = xg + r on its H columns, 16 rows at a time (few registers)
            hc = tl.program_id(1) * BH + tl.arange(0, BH)
            hm = hc < H
            for b0 in tl.static_range(0, BB, 16):
                sub = tl.program_id(0) * BB + b0 + tl.arange(0, 16)
                s64 = sub.to(tl.int64)
                mh = (sub < B)[:, None] & hm[None, :]
                col = col0 + hc[None, :]
                u = tl.load(xg + s64[:, None] * xg_ld + col, mask=mh, other=0.0).to(CT) \
                    + tl.load(r + s64[:, None] * R + col, mask=mh, other=0.0).to(CT)
                tl.store(rz + s64[:, None] * (tl.num_programs(2) * H) + g * H + hc[None, :], u, mask=mh)
        else:
            _deep_forward_tile(xg, xg_ld, r, w, a_kept, rz, lengths, t, g, rows, rm, r64, col0, d, H, R, ATOT,
                               WSTRIDE, N1, N1P, SIGMOID, IDENTITY, RELU, HAS_BIAS, KEEP, HAS_LEN, OP, MMA, CT, BB, BH)
    else:  # every gate deep: gate g's columns g·n_1 … in R and in the MLP buffer alike (ATOT = R)
        _deep_forward_tile(xg, xg_ld, r, w, a_kept, rz, lengths, t, g, rows, rm, r64, g * N1, g, H, R, R,
                           WSTRIDE, N1, N1P, SIGMOID, IDENTITY, RELU, HAS_BIAS, KEEP, HAS_LEN, OP, MMA, CT, BB, BH)


@triton.jit
def _deep_backward_rows(du, w, a_kept, dxg, rm, r64, g, col0, d, H, R, ATOT, WSTRIDE, GH,
                        N1: tl.constexpr, N1P: tl.constexpr, SIGMOID: tl.constexpr, IDENTITY: tl.constexpr,
                        RELU: tl.constexpr, OP: tl.constexpr, MMA: tl.constexpr, CT: tl.constexpr,
                        BB: tl.constexpr, BH: tl.constexpr):
    """A deep gate's BB rows of dxg = φ'(du_d W_d, a) (its first layer's columns col0 …)."""
    k = tl.arange(0, N1P)
    km = k < N1
    da = tl.zeros((BB, N1P), dtype=CT)
    for h0 in range(0, H, BH):
        hc = h0 + tl.arange(0, BH)
        hm = hc < H
        d_u = tl.load(du + r64[:, None] * GH + g * H + hc[None, :], mask=rm[:, None] & hm[None, :], other=0.0)
        wk = tl.load(w + d * WSTRIDE + hc[:, None] * N1 + k[None, :], mask=hm[:, None] & km[None, :], other=0.0)
        da += dot(d_u, wk, OP, MMA).to(CT)                                    # (BB, N1P) += du W_d[hc]
    m = rm[:, None] & km[None, :]
    a = tl.load(a_kept + r64[:, None] * ATOT + d * N1 + k[None, :], mask=m, other=0.0).to(CT)
    tl.store(dxg + r64[:, None] * R + col0 + k[None, :], _phi_grad(da, a, SIGMOID, IDENTITY, RELU), mask=m)


@triton.jit
def deep_backward(du, w, a_kept, dxg, B, H, R, ATOT, WSTRIDE,
                  N1: tl.constexpr, N1P: tl.constexpr, DEEP: tl.constexpr, SHALLOW: tl.constexpr,
                  SIGMOID: tl.constexpr, IDENTITY: tl.constexpr,
                  RELU: tl.constexpr, OP: tl.constexpr, MMA: tl.constexpr,
                  CT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Step t backwards (grid: cdiv(B, BB) × G): from the cell kernel's ``du`` (B, G·H) CT and the
    kept ``a`` (B, ATOT), ``dxg`` (B, R) CT = φ'(du_d W_d, a) per deep gate d, du itself per
    shallow gate."""
    g = tl.program_id(1)
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    rm = rows < B
    r64 = rows.to(tl.int64)
    GH = tl.num_programs(1) * H
    if SHALLOW:
        col0, d, deep = _gate(g, H, N1, DEEP)
        if deep == 0:  # a shallow gate: dxg = du on its H columns, 16 rows at a time (few registers)
            for h0 in range(0, H, BH):
                hc = h0 + tl.arange(0, BH)
                for b0 in tl.static_range(0, BB, 16):
                    sub = tl.program_id(0) * BB + b0 + tl.arange(0, 16)
                    s64 = sub.to(tl.int64)
                    mh = (sub < B)[:, None] & (hc < H)[None, :]
                    d_u = tl.load(du + s64[:, None] * GH + g * H + hc[None, :], mask=mh, other=0.0)
                    tl.store(dxg + s64[:, None] * R + col0 + hc[None, :], d_u, mask=mh)
        else:
            _deep_backward_rows(du, w, a_kept, dxg, rm, r64, g, col0, d, H, R, ATOT, WSTRIDE, GH, N1, N1P, SIGMOID,
                                IDENTITY, RELU, OP, MMA, CT, BB, BH)
    else:  # every gate deep (as deep_forward)
        _deep_backward_rows(du, w, a_kept, dxg, rm, r64, g, g * N1, g, H, R, R, WSTRIDE, GH, N1, N1P, SIGMOID,
                            IDENTITY, RELU, OP, MMA, CT, BB, BH)
