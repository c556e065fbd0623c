"""Build, load and call lstmkit's fused CPU recurrence (``csrc/recurrence.cpp``).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, the
machine's g++, ``-O3 -march=native -fopenmp``; cached afterwards). It runs the recurrence of
ONE layer in ONE direction, forward and a hand-written BPTT backward, for ``kind="lstm"``
with any of nig/nfg/nog, cifg, niaf/noaf, peephole, fgr, layernorm (input and recurrent
LN, their gains, the bias, and the LN of c), cell clip and projection, and ``kind="rnn"``
(tanh / relu); float32 and float64.

The input projection is NOT done here. Contract for ``xg`` (T, B, R):

* every variant but layernorm: ``xg = x W_ihᵀ + b_ih + b_hh`` (biases included when present);
* layernorm: ``xg = a = x W_ihᵀ``, the RAW projection (no bias, no LN). ``params`` then also
  holds ``"ln_ih_weight"`` (R,) and, when the layer has biases, ``"bias"`` (R,) = b_ih + b_hh.
  Per step the kernel computes ``z = LN(a_t)·γ_ih + LN(r_t)·γ_hh + bias`` (per gate chunk,
  biased variance, eps 1e-5); backward returns ``dxg`` = the gradient w.r.t. the raw ``a``
  and ``dparams`` gains ``"ln_ih_weight"`` and ``"bias"`` (the latter only if given).
  (Other variants ignore ``"ln_ih_weight"`` and ``"bias"``.)

Saved for backward (``saved`` tuple, see :data:`SAVED_FIELDS`); memory per variant:

* every LSTM variant: ``G`` (T, B, R) gate activations of the computed gates in order
  i, f, g, o (the trace's i, f, g, o), ``C`` (T, B, H) the (clipped) cell states c_t,
  and references (no copies) to ``y``, ``h0``, ``c0``, the weights and ``lengths``;
* layernorm: ``G`` is NOT saved (unless fgr); instead ``AH`` (T, B, R) the normalised input
  pre-activations â_t, ``AS`` (T, B, G) their 1/std per gate chunk, ``RH`` (T, B, R) the
  normalised recurrent pre-activations, ``RS`` (T, B, G) their 1/std, plus references to
  ``ln_ih_weight`` and ``bias``. Backward recomputes the gates from â, r̂ (bit-identical to the
  forward's) and the LN of c from ``C``; the raw ``a`` is not kept. Saved: 2·(T,B,R) +
  (T,B,H) + y, vs G + RH + the caller's LN buffers before. layernorm + fgr also saves ``G``;
* projection, fgr, peephole, cell clip, nig/nfg/nog, niaf/noaf: nothing more;
* rnn: ``y`` only (``G``, ``C`` empty).

Backward temporaries: ``dy`` of any strides is read in place (``y.sum()``'s expanded gradient
is not copied); layernorm's dr_t is kept for ~512 (t, b) rows at a time only (dW_hh is
accumulated chunk by chunk inside the extension); layernorm + fgr returns dz_S (T, B, |S|·H)
for dW_gg.

For the trace: ``trace_from_saved(saved, spec, hidden_size)`` returns {"i","f","g","o","c","h"} views.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import torch
from torch import Tensor

from lstmkit.spec import CellSpec

__all__ = ["available", "recurrence_forward", "recurrence_backward", "trace_from_saved",
           "SAVED_FIELDS", "set_num_threads"]

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_lock = threading.Lock()
_ext: Any = None
_failed = False
_nthreads = 0  # 0 = torch.get_num_threads() (the kernel still uses 1 thread for tiny steps)

#: Names of the entries of the ``saved`` tuple, in order.
SAVED_FIELDS = ("G", "C", "y", "h0", "c0", "w_hh", "lengths", "peephole_i", "peephole_f",
                "peephole_o", "weight_gg", "ln_hh_weight", "ln_c_weight", "ln_c_bias",
                "weight_hr", "ln_ih_weight", "bias", "RH", "RS", "AH", "AS")

_PARAM_KEYS = ("peephole_i", "peephole_f", "peephole_o", "weight_gg", "ln_hh_weight",
               "ln_c_weight", "ln_c_bias", "weight_hr", "ln_ih_weight", "bias")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build():
    from torch.utils.cpp_extension import load

    flags = _cpu_flags()
    cflags = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
    # ATen's Vectorized<T> width: 512-bit (Sleef exp/tanh, as torch's own CPU kernels).
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        cflags += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    elif {"avx2", "fma"} <= flags:
        cflags += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return load(
        name="lstmkit_cpu_recurrence",
        sources=[os.path.join(_CSRC, "recurrence.cpp")],
        extra_include_paths=[_CSRC],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def available() -> bool:
    """True if the extension is built and loaded (builds it on the first call, ~40 s).

    Never raises: a failed build gives False and one warning.
    """
    global _ext, _failed
    if _ext is not None:
        return True
    if _failed:
        return False
    with _lock:
        if _ext is None and not _failed:
            try:
                _ext = _build()
            except Exception as exc:  # noqa: BLE001 - any build failure means "not available"
                _failed = True
                warnings.warn(f"lstmkit: the fused CPU kernel could not be built ({exc!r}); "
                              f"falling back to slower kernels", RuntimeWarning, stacklevel=2)
    return _ext is not None


def set_num_threads(n: int) -> None:
    """Threads the kernel may use (0 = ``torch.get_num_threads()``)."""
    global _nthreads
    _nthreads = int(n)


def _flags(spec: CellSpec) -> tuple[int, float]:
    """The variant as the C++ side's bit flags, plus the clip value."""
    if not spec.is_lstm:
        return 1 | (2 if spec.nonlinearity == "relu" else 0), 0.0
    f = 0
    for bit, on in ((4, not spec.input_gate), (8, not spec.forget_gate), (16, not spec.output_gate),
                    (32, spec.coupled), (64, spec.peephole), (128, spec.fgr), (256, spec.layernorm),
                    (512, spec.candidate_activation == "identity"),
                    (1024, spec.output_activation == "identity"), (2048, spec.cell_clip is not None)):
        if on:
            f |= bit
    return f, float(spec.cell_clip or 0.0)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def recurrence_forward(xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor | None,
                       lengths: Tensor | None, params: dict, spec: CellSpec, hidden_size: int,
                       proj_size: int, save: bool):
    """Run the recurrence forward over all T steps.

    Args:
        xg: (T, B, R) input pre-activations: input projection plus both biases, or for
            layernorm the raw projection ``x W_ihᵀ`` only (see the module docstring).
        w_hh: (R, H_out). h0: (B, H_out). c0: (B, H), or None/empty for the RNN.
        lengths: (B,) int64 on the CPU, or None/empty (= all T).
        params: the variant's extra parameters, names as in docs/cell.md without suffix;
            layernorm also "ln_ih_weight" (R,) and optionally "bias" (R,) = b_ih + b_hh.
        spec, hidden_size, proj_size: the variant and its sizes (no deep gates).
        save: keep what backward needs (training); False for inference.
    Returns:
        (y (T, B, H_out), h_n (B, H_out), c_n (B, H) or None, saved tuple)
    """
    flags, clip = _flags(spec)
    H, P = int(hidden_size), int(proj_size)
    e = _empty(xg)
    rnn = bool(flags & 1)
    if lengths is None:
        lengths = torch.empty(0, dtype=torch.long)
    if rnn or c0 is None or c0.numel() == 0:
        c0 = e if rnn else xg.new_zeros(xg.shape[1], H)
    ln = bool(flags & 256)
    p = [params.get(k, e) if params.get(k) is not None else e for k in _PARAM_KEYS]
    if not ln:  # only layernorm takes the input-LN gain and the bias inside the kernel
        p[-2:] = [e, e]
    p = [t.detach() for t in p]
    y, h_n, c_n, G, C, RH, RS, AH, AS = _ext.forward(
        xg.detach(), w_hh.detach(), h0.detach(), c0.detach(), lengths, *p, flags, clip, H, P, save,
        _nthreads)
    saved = ()
    if save:
        saved = (G, C, y, h0.detach(), c0.detach(), w_hh.detach(), lengths, *p, RH, RS, AH, AS)
    return y, h_n, (None if rnn else c_n), saved


