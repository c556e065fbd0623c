"""The recurrence as Triton kernels: one step's math once, two ways to run the time loop.

Imported only when a Triton row runs (``import lstmkit`` never imports triton). The
launches, buffers and after-loop reductions are in :mod:`lstmkit.kernels.triton_impl`;
what is computed is :mod:`lstmkit.cell`'s step, the CPU kernel's forward and BPTT.

Shapes (T steps, B batch, H cells, H_out = P or H, R = Σ n_k rows of the computed gates' first
layers (G·H for G computed gates without deep gates),
NSH = |S|·H for the sigmoid gates S of fgr). Every tile is (BB rows of the batch, BH cells)
or (BB, BO) for H_out; one gate's columns in an (·, R) matrix are ``slot·H + cell``.

* **persistent** (:func:`persistent_forward`, :func:`persistent_backward`): one program per
  BB batch rows runs the whole time loop; ``W_hh`` (and ``W_gg``, ``W_hr``) are loaded once,
  before the loop, and stay on chip; the recurrent GEMM of a step is ``tl.dot`` on the
  state tile. Needs the whole state of a row in one program (BH ≥ H, BO ≥ H_out).
* **per step** (:func:`step_forward`, :func:`step_backward`): the caller runs the time loop,
  one cuBLAS GEMM per step for ``h W_hhᵀ`` (and ``s W_ggᵀ``, ``m W_hrᵀ``), then one of these
  pointwise kernels over a (batch block, cell block) grid; layernorm needs a whole row
  per program (one cell block).

Both call the same step helpers (:mod:`lstmkit.kernels.triton_cell`), which also write
the buffers (:data:`lstmkit.kernels.abi.BUFFERS`: G, C, RH, RS, AH, AS, CN) with the CPU
kernel's meaning: rows past a sequence's length hold zeros (C and CN: the carried c).

Zoneout: the cell computes c̃_t and h̃_t as without it (h̃ from c̃, projection included), then
``c_t = c̃ + d_c (c_{t-1} − c̃)``, ``h_t = h̃ + d_h (h_{t-1} − h̃)`` with d the training masks
``keep_c`` (T, B, H), ``keep_h`` (T, B, H_out) (HAS_KEEP) or, at evaluation, the scalars
``zc``, ``zh``; CN keeps c̃. Backward, with dh, dc the gradients of the zoned states: d_h·dh
goes straight to h_{t-1}, d_c·dc to c_{t-1}, the rest to the cell (c̃ read from CN).

Constexpr arguments (from the launch plan of ``triton_impl``): FLAGS, the variant's flag word
(:func:`lstmkit.kernels.abi.flags`; the kernels decode it while they are built, through
:func:`~lstmkit.kernels.triton_cell.has`, :func:`~lstmkit.kernels.triton_cell.slot` — a gate's
slot in R, -1 absent — and :func:`~lstmkit.kernels.triton_cell.fgr_slot`); PROJ (a
projection); HAS_BIAS, HAS_LEN, HAS_KEEP, HAS_DY (the call has layernorm's bias, lengths,
zoneout's masks, an output gradient); READY (per step: ``r`` holds the gates' whole pre-activations,
layer norms included, and ``xg`` is not read — deep gates, whose MLPs the caller runs); CT (compute dtype:
float32, or float64), OP (dtype of a GEMM
operand: the layer's), MMA (the dtype ``tl.dot`` sees: OP, except float32 for 16-bit OP in
the interpreter, whose dot cannot take bfloat16; the products are exact in float32 either
way); EPS (layer-norm epsilon); block sizes BB, BH, BO.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lstmkit.kernels.triton_cell import (
    bwd_core,
    dot,
    fgr_in,
    fgr_slot,
    fwd_core,
    has,
    keep_tile,
    ld,
    ld_dy,
    persistent_block,
    recurrent_tiles,
    rnn_act,
    rnn_act_bwd,
    saved_cells,
    scalar,
    seq_lengths,
    slot,
    st,
    step_gates,
    tile_block,
)
from lstmkit.kernels.triton_slstm import slstm_bwd, slstm_fwd

# ----------------------------------------------------------------------------- persistent


@triton.jit
def persistent_forward(
        xg, w_hh, h0, c0, lengths, p_i, p_f, p_o, w_gg, g_hh, c_w, c_b, w_hr, g_ih, bias, keep_c, keep_h,
        y, h_n, c_n, G, C, RH, RS, AH, AS, CN,
        T, B, H, HO, R, NG, NSH, clip: tl.float64, zc: tl.float64, zh: tl.float64,
        FLAGS: tl.constexpr, PROJ: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr,
        HAS_KEEP: tl.constexpr, SAVE_G: tl.constexpr, SAVE_C: tl.constexpr, SAVE_LN: tl.constexpr,
        CT: tl.constexpr, OP: tl.constexpr, MMA: tl.constexpr, EPS: tl.constexpr,
        BB: tl.constexpr, BH: tl.constexpr, BO: tl.constexpr):
    """The whole forward of BB sequences (grid: cdiv(B, BB)). xg (T, B, R), w_hh (R, HO),
    h0 (B, HO), c0 (B, H), lengths (B,) int32, zoneout's masks keep_c (T, B, H) and keep_h
    (T, B, HO) (HAS_KEEP; else the scalars zc, zh); y (T, B, HO), h_n (B, HO), c_n (B, H);
    buffers (T, B, ·). The weights are read once, into (BO, BH) tiles per gate."""
    clip, zc, zh = scalar(clip, CT), scalar(zc, CT), scalar(zh, CT)
    RNN: tl.constexpr = has(FLAGS, "rnn")
    FGR: tl.constexpr = has(FLAGS, "fgr")
    pid = tl.program_id(0)
    rb, rm, rb64, ch, cm, co, om, m2, mo2 = persistent_block(pid, B, H, HO, BB, BH, BO)
    lens = seq_lengths(lengths, rb, rm, T, HAS_LEN, BB)
    w_i, w_f, w_g, w_o, q_ii, q_if, q_io, q_fi, q_ff, q_fo, q_oi, q_of, q_oo = recurrent_tiles(
        w_hh, w_gg, H, HO, NSH, co, ch, cm, om, FLAGS, OP, BO, BH)  # (BO, BH); fgr: (BH, BH)
    if PROJ:  # (BH, BO): [c, p] = W_hr[p, c]
        w_r = tl.load(w_hr + co[None, :] * H + ch[:, None], mask=cm[:, None] & om[None, :], other=0.0).to(OP)
    else:
        w_r = tl.zeros((BH, BO), OP)
    h = tl.load(h0 + rb64[:, None] * HO + co[None, :], mask=mo2, other=0.0).to(CT)  # (BB, BO)
    c = ld(c0, rb64, H, 0, ch, m2, CT, not RNN, BB, BH)  # (BB, BH)
    s_i = tl.zeros((BB, BH), CT)
    s_f = tl.zeros((BB, BH), CT)
    s_o = tl.zeros((BB, BH), CT)
    for t in range(T):
        valid = rm & (t < lens)
        v2 = valid[:, None]
        row = rb64 + t * B
        if RNN:
            u = ld(xg, row, R, 0, ch, m2, CT, True, BB, BH) + dot(h, w_g, OP, MMA).to(CT)
            hn = rnn_act(u, FLAGS)
            hn = tl.where(cm[None, :], hn, 0.0)
            h = tl.where(v2, hn, h)
            st(y, row, HO, 0, ch, m2, tl.where(v2, hn, 0.0), True)
        else:
            zero = tl.zeros((BB, BH), CT)
            r_i = zero
            r_f = zero
            r_o = zero
            if slot(FLAGS, "i") >= 0:
                r_i = dot(h, w_i, OP, MMA).to(CT)
            if slot(FLAGS, "f") >= 0:
                r_f = dot(h, w_f, OP, MMA).to(CT)
            r_g = dot(h, w_g, OP, MMA).to(CT)
            if slot(FLAGS, "o") >= 0:
                r_o = dot(h, w_o, OP, MMA).to(CT)
            f_i = zero
            f_f = zero
            f_o = zero
            if fgr_slot(FLAGS, "i") >= 0:
                f_i = fgr_in(s_i, s_f, s_o, q_ii, q_if, q_io, FLAGS, OP, MMA)
            if fgr_slot(FLAGS, "f") >= 0:
                f_f = fgr_in(s_i, s_f, s_o, q_fi, q_ff, q_fo, FLAGS, OP, MMA)
            if fgr_slot(FLAGS, "o") >= 0:
                f_o = fgr_in(s_i, s_f, s_o, q_oi, q_of, q_oo, FLAGS, OP, MMA)
            i, f, o, c, hm = fwd_core(xg, row, r_i, r_f, r_g, r_o, f_i, f_f, f_o, c, valid, rm, ch, cm, H, clip,
                                       zc, p_i, p_f, p_o, g_hh, c_w, c_b, g_ih, bias, keep_c, G, C, CN, RH, RS, AH,
                                       AS, R, NG, FLAGS, HAS_BIAS, HAS_KEEP, SAVE_G, SAVE_C, SAVE_LN, False, CT, EPS,
                                       BB, BH)
            if FGR:
                s_i = tl.where(v2, i, s_i)
                s_f = tl.where(v2, f, s_f)
                s_o = tl.where(v2, o, s_o)
            if PROJ:
                yv = dot(hm, w_r, OP, MMA).to(CT)  # (BB, BO)
            else:
                yv = hm
            if has(FLAGS, "zoneout"):  # h_t = h̃ + d_h (h_{t-1} − h̃), after the projection
                yv += keep_tile(keep_h, row, HO, co, mo2, zh, HAS_KEEP, CT, BB, BO) * (h - yv)
            h = tl.where(v2, yv, h)
            st(y, row, HO, 0, co, mo2, tl.where(v2, yv, 0.0), True)
    st(h_n, rb64, HO, 0, co, mo2, h, True)
    st(c_n, rb64, H, 0, ch, m2, c, not RNN)


@triton.jit
def persistent_backward(
        dy, dy_s0, dy_s1, dy_s2, dh_n, dc_n, y, c0, w_hh, w_gg, w_hr, lengths,
        p_i, p_f, p_o, g_hh, c_w, c_b, g_ih, bias, keep_c, keep_h, G, C, RH, RS, AH, AS, CN,
        dxg, dr, dzs, dhp, mo, dh0, dc0, acc,
        T, B, H, HO, R, NG, NSH, NACC, clip: tl.float64, zc: tl.float64, zh: tl.float64,
        FLAGS: tl.constexpr, PROJ: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_LEN: tl.constexpr, HAS_DY: tl.constexpr, HAS_KEEP: tl.constexpr,
        CT: tl.constexpr, OP: tl.constexpr, MMA: tl.constexpr, EPS: tl.constexpr,
        BB: tl.constexpr, BH: tl.constexpr, BO: tl.constexpr):
    """BPTT of BB sequences (grid: cdiv(B, BB)), steps T-1 … 0, the weights on chip.
    Writes dxg (T, B, R), dR (layernorm), dZS (layernorm + fgr), dHP and MO (projection:
    the gradient of the projected h̃_t W_hrᵀ, zero on invalid rows, and h̃_t), dh0 (B, HO),
    dc0 (B, H) and this program's row of ``acc`` (cdiv(B, BB), NACC). The carried dh, dc
    are the gradients of the states h_t, c_t (zoneout: of the zoned states; d_h·dh goes
    straight to h_{t-1})."""
    clip, zc, zh = scalar(clip, CT), scalar(zc, CT), scalar(zh, CT)
    RNN: tl.constexpr = has(FLAGS, "rnn")
    pid = tl.program_id(0)
    rb, rm, rb64, ch, cm, co, om, m2, mo2 = persistent_block(pid, B, H, HO, BB, BH, BO)
    lens = seq_lengths(lengths, rb, rm, T, HAS_LEN, BB)
    w_i, w_f, w_g, w_o, q_ii, q_if, q_io, q_fi, q_ff, q_fo, q_oi, q_of, q_oo = recurrent_tiles(
        w_hh, w_gg, H, HO, NSH, co, ch, cm, om, FLAGS, OP, BO, BH)  # dh = Σ_k dz_k w_kᵀ
    if PROJ:  # (BO, BH): W_hr itself, dh̃ = dy W_hr
        w_r = tl.load(w_hr + co[:, None] * H + ch[None, :], mask=om[:, None] & cm[None, :], other=0.0).to(OP)
    else:
        w_r = tl.zeros((BO, BH), OP)
    acc_row = acc + pid * NACC
    dh = tl.load(dh_n + rb64[:, None] * HO + co[None, :], mask=mo2, other=0.0).to(CT)  # carried, (BB, BO)
    dc = ld(dc_n, rb64, H, 0, ch, m2, CT, not RNN, BB, BH)
    ds_i = tl.zeros((BB, BH), CT)
    ds_f = tl.zeros((BB, BH), CT)
    ds_o = tl.zeros((BB, BH), CT)
    for k in range(T):
        t = T - 1 - k
        valid = rm & (t < lens)
        v2 = valid[:, None]
        row = rb64 + t * B
        dht = tl.where(v2, ld_dy(dy, t, rb64, co, mo2, dy_s0, dy_s1, dy_s2, CT, HAS_DY, BB, BO) + dh, 0.0)
        if RNN:
            du = rnn_act_bwd(y, row, HO, ch, m2, dht, FLAGS, CT, BB, BH)
            st(dxg, row, R, 0, ch, m2, du, True)
            dh = tl.where(v2, dot(du, tl.trans(w_g), OP, MMA).to(CT), dh)
        else:
            if has(FLAGS, "zoneout"):  # h_t = h̃ + d_h (h_{t-1} − h̃): h_{t-1} gets d_h·dh, h̃ the rest
                dhz = keep_tile(keep_h, row, HO, co, mo2, zh, HAS_KEEP, CT, BB, BO) * dht  # (BB, BO)
                dht -= dhz
            if PROJ:
                st(dhp, row, HO, 0, co, mo2, dht, True)
                dhm = dot(dht, w_r, OP, MMA).to(CT)  # (BB, BH)
            else:
                dhm = dht
            cc, cp = saved_cells(C, CN, c0, row, rb64, t, B, H, ch, m2, FLAGS, CT, BB, BH)
            i, f, g, o = step_gates(G, AH, RH, row, R, rm, ch, cm, H, cp, clip, p_i, p_f, p_o, c_w, c_b, g_ih, g_hh,
                                    bias, FLAGS, HAS_BIAS, False, CT, EPS, BB, BH)
            d_i, d_f, d_g, d_o, u_i, u_f, u_o, dcp = bwd_core(
                i, f, g, o, cc, cp, dhm, tl.where(v2, dc, 0.0), tl.where(v2, ds_i, 0.0), tl.where(v2, ds_f, 0.0),
                tl.where(v2, ds_o, 0.0), valid, rm, ch, cm, H, clip, zc, p_i, p_f, p_o, c_w, c_b, g_ih, g_hh, keep_c,
                AH, AS, RH, RS, dxg, dr, dzs, mo, acc_row, row, R, NG, NSH, FLAGS, PROJ, HAS_BIAS, HAS_KEEP, False, CT,
                EPS, BB, BH)
            dn = dot(d_g, tl.trans(w_g), OP, MMA).to(CT)  # (BB, BO)
            if slot(FLAGS, "i") >= 0:
                dn += dot(d_i, tl.trans(w_i), OP, MMA).to(CT)
            if slot(FLAGS, "f") >= 0:
                dn += dot(d_f, tl.trans(w_f), OP, MMA).to(CT)
            if slot(FLAGS, "o") >= 0:
                dn += dot(d_o, tl.trans(w_o), OP, MMA).to(CT)
            if has(FLAGS, "zoneout"):
                dn += dhz
            dh = tl.where(v2, dn, dh)
            dc = tl.where(v2, dcp, dc)
            # fgr: ds_j = Σ_k du_k W_gg[k, j]
            if fgr_slot(FLAGS, "i") >= 0:
                ds_i = tl.where(v2, fgr_in(u_i, u_f, u_o, tl.trans(q_ii), tl.trans(q_fi), tl.trans(q_oi),
                                           FLAGS, OP, MMA), ds_i)
            if fgr_slot(FLAGS, "f") >= 0:
                ds_f = tl.where(v2, fgr_in(u_i, u_f, u_o, tl.trans(q_if), tl.trans(q_ff), tl.trans(q_of),
                                           FLAGS, OP, MMA), ds_f)
            if fgr_slot(FLAGS, "o") >= 0:
                ds_o = tl.where(v2, fgr_in(u_i, u_f, u_o, tl.trans(q_io), tl.trans(q_fo), tl.trans(q_oo),
                                           FLAGS, OP, MMA), ds_o)
    st(dh0, rb64, HO, 0, co, mo2, dh, True)
    st(dc0, rb64, H, 0, ch, m2, dc, not RNN)


# ----------------------------------------------------------------------------- per step


@triton.jit(do_not_specialize=["t"])
def step_forward(
        xg, r, fw, c_s, s_s, h_s, m_s, y, lengths, p_i, p_f, p_o, g_hh, c_w, c_b, g_ih, bias, keep_c, keep_h,
        G, C, RH, RS, AH, AS, CN,
        t, T, B, H, HO, R, NG, NSH, clip: tl.float64, zc: tl.float64, zh: tl.float64,
        FLAGS: tl.constexpr, PROJ: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr,
        HAS_KEEP: tl.constexpr, SAVE_G: tl.constexpr, SAVE_C: tl.constexpr, SAVE_LN: tl.constexpr,
        READY: tl.constexpr, CT: tl.constexpr, EPS: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Step t after its GEMMs (grid: cdiv(B, BB) × cdiv(H, BH); layernorm: BH ≥ H).
    r = h_{t-1} W_hhᵀ (B, R) and fw = s_{t-1} W_ggᵀ (B, NSH) in CT; updates the states in
    place — c_s (B, H) CT, s_s (B, NSH) and h_s (B, HO) as GEMM operands — on valid rows;
    writes y[t] (projection: h̃ into m_s (B, H) for the next GEMM, and :func:`step_project`
    finishes the step) and the buffers at t. Zoneout: masks keep_c (T, B, H), keep_h
    (T, B, HO) if HAS_KEEP, else the scalars zc, zh."""
    clip, zc, zh = scalar(clip, CT), scalar(zc, CT), scalar(zh, CT)
    GI: tl.constexpr = slot(FLAGS, "i")
    GF: tl.constexpr = slot(FLAGS, "f")
    GG: tl.constexpr = slot(FLAGS, "g")
    GO: tl.constexpr = slot(FLAGS, "o")
    SI: tl.constexpr = fgr_slot(FLAGS, "i")
    SF: tl.constexpr = fgr_slot(FLAGS, "f")
    SO: tl.constexpr = fgr_slot(FLAGS, "o")
    rb, rm, rb64, ch, cm, m2 = tile_block(tl.program_id(0), tl.program_id(1), B, H, BB, BH)
    lens = seq_lengths(lengths, rb, rm, T, HAS_LEN, BB)
    valid = rm & (t < lens)
    v2 = valid[:, None]
    vm2 = v2 & cm[None, :]
    row = rb64 + t * B
    if has(FLAGS, "rnn"):
        u = ld(xg, row, R, 0, ch, m2, CT, True, BB, BH) + ld(r, rb64, R, 0, ch, m2, CT, True, BB, BH)
        hn = rnn_act(u, FLAGS)
        st(h_s, rb64, HO, 0, ch, vm2, hn, True)
        st(y, row, HO, 0, ch, m2, tl.where(v2, hn, 0.0), True)
    elif has(FLAGS, "slstm"):  # c_s (B, 3H): c | n | m
        slstm_fwd(xg, r, c_s, h_s, y, G, C, row, rb64, valid, m2, ch, H, R, FLAGS, SAVE_G, SAVE_C, CT, BB, BH)
    else:
        r_i = ld(r, rb64, R, GI * H, ch, m2, CT, GI >= 0, BB, BH)
        r_f = ld(r, rb64, R, GF * H, ch, m2, CT, GF >= 0, BB, BH)
        r_g = ld(r, rb64, R, GG * H, ch, m2, CT, True, BB, BH)
        r_o = ld(r, rb64, R, GO * H, ch, m2, CT, GO >= 0, BB, BH)
        f_i = ld(fw, rb64, NSH, SI * H, ch, m2, CT, SI >= 0, BB, BH)
        f_f = ld(fw, rb64, NSH, SF * H, ch, m2, CT, SF >= 0, BB, BH)
        f_o = ld(fw, rb64, NSH, SO * H, ch, m2, CT, SO >= 0, BB, BH)
        cp = ld(c_s, rb64, H, 0, ch, m2, CT, True, BB, BH)
        i, f, o, c, hm = fwd_core(xg, row, r_i, r_f, r_g, r_o, f_i, f_f, f_o, cp, valid, rm, ch, cm, H, clip, zc,
                                   p_i, p_f, p_o, g_hh, c_w, c_b, g_ih, bias, keep_c, G, C, CN, RH, RS, AH, AS, R,
                                   NG, FLAGS, HAS_BIAS, HAS_KEEP, SAVE_G, SAVE_C, SAVE_LN, READY, CT, EPS, BB, BH)
        st(c_s, rb64, H, 0, ch, m2, c, True)
        st(s_s, rb64, NSH, SI * H, ch, vm2, i, SI >= 0)
        st(s_s, rb64, NSH, SF * H, ch, vm2, f, SF >= 0)
        st(s_s, rb64, NSH, SO * H, ch, vm2, o, SO >= 0)
        if PROJ:
            st(m_s, rb64, H, 0, ch, m2, hm, True)
        else:
            if has(FLAGS, "zoneout"):  # h_t = h̃ + d_h (h_{t-1} − h̃)
                hp = ld(h_s, rb64, HO, 0, ch, m2, CT, True, BB, BH)
                hm += keep_tile(keep_h, row, HO, ch, m2, zh, HAS_KEEP, CT, BB, BH) * (hp - hm)
            st(h_s, rb64, HO, 0, ch, vm2, hm, True)
            st(y, row, HO, 0, ch, m2, tl.where(v2, hm, 0.0), True)


