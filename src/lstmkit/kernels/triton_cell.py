"""One step of the recurrence as Triton helper functions, forward and backward.

The ``@triton.jit`` helpers that the kernels of :mod:`lstmkit.kernels.triton_kernels`
(persistent and per step) share: the activations, the layer norms, loads and stores of
tiles, and one LSTM step forwards (:func:`fwd_core`, :func:`_cell`) and backwards
(:func:`bwd_core`) on a (BB batch rows, BH cells) tile — :mod:`lstmkit.cell`'s step and
the CPU kernel's BPTT, written once for the GPU. Constexpr arguments are described in
:mod:`lstmkit.kernels.triton_kernels`; the variant reaches every helper as one of them,
``FLAGS``, the variant's flag word (:func:`lstmkit.kernels.abi.flags`), which the
compile-time decoders below read (:func:`has`, :func:`slot`, :func:`fgr_slot`): the bits and
the gate slots come from :mod:`lstmkit.kernels.abi`, and every test on them folds when a
kernel is built. Imported only when a Triton row runs. The names without a leading
underscore are the ones the kernels call.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lstmkit import variants
from lstmkit.kernels import abi

# ----------------------------------------------------------------------------- the variant word

#: The variant table's rows whose step and BPTT these kernels compute, by flag (the kernels' claim:
#: a row the table gains is refused by TritonImpl, not run as the plain cell, until its step is
#: written here and it is added; test_triton_row.py compares it with the rows the Triton kernel row
#: says it implements).
IMPLEMENTED: frozenset[str] = frozenset({
    "peephole", "cifg", "fgr", "layernorm", "nig", "nfg", "nog", "niaf", "cand_act_relu", "noaf", "out_act_relu",
    "gate_act_hard_sigmoid", "gate_act_hardsigmoid", "clip", "zoneout", "slstm", "forget_act_exp", "n_clamp", "rnn",
    "rnn_relu"})
#: The bit of each flag of the variant word (:func:`lstmkit.kernels.abi.flag`).
_BITS: dict[str, int] = {name: abi.flag(name) for name in abi.FLAGS}
#: :func:`lstmkit.kernels.abi.gate_slots` itself, callable while a kernel is built (Triton
#: hashes its source and the ABI tables it reads into the kernels' cache keys).
_gate_slots = triton.constexpr_function(abi.gate_slots)
_acc_offset = triton.constexpr_function(abi.acc_offset)


@triton.constexpr_function
def has(flags: int, name: str) -> bool:
    """Whether the variant word ``flags`` has the flag ``name`` (of :data:`lstmkit.kernels.abi.FLAGS`)."""
    return bool(flags & _BITS[name])


@triton.constexpr_function
def slot(flags: int, gate: str) -> int:
    """Gate ``gate``'s slot among the computed gates (its row block of ``W_hh``, its columns
    ``slot·H + cell`` of an (·, R) matrix); -1 if the variant does not compute it."""
    return _gate_slots(flags)[0][gate]


@triton.constexpr_function
def fgr_slot(flags: int, gate: str) -> int:
    """fgr: gate ``gate``'s (i, f or o) slot in the sigmoid-gate state s (|S|·H wide) and in
    ``W_gg``; -1 if absent, and for every gate without fgr."""
    return _gate_slots(flags)[1][gate] if flags & _BITS["fgr"] else -1


@triton.constexpr_function
def acc_h(param: str) -> int:
    """Parameter ``param``'s summed gradient starts at ``acc_h(param)·H + acc_r(param)·R`` in a
    row of the backward's ``acc`` (:func:`lstmkit.kernels.abi.acc_offset`, as the C++ AccLayout)."""
    return _acc_offset(param)[0]


@triton.constexpr_function
def acc_r(param: str) -> int:
    """The R coefficient of :func:`acc_h`'s offset."""
    return _acc_offset(param)[1]


#: The bit of each hard-sigmoid row of the variant table -> its slope (``HARD_SIGMOID_SLOPES``).
_SLOPE_OF_BIT: dict[int, float] = {abi.flag(r.flag_name): variants.HARD_SIGMOID_SLOPES[r.sets["gate_activation"]]
                                   for r in variants.ROWS if "gate_activation" in r.sets}


@triton.constexpr_function
def hard_slope(flags: int) -> float:
    """The slope of the gates' hard sigmoid ``clamp(slope·u + 1/2, 0, 1)``; 0.0: they use σ."""
    for bit in _SLOPE_OF_BIT:
        if flags & bit:
            return _SLOPE_OF_BIT[bit]
    return 0.0


# ----------------------------------------------------------------------------- math


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # |x| >= S: 1 - 2/(e^{2|x|} + 1) through e^{-2|x|} (no overflow). Below S that form cancels
    # (1 - e loses a small x's digits: every |x| < 3e-8 gave 0 in float32), so there the odd series
    # x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835, nested with exact constants (a float literal
    # such as 1/3 may be rounded to float32 first); its next term is 0.0089 x^11. S puts both
    # errors near the dtype's rounding: 0.3 in float32, 0.05 in float64. NaN stays NaN.
    S: tl.constexpr = 0.3 if x.dtype == tl.float32 else 0.05
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    small = ax < S
    xs = tl.where(small, x, 0.0)  # (no overflow in xs^2 where the series is not taken)
    x2 = xs * xs
    series = xs * (1.0 - x2 / 3.0 * (1.0 - 2.0 * x2 / 5.0 * (1.0 - 17.0 * x2 / 42.0 * (1.0 - 62.0 * x2 / 153.0))))
    return tl.where(small, series, tl.where(x < 0, -t, t))


