"""The sLSTM's step as Triton helper functions, forward and backward.

The sLSTM (Beck et al. 2024; :func:`lstmkit.cell.slstm_step`, docs/cell.md "The sLSTM") on a
(BB batch rows, BH cells) tile of the per-step kernels of :mod:`lstmkit.kernels.triton_kernels`,
as the CPU kernel's ``slstm_row`` computes it forwards and backwards: the three cell states
``c | n | m`` side by side, (B, 3H), the buffers ``G`` (T, B, 6H: i', f', z, o, ĩ, f̃) and ``C``
(T, B, 3H) of :func:`lstmkit.kernels.abi.buffer_shapes`. The variant word ``FLAGS`` says which
forget activation (``forget_act_exp``) and whether the normaliser has its floor (``n_clamp``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lstmkit.kernels import abi
from lstmkit.kernels.triton_cell import has, ld, sigmoid, slot, st, tanh

#: :func:`lstmkit.kernels.abi.slstm_slot` itself, callable while a kernel is built (as triton_cell's
#: tables: a constexpr function's own body may call no Python built-in method).
_slstm_slot = triton.constexpr_function(abi.slstm_slot)


@triton.constexpr_function
def kept_slot(name: str) -> int:
    """``name``'s slot (H wide) in the sLSTM's row of the gate buffer G (:data:`abi.SLSTM_KEPT`);
    ``"width"``: the row's slots."""
    return _slstm_slot("kept", name)


@triton.constexpr_function
def state_slot(name: str) -> int:
    """``name``'s slot (H wide) among the sLSTM's cell states (:data:`abi.SLSTM_STATES`: c0, the
    carried state and C); ``"width"``: how many there are."""
    return _slstm_slot("states", name)