@triton.jit(do_not_specialize=["t"])
def step_project(yp, h_s, y, lengths, keep_h, t, T, B, HO, zh: tl.float64, FLAGS: tl.constexpr, HAS_LEN: tl.constexpr,
                 HAS_KEEP: tl.constexpr, CT: tl.constexpr, BB: tl.constexpr, BO: tl.constexpr):
    """Projection, after the GEMM y_t = h̃ W_hrᵀ (yp (B, HO), CT): zoneout (y_t += d_h (h_{t-1} − y_t),
    d_h from keep_h (T, B, HO) or zh), then h_s ← y_t on valid rows; y[t] = y_t there, 0
    elsewhere (grid: cdiv(B, BB) × cdiv(HO, BO)). FLAGS: the variant word's zoneout bit (the
    only one it reads)."""
    zh = scalar(zh, CT)
    rb, rm, rb64, co, om, m2 = tile_block(tl.program_id(0), tl.program_id(1), B, HO, BB, BO)
    lens = seq_lengths(lengths, rb, rm, T, HAS_LEN, BB)
    valid = rm & (t < lens)
    v = tl.load(yp + rb64[:, None] * HO + co[None, :], mask=m2, other=0.0)
    if has(FLAGS, "zoneout"):
        hp = ld(h_s, rb64, HO, 0, co, m2, CT, True, BB, BO)
        v += keep_tile(keep_h, rb64 + t * B, HO, co, m2, zh, HAS_KEEP, CT, BB, BO) * (hp - v)
    st(h_s, rb64, HO, 0, co, valid[:, None] & om[None, :], v, True)
    st(y, rb64 + t * B, HO, 0, co, m2, tl.where(valid[:, None], v, 0.0), True)


