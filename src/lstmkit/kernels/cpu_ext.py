"""Build, load and call lstmkit's fused CPU recurrence (``csrc/recurrence.cpp``).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja, the
machine's g++, ``-O3 -march=native -fopenmp``; cached afterwards). It runs the recurrence of
ONE layer in ONE direction, forward and a hand-written BPTT backward, for ``kind="lstm"``
with any of nig/nfg/nog, cifg, niaf/noaf, peephole, fgr, layernorm (recurrent LN and the
LN of c), cell clip and projection, and ``kind="rnn"`` (tanh / relu); float32 and float64.

The input projection ``xg = x W_ihᵀ (+LN) + b_ih + b_hh`` (T, B, R) is NOT done here.

Saved for backward (``saved`` tuple, see :data:`SAVED_FIELDS`); memory per variant:

* every LSTM variant: ``G`` (T, B, R) gate activations of the computed gates in order
  i, f, g, o (the trace's i, f, g, o), ``C`` (T, B, H) the (clipped) cell states c_t,
  and references (no copies) to ``y``, ``h0``, ``c0``, the weights and ``lengths``;
* layernorm adds ``RH`` (T, B, R), the normalised recurrent pre-activations, and
  ``RS`` (T, B, G), their 1/std per gate chunk (the LN of c is recomputed from ``C``);
* projection, fgr, peephole, cell clip, nig/nfg/nog, niaf/noaf: nothing more;
* rnn: ``y`` only (``G``, ``C`` empty).

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

__all__ = ["available", "recurrence_forward", "recurrence_backward", "trace_from_saved", "input_projection",
           "SAVED_FIELDS", "set_num_threads"]

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_lock = threading.Lock()
_ext: Any = None
_failed = False
_nthreads = 0  # 0 = torch.get_num_threads() (the kernel still uses 1 thread for tiny steps)

#: Names of the entries of the ``saved`` tuple, in order.
SAVED_FIELDS = ("G", "C", "y", "h0", "c0", "w_hh", "lengths", "peephole_i", "peephole_f",
                "peephole_o", "weight_gg", "ln_hh_weight", "ln_c_weight", "ln_c_bias",
                "weight_hr", "RH", "RS")

_PARAM_KEYS = ("peephole_i", "peephole_f", "peephole_o", "weight_gg", "ln_hh_weight",
               "ln_c_weight", "ln_c_bias", "weight_hr")


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
        xg: (T, B, R) input pre-activations (input projection plus both biases).
        w_hh: (R, H_out). h0: (B, H_out). c0: (B, H), or None/empty for the RNN.
        lengths: (B,) int64 on the CPU, or None/empty (= all T).
        params: the variant's extra parameters, names as in docs/cell.md without suffix.
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
    p = [params.get(k, e) if params.get(k) is not None else e for k in _PARAM_KEYS]
    p = [t.detach() for t in p]
    y, h_n, c_n, G, C, RH, RS = _ext.forward(
        xg.detach(), w_hh.detach(), h0.detach(), c0.detach(), lengths, *p, flags, clip, H, P, save,
        _nthreads)
    saved = ()
    if save:
        saved = (G, C, y, h0.detach(), c0.detach(), w_hh.detach(), lengths, *p, RH, RS)
    return y, h_n, (None if rnn else c_n), saved


def recurrence_backward(saved: tuple, dy: Tensor | None, dh_n: Tensor | None,
                        dc_n: Tensor | None, spec: CellSpec, hidden_size: int, proj_size: int):
    """BPTT through the recurrence.

    Returns:
        (dxg (T, B, R), dw_hh (R, H_out), dh0 (B, H_out), dc0 (B, H) or None,
         dparams {name: grad} for every parameter of ``params`` the variant has)
    """
    (G, C, y, h0, c0, w_hh, lengths, p_i, p_f, p_o, w_gg, ln_hh_w, ln_c_w, ln_c_b, w_hr,
     RH, RS) = saved
    flags, clip = _flags(spec)
    rnn = bool(flags & 1)
    H, P = int(hidden_size), int(proj_size)
    Hout = P if P > 0 else H
    T, B = y.shape[0], y.shape[1]
    if dy is None:
        dy = y.new_zeros(T, B, Hout)
    if dh_n is None:
        dh_n = y.new_zeros(B, Hout)
    if rnn:
        dc_n = _empty(y)
    elif dc_n is None:
        dc_n = y.new_zeros(B, H)
    dXG, dR, dHP, Mo, dh0, dc0, acc = _ext.backward(
        G, C, y, h0, c0, w_hh, lengths, p_i, p_f, p_o, w_gg, ln_hh_w, ln_c_w, ln_c_b, w_hr, RH, RS,
        dy, dh_n, dc_n, flags, clip, H, P, _nthreads)
    R = dXG.shape[2]
    dr = dR if (flags & 256) else dXG  # gradient w.r.t. r_t = h_{t-1} W_hhᵀ
    # dW_hh = sum_t dr_tᵀ h_{t-1};  h_{t-1} = h0 at t = 0, else y_{t-1} (dr = 0 on padded steps)
    dw_hh = torch.mm(dr[0].t(), h0.to(dr.dtype))
    if T > 1:
        dw_hh.addmm_(dr[1:].reshape(-1, R).t(), y[:-1].reshape(-1, Hout))
    dparams: dict[str, Tensor] = {}
    if not rnn:
        gates = spec.computed_gates
        if flags & 64:
            for k, sl in (("i", slice(0, H)), ("f", slice(H, 2 * H)), ("o", slice(2 * H, 3 * H))):
                if k in gates:
                    dparams[f"peephole_{k}"] = acc[sl].clone()
        if flags & 256:
            dparams["ln_c_weight"] = acc[3 * H:4 * H].clone()
            dparams["ln_c_bias"] = acc[4 * H:5 * H].clone()
            dparams["ln_hh_weight"] = acc[5 * H:5 * H + R].clone()
        if P > 0:
            dparams["weight_hr"] = torch.mm(dHP.reshape(-1, P).t(), Mo.reshape(-1, H))
        if flags & 128:
            sig = spec.sigmoid_gates
            cols = [gates.index(k) * H for k in sig]
            nS = len(sig) * H
            if T > 1:
                dus = torch.cat([dXG[1:, :, c:c + H] for c in cols], -1).reshape(-1, nS)
                s_prev = torch.cat([G[:-1, :, c:c + H] for c in cols], -1).reshape(-1, nS)
                dparams["weight_gg"] = torch.mm(dus.t(), s_prev)
            else:
                dparams["weight_gg"] = dXG.new_zeros(nS, nS)
    return dXG, dw_hh, dh0, (None if rnn else dc0), dparams


def input_projection(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x Wᵀ + b`` over all leading dims with the kernel's packed GEMM (forward only, no autograd).

    Faster than ``F.linear`` (MKL sgemm) on this AMD machine: see benchmarks/lab_recurrence.py.
    Its backward is ``dx = dout W`` and ``dW = doutᵀ x`` (plain torch.mm), for the caller's
    autograd.Function.
    """
    shape = x.shape
    out = _ext.linear(x.reshape(-1, shape[-1]), weight.detach(),
                      bias.detach() if bias is not None else _empty(x), _nthreads)
    return out.view(*shape[:-1], weight.shape[0])


def trace_from_saved(saved: tuple, spec: CellSpec, hidden_size: int) -> dict[str, Tensor]:
    """Per-step activations (T, B, ·) from a forward run with ``save=True``: views, no copies."""
    G, C, y = saved[0], saved[1], saved[2]
    H = int(hidden_size)
    out: dict[str, Tensor] = {"h": y}
    if not spec.is_lstm:
        out["g"] = y
        return out
    for n, k in enumerate(spec.computed_gates):
        out[k] = G[:, :, n * H:(n + 1) * H]
    out["c"] = C
    return out
