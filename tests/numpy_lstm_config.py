"""The NumPy oracle's (numpy_lstm.py) reading of a variant: the variant dict (its keys:
numpy_lstm.py's docstring) validated and normalised into the sizes and flags every step
reads (``_Cfg``), and the layout of the heads' block-diagonal recurrent weights. Like the
rest of the oracle, written from ``docs/cell.md`` alone, with NumPy and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Variant = dict
Params = dict[str, np.ndarray]

GATE_ORDER = ("i", "f", "g", "o")  # canonical order of gates
SIGMOID_ORDER = ("i", "f", "o")  # order of the sigmoid gates S

_LSTM_KEYS = {
    "kind", "hidden_size", "proj_size", "bias", "input_gate", "forget_gate", "output_gate",
    "coupled", "peephole", "fgr", "layernorm", "candidate_activation", "output_activation",
    "cell_clip", "gate_hidden", "gate_activation", "zoneout", "heads", "slstm", "forget_activation", "n_clamp",
    "gate_hidden_activation",
}
_RNN_KEYS = {"kind", "hidden_size", "bias", "nonlinearity", "heads"}


# --------------------------------------------------------------------------------------
# Variant -> normalised configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cfg:
    kind: str  # "lstm" | "rnn"
    H: int  # hidden size
    P: int  # projection size, 0 = none
    H_out: int  # P if P > 0 else H
    bias: bool
    nonlinearity: str  # rnn only
    C: tuple[str, ...]  # computed gates, in order i, f, g, o
    S: tuple[str, ...]  # sigmoid gates  C ∩ (i, f, o), in that order
    f_mode: str  # "sigmoid" | "one" (nfg) | "cifg" (f = 1 - i)
    hidden: dict  # gate -> tuple of MLP hidden widths (only deep gates)
    phi: str  # between a deep gate's layers: "tanh" | "relu" | "sigmoid" | "identity"
    width: dict  # gate -> first-layer width n_k
    slices: dict  # gate -> slice of its n_k rows inside the R rows
    R: int  # sum of n_k
    peephole: bool
    fgr: bool
    layernorm: bool
    cand: str  # g = cand(u_g): "tanh" | "identity" (niaf) | "relu"
    out: str  # h = o * out(m): "tanh" | "identity" (noaf) | "relu"
    clip: float | None
    gate_slope: float | None  # None: σ gates; else clamp(slope · u + 0.5, 0, 1)
    zoneout: tuple[float, float]  # (z_c, z_h)
    heads: int = 1  # k: W_hh block-diagonal per gate
    slstm: bool = False  # the sLSTM; its cell state is c, n, m side by side
    fexp: bool = False  # sLSTM: exponential forget gate (log f = f̃)
    nclamp: bool = False  # sLSTM: n_t = max(·, 1)

    @property
    def SH(self) -> int:
        """Width of the carried cell state: H, or 3H for the sLSTM (c, n, m)."""
        return 3 * self.H if self.slstm else self.H


def _config(variant: Variant) -> _Cfg:
    """Validate a variant dict and derive the sizes used everywhere else."""
    v = dict(variant)
    kind = v.get("kind", "lstm")
    if kind not in ("lstm", "rnn"):
        raise ValueError(f"unknown kind {kind!r}")
    allowed = _LSTM_KEYS if kind == "lstm" else _RNN_KEYS
    unknown = set(v) - allowed
    if unknown:
        raise ValueError(f"variant keys not valid for kind={kind!r}: {sorted(unknown)}")
    H = int(v["hidden_size"])
    if H <= 0:
        raise ValueError("hidden_size must be positive")
    bias = bool(v.get("bias", True))

    if kind == "rnn":
        nl = v.get("nonlinearity", "tanh")
        if nl not in ("tanh", "relu"):
            raise ValueError(f"unknown nonlinearity {nl!r}")
        heads = _heads(v, H, H, [H])
        return _Cfg(kind, H, 0, H, bias, nl, (), (), "one", {}, "tanh", {}, {"g": slice(0, H)}, H,
                    False, False, False, "tanh", "tanh", None, None, (0.0, 0.0), heads)

    P = int(v.get("proj_size", 0) or 0)
    if P < 0:
        raise ValueError("proj_size must be >= 0")
    has_i = bool(v.get("input_gate", True))
    has_f = bool(v.get("forget_gate", True))
    has_o = bool(v.get("output_gate", True))
    coupled = bool(v.get("coupled", False))
    if coupled and not has_i:
        raise ValueError("coupled (cifg, f = 1 - i) needs the input gate")
    if coupled and not has_f:
        raise ValueError("coupled (cifg) and forget_gate=False (nfg) contradict each other")
    f_mode = "cifg" if coupled else ("sigmoid" if has_f else "one")

    C = tuple(k for k, on in zip(GATE_ORDER, (has_i, f_mode == "sigmoid", True, has_o), strict=True) if on)
    S = tuple(k for k in SIGMOID_ORDER if k in C)

    hidden = {}
    for k, widths in (v.get("gate_hidden") or {}).items():
        widths = tuple(int(w) for w in widths)
        if k not in C:
            raise ValueError(f"gate_hidden names gate {k!r}, which is not computed")
        if any(w <= 0 for w in widths):
            raise ValueError("MLP widths must be positive")
        if widths:  # an empty tuple means an ordinary gate
            hidden[k] = widths
    width = {k: (hidden[k][0] if k in hidden else H) for k in C}
    slices, start = {}, 0
    for k in C:
        slices[k] = slice(start, start + width[k])
        start += width[k]

    cand = v.get("candidate_activation", "tanh")
    out = v.get("output_activation", "tanh")
    if cand not in ("tanh", "identity", "relu") or out not in ("tanh", "identity", "relu"):
        raise ValueError("activations must be 'tanh', 'identity' or 'relu'")
    slopes = {"sigmoid": None, "hard_sigmoid": 0.2, "hardsigmoid": 1.0 / 6.0}
    gate_act = v.get("gate_activation", "sigmoid")
    if gate_act not in slopes:
        raise ValueError(f"unknown gate activation {gate_act!r}")
    zc, zh = (float(z) for z in v.get("zoneout", (0.0, 0.0)))
    clip = v.get("cell_clip", None)
    if clip is not None:
        clip = float(clip)
        if not clip > 0:
            raise ValueError("cell_clip must be positive")
    return _Cfg(
        kind="lstm", H=H, P=P, H_out=P if P > 0 else H, bias=bias, nonlinearity="tanh",
        C=C, S=S, f_mode=f_mode, hidden=hidden, phi=_hidden_activation(v), width=width, slices=slices, R=start,
        peephole=bool(v.get("peephole", False)), fgr=bool(v.get("fgr", False)),
        layernorm=bool(v.get("layernorm", False)),
        cand=cand, out=out, clip=clip, gate_slope=slopes[gate_act], zoneout=(zc, zh),
        heads=_heads(v, H, P if P > 0 else H, list(width.values())),
        slstm=_slstm(v, P, C, hidden), fexp=v.get("forget_activation", "sigmoid") == "exp",
        nclamp=bool(v.get("n_clamp", False)),
    )


def _hidden_activation(v: Variant) -> str:
    phi = v.get("gate_hidden_activation", "tanh")
    if phi not in ("tanh", "relu", "sigmoid", "identity"):
        raise ValueError("gate_hidden_activation must be 'tanh', 'relu', 'sigmoid' or 'identity'")
    if phi != "tanh" and not v.get("gate_hidden"):
        raise ValueError("gate_hidden_activation needs deep gates (gate_hidden)")
    return phi


def _slstm(v: Variant, P: int, C: tuple[str, ...], hidden: dict) -> bool:
    on = bool(v.get("slstm", False))
    if not on and (v.get("forget_activation", "sigmoid") != "sigmoid" or v.get("n_clamp", False)):
        raise ValueError("forget_activation / n_clamp are options of the sLSTM")
    plain = ("peephole", "fgr", "layernorm", "coupled", "cell_clip")
    if on and (P or C != GATE_ORDER or hidden or any(v.get(k) for k in plain)
               or v.get("candidate_activation", "tanh") != "tanh" or v.get("output_activation", "tanh") != "tanh"
               or v.get("gate_activation", "sigmoid") != "sigmoid" or any(v.get("zoneout", (0, 0)))):
        raise ValueError("the sLSTM takes heads, forget_activation and n_clamp only")
    return on


def _heads(v: Variant, H: int, H_out: int, widths: list[int]) -> int:
    k = int(v.get("heads", 1))
    if k < 1 or H_out % k or any(w % k for w in widths):
        raise ValueError(f"heads={k} must divide H_out={H_out} and every gate width {widths}")
    return k


def _full_recurrent(cfg: _Cfg, w: np.ndarray) -> np.ndarray:
    """The full W_hh (R, H_out) from the stored (R, H_out/k): per gate, block j (rows
    j·n/k … (j+1)·n/k of the gate) sits in columns j·H_out/k … (j+1)·H_out/k, zeros elsewhere."""
    k = cfg.heads
    if k == 1:
        return w
    d = cfg.H_out // k
    full = np.zeros((w.shape[0], cfg.H_out))
    for sl in cfg.slices.values():
        n = (sl.stop - sl.start) // k
        for j in range(k):
            rows = slice(sl.start + j * n, sl.start + (j + 1) * n)
            full[rows, j * d:(j + 1) * d] = w[rows]
    return full


def _stored_recurrent_grad(cfg: _Cfg, dfull: np.ndarray) -> np.ndarray:
    """dL/dW_hh (R, H_out) -> the gradient of the stored blocks (R, H_out/k)."""
    k = cfg.heads
    if k == 1:
        return dfull
    d = cfg.H_out // k
    out = np.zeros((dfull.shape[0], d))
    for sl in cfg.slices.values():
        n = (sl.stop - sl.start) // k
        for j in range(k):
            rows = slice(sl.start + j * n, sl.start + (j + 1) * n)
            out[rows] = dfull[rows, j * d:(j + 1) * d]
    return out