@triton.jit(do_not_specialize=["t"])
def step_dh(dy, dy_s0, dy_s1, dy_s2, dh_g, dh_n, dhz, out, out_op, lengths, keep_h, t, T, B, HO, zh: tl.float64,
            FLAGS: tl.constexpr, HAS_LEN: tl.constexpr, HAS_DY: tl.constexpr, HAS_NEXT: tl.constexpr,
            SEP_OP: tl.constexpr, HAS_KEEP: tl.constexpr, CT: tl.constexpr, BB: tl.constexpr, BO: tl.constexpr):
    """The gradient of the state h_t, dy_t + the carried dh (dh_g = dh_{t+1}'s GEMM result on
    rows valid at t+1, else dh_n), zero on invalid rows; zoneout (FLAGS: the word's zoneout
    bit, the only one it reads) sends d_h of it straight to h_{t-1} (dhz (B, HO) in place:
    added to the carry at t+1, written for t) and keeps the rest, the gradient of the cell's
    projected output. That goes into ``out`` at row t·B + b (projection: dHP (T, B, P)) and,
    as the next GEMM's operand, ``out_op`` (B, HO) if SEP_OP."""
    zh = scalar(zh, CT)
    rb, rm, rb64, co, _, m2 = tile_block(tl.program_id(0), tl.program_id(1), B, HO, BB, BO)
    lens = seq_lengths(lengths, rb, rm, T, HAS_LEN, BB)
    carry = ld(dh_n, rb64, HO, 0, co, m2, CT, True, BB, BO)
    if HAS_NEXT:
        nxt = ld(dh_g, rb64, HO, 0, co, m2, CT, True, BB, BO)
        if has(FLAGS, "zoneout"):
            nxt += ld(dhz, rb64, HO, 0, co, m2, CT, True, BB, BO)
        carry = tl.where(((t + 1) < lens)[:, None], nxt, carry)
    d = ld_dy(dy, t, rb64, co, m2, dy_s0, dy_s1, dy_s2, CT, HAS_DY, BB, BO) + carry
    d = tl.where((rm & (t < lens))[:, None], d, 0.0)
    if has(FLAGS, "zoneout"):
        dz = keep_tile(keep_h, rb64 + t * B, HO, co, m2, zh, HAS_KEEP, CT, BB, BO) * d
        st(dhz, rb64, HO, 0, co, m2, dz, True)
        d -= dz
    st(out, rb64 + t * B, HO, 0, co, m2, d, True)
    st(out_op, rb64, HO, 0, co, m2, d, SEP_OP)


