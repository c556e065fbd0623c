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

For the trace: ``trace_from_saved(saved, cfg)`` returns {"i","f","g","o","c","h"} views.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import torch
from torch import Tensor

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
    cflags = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
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


def _flags(cfg: dict) -> tuple[int, float]:
    f = 0
    if cfg.get("kind", "lstm") == "rnn":
        f |= 1
        if cfg.get("nonlinearity", "tanh") == "relu":
            f |= 2
        return f, 0.0
    if not cfg.get("input_gate", True):
        f |= 4
    if not cfg.get("forget_gate", True):
        f |= 8
    if not cfg.get("output_gate", True):
        f |= 16
    if cfg.get("coupled", False):
        f |= 32
    if cfg.get("peephole", False):
        f |= 64
    if cfg.get("fgr", False):
        f |= 128
    if cfg.get("layernorm", False):
        f |= 256
    if cfg.get("candidate_activation", "tanh") == "identity":
        f |= 512
    if cfg.get("output_activation", "tanh") == "identity":
        f |= 1024
    clip = cfg.get("cell_clip")
    if clip is not None:
        f |= 2048
        return f, float(clip)
    return f, 0.0


def _gates(cfg: dict) -> tuple[str, ...]:
    """Computed gates, canonical order (as CellSpec.computed_gates)."""
    if cfg.get("kind", "lstm") == "rnn":
        return ("g",)
    out = []
    if cfg.get("input_gate", True):
        out.append("i")
    if cfg.get("forget_gate", True) and not cfg.get("coupled", False):
        out.append("f")
    out.append("g")
    if cfg.get("output_gate", True):
        out.append("o")
    return tuple(out)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def recurrence_forward(xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor | None,
                       lengths: Tensor | None, params: dict, cfg: dict, save: bool):
    """Run the recurrence forward over all T steps.

    Args:
        xg: (T, B, R) input pre-activations (input projection plus both biases).
        w_hh: (R, H_out). h0: (B, H_out). c0: (B, H), or None/empty for the RNN.
        lengths: (B,) int64 on the CPU, or None/empty (= all T).
        params: the variant's extra parameters, names as in docs/cell.md without suffix.
        cfg: the variant (keys as CellSpec plus hidden_size, proj_size).
        save: keep what backward needs (training); False for inference.
    Returns:
        (y (T, B, H_out), h_n (B, H_out), c_n (B, H) or None, saved tuple)
    """
    flags, clip = _flags(cfg)
    H = int(cfg["hidden_size"])
    P = int(cfg.get("proj_size") or 0) if cfg.get("kind", "lstm") == "lstm" else 0
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
                        dc_n: Tensor | None, cfg: dict):
    """BPTT through the recurrence.

    Returns:
        (dxg (T, B, R), dw_hh (R, H_out), dh0 (B, H_out), dc0 (B, H) or None,
         dparams {name: grad} for every parameter of ``params`` the variant has)
    """
    (G, C, y, h0, c0, w_hh, lengths, p_i, p_f, p_o, w_gg, ln_hh_w, ln_c_w, ln_c_b, w_hr,
     RH, RS) = saved
    flags, clip = _flags(cfg)
    rnn = bool(flags & 1)
    H = int(cfg["hidden_size"])
    P = int(cfg.get("proj_size") or 0) if not rnn else 0
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
        gates = _gates(cfg)
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
            sig = [k for k in gates if k != "g"]
            cols = [gates.index(k) * H for k in sig]
            nS = len(sig) * H
            if T > 1:
                dus = torch.cat([dXG[1:, :, c:c + H] for c in cols], -1).reshape(-1, nS)
                s_prev = torch.cat([G[:-1, :, c:c + H] for c in cols], -1).reshape(-1, nS)
                dparams["weight_gg"] = torch.mm(dus.t(), s_prev)
            else:
                dparams["weight_gg"] = dXG.new_zeros(nS, nS)
    return dXG, dw_hh, dh0, (None if rnn else dc0), dparams


def trace_from_saved(saved: tuple, cfg: dict) -> dict[str, Tensor]:
    """Per-step activations (T, B, ·) from a forward run with ``save=True``: views, no copies."""
    G, C, y = saved[0], saved[1], saved[2]
    H = int(cfg["hidden_size"])
    out: dict[str, Tensor] = {"h": y}
    if cfg.get("kind", "lstm") == "rnn":
        out["g"] = y
        return out
    for n, k in enumerate(_gates(cfg)):
        out[k] = G[:, :, n * H:(n + 1) * H]
    out["c"] = C
    return out
