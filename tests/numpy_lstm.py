"""Float64 NumPy reference ("oracle") for every lstmkit layer.

Written independently from ``docs/cell.md`` (the contract) and from nothing else: it
imports only NumPy and the standard library, and it never looks at ``src/``. Forward
passes follow the equations of cell.md line by line; backward passes are hand-written
backpropagation through time (no autograd, no numerical differentiation). The test
file ``test_numpy_oracle.py`` checks every backward here against central finite
differences.

Conventions
-----------
* Shapes: ``T`` time, ``B`` batch, ``I`` layer input size, ``H`` hidden size (cells),
  ``P`` projection size (0 = none), ``H_out = P or H``, ``R`` total first-layer gate
  width (``4H`` for vanilla), ``nS = len(S)`` number of sigmoid gates, ``D`` directions,
  ``L`` layers.
* A *variant* is a plain dict (keys below). Parameter dicts use the names of cell.md
  *without* the ``_l{k}`` / ``_reverse`` suffix (``weight_ih``, ``peephole_i``,
  ``mlp_f_weight1`` ...); :func:`flatten_params` / :func:`unflatten_params` convert
  to and from torch-style suffixed names.
* Cell clip: ``c = clamp(c_pre, -clip, clip)``; its derivative is taken to be 1 where
  ``|c_pre| <= clip`` (boundary included, the same convention as ``torch.clamp``)
  and 0 elsewhere.

Variant keys (all optional except ``hidden_size``)::

    kind                  "lstm" (default) | "rnn"
    nonlinearity          "tanh" (default) | "relu"            (rnn only)
    hidden_size           H
    proj_size             P, 0 = no projection                 (lstm only)
    bias                  bool, default True
    input_gate            False = nig  (i = 1)
    forget_gate           False = nfg  (f = 1)
    output_gate           False = nog  (o = 1)
    coupled               True  = cifg (f = 1 - i)
    peephole              bool
    fgr                   bool, full gate recurrence
    layernorm             bool
    candidate_activation  "tanh" (default) | "identity" (= niaf) | "relu"
    output_activation     "tanh" (default) | "identity" (= noaf) | "relu"
    gate_activation       "sigmoid" (default) | "hard_sigmoid" (clamp(0.2u + 0.5, 0, 1))
                          | "hardsigmoid" (clamp(u/6 + 0.5, 0, 1)); for i, f and o
    cell_clip             float or None
    zoneout               (z_c, z_h), default (0, 0); the masks are given to forward()
    gate_hidden           {gate letter: tuple of MLP hidden widths}, e.g. {"f": (8,), "g": (5, 3)}
    gate_hidden_activation  φ between a deep gate's layers: "tanh" (default) | "relu" | "sigmoid"
                          | "identity"
    slstm                 True = the sLSTM (Beck et al. 2024): exponential input gate, forget gate
                          exp(log σ(f̃) + m_prev − m), normaliser n, stabiliser m, h = o c / n; its
                          "c" state is c, n, m side by side (B, 3H) wherever c appears below
    forget_activation     "sigmoid" (default) | "exp": the sLSTM's log f = log σ(f̃) or f̃
    n_clamp               True = the sLSTM's n_t = max(f n + i, 1) (FlashRNN)
    heads                 k, default 1: block-diagonal recurrent weights (lstm and rnn); each
                          computed gate's n_k rows of W_hh split in k blocks, block j reading the
                          j-th H_out/k entries of h; stored as weight_hh (R, H_out/k), row r holding
                          the H_out/k weights of its block
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Variant = dict
Params = dict[str, np.ndarray]
Lengths = Sequence[int] | np.ndarray | None
Cache = dict[str, Any]

LN_EPS = 1e-5  # epsilon of every layer norm (cell.md: sqrt(var + 1e-5))
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


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


def param_shapes(variant: Variant, input_size: int) -> dict[str, tuple[int, ...]]:
    """Names (without suffix) and shapes of one layer-direction's parameters (cell.md table)."""
    cfg = _config(variant)
    I, H = int(input_size), cfg.H
    if cfg.kind == "rnn":
        shapes = {"weight_ih": (H, I), "weight_hh": (H, H // cfg.heads)}
        if cfg.bias:
            shapes |= {"bias_ih": (H,), "bias_hh": (H,)}
        return shapes
    R, nS = cfg.R, len(cfg.S)
    shapes = {"weight_ih": (R, I), "weight_hh": (R, cfg.H_out // cfg.heads)}
    if cfg.bias:
        shapes |= {"bias_ih": (R,), "bias_hh": (R,)}
    if cfg.P:
        shapes["weight_hr"] = (cfg.P, H)
    if cfg.peephole:
        for k in cfg.S:
            shapes[f"peephole_{k}"] = (H,)
    if cfg.fgr:
        shapes["weight_gg"] = (nS * H, nS * H)
    if cfg.layernorm:
        shapes |= {"ln_ih_weight": (R,), "ln_hh_weight": (R,),
                   "ln_c_weight": (H,), "ln_c_bias": (H,)}
    for k, widths in cfg.hidden.items():
        n = widths + (H,)  # n_1 .. n_m, n_{m+1} = H
        for j in range(1, len(widths) + 1):
            shapes[f"mlp_{k}_weight{j}"] = (n[j], n[j - 1])  # (n_{j+1}, n_j)
            if cfg.bias:
                shapes[f"mlp_{k}_bias{j}"] = (n[j],)
    return shapes


def init_params(variant: Variant, input_size: int, rng: np.random.Generator) -> Params:
    """Random float64 parameters: U(-0.5, 0.5), layer-norm gains 1 + U(-0.3, 0.3),
    layer-norm shift U(-0.3, 0.3). (Deliberately not torch's init: tests want generic values.)"""
    params = {}
    for name, shape in param_shapes(variant, input_size).items():
        if name.startswith("ln_") and name.endswith("_weight"):
            params[name] = 1.0 + rng.uniform(-0.3, 0.3, shape)
        elif name == "ln_c_bias":
            params[name] = rng.uniform(-0.3, 0.3, shape)
        else:
            params[name] = rng.uniform(-0.5, 0.5, shape)
    return params


def layer_input_size(variant: Variant, input_size: int, layer: int, bidirectional: bool) -> int:
    """Input size of layer ``layer`` of a stack: ``input_size`` for layer 0, ``D * H_out`` above."""
    cfg = _config(variant)
    return int(input_size) if layer == 0 else (2 if bidirectional else 1) * cfg.H_out


def init_stack(variant: Variant, input_size: int, num_layers: int, bidirectional: bool,
               rng: np.random.Generator) -> list[list[Params]]:
    """``layers[l][d]`` parameter dicts for a whole stack (see :func:`init_params`)."""
    D = 2 if bidirectional else 1
    return [[init_params(variant, layer_input_size(variant, input_size, l, bidirectional), rng)
             for _ in range(D)] for l in range(num_layers)]


def flatten_params(layers: list[list[Params]]) -> dict[str, np.ndarray]:
    """``layers[l][d][name]`` -> ``{name_l{l}[_reverse]: array}`` (torch naming)."""
    flat = {}
    for l, dirs in enumerate(layers):
        for d, params in enumerate(dirs):
            for name, value in params.items():
                flat[f"{name}_l{l}{'_reverse' if d == 1 else ''}"] = value
    return flat


def unflatten_params(flat: dict[str, Any], num_layers: int, bidirectional: bool) -> list[list[Params]]:
    """Inverse of :func:`flatten_params`."""
    D = 2 if bidirectional else 1
    layers: list[list[Params]] = [[{} for _ in range(D)] for _ in range(num_layers)]
    for key, value in flat.items():
        d = 1 if key.endswith("_reverse") else 0
        base = key[: -len("_reverse")] if d else key
        stem, _, lpart = base.rpartition("_l")
        layers[int(lpart)][d][stem] = np.asarray(value, dtype=np.float64)
    return layers


def _check_params(cfg_variant: Variant, params: Params, input_size: int) -> None:
    expected = param_shapes(cfg_variant, input_size)
    if set(params) != set(expected):
        raise ValueError(f"parameter names {sorted(params)} != expected {sorted(expected)}")
    for name, shape in expected.items():
        if np.shape(params[name]) != shape:
            raise ValueError(f"{name}: shape {np.shape(params[name])} != expected {shape}")


# --------------------------------------------------------------------------------------
# Small building blocks (each with its exact backward)
# --------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free σ


def _act(name: str, v: np.ndarray) -> np.ndarray:
    """tanh, identity or relu."""
    return np.tanh(v) if name == "tanh" else np.maximum(v, 0.0) if name == "relu" else v


def _act_backward(name: str, dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Gradient through :func:`_act`, from its output: 1 − out² (tanh), 1 where out > 0 (relu)."""
    if name == "tanh":
        return dout * (1.0 - out**2)
    return dout * (out > 0) if name == "relu" else dout


def _gate(cfg: _Cfg, u: np.ndarray) -> np.ndarray:
    """A gate i, f or o: σ(u), or the hard sigmoid clamp(slope · u + 0.5, 0, 1)."""
    if cfg.gate_slope is None:
        return _sigmoid(u)
    return np.clip(cfg.gate_slope * u + 0.5, 0.0, 1.0)


def _gate_backward(cfg: _Cfg, da: np.ndarray, a: np.ndarray) -> np.ndarray:
    """dL/du from dL/da and the gate's value a: a(1 − a) for σ; the slope strictly inside
    (0, 1) for a hard sigmoid (0 on the flat parts and at the kinks)."""
    if cfg.gate_slope is None:
        return da * a * (1.0 - a)
    return da * cfg.gate_slope * ((a > 0.0) & (a < 1.0))


def _ln_forward(v: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None = None):
    """LN over the last axis: γ ⊙ (v − mean) / sqrt(var + 1e-5) (+ β), biased variance.
    v (B, n), γ (n,), β (n,) -> (B, n)."""
    mean = v.mean(axis=-1, keepdims=True)  # (B, 1)
    centred = v - mean  # (B, n)
    inv_std = 1.0 / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + LN_EPS)  # (B, 1)
    xhat = centred * inv_std  # (B, n)
    out = gamma * xhat if beta is None else gamma * xhat + beta
    return out, (xhat, inv_std, gamma)


def _ln_backward(dout: np.ndarray, cache):
    """Exact LN backward. Returns (dv (B, n), dγ (n,), dβ (n,))."""
    xhat, inv_std, gamma = cache
    dgamma = (dout * xhat).sum(axis=0)
    dbeta = dout.sum(axis=0)
    dxhat = dout * gamma  # (B, n)
    # d/dv of (v - mean)/std:  (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / std
    dv = inv_std * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                    - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dv, dgamma, dbeta


def _ln_chunks_forward(v: np.ndarray, gamma: np.ndarray, cfg: _Cfg):
    """LN applied separately to each gate's n_k-wide chunk of the R columns. v (B, R)."""
    out = np.empty_like(v)  # (B, R)
    caches = {}
    for k in cfg.C:
        sl = cfg.slices[k]
        out[:, sl], caches[k] = _ln_forward(v[:, sl], gamma[sl])
    return out, caches


def _ln_chunks_backward(dout: np.ndarray, caches, cfg: _Cfg):
    dv = np.empty_like(dout)  # (B, R)
    dgamma = np.empty(dout.shape[1])  # (R,)
    for k in cfg.C:
        sl = cfg.slices[k]
        dv[:, sl], dgamma[sl], _ = _ln_backward(dout[:, sl], caches[k])
    return dv, dgamma


def _phi(name: str, v: np.ndarray) -> np.ndarray:
    """A deep gate's activation between its layers."""
    return _sigmoid(v) if name == "sigmoid" else _act(name, v)


def _phi_backward(name: str, dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Gradient through :func:`_phi`, from its output (σ: out (1 − out))."""
    return dout * out * (1.0 - out) if name == "sigmoid" else _act_backward(name, dout, out)


def _mlp_forward(z_k: np.ndarray, p: Params, k: str, cfg: _Cfg):
    """Deep gate: u_k = W_m φ(… W_2 φ(W_1 φ(z_k) + b_1) …) + b_m, φ = cfg.phi (tanh by default).
    z_k (B, n_1) -> u_k (B, H)."""
    v, acts = z_k, []
    for j in range(1, len(cfg.hidden[k]) + 1):
        a = _phi(cfg.phi, v)  # (B, n_j)
        acts.append(a)
        v = a @ p[f"mlp_{k}_weight{j}"].T  # (B, n_{j+1})
        if cfg.bias:
            v = v + p[f"mlp_{k}_bias{j}"]
    return v, acts


def _mlp_backward(du: np.ndarray, acts, p: Params, k: str, cfg: _Cfg, grads: Params):
    dv = du  # (B, H)
    for j in range(len(cfg.hidden[k]), 0, -1):
        a = acts[j - 1]  # (B, n_j)
        grads[f"mlp_{k}_weight{j}"] += dv.T @ a
        if cfg.bias:
            grads[f"mlp_{k}_bias{j}"] += dv.sum(axis=0)
        dv = _phi_backward(cfg.phi, dv @ p[f"mlp_{k}_weight{j}"], a)  # (B, n_j)
    return dv  # dz_k (B, n_1)


# --------------------------------------------------------------------------------------
# One LSTM step (cell.md "One step") and its backward
# --------------------------------------------------------------------------------------


def _lstm_step(cfg: _Cfg, p: Params, x_t, h_prev, c_prev, s_prev, keep=None):
    """x_t (B, I), h_prev (B, H_out), c_prev (B, H), s_prev (B, nS·H) or None; keep: zoneout's
    masks (d_c (B, H), d_h (B, H_out)) of this step, or None for the expectation (z_c, z_h).
    Returns h_t (B, H_out), c_t (B, H), s_t (B, nS·H) or None, cache."""
    H = cfg.H
    ones = np.ones_like(c_prev)  # (B, H)

    # Input and recurrent contributions to the gate pre-activations.
    a_raw = x_t @ p["weight_ih"].T  # (B, R)
    r_raw = h_prev @ _full_recurrent(cfg, p["weight_hh"]).T  # (B, R)
    ln_a = ln_r = None
    if cfg.layernorm:  # per gate chunk, gains only
        a, ln_a = _ln_chunks_forward(a_raw, p["ln_ih_weight"], cfg)  # (B, R)
        r, ln_r = _ln_chunks_forward(r_raw, p["ln_hh_weight"], cfg)  # (B, R)
    else:
        a, r = a_raw, r_raw
    z = a + r  # (B, R)
    if cfg.bias:
        z = z + p["bias_ih"] + p["bias_hh"]

    # Per-gate pre-activations u_k (B, H): ordinary gate u_k = z_k, deep gate u_k = MLP(z_k).
    u, mlp = {}, {}
    for k in cfg.C:
        z_k = z[:, cfg.slices[k]]  # (B, n_k)
        if k in cfg.hidden:
            u[k], mlp[k] = _mlp_forward(z_k, p, k, cfg)  # (B, H)
        else:
            u[k] = z_k  # (B, H)

    if cfg.peephole:  # i and f peek at the previous cell state
        for k in ("i", "f"):
            if k in cfg.S:
                u[k] = u[k] + p[f"peephole_{k}"] * c_prev
    if cfg.fgr:  # full gate recurrence from the previous sigmoid-gate activations
        rec = s_prev @ p["weight_gg"].T  # (B, nS·H)
        for j, k in enumerate(cfg.S):
            u[k] = u[k] + rec[:, j * H:(j + 1) * H]

    i = _gate(cfg, u["i"]) if "i" in cfg.C else ones  # (B, H)
    if cfg.f_mode == "sigmoid":
        f = _gate(cfg, u["f"])
    elif cfg.f_mode == "cifg":
        f = 1.0 - i
    else:  # nfg
        f = ones
    g = _act(cfg.cand, u["g"])  # (B, H)

    c_pre = f * c_prev + i * g  # (B, H)
    c = c_pre if cfg.clip is None else np.clip(c_pre, -cfg.clip, cfg.clip)

    if cfg.peephole and "o" in cfg.C:  # the output gate peeks at the new c_t
        u["o"] = u["o"] + p["peephole_o"] * c
    o = _gate(cfg, u["o"]) if "o" in cfg.C else ones  # (B, H)

    ln_c = None
    if cfg.layernorm:
        m, ln_c = _ln_forward(c, p["ln_c_weight"], p["ln_c_bias"])  # (B, H)
    else:
        m = c
    act = _act(cfg.out, m)  # (B, H)
    h_cell = o * act  # (B, H)
    h = h_cell @ p["weight_hr"].T if cfg.P else h_cell  # (B, H_out)

    gate_val = {"i": i, "f": f, "o": o}
    s = np.concatenate([gate_val[k] for k in cfg.S], axis=1) if cfg.fgr else None  # (B, nS·H)
    d_c, d_h = keep if keep is not None else cfg.zoneout  # zoneout: keep the previous state
    c_z = d_c * c_prev + (1.0 - d_c) * c  # (B, H)
    h_z = d_h * h_prev + (1.0 - d_h) * h  # (B, H_out)
    cache = dict(x=x_t, h_prev=h_prev, c_prev=c_prev, s_prev=s_prev, ln_a=ln_a, ln_r=ln_r,
                 mlp=mlp, i=i, f=f, g=g, c_pre=c_pre, c=c, o=o, ln_c=ln_c, act=act,
                 h_cell=h_cell, d_c=d_c, d_h=d_h, c_state=c_z, h_state=h_z)
    return h_z, c_z, s, cache


def _lstm_step_backward(cfg: _Cfg, p: Params, sc, dh, dc, ds, grads: Params):
    """dh (B, H_out) = dL/dh_t, dc (B, H) = dL/dc_t through the carried state,
    ds (B, nS·H) = dL/ds_t (fgr) or None. Accumulates into grads; returns
    dx_t (B, I), dh_prev (B, H_out), dc_prev (B, H), ds_prev or None."""
    H = cfg.H
    i, f, g, o, c, act = sc["i"], sc["f"], sc["g"], sc["o"], sc["c"], sc["act"]
    c_prev = sc["c_prev"]
    zeros = np.zeros_like(c)
    # Zoneout: h_z = d_h h_prev + (1 − d_h) h, c_z likewise; dh, dc arrive at h_z, c_z.
    dh_prev_kept, dc_prev_kept = sc["d_h"] * dh, sc["d_c"] * dc
    dh, dc = (1.0 - sc["d_h"]) * dh, (1.0 - sc["d_c"]) * dc

    # Projection.
    if cfg.P:
        grads["weight_hr"] += dh.T @ sc["h_cell"]
        dh_cell = dh @ p["weight_hr"]  # (B, H)
    else:
        dh_cell = dh

    # Gradients reaching the sigmoid gates' activations through s_t (fgr).
    dgate = {"i": zeros, "f": zeros, "o": zeros}
    if cfg.fgr:
        for j, k in enumerate(cfg.S):
            dgate[k] = ds[:, j * H:(j + 1) * H]

    # h_cell = o ⊙ act(m)
    do = dh_cell * act + dgate["o"]
    dact = dh_cell * o
    dm = _act_backward(cfg.out, dact, act)
    if cfg.layernorm:
        dm_c, dgc, dbc = _ln_backward(dm, sc["ln_c"])
        grads["ln_c_weight"] += dgc
        grads["ln_c_bias"] += dbc
        dc = dc + dm_c
    else:
        dc = dc + dm

    du = {}
    if "o" in cfg.C:
        du["o"] = _gate_backward(cfg, do, o)
        if cfg.peephole:
            grads["peephole_o"] += (du["o"] * c).sum(axis=0)
            dc = dc + du["o"] * p["peephole_o"]

    # Cell clip: derivative 1 where |c_pre| <= clip, else 0.
    if cfg.clip is not None:
        dc = dc * (np.abs(sc["c_pre"]) <= cfg.clip)

    # c_pre = f ⊙ c_prev + i ⊙ g
    dc_prev = dc * f
    df = dc * c_prev + dgate["f"]
    di = dc * g + dgate["i"]
    dg = dc * i
    if cfg.f_mode == "cifg":  # f = 1 - i
        di = di - df
    if "i" in cfg.C:
        du["i"] = _gate_backward(cfg, di, i)
    if cfg.f_mode == "sigmoid":
        du["f"] = _gate_backward(cfg, df, f)
    du["g"] = _act_backward(cfg.cand, dg, g)

    ds_prev = None
    if cfg.fgr:
        du_s = np.concatenate([du[k] for k in cfg.S], axis=1)  # (B, nS·H)
        grads["weight_gg"] += du_s.T @ sc["s_prev"]
        ds_prev = du_s @ p["weight_gg"]  # (B, nS·H)
    if cfg.peephole:
        for k in ("i", "f"):
            if k in cfg.S:
                grads[f"peephole_{k}"] += (du[k] * c_prev).sum(axis=0)
                dc_prev = dc_prev + du[k] * p[f"peephole_{k}"]

    # Back through the deep gates into z (B, R).
    dz = np.empty((c.shape[0], cfg.R))
    for k in cfg.C:
        if k in cfg.hidden:
            dz[:, cfg.slices[k]] = _mlp_backward(du[k], sc["mlp"][k], p, k, cfg, grads)
        else:
            dz[:, cfg.slices[k]] = du[k]
    if cfg.bias:
        grads["bias_ih"] += dz.sum(axis=0)
        grads["bias_hh"] += dz.sum(axis=0)
    if cfg.layernorm:
        da, dgi = _ln_chunks_backward(dz, sc["ln_a"], cfg)
        dr, dgh = _ln_chunks_backward(dz, sc["ln_r"], cfg)
        grads["ln_ih_weight"] += dgi
        grads["ln_hh_weight"] += dgh
    else:
        da = dr = dz
    grads["weight_ih"] += da.T @ sc["x"]
    grads["weight_hh"] += _stored_recurrent_grad(cfg, dr.T @ sc["h_prev"])
    dx = da @ p["weight_ih"]  # (B, I)
    dh_prev = dr @ _full_recurrent(cfg, p["weight_hh"]) + dh_prev_kept  # (B, H_out)
    return dx, dh_prev, dc_prev + dc_prev_kept, ds_prev


# --------------------------------------------------------------------------------------
# One sLSTM step (cell.md "The sLSTM") and its backward
# --------------------------------------------------------------------------------------


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    """log σ(x) = min(x, 0) − log(1 + e^{−|x|}), without overflow."""
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def _slstm_step(cfg: _Cfg, p: Params, x_t, h_prev, state, s_prev=None, keep=None):
    """x_t (B, I), h_prev (B, H), state (B, 3H) = c, n, m. Returns h_t, the new state (B, 3H),
    None (no fgr state), cache."""
    H = cfg.H
    pre = x_t @ p["weight_ih"].T + h_prev @ _full_recurrent(cfg, p["weight_hh"]).T  # (B, 4H)
    if cfg.bias:
        pre = pre + p["bias_ih"] + p["bias_hh"]
    ui, uf, uz, uo = (pre[:, k * H:(k + 1) * H] for k in range(4))  # ĩ, f̃, z̃, õ
    c, n, m = state[:, :H], state[:, H:2 * H], state[:, 2 * H:]
    log_f = uf if cfg.fexp else _log_sigmoid(uf)
    kept = log_f + m  # (B, H)
    empty = n == 0.0  # nothing kept: the stabiliser is ĩ
    m_new = np.where(empty, ui, np.maximum(kept, ui))
    i = np.exp(ui - m_new)
    f = np.exp(np.where(empty, -np.inf, kept - m_new))  # nothing kept from an empty cell
    g = np.tanh(uz)
    o = _sigmoid(uo)
    c_new = f * c + i * g
    n_raw = f * n + i
    n_new = np.maximum(n_raw, 1.0) if cfg.nclamp else n_raw
    h = o * (c_new / n_new)
    cache = dict(x=x_t, h_prev=h_prev, c=c, n=n, ui=ui, uf=uf, kept=kept, empty=empty, i=i, f=f, g=g, o=o,
                 c_new=c_new, n_raw=n_raw, n_new=n_new)
    return h, np.concatenate([c_new, n_new, m_new], axis=1), None, cache


def _slstm_step_backward(cfg: _Cfg, p: Params, sc, dh, dstate, ds=None, grads=None):
    """dh (B, H) = dL/dh_t, dstate (B, 3H) = dL/d(c_t, n_t, m_t) through the carried state.
    The stabiliser's max is differentiated as it is computed: its gradient goes to the larger
    of ĩ and log f + m_prev (half to each at a tie), and all of it to ĩ where the cell was empty.
    Returns dx_t, dh_prev, dstate_prev, None."""
    H = cfg.H
    dc, dn, dm = dstate[:, :H], dstate[:, H:2 * H], dstate[:, 2 * H:]
    i, f, g, o, c_new, n_new = sc["i"], sc["f"], sc["g"], sc["o"], sc["c_new"], sc["n_new"]
    dc = dc + dh * o / n_new
    dn = dn - dh * o * c_new / n_new**2
    do = dh * c_new / n_new
    if cfg.nclamp:  # n_new = max(n_raw, 1): the floor's derivative is 0 (1 at the tie, as torch.clamp_min)
        dn = dn * (sc["n_raw"] >= 1.0)
    di = dc * g + dn  # through c_t = f c + i g and n_t = f n + i
    df = dc * sc["c"] + dn * sc["n"]
    dg = dc * i
    dc_prev, dn_prev = dc * f, dn * f
    # i = exp(ĩ − m_t), f = exp(kept − m_t)
    dui = di * i
    dkept = df * f
    dm_new = dm - di * i - df * f
    ui, kept = sc["ui"], sc["kept"]
    to_i = np.where(sc["empty"], 1.0, np.where(ui > kept, 1.0, np.where(ui == kept, 0.5, 0.0)))
    dui = dui + dm_new * to_i
    dkept = dkept + dm_new * (1.0 - to_i)
    dm_prev = dkept  # kept = log f + m_prev
    duf = dkept if cfg.fexp else dkept * (1.0 - _sigmoid(sc["uf"]))
    duz = dg * (1.0 - g**2)
    duo = do * o * (1.0 - o)
    dz = np.concatenate([dui, duf, duz, duo], axis=1)  # (B, 4H)
    if cfg.bias:
        grads["bias_ih"] += dz.sum(axis=0)
        grads["bias_hh"] += dz.sum(axis=0)
    grads["weight_ih"] += dz.T @ sc["x"]
    grads["weight_hh"] += _stored_recurrent_grad(cfg, dz.T @ sc["h_prev"])
    dx = dz @ p["weight_ih"]
    dh_prev = dz @ _full_recurrent(cfg, p["weight_hh"])
    return dx, dh_prev, np.concatenate([dc_prev, dn_prev, dm_prev], axis=1), None


# --------------------------------------------------------------------------------------
# One plain-RNN step
# --------------------------------------------------------------------------------------


def _rnn_step(cfg: _Cfg, p: Params, x_t, h_prev):
    """h_t = φ(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh). x_t (B, I), h_prev (B, H)."""
    pre = x_t @ p["weight_ih"].T + h_prev @ _full_recurrent(cfg, p["weight_hh"]).T  # (B, H)
    if cfg.bias:
        pre = pre + p["bias_ih"] + p["bias_hh"]
    h = np.tanh(pre) if cfg.nonlinearity == "tanh" else np.maximum(pre, 0.0)
    return h, dict(x=x_t, h_prev=h_prev, pre=pre, h=h)


def _rnn_step_backward(cfg: _Cfg, p: Params, sc, dh, grads: Params):
    if cfg.nonlinearity == "tanh":
        dpre = dh * (1.0 - sc["h"] ** 2)
    else:
        dpre = dh * (sc["pre"] > 0)
    if cfg.bias:
        grads["bias_ih"] += dpre.sum(axis=0)
        grads["bias_hh"] += dpre.sum(axis=0)
    grads["weight_ih"] += dpre.T @ sc["x"]
    grads["weight_hh"] += _stored_recurrent_grad(cfg, dpre.T @ sc["h_prev"])
    return dpre @ p["weight_ih"], dpre @ _full_recurrent(cfg, p["weight_hh"])


# --------------------------------------------------------------------------------------
# One layer, one (forward-in-time) direction
# --------------------------------------------------------------------------------------


def _valid_mask(lengths: Lengths, T: int, B: int) -> np.ndarray:
    """(T, B) bool: step t is valid for batch entry b iff t < len_b."""
    if lengths is None:
        return np.ones((T, B), dtype=bool)
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lens.shape != (B,) or (lens < 0).any() or (lens > T).any():
        raise ValueError(f"lengths must be (B,)={B} ints in [0, T={T}], got {lengths}")
    return np.arange(T)[:, None] < lens[None, :]


def layer_forward(
    x: np.ndarray, params: Params, h0: np.ndarray | None, c0: np.ndarray | None,
    variant: Variant, lengths: Lengths = None, keep=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Cache]:
    """One layer, one forward-in-time direction.

    x (T, B, I); h0 (B, H_out); c0 (B, H) (None for rnn); lengths (B,) ints or None;
    keep: zoneout's masks (d_c (T, B, H), d_h (T, B, H_out)) indexed by step, or None (the
    expectation; no effect without zoneout).
    Returns y (T, B, H_out) (zero at t >= len_b), h_n (B, H_out), c_n (B, H) (None for
    rnn), cache. Steps t >= len_b change nothing (h, c and the fgr state carry over).
    """
    cfg = _config(variant)
    x = np.asarray(x, dtype=np.float64)
    T, B, I = x.shape
    _check_params(variant, params, I)
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    valid = _valid_mask(lengths, T, B)  # (T, B)
    h = np.zeros((B, cfg.H_out)) if h0 is None else np.array(h0, dtype=np.float64)  # (B, H_out)
    if h.shape != (B, cfg.H_out):
        raise ValueError(f"h0 shape {h.shape} != {(B, cfg.H_out)}")
    if cfg.kind == "lstm":
        c = np.zeros((B, cfg.SH)) if c0 is None else np.array(c0, dtype=np.float64)  # (B, H) (sLSTM: c, n, m)
        if c.shape != (B, cfg.SH):
            raise ValueError(f"c0 shape {c.shape} != {(B, cfg.SH)}")
        s = np.zeros((B, len(cfg.S) * cfg.H)) if cfg.fgr else None  # fgr state restarts at 0
    y = np.zeros((T, B, cfg.H_out))
    steps = []
    for t in range(T):
        mk = valid[t][:, None]  # (B, 1)
        if cfg.kind == "rnn":
            h_new, sc = _rnn_step(cfg, p, x[t], h)
        else:
            step_keep = None if keep is None else (keep[0][t], keep[1][t])
            step_fn = _slstm_step if cfg.slstm else _lstm_step
            h_new, c_new, s_new, sc = step_fn(cfg, p, x[t], h, c, s, step_keep)
            c = np.where(mk, c_new, c)
            if cfg.fgr:
                s = np.where(mk, s_new, s)
        y[t] = np.where(mk, h_new, 0.0)
        h = np.where(mk, h_new, h)
        steps.append(sc)
    cache = dict(cfg=cfg, variant=dict(variant), p=p, valid=valid, steps=steps, shape=(T, B, I))
    return y, h, (c if cfg.kind == "lstm" else None), cache


def layer_backward(
    cache: Cache, dy: np.ndarray | None, dh_n: np.ndarray | None, dc_n: np.ndarray | None,
) -> tuple[np.ndarray, Params, np.ndarray, np.ndarray | None]:
    """Hand-written BPTT for :func:`layer_forward`.

    dy (T, B, H_out), dh_n (B, H_out), dc_n (B, H) (any may be None = zero; dc_n ignored
    for rnn). Returns dx (T, B, I), dparams (same keys as params), dh0 (B, H_out),
    dc0 (B, H) (None for rnn).
    """
    cfg, p, valid = cache["cfg"], cache["p"], cache["valid"]
    T, B, I = cache["shape"]
    grads = {k: np.zeros_like(v) for k, v in p.items()}
    dy = np.zeros((T, B, cfg.H_out)) if dy is None else np.asarray(dy, dtype=np.float64)
    dh = np.zeros((B, cfg.H_out)) if dh_n is None else np.array(dh_n, dtype=np.float64)
    if cfg.kind == "lstm":
        dc = np.zeros((B, cfg.SH)) if dc_n is None else np.array(dc_n, dtype=np.float64)
        ds = np.zeros((B, len(cfg.S) * cfg.H)) if cfg.fgr else None
    dx = np.zeros((T, B, I))
    for t in range(T - 1, -1, -1):
        mk = valid[t][:, None]  # (B, 1)
        sc = cache["steps"][t]
        # Valid rows: the new state got dh (+ dy[t]); masked rows: state passed through unchanged.
        dh_new = np.where(mk, dh + dy[t], 0.0)
        if cfg.kind == "rnn":
            dx[t], dh_prev = _rnn_step_backward(cfg, p, sc, dh_new, grads)
        else:
            dc_new = np.where(mk, dc, 0.0)
            ds_new = np.where(mk, ds, 0.0) if cfg.fgr else None
            back = _slstm_step_backward if cfg.slstm else _lstm_step_backward
            dx[t], dh_prev, dc_prev, ds_prev = back(cfg, p, sc, dh_new, dc_new, ds_new, grads)
            dc = np.where(mk, dc_prev, dc)
            if cfg.fgr:
                ds = np.where(mk, ds_prev, ds)
        dh = np.where(mk, dh_prev, dh)
    return dx, grads, dh, (dc if cfg.kind == "lstm" else None)


# --------------------------------------------------------------------------------------
# Full stack: layers x directions
# --------------------------------------------------------------------------------------


def _reverse_index(lengths: Lengths, T: int, B: int) -> np.ndarray:
    """(T, B) time index: rev[t, b] = len_b - 1 - t for t < len_b, else t. It reverses each
    sequence within its own length and leaves padding in place; it is its own inverse."""
    lens = np.full(B, T) if lengths is None else np.asarray(lengths, dtype=np.int64).reshape(-1)
    t = np.arange(T)[:, None]  # (T, 1)
    return np.where(t < lens[None, :], lens[None, :] - 1 - t, t)  # (T, B)


def _permute_time(a: np.ndarray, rev: np.ndarray) -> np.ndarray:
    """out[t, b] = a[rev[t, b], b]. a (T, B, ...)."""
    return a[rev, np.arange(a.shape[1])[None, :]]


def forward(
    x: np.ndarray, layers: list[list[Params]], h0: np.ndarray | None, c0: np.ndarray | None,
    variant: Variant, lengths: Lengths = None, bidirectional: bool = False, keep=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Cache]:
    """Full stack. x (T, B, I); layers[l][d] params; h0 (D·L, B, H_out); c0 (D·L, B, H)
    (None for rnn; h0/c0 None = zeros). Returns y (T, B, D·H_out), h_n (D·L, B, H_out),
    c_n (D·L, B, H) or None, cache. No dropout. keep: zoneout's masks ``keep[l][d]`` =
    (d_c, d_h) in each direction's own step order (the reverse direction's step t reads
    x_{len_b − 1 − t}), or None for the expectation."""
    cfg = _config(variant)
    x = np.asarray(x, dtype=np.float64)
    T, B, _ = x.shape
    D, L = (2 if bidirectional else 1), len(layers)
    if any(len(dirs) != D for dirs in layers):
        raise ValueError(f"every layer needs {D} direction(s) of parameters")
    h0 = np.zeros((D * L, B, cfg.H_out)) if h0 is None else np.asarray(h0, dtype=np.float64)
    is_lstm = cfg.kind == "lstm"
    if is_lstm:
        c0 = np.zeros((D * L, B, cfg.SH)) if c0 is None else np.asarray(c0, dtype=np.float64)
    _valid_mask(lengths, T, B)  # validates lengths
    rev = _reverse_index(lengths, T, B)  # (T, B)

    h_n = np.zeros((D * L, B, cfg.H_out))
    c_n = np.zeros((D * L, B, cfg.SH)) if is_lstm else None
    inp = x  # (T, B, I) for layer 0, (T, B, D·H_out) above
    caches = []
    for l in range(L):
        outs, lcaches = [], []
        for d in range(D):
            idx = l * D + d
            x_dir = inp if d == 0 else _permute_time(inp, rev)  # reverse: read backwards
            y_dir, h_n[idx], c_dir, lc = layer_forward(
                x_dir, layers[l][d], h0[idx], c0[idx] if is_lstm else None, variant, lengths,
                None if keep is None else keep[l][d])
            if is_lstm:
                c_n[idx] = c_dir
            outs.append(y_dir if d == 0 else _permute_time(y_dir, rev))  # flip output back
            lcaches.append(lc)
        inp = np.concatenate(outs, axis=-1)  # (T, B, D·H_out)
        caches.append(lcaches)
    cache = dict(cfg=cfg, caches=caches, rev=rev, D=D, L=L, shape=x.shape)
    return inp, h_n, c_n, cache


def backward(
    cache: Cache, dy: np.ndarray | None, dh_n: np.ndarray | None, dc_n: np.ndarray | None,
) -> tuple[np.ndarray, list[list[Params]], np.ndarray, np.ndarray | None]:
    """Backward of :func:`forward`. dy (T, B, D·H_out), dh_n (D·L, B, H_out), dc_n
    (D·L, B, H) (any may be None = zero). Returns dx (T, B, I), dlayers (same nesting
    as layers), dh0 (D·L, B, H_out), dc0 (D·L, B, H) or None for rnn."""
    cfg, rev, D, L = cache["cfg"], cache["rev"], cache["D"], cache["L"]
    T, B, _ = cache["shape"]
    Ho, is_lstm = cfg.H_out, cfg.kind == "lstm"
    dy = np.zeros((T, B, D * Ho)) if dy is None else np.asarray(dy, dtype=np.float64)
    dh_n = np.zeros((D * L, B, Ho)) if dh_n is None else np.asarray(dh_n, dtype=np.float64)
    if is_lstm and dc_n is None:
        dc_n = np.zeros((D * L, B, cfg.SH))
    dh0 = np.zeros((D * L, B, Ho))
    dc0 = np.zeros((D * L, B, cfg.SH)) if is_lstm else None
    dlayers: list[list[Params]] = [[{} for _ in range(D)] for _ in range(L)]
    d_out = dy  # gradient w.r.t. the current layer's output (T, B, D·H_out)
    for l in range(L - 1, -1, -1):
        d_in = None
        for d in range(D):
            idx = l * D + d
            dy_dir = d_out[..., d * Ho:(d + 1) * Ho]  # (T, B, H_out)
            if d == 1:
                dy_dir = _permute_time(dy_dir, rev)
            dx_dir, dlayers[l][d], dh0[idx], dc_dir = layer_backward(
                cache["caches"][l][d], dy_dir, dh_n[idx], dc_n[idx] if is_lstm else None)
            if is_lstm:
                dc0[idx] = dc_dir
            if d == 1:
                dx_dir = _permute_time(dx_dir, rev)  # the permutation is its own inverse
            d_in = dx_dir if d_in is None else d_in + dx_dir
        d_out = d_in
    return d_out, dlayers, dh0, dc0