@triton.jit(do_not_specialize=["t"])
def step_backward(
        dy, dy_s0, dy_s1, dy_s2, dh_g, dh_n, dhz, dm, dc_s, ds_g, y, c0, lengths,
        p_i, p_f, p_o, g_hh, c_w, c_b, g_ih, bias, keep_c, keep_h, G, C, RH, RS, AH, AS, CN,
        dxg, dr, dzs, mo, dop, dus, acc,
        t, T, B, H, HO, R, NG, NSH, NACC, clip: tl.float64, zc: tl.float64, zh: tl.float64,
        FLAGS: tl.constexpr, PROJ: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_LEN: tl.constexpr, HAS_DY: tl.constexpr, HAS_NEXT: tl.constexpr, SEP_OP: tl.constexpr,
        HAS_KEEP: tl.constexpr, READY: tl.constexpr, CT: tl.constexpr, EPS: tl.constexpr, BB: tl.constexpr,
        BH: tl.constexpr):
    """Step t of BPTT before its GEMMs (grid: cdiv(B, BB) × cdiv(H, BH); layernorm: BH ≥ H).
    The carried gradients: dh_g = dz_{t+1} W_hh (B, HO) (zoneout: plus dhz, d_h·dh_{t+1},
    in place (B, HO)) and ds_g = du_S,t+1 W_gg (B, NSH) on rows valid at t+1 (else dh_n and 0;
    HAS_NEXT: t+1 < T), dc_s (B, H) in place (valid rows); projection: dm = dHP_t W_hr (B, H)
    instead of dy + dh (:func:`step_dh` did zoneout's split). Writes dxg[t] etc. (see
    :func:`bwd_core`), the next GEMMs' operands dop (B, R) if SEP_OP (else dxg[t] or dR[t]
    is the operand) and fgr's dus (B, NSH), and adds to acc's row of this batch block."""
    clip, zc, zh = scalar(clip, CT), scalar(zc, CT), scalar(zh, CT)
    GI: tl.constexpr = slot(FLAGS, "i")
    GF: tl.constexpr = slot(FLAGS, "f")
    GG: tl.constexpr = slot(FLAGS, "g")
    GO: tl.constexpr = slot(FLAGS, "o")
    SI: tl.constexpr = fgr_slot(FLAGS, "i")
    SF: tl.constexpr = fgr_slot(FLAGS, "f")
    SO: tl.constexpr = fgr_slot(FLAGS, "o")
    pid_b = tl.program_id(0)
    rb, rm, rb64, ch, cm, m2 = tile_block(pid_b, tl.program_id(1), B, H, BB, BH)
    lens = seq_lengths(lengths, rb, rm, T, HAS_LEN, BB)
    valid = rm & (t < lens)
    nxt = rm & ((t + 1) < lens)
    v2 = valid[:, None]
    row = rb64 + t * B
    if PROJ:
        dhm = tl.where(v2, ld(dm, rb64, H, 0, ch, m2, CT, True, BB, BH), 0.0)
    else:
        carry = ld(dh_n, rb64, HO, 0, ch, m2, CT, True, BB, BH)
        if HAS_NEXT:
            dn = ld(dh_g, rb64, HO, 0, ch, m2, CT, True, BB, BH)
            if has(FLAGS, "zoneout"):
                dn += ld(dhz, rb64, HO, 0, ch, m2, CT, True, BB, BH)
            carry = tl.where(nxt[:, None], dn, carry)
        dhm = tl.where(v2, ld_dy(dy, t, rb64, ch, m2, dy_s0, dy_s1, dy_s2, CT, HAS_DY, BB, BH) + carry, 0.0)
        if has(FLAGS, "zoneout"):  # h_t = h̃ + d_h (h_{t-1} − h̃): h_{t-1} gets d_h·dh, h̃ the rest
            dz = keep_tile(keep_h, row, HO, ch, m2, zh, HAS_KEEP, CT, BB, BH) * dhm
            st(dhz, rb64, HO, 0, ch, m2, dz, True)
            dhm -= dz
    if has(FLAGS, "rnn"):
        du = rnn_act_bwd(y, row, HO, ch, m2, dhm, FLAGS, CT, BB, BH)
        st(dxg, row, R, 0, ch, m2, du, True)
        st(dop, rb64, R, 0, ch, m2, du, SEP_OP)
    elif has(FLAGS, "slstm"):  # dc_s (B, 3H): dL/d(c, n, m)
        slstm_bwd(G, C, c0, dc_s, dxg, dop, dhm, row, rb64, t, B, valid, m2, ch, H, R, FLAGS, SEP_OP, CT, BB, BH)
    else:
        cc, cp = saved_cells(C, CN, c0, row, rb64, t, B, H, ch, m2, FLAGS, CT, BB, BH)
        i, f, g, o = step_gates(G, AH, RH, row, R, rm, ch, cm, H, cp, clip, p_i, p_f, p_o, c_w, c_b, g_ih, g_hh,
                                bias, FLAGS, HAS_BIAS, READY, CT, EPS, BB, BH)
        dc = tl.where(v2, ld(dc_s, rb64, H, 0, ch, m2, CT, True, BB, BH), 0.0)
        nx2 = nxt[:, None]
        ds_i = tl.where(nx2, ld(ds_g, rb64, NSH, SI * H, ch, m2, CT, HAS_NEXT and SI >= 0, BB, BH), 0.0)
        ds_f = tl.where(nx2, ld(ds_g, rb64, NSH, SF * H, ch, m2, CT, HAS_NEXT and SF >= 0, BB, BH), 0.0)
        ds_o = tl.where(nx2, ld(ds_g, rb64, NSH, SO * H, ch, m2, CT, HAS_NEXT and SO >= 0, BB, BH), 0.0)
        d_i, d_f, d_g, d_o, u_i, u_f, u_o, dcp = bwd_core(
            i, f, g, o, cc, cp, dhm, dc, ds_i, ds_f, ds_o, valid, rm, ch, cm, H, clip, zc, p_i, p_f, p_o, c_w,
            c_b, g_ih, g_hh, keep_c, AH, AS, RH, RS, dxg, dr, dzs, mo, acc + pid_b * NACC, row, R, NG, NSH,
            FLAGS, PROJ, HAS_BIAS, HAS_KEEP, READY, CT, EPS, BB, BH)
        st(dc_s, rb64, H, 0, ch, v2 & cm[None, :], dcp, True)
        st(dop, rb64, R, GI * H, ch, m2, d_i, SEP_OP and GI >= 0)
        st(dop, rb64, R, GF * H, ch, m2, d_f, SEP_OP and GF >= 0)
        st(dop, rb64, R, GG * H, ch, m2, d_g, SEP_OP)
        st(dop, rb64, R, GO * H, ch, m2, d_o, SEP_OP and GO >= 0)
        st(dus, rb64, NSH, SI * H, ch, m2, u_i, SI >= 0)
        st(dus, rb64, NSH, SF * H, ch, m2, u_f, SF >= 0)
        st(dus, rb64, NSH, SO * H, ch, m2, u_o, SO >= 0)