@triton.jit
def _pre(xg, r, row, rb64, R, col, ch, m2, CT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """A gate's pre-activation xg[row] + r at its columns col.. of R, (BB, BH)."""
    return ld(xg, row, R, col, ch, m2, CT, True, BB, BH) + ld(r, rb64, R, col, ch, m2, CT, True, BB, BH)


@triton.jit
def _log_sigmoid(x):
    """log σ(x) = min(x, 0) − log(1 + e^{−|x|}) (no overflow)."""
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _slstm_kept(u_f, m_prev, FLAGS: tl.constexpr):
    """log f + m_{t-1}: what the forget gate keeps, on the previous step's scale (log f = f̃, or
    log σ(f̃))."""
    if has(FLAGS, "forget_act_exp"):
        lf = u_f
    else:
        lf = _log_sigmoid(u_f)
    return lf + m_prev


@triton.jit
def slstm_fwd(xg, r, c_s, h_s, y, G, C, row, rb64, valid, m2, ch, H, R, FLAGS: tl.constexpr,
              SAVE_G: tl.constexpr, SAVE_C: tl.constexpr, CT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """One sLSTM step (:func:`lstmkit.cell.slstm_step`, the CPU kernel's ``slstm_row``) on a
    (BB, BH) tile: from z = xg[row] + r (ĩ, f̃, z̃, õ in slots 0-3 of R = 4H) and the state
    c_s (B, 3H) = c | n | m, updated in place (carried on rows that are not ``valid``).
    m_t = max(log f + m_{t-1}, ĩ) (ĩ where the cell is empty, n_{t-1} = 0), i' = e^{ĩ − m_t},
    f' = e^{log f + m_{t-1} − m_t} (0 where empty), c_t = f' c + i' tanh(z̃), n_t = f' n + i' (n_clamp: at
    least 1), h_t = σ(õ) c_t / n_t. Writes h_s, y[t], G (T, B, 6H: i', f', z, o, ĩ, f̃; zeros
    on rows not valid) and C (T, B, 3H)."""
    v2 = valid[:, None]
    u_i = _pre(xg, r, row, rb64, R, slot(FLAGS, "i") * H, ch, m2, CT, BB, BH)
    u_f = _pre(xg, r, row, rb64, R, slot(FLAGS, "f") * H, ch, m2, CT, BB, BH)
    u_z = _pre(xg, r, row, rb64, R, slot(FLAGS, "g") * H, ch, m2, CT, BB, BH)
    u_o = _pre(xg, r, row, rb64, R, slot(FLAGS, "o") * H, ch, m2, CT, BB, BH)
    cp = ld(c_s, rb64, state_slot("width") * H, state_slot("c") * H, ch, m2, CT, True, BB, BH)
    np_ = ld(c_s, rb64, state_slot("width") * H, state_slot("n") * H, ch, m2, CT, True, BB, BH)
    mp = ld(c_s, rb64, state_slot("width") * H, state_slot("m") * H, ch, m2, CT, True, BB, BH)
    kept = _slstm_kept(u_f, mp, FLAGS)
    m = tl.where(np_ == 0.0, u_i, tl.maximum(kept, u_i, propagate_nan=tl.PropagateNan.ALL))
    iv = tl.exp(u_i - m)
    fv = tl.where(np_ == 0.0, 0.0, tl.exp(kept - m))  # an empty cell keeps nothing (exp(kept - ĩ) is unbounded)
    z = tanh(u_z)
    o = sigmoid(u_o)
    cn = fv * cp + iv * z
    nn = fv * np_ + iv
    if has(FLAGS, "n_clamp"):
        nn = tl.maximum(nn, 1.0, propagate_nan=tl.PropagateNan.ALL)
    hv = o * (cn / nn)
    cn = tl.where(v2, cn, cp)
    nn = tl.where(v2, nn, np_)
    m = tl.where(v2, m, mp)
    st(c_s, rb64, state_slot("width") * H, state_slot("c") * H, ch, m2, cn, True)
    st(c_s, rb64, state_slot("width") * H, state_slot("n") * H, ch, m2, nn, True)
    st(c_s, rb64, state_slot("width") * H, state_slot("m") * H, ch, m2, m, True)
    st(h_s, rb64, H, 0, ch, v2 & m2, hv, True)
    st(y, row, H, 0, ch, m2, tl.where(v2, hv, 0.0), True)
    st(G, row, kept_slot("width") * H, kept_slot("i") * H, ch, m2, tl.where(v2, iv, 0.0), SAVE_G)
    st(G, row, kept_slot("width") * H, kept_slot("f") * H, ch, m2, tl.where(v2, fv, 0.0), SAVE_G)
    st(G, row, kept_slot("width") * H, kept_slot("g") * H, ch, m2, tl.where(v2, z, 0.0), SAVE_G)
    st(G, row, kept_slot("width") * H, kept_slot("o") * H, ch, m2, tl.where(v2, o, 0.0), SAVE_G)
    st(G, row, kept_slot("width") * H, kept_slot("i_raw") * H, ch, m2, tl.where(v2, u_i, 0.0), SAVE_G)
    st(G, row, kept_slot("width") * H, kept_slot("f_raw") * H, ch, m2, tl.where(v2, u_f, 0.0), SAVE_G)
    st(C, row, state_slot("width") * H, state_slot("c") * H, ch, m2, cn, SAVE_C)
    st(C, row, state_slot("width") * H, state_slot("n") * H, ch, m2, nn, SAVE_C)
    st(C, row, state_slot("width") * H, state_slot("m") * H, ch, m2, m, SAVE_C)


@triton.jit
def slstm_bwd(G, C, c0, dc_s, dxg, dop, dh, row, rb64, t, B, valid, m2, ch, H, R, FLAGS: tl.constexpr,
              SEP_OP: tl.constexpr, CT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """One sLSTM step backwards (the CPU kernel's ``slstm_row`` of BPTT) on a (BB, BH) tile:
    dh = dL/dh_t (zero on rows not valid); dc_s (B, 3H) holds dL/d(c_t, n_t, m_t) and becomes
    dL/d(c_{t-1}, n_{t-1}, m_{t-1}) on valid rows (the others carry it). The stabiliser's max
    is differentiated as computed: dL/dm_t goes to the larger of ĩ and log f + m_{t-1} (half to
    each at a tie; all to ĩ where the cell was empty). Writes dL/d(ĩ, f̃, z̃, õ) to dxg[row] (and
    dop, the next GEMM's 16-bit operand, if SEP_OP); zeros on rows not valid."""
    v2 = valid[:, None]
    iv = ld(G, row, kept_slot("width") * H, kept_slot("i") * H, ch, m2, CT, True, BB, BH)
    fv = ld(G, row, kept_slot("width") * H, kept_slot("f") * H, ch, m2, CT, True, BB, BH)
    z = ld(G, row, kept_slot("width") * H, kept_slot("g") * H, ch, m2, CT, True, BB, BH)
    o = ld(G, row, kept_slot("width") * H, kept_slot("o") * H, ch, m2, CT, True, BB, BH)
    u_i = ld(G, row, kept_slot("width") * H, kept_slot("i_raw") * H, ch, m2, CT, True, BB, BH)
    u_f = ld(G, row, kept_slot("width") * H, kept_slot("f_raw") * H, ch, m2, CT, True, BB, BH)
    cn = ld(C, row, state_slot("width") * H, state_slot("c") * H, ch, m2, CT, True, BB, BH)
    nn = ld(C, row, state_slot("width") * H, state_slot("n") * H, ch, m2, CT, True, BB, BH)
    if t > 0:
        cp = ld(C, row - B, state_slot("width") * H, state_slot("c") * H, ch, m2, CT, True, BB, BH)
        np_ = ld(C, row - B, state_slot("width") * H, state_slot("n") * H, ch, m2, CT, True, BB, BH)
        mp = ld(C, row - B, state_slot("width") * H, state_slot("m") * H, ch, m2, CT, True, BB, BH)
    else:
        cp = ld(c0, rb64, state_slot("width") * H, state_slot("c") * H, ch, m2, CT, True, BB, BH)
        np_ = ld(c0, rb64, state_slot("width") * H, state_slot("n") * H, ch, m2, CT, True, BB, BH)
        mp = ld(c0, rb64, state_slot("width") * H, state_slot("m") * H, ch, m2, CT, True, BB, BH)
    nn = tl.where(v2, nn, 1.0)                       # rows not valid: any carried n, even an empty cell's 0
    ratio = cn / nn                                  # h = o (c / n)
    dcv = ld(dc_s, rb64, state_slot("width") * H, state_slot("c") * H, ch, m2, CT, True, BB, BH) + dh * o / nn
    dnv = ld(dc_s, rb64, state_slot("width") * H, state_slot("n") * H, ch, m2, CT, True, BB, BH) - dh * o * ratio / nn
    du_o = dh * ratio * o * (1.0 - o)
    if has(FLAGS, "n_clamp"):                        # the floor holds n: no gradient through it
        dnv = tl.where(fv * np_ + iv >= 1.0, dnv, 0.0)
    di = dcv * z + dnv                               # c_t = f' c + i' z, n_t = f' n + i'
    df = dcv * cp + dnv * np_
    du_z = dcv * iv * (1.0 - z * z)
    dm = ld(dc_s, rb64, state_slot("width") * H, state_slot("m") * H, ch, m2, CT, True, BB, BH) - di * iv - df * fv
    kept = _slstm_kept(u_f, mp, FLAGS)
    to_i = tl.where(u_i > kept, 1.0, tl.where(u_i == kept, 0.5, 0.0))
    to_i = tl.where(np_ == 0.0, 1.0, to_i)
    du_i = di * iv + dm * to_i
    dkept = df * fv + dm * (1.0 - to_i)
    if has(FLAGS, "forget_act_exp"):
        du_f = dkept
    else:
        du_f = dkept * (1.0 - sigmoid(u_f))
    du_i = tl.where(v2, du_i, 0.0)
    du_f = tl.where(v2, du_f, 0.0)
    du_z = tl.where(v2, du_z, 0.0)
    du_o = tl.where(v2, du_o, 0.0)
    st(dxg, row, R, slot(FLAGS, "i") * H, ch, m2, du_i, True)
    st(dxg, row, R, slot(FLAGS, "f") * H, ch, m2, du_f, True)
    st(dxg, row, R, slot(FLAGS, "g") * H, ch, m2, du_z, True)
    st(dxg, row, R, slot(FLAGS, "o") * H, ch, m2, du_o, True)
    st(dop, rb64, R, slot(FLAGS, "i") * H, ch, m2, du_i, SEP_OP)
    st(dop, rb64, R, slot(FLAGS, "f") * H, ch, m2, du_f, SEP_OP)
    st(dop, rb64, R, slot(FLAGS, "g") * H, ch, m2, du_z, SEP_OP)
    st(dop, rb64, R, slot(FLAGS, "o") * H, ch, m2, du_o, SEP_OP)
    vm2 = v2 & m2
    st(dc_s, rb64, state_slot("width") * H, state_slot("c") * H, ch, vm2, dcv * fv, True)
    st(dc_s, rb64, state_slot("width") * H, state_slot("n") * H, ch, vm2, dnv * fv, True)
    st(dc_s, rb64, state_slot("width") * H, state_slot("m") * H, ch, vm2, dkept, True)