def recurrence_backward(saved: tuple, dy: Tensor | None, dh_n: Tensor | None,
                        dc_n: Tensor | None, spec: CellSpec, hidden_size: int, proj_size: int):
    """BPTT through the recurrence.

    Returns:
        (dxg (T, B, R), dw_hh (R, H_out), dh0 (B, H_out), dc0 (B, H) or None,
         dparams {name: grad} for every parameter of ``params`` the variant has)
        For layernorm ``dxg`` is the gradient w.r.t. the raw projection ``a`` and dparams
        includes "ln_ih_weight" and (when given) "bias".
    """
    (G, C, y, h0, c0, w_hh, lengths, p_i, p_f, p_o, w_gg, ln_hh_w, ln_c_w, ln_c_b, w_hr,
     ln_ih_w, bias, RH, RS, AH, AS) = saved
    flags, clip = _flags(spec)
    rnn = bool(flags & 1)
    H, P = int(hidden_size), int(proj_size)
    Hout = P if P > 0 else H
    T, B = y.shape[0], y.shape[1]
    if dy is None:
        dy = y.new_zeros(1).expand(T, B, Hout)  # read with stride 0, never materialised
    if dh_n is None:
        dh_n = y.new_zeros(B, Hout)
    if rnn:
        dc_n = _empty(y)
    elif dc_n is None:
        dc_n = y.new_zeros(B, H)
    ln = bool(flags & 256)
    dXG, dWhh, dHP, Mo, dh0, dc0, acc, dZS = _ext.backward(
        G, C, y, h0, c0, w_hh, lengths, p_i, p_f, p_o, w_gg, ln_hh_w, ln_c_w, ln_c_b, w_hr,
        ln_ih_w, bias, RH, RS, AH, AS, dy, dh_n, dc_n, flags, clip, H, P, _nthreads)
    R = dXG.shape[2]
    if ln:  # accumulated in the extension from the gradient w.r.t. r_t = h_{t-1} W_hhᵀ
        dw_hh = dWhh
    else:
        # dW_hh = sum_t dxg_tᵀ h_{t-1};  h_{t-1} = h0 at t = 0, else y_{t-1} (0 on padded steps)
        dw_hh = torch.mm(dXG[0].t(), h0.to(dXG.dtype))
        if T > 1:
            dw_hh.addmm_(dXG[1:].reshape(-1, R).t(), y[:-1].reshape(-1, Hout))
    dparams: dict[str, Tensor] = {}
    if not rnn:
        gates = spec.computed_gates
        if flags & 64:
            for k, sl in (("i", slice(0, H)), ("f", slice(H, 2 * H)), ("o", slice(2 * H, 3 * H))):
                if k in gates:
                    dparams[f"peephole_{k}"] = acc[sl].clone()
        if ln:
            dparams["ln_c_weight"] = acc[3 * H:4 * H].clone()
            dparams["ln_c_bias"] = acc[4 * H:5 * H].clone()
            dparams["ln_hh_weight"] = acc[5 * H:5 * H + R].clone()
            dparams["ln_ih_weight"] = acc[5 * H + R:5 * H + 2 * R].clone()
            if bias.numel():
                dparams["bias"] = acc[5 * H + 2 * R:5 * H + 3 * R].clone()
        if P > 0:
            dparams["weight_hr"] = torch.mm(dHP.reshape(-1, P).t(), Mo.reshape(-1, H))
        if flags & 128:
            sig = spec.sigmoid_gates
            cols = [gates.index(k) * H for k in sig]
            nS = len(sig) * H
            if T > 1 and ln:  # the gradient w.r.t. u_S (before the input LN), S order
                dus = dZS[1:].reshape(-1, nS)
                s_prev = torch.cat([G[:-1, :, c:c + H] for c in cols], -1).reshape(-1, nS)
                dparams["weight_gg"] = torch.mm(dus.t(), s_prev)
            elif T > 1:
                dus = torch.cat([dXG[1:, :, c:c + H] for c in cols], -1).reshape(-1, nS)
                s_prev = torch.cat([G[:-1, :, c:c + H] for c in cols], -1).reshape(-1, nS)
                dparams["weight_gg"] = torch.mm(dus.t(), s_prev)
            else:
                dparams["weight_gg"] = dXG.new_zeros(nS, nS)
    return dXG, dw_hh, dh0, (None if rnn else dc0), dparams