@triton.jit
def gate_act(u, FLAGS: tl.constexpr):
    """A gate's activation (i, f, o): σ(u), or the hard sigmoid ``clamp(slope·u + 1/2, 0, 1)``
    (as :func:`lstmkit.cell.gate_activation`: NaN gives 0)."""
    SLOPE: tl.constexpr = hard_slope(FLAGS)
    if SLOPE > 0:
        # (u + 1/(2·slope))·slope, not slope·u + 1/2, which the compiler may fuse into one
        # multiply-add that misses the kinks (2.8e-17 at u = −3 in float64): the half-width (3,
        # 2.5) is exact, so u at a kink gives exactly 0 or 1
        HALF_WIDTH: tl.constexpr = 0.5 / SLOPE
        v = (u + HALF_WIDTH) * SLOPE
        a = tl.where((v > 0.0) & (v < 1.0), v, tl.where(v >= 1.0, 1.0, 0.0))
    else:
        a = sigmoid(u)
    return a


@triton.jit
def gate_grad(d, a, FLAGS: tl.constexpr):
    """dL/du of a gate from d = dL/da and its activation a: d·a(1 − a) for σ; for the hard
    sigmoid d·slope where 0 < a < 1 (the ramp), 0 on the flat parts and at the kinks."""
    SLOPE: tl.constexpr = hard_slope(FLAGS)
    if SLOPE > 0:
        du = tl.where((a > 0.0) & (a < 1.0), d * SLOPE, 0.0)
    else:
        du = d * a * (1.0 - a)
    return du


@triton.jit
def act(u, IDENTITY: tl.constexpr, RELU: tl.constexpr):
    """The candidate's or the cell output's activation: tanh(u), u (IDENTITY) or max(u, 0)
    (RELU; NaN stays NaN, as torch.relu)."""
    if IDENTITY:
        a = u
    elif RELU:
        a = tl.where(u < 0, 0.0, u)
    else:
        a = tanh(u)
    return a


@triton.jit
def act_grad(d, a, IDENTITY: tl.constexpr, RELU: tl.constexpr):
    """dL/du of :func:`act` from d = dL/da and its output a: d, d·[a > 0] or d·(1 − a²)."""
    if IDENTITY:
        du = d
    elif RELU:
        du = tl.where(a > 0, d, 0.0)
    else:
        du = d * (1.0 - a * a)
    return du


@triton.jit
def scalar(x, CT: tl.constexpr):
    """A float argument (the operator's scalars arrive as float64, exact for a float64 layer)
    in the compute dtype CT, once per kernel."""
    return tl.full((), x, CT)


@triton.jit
def dot(a, b, OP: tl.constexpr, MMA: tl.constexpr):
    """``a @ b`` with both operands rounded to OP, accumulated in float32 (float64 for
    float64). float32 runs as 3xTF32 on tensor cores (about float32's accuracy; the plain
    float32 FMA path also crashes Triton 3.9's LLVM on sm_90), float64 in IEEE."""
    if OP == tl.float32:
        out = tl.dot(a.to(OP).to(MMA), b.to(OP).to(MMA), input_precision="tf32x3")
    else:
        out = tl.dot(a.to(OP).to(MMA), b.to(OP).to(MMA), input_precision="ieee")
    return out


@triton.jit
def _ln_rows(x, cm, H, EPS: tl.constexpr):
    """Layer norm without gain of each row of ``x`` (BB, BH) over its H valid columns
    ``cm`` (BH,): (x̂ (BB, BH), 1/std (BB,)); two-pass, biased variance (as the CPU kernel)."""
    xm = tl.where(cm[None, :], x, 0.0)
    mean = tl.sum(xm, 1) / H
    d = tl.where(cm[None, :], xm - mean[:, None], 0.0)
    var = tl.sum(d * d, 1) / H
    rstd = tl.where(var < float("inf"), 1.0 / tl.sqrt(var + EPS), float("nan"))  # (overflowed: NaN, as torch's)
    return d * rstd[:, None], rstd


@triton.jit
def _ln_bwd(dz, ah, ra, rh, rs, gih, ghh, H):
    """Both layer norms of one gate backwards, from dz (BB, BH), the gradient of
    z = â·g_ih + r̂·g_hh + b: (da, dr), the gradients of the raw a and r."""
    dai = dz * gih[None, :]
    drh = dz * ghh[None, :]
    ma1 = tl.sum(dai, 1) / H
    ma2 = tl.sum(dai * ah, 1) / H
    mr1 = tl.sum(drh, 1) / H
    mr2 = tl.sum(drh * rh, 1) / H
    da = ra[:, None] * (dai - ma1[:, None] - ah * ma2[:, None])
    dr = rs[:, None] * (drh - mr1[:, None] - rh * mr2[:, None])
    return da, dr


@triton.jit
def _ln_z(ah, rh, g_ih, g_hh, bias, SLOT: tl.constexpr, H, ch, cm, HAS_BIAS: tl.constexpr, CT: tl.constexpr,
          BH: tl.constexpr):
    """layernorm: one gate's z = â·g_ih + r̂·g_hh (+ bias), from the normalised â, r̂ (BB, BH).
    Forward and backward both call it on the same values (the backward recomputes gates)."""
    z = ah * _vec(g_ih, SLOT * H, ch, cm, CT, SLOT >= 0, BH)[None, :]
    z += rh * _vec(g_hh, SLOT * H, ch, cm, CT, SLOT >= 0, BH)[None, :]
    if HAS_BIAS:
        z += _vec(bias, SLOT * H, ch, cm, CT, SLOT >= 0, BH)[None, :]
    return z


# ----------------------------------------------------------------------------- memory


@triton.jit
def ld(ptr, rows, ld, col0, ch, m, CT: tl.constexpr, ON: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Tile ``ptr[rows, col0 + ch]`` (row stride ``ld``) as CT; zeros where masked or not ON."""
    if ON:
        v = tl.load(ptr + rows[:, None] * ld + col0 + ch[None, :], mask=m, other=0.0).to(CT)
    else:
        v = tl.zeros((BB, BH), CT)
    return v


@triton.jit
def st(ptr, rows, ld, col0, ch, m, v, ON: tl.constexpr):
    if ON:
        tl.store(ptr + rows[:, None] * ld + col0 + ch[None, :], v.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def keep_tile(keep, row, ld, cols, m, z, HAS_KEEP: tl.constexpr, CT: tl.constexpr, BB: tl.constexpr,
              BN: tl.constexpr):
    """zoneout's d (BB, BN) for the rows ``row`` (t·B + b): the training mask ``keep[row, cols]``
    (row stride ``ld``; 1 where a unit keeps its previous state), or at evaluation, without
    masks, the probability ``z`` everywhere (the mask's expectation)."""
    if HAS_KEEP:
        d = tl.load(keep + row[:, None] * ld + cols[None, :], mask=m, other=0.0).to(CT)
    else:
        d = tl.zeros((BB, BN), CT) + z
    return d


@triton.jit
def _vec(ptr, col0, ch, cm, CT: tl.constexpr, ON: tl.constexpr, BH: tl.constexpr):
    """Vector ``ptr[col0 + ch]`` (BH,) as CT; zeros if not ON."""
    if ON:
        v = tl.load(ptr + col0 + ch, mask=cm, other=0.0).to(CT)
    else:
        v = tl.zeros((BH,), CT)
    return v


@triton.jit
def _acc(ptr, col0, ch, cm, v, ON: tl.constexpr):
    """``ptr[col0 + ch] += Σ_rows v`` (a parameter gradient; the row is this program's own)."""
    if ON:
        p = ptr + col0 + ch
        tl.store(p, tl.load(p, mask=cm, other=0.0) + tl.sum(v, 0), mask=cm)


@triton.jit
def whh_tile(w, SLOT: tl.constexpr, H, ld, ko, ch, m, OP: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr):
    """The tile (BK, BH) ``w[SLOT·H + ch, ko]ᵀ`` of a (rows, ld) weight: one gate's block,
    transposed for ``state @ tile``; zeros for an absent gate."""
    if SLOT >= 0:
        v = tl.load(w + (SLOT * H + ch[None, :]) * ld + ko[:, None], mask=m, other=0.0).to(OP)
    else:
        v = tl.zeros((BK, BH), OP)
    return v


@triton.jit
def gg_tile(w, SK: tl.constexpr, SJ: tl.constexpr, H, NSH, ch, m, OP: tl.constexpr, BH: tl.constexpr):
    """fgr: the block of W_gg from source gate SJ to target gate SK, as the (BH, BH) tile
    ``[cj, ck] = W_gg[SK·H + ck, SJ·H + cj]``; zeros if either gate is absent."""
    if SK >= 0 and SJ >= 0:
        v = tl.load(w + (SK * H + ch[None, :]) * NSH + SJ * H + ch[:, None], mask=m, other=0.0).to(OP)
    else:
        v = tl.zeros((BH, BH), OP)
    return v


@triton.jit
def rnn_act(u, FLAGS: tl.constexpr):
    """The plain RNN's h = act(u): relu or tanh."""
    if has(FLAGS, "rnn_relu"):
        h = tl.where(u < 0, 0.0, u)
    else:
        h = tanh(u)
    return h


@triton.jit
def rnn_act_bwd(y, row, HO, ch, m2, dh, FLAGS: tl.constexpr, CT: tl.constexpr, BB: tl.constexpr,
                BH: tl.constexpr):
    """The plain RNN's du from dh and the saved output h = y[row]: dh·[h > 0] (relu) or
    dh·(1 − h²) (tanh); (BB, BH)."""
    yt = ld(y, row, HO, 0, ch, m2, CT, True, BB, BH)
    if has(FLAGS, "rnn_relu"):
        du = tl.where(yt > 0, dh, 0.0)
    else:
        du = dh * (1.0 - yt * yt)
    return du


@triton.jit
def saved_cells(C, CN, c0, row, rb64, t, B, H, ch, m2, FLAGS: tl.constexpr, CT: tl.constexpr, BB: tl.constexpr,
                BH: tl.constexpr):
    """(c̃_t, c_{t-1}) of the rows at step t, (BB, BH) each: the cell's new state (zoneout: before
    it mixed in c_{t-1}, CN (T, B, H); else C (T, B, H)) and the previous state (C at t − 1,
    c0 (B, H) at t = 0)."""
    if has(FLAGS, "zoneout"):
        cc = ld(CN, row, H, 0, ch, m2, CT, True, BB, BH)
    else:
        cc = ld(C, row, H, 0, ch, m2, CT, True, BB, BH)
    if t > 0:
        cp = ld(C, row - B, H, 0, ch, m2, CT, True, BB, BH)
    else:
        cp = ld(c0, rb64, H, 0, ch, m2, CT, True, BB, BH)
    return cc, cp


@triton.jit
def tile_block(pid_b, pid_c, B, N, BB: tl.constexpr, BN: tl.constexpr):
    """The indices of tile (pid_b, pid_c) of a (B, N) grid: batch rows rb (BB,), their mask
    rm and int64 copy rb64, columns ch (BN,) with mask cm, and the tile mask m2 (BB, BN)."""
    rb = pid_b * BB + tl.arange(0, BB)
    rm = rb < B
    ch = pid_c * BN + tl.arange(0, BN)
    cm = ch < N
    return rb, rm, rb.to(tl.int64), ch, cm, rm[:, None] & cm[None, :]


@triton.jit
def persistent_block(pid, B, H, HO, BB: tl.constexpr, BH: tl.constexpr, BO: tl.constexpr):
    """The indices of persistent program ``pid``: those of :func:`tile_block` over all H
    cells, and the outputs co (BO,) with mask om and the tile mask mo2 (BB, BO)."""
    rb, rm, rb64, ch, cm, m2 = tile_block(pid, 0, B, H, BB, BH)
    co = tl.arange(0, BO)
    om = co < HO
    return rb, rm, rb64, ch, cm, co, om, m2, rm[:, None] & om[None, :]


@triton.jit
def recurrent_tiles(w_hh, w_gg, H, HO, NSH, co, ch, cm, om, FLAGS: tl.constexpr, OP: tl.constexpr,
                    BO: tl.constexpr, BH: tl.constexpr):
    """The recurrent weights of a persistent program, read once: the (BO, BH) tiles
    w_i, w_f, w_g, w_o of ``W_hh`` (for ``h @ w_k``; the backward uses ``tl.trans``) and
    fgr's nine (BH, BH) tiles q_kj of ``W_gg`` (source j → target k), zeros where absent."""
    GI: tl.constexpr = slot(FLAGS, "i")
    GF: tl.constexpr = slot(FLAGS, "f")
    GG: tl.constexpr = slot(FLAGS, "g")
    GO: tl.constexpr = slot(FLAGS, "o")
    SI: tl.constexpr = fgr_slot(FLAGS, "i")
    SF: tl.constexpr = fgr_slot(FLAGS, "f")
    SO: tl.constexpr = fgr_slot(FLAGS, "o")
    wm = om[:, None] & cm[None, :]
    gm = cm[:, None] & cm[None, :]
    return (whh_tile(w_hh, GI, H, HO, co, ch, wm, OP, BO, BH), whh_tile(w_hh, GF, H, HO, co, ch, wm, OP, BO, BH),
            whh_tile(w_hh, GG, H, HO, co, ch, wm, OP, BO, BH), whh_tile(w_hh, GO, H, HO, co, ch, wm, OP, BO, BH),
            gg_tile(w_gg, SI, SI, H, NSH, ch, gm, OP, BH), gg_tile(w_gg, SI, SF, H, NSH, ch, gm, OP, BH),
            gg_tile(w_gg, SI, SO, H, NSH, ch, gm, OP, BH), gg_tile(w_gg, SF, SI, H, NSH, ch, gm, OP, BH),
            gg_tile(w_gg, SF, SF, H, NSH, ch, gm, OP, BH), gg_tile(w_gg, SF, SO, H, NSH, ch, gm, OP, BH),
            gg_tile(w_gg, SO, SI, H, NSH, ch, gm, OP, BH), gg_tile(w_gg, SO, SF, H, NSH, ch, gm, OP, BH),
            gg_tile(w_gg, SO, SO, H, NSH, ch, gm, OP, BH))


@triton.jit
def seq_lengths(lengths, rb, rm, T, HAS_LEN: tl.constexpr, BB: tl.constexpr):
    """(BB,) int32: the lengths of batch rows ``rb`` (T for every row without ``lengths``)."""
    if HAS_LEN:
        lens = tl.load(lengths + rb, mask=rm, other=0)
    else:
        lens = tl.zeros((BB,), tl.int32) + T
    return lens


@triton.jit
def fgr_in(s_i, s_f, s_o, w_i, w_f, w_o, FLAGS: tl.constexpr, OP: tl.constexpr, MMA: tl.constexpr):
    """One target gate's ``Σ_j s_j W_gg[k, j]ᵀ`` (BB, BH) from the sources' tiles ``w_j``."""
    acc = tl.zeros(s_i.shape, s_i.dtype)
    if fgr_slot(FLAGS, "i") >= 0:
        acc += dot(s_i, w_i, OP, MMA).to(s_i.dtype)
    if fgr_slot(FLAGS, "f") >= 0:
        acc += dot(s_f, w_f, OP, MMA).to(s_i.dtype)
    if fgr_slot(FLAGS, "o") >= 0:
        acc += dot(s_o, w_o, OP, MMA).to(s_i.dtype)
    return acc


# ----------------------------------------------------------------------------- one step


@triton.jit
def fwd_core(xg, row, r_i, r_f, r_g, r_o, f_i, f_f, f_o, cp, valid, rm, ch, cm, H, clip, zc,
              p_i, p_f, p_o, g_hh, c_w, c_b, g_ih, bias, keep_c,
              G, C, CN, RH, RS, AH, AS, R, NG, FLAGS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
              SAVE_G: tl.constexpr, SAVE_C: tl.constexpr, SAVE_LN: tl.constexpr, READY: tl.constexpr,
              CT: tl.constexpr, EPS: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """One LSTM step on a (BB, BH) tile, from the recurrent pre-activations ``r_k`` (layernorm:
    raw) and fgr's ``f_k = s_{t-1} W_ggᵀ``: loads ``xg`` at ``row`` = t·B + b (rows that
    exist: ``rm``), writes the buffers of this step (zeros on invalid rows, C and CN carried),
    and returns ``(i, f, o, c_t, h̃)``: the gates (1 where absent), c_t already carried on rows
    that are not ``valid`` (zoneout: c_t = c̃ + d_c (c_{t-1} − c̃), with d_c from ``keep_c``
    (T, B, H) or ``zc``; CN keeps c̃), and h̃ = o ⊙ act(LN(c̃)) (zero outside the H cells).
    READY: ``r`` holds the gates' whole pre-activations, layer norms included, and ``xg`` is
    not read (deep gates: the caller ran the MLPs and, with layernorm, each gate's norms)."""
    GI: tl.constexpr = slot(FLAGS, "i")
    GF: tl.constexpr = slot(FLAGS, "f")
    GG: tl.constexpr = slot(FLAGS, "g")
    GO: tl.constexpr = slot(FLAGS, "o")
    v2 = valid[:, None]
    m2 = rm[:, None] & cm[None, :]
    x_i = ld(xg, row, R, GI * H, ch, m2, CT, GI >= 0 and not READY, BB, BH)
    x_f = ld(xg, row, R, GF * H, ch, m2, CT, GF >= 0 and not READY, BB, BH)
    x_g = ld(xg, row, R, GG * H, ch, m2, CT, not READY, BB, BH)
    x_o = ld(xg, row, R, GO * H, ch, m2, CT, GO >= 0 and not READY, BB, BH)
    if has(FLAGS, "layernorm") and not READY:  # z = LN(a) g_ih + LN(r) g_hh + bias, per gate; â, r̂, 1/std kept
        a_i, ra_i = _ln_rows(x_i, cm, H, EPS)
        a_f, ra_f = _ln_rows(x_f, cm, H, EPS)
        a_g, ra_g = _ln_rows(x_g, cm, H, EPS)
        a_o, ra_o = _ln_rows(x_o, cm, H, EPS)
        q_i, rs_i = _ln_rows(r_i, cm, H, EPS)
        q_f, rs_f = _ln_rows(r_f, cm, H, EPS)
        q_g, rs_g = _ln_rows(r_g, cm, H, EPS)
        q_o, rs_o = _ln_rows(r_o, cm, H, EPS)
        z_i = _ln_z(a_i, q_i, g_ih, g_hh, bias, GI, H, ch, cm, HAS_BIAS, CT, BH)
        z_f = _ln_z(a_f, q_f, g_ih, g_hh, bias, GF, H, ch, cm, HAS_BIAS, CT, BH)
        z_g = _ln_z(a_g, q_g, g_ih, g_hh, bias, GG, H, ch, cm, HAS_BIAS, CT, BH)
        z_o = _ln_z(a_o, q_o, g_ih, g_hh, bias, GO, H, ch, cm, HAS_BIAS, CT, BH)
        if SAVE_LN:
            st(AH, row, R, GI * H, ch, m2, tl.where(v2, a_i, 0.0), GI >= 0)
            st(AH, row, R, GF * H, ch, m2, tl.where(v2, a_f, 0.0), GF >= 0)
            st(AH, row, R, GG * H, ch, m2, tl.where(v2, a_g, 0.0), True)
            st(AH, row, R, GO * H, ch, m2, tl.where(v2, a_o, 0.0), GO >= 0)
            st(RH, row, R, GI * H, ch, m2, tl.where(v2, q_i, 0.0), GI >= 0)
            st(RH, row, R, GF * H, ch, m2, tl.where(v2, q_f, 0.0), GF >= 0)
            st(RH, row, R, GG * H, ch, m2, tl.where(v2, q_g, 0.0), True)
            st(RH, row, R, GO * H, ch, m2, tl.where(v2, q_o, 0.0), GO >= 0)
            if GI >= 0:
                tl.store(AS + row * NG + GI, tl.where(valid, ra_i, 0.0), mask=rm)
                tl.store(RS + row * NG + GI, tl.where(valid, rs_i, 0.0), mask=rm)
            if GF >= 0:
                tl.store(AS + row * NG + GF, tl.where(valid, ra_f, 0.0), mask=rm)
                tl.store(RS + row * NG + GF, tl.where(valid, rs_f, 0.0), mask=rm)
            tl.store(AS + row * NG + GG, tl.where(valid, ra_g, 0.0), mask=rm)
            tl.store(RS + row * NG + GG, tl.where(valid, rs_g, 0.0), mask=rm)
            if GO >= 0:
                tl.store(AS + row * NG + GO, tl.where(valid, ra_o, 0.0), mask=rm)
                tl.store(RS + row * NG + GO, tl.where(valid, rs_o, 0.0), mask=rm)
    else:
        z_i = x_i + r_i
        z_f = x_f + r_f
        z_g = x_g + r_g
        z_o = x_o + r_o
    if has(FLAGS, "fgr"):
        z_i += f_i
        z_f += f_f
        z_o += f_o
    i, f, g, o, c, hm = _cell(z_i, z_f, z_g, z_o, cp, ch, cm, H, clip, p_i, p_f, p_o, c_w, c_b, FLAGS, CT, EPS, BH)
    st(G, row, R, GI * H, ch, m2, tl.where(v2, i, 0.0), SAVE_G and GI >= 0)
    st(G, row, R, GF * H, ch, m2, tl.where(v2, f, 0.0), SAVE_G and GF >= 0)
    st(G, row, R, GG * H, ch, m2, tl.where(v2, g, 0.0), SAVE_G)
    st(G, row, R, GO * H, ch, m2, tl.where(v2, o, 0.0), SAVE_G and GO >= 0)
    c = tl.where(v2, c, cp)
    if has(FLAGS, "zoneout"):  # c_t = c̃ + d_c (c_{t-1} − c̃): c_{t-1} on the rows that are not valid
        st(CN, row, H, 0, ch, m2, c, SAVE_C)
        c += keep_tile(keep_c, row, H, ch, m2, zc, HAS_KEEP, CT, BB, BH) * (cp - c)
    st(C, row, H, 0, ch, m2, c, SAVE_C)
    return i, f, o, c, tl.where(cm[None, :], hm, 0.0)


@triton.jit
def _cell(z_i, z_f, z_g, z_o, cp, ch, cm, H, clip, p_i, p_f, p_o, c_w, c_b, FLAGS: tl.constexpr,
          CT: tl.constexpr, EPS: tl.constexpr, BH: tl.constexpr):
    """The gates and states from the pre-activations (cell.step after ``z``):
    ``(i, f, g, o, c_t, o ⊙ act(LN(c_t)))``, absent gates as 1 (cifg: f = 1 - i)."""
    PEEP: tl.constexpr = has(FLAGS, "peephole")
    one = tl.zeros_like(z_g) + 1.0
    i = one
    if slot(FLAGS, "i") >= 0:
        if PEEP:
            z_i += _vec(p_i, 0, ch, cm, CT, True, BH)[None, :] * cp
        i = gate_act(z_i, FLAGS)
    f = one
    if slot(FLAGS, "f") >= 0:
        if PEEP:
            z_f += _vec(p_f, 0, ch, cm, CT, True, BH)[None, :] * cp
        f = gate_act(z_f, FLAGS)
    elif has(FLAGS, "cifg"):
        f = 1.0 - i
    g = act(z_g, has(FLAGS, "niaf"), has(FLAGS, "cand_act_relu"))
    c = f * cp + i * g
    if has(FLAGS, "clip"):  # comparisons are false for NaN: it stays
        c = tl.where(c > clip, clip, tl.where(c < -clip, -clip, c))
    o = one
    if slot(FLAGS, "o") >= 0:
        if PEEP:
            z_o += _vec(p_o, 0, ch, cm, CT, True, BH)[None, :] * c
        o = gate_act(z_o, FLAGS)
    m = c
    if has(FLAGS, "layernorm"):
        chat, _ = _ln_rows(c, cm, H, EPS)
        m = chat * _vec(c_w, 0, ch, cm, CT, True, BH)[None, :] + _vec(c_b, 0, ch, cm, CT, True, BH)[None, :]
    hm = o * act(m, has(FLAGS, "noaf"), has(FLAGS, "out_act_relu"))
    return i, f, g, o, c, hm


@triton.jit
def _ln_z_kept(AH, RH, row, R, g_ih, g_hh, bias, SLOT: tl.constexpr, H, ch, m2, cm, HAS_BIAS: tl.constexpr,
               CT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """layernorm: one gate's z from the kept â, r̂ of a step (rows ``row``)."""
    ah = ld(AH, row, R, SLOT * H, ch, m2, CT, SLOT >= 0, BB, BH)
    rh = ld(RH, row, R, SLOT * H, ch, m2, CT, SLOT >= 0, BB, BH)
    return _ln_z(ah, rh, g_ih, g_hh, bias, SLOT, H, ch, cm, HAS_BIAS, CT, BH)


@triton.jit
def step_gates(G, AH, RH, row, R, rm, ch, cm, H, cp, clip, p_i, p_f, p_o, c_w, c_b, g_ih, g_hh, bias,
               FLAGS: tl.constexpr, HAS_BIAS: tl.constexpr, READY: tl.constexpr, CT: tl.constexpr,
               EPS: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """The forward's gate activations of step ``row`` for backward: read from G, or (layernorm
    without fgr or deep gates, which keeps â and r̂ instead) recomputed by the forward's own
    code. Absent gates are 1, cifg's f is 1 - i."""
    GI: tl.constexpr = slot(FLAGS, "i")
    GF: tl.constexpr = slot(FLAGS, "f")
    GG: tl.constexpr = slot(FLAGS, "g")
    GO: tl.constexpr = slot(FLAGS, "o")
    m2 = rm[:, None] & cm[None, :]
    if has(FLAGS, "layernorm") and not has(FLAGS, "fgr") and not READY:
        z_i = _ln_z_kept(AH, RH, row, R, g_ih, g_hh, bias, GI, H, ch, m2, cm, HAS_BIAS, CT, BB, BH)
        z_f = _ln_z_kept(AH, RH, row, R, g_ih, g_hh, bias, GF, H, ch, m2, cm, HAS_BIAS, CT, BB, BH)
        z_g = _ln_z_kept(AH, RH, row, R, g_ih, g_hh, bias, GG, H, ch, m2, cm, HAS_BIAS, CT, BB, BH)
        z_o = _ln_z_kept(AH, RH, row, R, g_ih, g_hh, bias, GO, H, ch, m2, cm, HAS_BIAS, CT, BB, BH)
        i, f, g, o, _c, _h = _cell(z_i, z_f, z_g, z_o, cp, ch, cm, H, clip, p_i, p_f, p_o, c_w, c_b, FLAGS, CT,
                                   EPS, BH)
    else:
        one = tl.zeros((BB, BH), CT) + 1.0
        i = one
        if GI >= 0:
            i = ld(G, row, R, GI * H, ch, m2, CT, True, BB, BH)
        f = one
        if GF >= 0:
            f = ld(G, row, R, GF * H, ch, m2, CT, True, BB, BH)
        elif has(FLAGS, "cifg"):
            f = 1.0 - i
        g = ld(G, row, R, GG * H, ch, m2, CT, True, BB, BH)
        o = one
        if GO >= 0:
            o = ld(G, row, R, GO * H, ch, m2, CT, True, BB, BH)
    return i, f, g, o


@triton.jit
def bwd_core(i, f, g, o, c, cp, dh, dc, ds_i, ds_f, ds_o, valid, rm, ch, cm, H, clip, zc,
              p_i, p_f, p_o, c_w, c_b, g_ih, g_hh, keep_c, AH, AS, RH, RS, DXG, DR, DZS, MO, acc, row, R, NG, NSH,
              FLAGS: tl.constexpr, PROJ: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
              READY: tl.constexpr, CT: tl.constexpr, EPS: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """One LSTM step backwards on a (BB, BH) tile (the CPU kernel's loops 2' and 1').

    Takes the gates, c̃_t (the cell's new state, before zoneout), c_{t-1} and the incoming
    gradients — dh of h̃ = o ⊙ act(LN(c̃_t)), dc of c_t (carried; zoneout: of the zoned c_t,
    of which d_c·dc goes straight to c_{t-1} and the rest to c̃_t), fgr's ds of s_t — all
    zero on rows that are not ``valid``. Writes
    dXG (the gradient of xg: of z, or through the input layer norm), layernorm's dR (of the
    raw r) and fgr's dZS, the projection's MO (h̃), and adds this tile's parameter
    gradients to ``acc`` (peepholes and LN gains; layout as the CPU kernel's: p_i, p_f,
    p_o, ln_c w, ln_c b (H each), ln_hh, ln_ih, bias (R each)). Returns the next GEMM's
    inputs per gate ``(din_i, din_f, din_g, din_o)`` (dz, layernorm: dr), fgr's
    ``(du_i, du_f, du_o)`` and dc_{t-1}. READY (see :func:`fwd_core`): dXG gets the gates' dL/du
    and the caller takes them back through the gates' layer norms."""
    GI: tl.constexpr = slot(FLAGS, "i")
    GF: tl.constexpr = slot(FLAGS, "f")
    GG: tl.constexpr = slot(FLAGS, "g")
    GO: tl.constexpr = slot(FLAGS, "o")
    SI: tl.constexpr = fgr_slot(FLAGS, "i")
    SF: tl.constexpr = fgr_slot(FLAGS, "f")
    SO: tl.constexpr = fgr_slot(FLAGS, "o")
    PEEP: tl.constexpr = has(FLAGS, "peephole")
    FGR: tl.constexpr = has(FLAGS, "fgr")
    LN: tl.constexpr = has(FLAGS, "layernorm")
    NOAF: tl.constexpr = has(FLAGS, "noaf")
    OUT_RELU: tl.constexpr = has(FLAGS, "out_act_relu")
    m2 = rm[:, None] & cm[None, :]
    v2 = valid[:, None]
    zero = tl.zeros((BB, BH), CT)
    if has(FLAGS, "zoneout"):  # c_t = c̃ + d_c (c_{t-1} − c̃): dc_{t-1} gets d_c·dc, c̃ the rest
        dcz = keep_tile(keep_c, row, H, ch, m2, zc, HAS_KEEP, CT, BB, BH) * dc
        dc = dc - dcz
    # h̃ = o ⊙ act(m), m = LN(c̃) or c̃
    m = c
    chat = c
    crs = tl.zeros((BB,), CT)
    if LN:
        chat, crs = _ln_rows(c, cm, H, EPS)
        m = chat * _vec(c_w, 0, ch, cm, CT, True, BH)[None, :] + _vec(c_b, 0, ch, cm, CT, True, BH)[None, :]
    tm = act(m, NOAF, OUT_RELU)
    du_o = zero
    if GO >= 0:
        d_o = dh * tm
        if FGR:
            d_o += ds_o
        du_o = gate_grad(d_o, o, FLAGS)
    if PROJ:
        st(MO, row, H, 0, ch, m2, tl.where(v2, o * tm, 0.0), True)
    dm = act_grad(dh * o, tm, NOAF, OUT_RELU)
    if LN:
        _acc(acc, acc_h("ln_c_weight") * H + acc_r("ln_c_weight") * R, ch, cm, dm * chat, True)
        _acc(acc, acc_h("ln_c_bias") * H + acc_r("ln_c_bias") * R, ch, cm, dm, True)
        dch = dm * _vec(c_w, 0, ch, cm, CT, True, BH)[None, :]
        s1 = tl.sum(dch, 1) / H
        s2 = tl.sum(dch * chat, 1) / H
        dc = dc + crs[:, None] * (dch - s1[:, None] - chat * s2[:, None])
    else:
        dc = dc + dm
    if PEEP and GO >= 0:
        dc += du_o * _vec(p_o, 0, ch, cm, CT, True, BH)[None, :]
        _acc(acc, acc_h("peephole_o") * H + acc_r("peephole_o") * R, ch, cm, du_o * c, True)
    if has(FLAGS, "clip"):  # passed where |c~| <= clip before it (torch.clamp's rule), c~ recomputed as _cell has it
        dc = tl.where(tl.abs(f * cp + i * g) <= clip, dc, 0.0)
    # dc -> g, f, i, c_{t-1}
    du_g = act_grad(dc * i, g, has(FLAGS, "niaf"), has(FLAGS, "cand_act_relu"))
    df = dc * cp
    dcp = dc * f
    if has(FLAGS, "zoneout"):
        dcp += dcz
    du_f = zero
    if GF >= 0:
        d_f = df
        if FGR:
            d_f += ds_f
        du_f = gate_grad(d_f, f, FLAGS)
        if PEEP:
            dcp += du_f * _vec(p_f, 0, ch, cm, CT, True, BH)[None, :]
            _acc(acc, acc_h("peephole_f") * H + acc_r("peephole_f") * R, ch, cm, du_f * cp, True)
    du_i = zero
    if GI >= 0:
        d_i = dc * g
        if has(FLAGS, "cifg"):
            d_i -= df
        if FGR:
            d_i += ds_i
        du_i = gate_grad(d_i, i, FLAGS)
        if PEEP:
            dcp += du_i * _vec(p_i, 0, ch, cm, CT, True, BH)[None, :]
            _acc(acc, acc_h("peephole_i") * H + acc_r("peephole_i") * R, ch, cm, du_i * cp, True)
    if LN and not READY:  # both layer norms of each gate backwards; dz -> da (dXG), dr (next GEMM, dW_hh)
        din_i = _ln_gate_bwd(du_i, AH, AS, RH, RS, DXG, DR, acc, row, R, NG, rm, ch, cm, H, g_ih, g_hh,
                             GI, HAS_BIAS, CT, BB, BH)
        din_f = _ln_gate_bwd(du_f, AH, AS, RH, RS, DXG, DR, acc, row, R, NG, rm, ch, cm, H, g_ih, g_hh,
                             GF, HAS_BIAS, CT, BB, BH)
        din_g = _ln_gate_bwd(du_g, AH, AS, RH, RS, DXG, DR, acc, row, R, NG, rm, ch, cm, H, g_ih, g_hh,
                             GG, HAS_BIAS, CT, BB, BH)
        din_o = _ln_gate_bwd(du_o, AH, AS, RH, RS, DXG, DR, acc, row, R, NG, rm, ch, cm, H, g_ih, g_hh,
                             GO, HAS_BIAS, CT, BB, BH)
        if FGR:
            st(DZS, row, NSH, SI * H, ch, m2, du_i, SI >= 0)
            st(DZS, row, NSH, SF * H, ch, m2, du_f, SF >= 0)
            st(DZS, row, NSH, SO * H, ch, m2, du_o, SO >= 0)
    else:
        din_i = du_i
        din_f = du_f
        din_g = du_g
        din_o = du_o
        st(DXG, row, R, GI * H, ch, m2, du_i, GI >= 0)
        st(DXG, row, R, GF * H, ch, m2, du_f, GF >= 0)
        st(DXG, row, R, GG * H, ch, m2, du_g, True)
        st(DXG, row, R, GO * H, ch, m2, du_o, GO >= 0)
    return din_i, din_f, din_g, din_o, du_i, du_f, du_o, dcp


@triton.jit
def _ln_gate_bwd(dz, AH, AS, RH, RS, DXG, DR, acc, row, R, NG, rm, ch, cm, H, g_ih, g_hh,
                 SLOT: tl.constexpr, HAS_BIAS: tl.constexpr, CT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """One gate's layer norms backwards (layernorm): writes da to dXG and dr to dR, adds the
    gains' and the bias' gradients to ``acc``; returns dr (zeros for an absent gate)."""
    dr = tl.zeros((BB, BH), CT)
    if SLOT >= 0:
        m2 = rm[:, None] & cm[None, :]
        ah = ld(AH, row, R, SLOT * H, ch, m2, CT, True, BB, BH)
        rh = ld(RH, row, R, SLOT * H, ch, m2, CT, True, BB, BH)
        ra = tl.load(AS + row * NG + SLOT, mask=rm, other=0.0).to(CT)
        rs = tl.load(RS + row * NG + SLOT, mask=rm, other=0.0).to(CT)
        da, dr = _ln_bwd(dz, ah, ra, rh, rs, _vec(g_ih, SLOT * H, ch, cm, CT, True, BH),
                         _vec(g_hh, SLOT * H, ch, cm, CT, True, BH), H)
        _acc(acc, acc_h("ln_hh_weight") * H + acc_r("ln_hh_weight") * R + SLOT * H, ch, cm, dz * rh, True)
        _acc(acc, acc_h("ln_ih_weight") * H + acc_r("ln_ih_weight") * R + SLOT * H, ch, cm, dz * ah, True)
        _acc(acc, acc_h("bias") * H + acc_r("bias") * R + SLOT * H, ch, cm, dz, HAS_BIAS)
        st(DXG, row, R, SLOT * H, ch, m2, da, True)
        st(DR, row, R, SLOT * H, ch, m2, dr, True)
    return dr


@triton.jit
def ld_dy(dy, t, rb64, co, m, s0, s1, s2, CT: tl.constexpr, ON: tl.constexpr, BB: tl.constexpr, BO: tl.constexpr):
    """Step t of the output's gradient (any strides: an expanded gradient is not copied);
    zeros if there is none."""
    if ON:
        v = tl.load(dy + (rb64 * 0 + t)[:, None] * s0 + rb64[:, None] * s1 + co[None, :] * s2,
                    mask=m, other=0.0).to(CT)
    else:
        v = tl.zeros((BB, BO), CT)
    return v