def _layernorm_gates(saved: tuple, spec: CellSpec, H: int) -> Tensor:
    """layernorm without fgr saves â, r̂ instead of G: the gate activations (T, B, R) again."""
    f = dict(zip(SAVED_FIELDS, saved))
    z = f["AH"] * f["ln_ih_weight"] + f["RH"] * f["ln_hh_weight"]
    if f["bias"].numel():
        z = z + f["bias"]
    C, c0 = f["C"], f["c0"]
    c_prev = torch.cat([c0.unsqueeze(0), C[:-1]], 0)
    parts = []
    for n, k in enumerate(spec.computed_gates):
        u = z[:, :, n * H:(n + 1) * H]
        if k == "g":
            parts.append(u if spec.candidate_activation == "identity" else torch.tanh(u))
            continue
        p = f[f"peephole_{k}"]
        if p.numel():
            u = u + p * (C if k == "o" else c_prev)
        parts.append(torch.sigmoid(u))
    G = torch.cat(parts, -1)
    lengths = f["lengths"]
    if lengths.numel():
        T = G.shape[0]
        valid = torch.arange(T).unsqueeze(1) < lengths.clamp(max=T).unsqueeze(0)  # (T, B)
        G = G * valid.unsqueeze(-1).to(G.dtype)
    return G


def trace_from_saved(saved: tuple, spec: CellSpec, hidden_size: int) -> dict[str, Tensor]:
    """Per-step activations (T, B, ·) from a forward run with ``save=True``: views, no copies
    (layernorm without fgr: the gates are recomputed from the saved â, r̂)."""
    G, C, y = saved[0], saved[1], saved[2]
    H = int(hidden_size)
    out: dict[str, Tensor] = {"h": y}
    if not spec.is_lstm:
        out["g"] = y
        return out
    if G.numel() == 0 and C.numel() and spec.layernorm:
        G = _layernorm_gates(saved, spec, H)
    for n, k in enumerate(spec.computed_gates):
        out[k] = G[:, :, n * H:(n + 1) * H]
    out["c"] = C
    return out
