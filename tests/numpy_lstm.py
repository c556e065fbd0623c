"""Float64 NumPy reference ("oracle") for every lstmkit layer.

Written independently from ``docs/cell.md`` (the contract) and from nothing else: it
imports only NumPy, the standard library and its own two parts — ``numpy_lstm_config.py``
(a variant read into the sizes and flags every step uses) and ``numpy_lstm_steps.py`` (one
time step of each cell and its backward) — and it never looks at ``src/``. This module holds
the parameters, one layer and the full stack. Forward passes follow the equations of
cell.md line by line; backward passes are hand-written backpropagation through time (no
autograd, no numerical differentiation). The test file ``test_numpy_oracle.py`` checks
every backward here and in ``numpy_lstm_steps.py`` against central finite differences.

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
from typing import Any

import numpy as np

from numpy_lstm_config import Params, Variant, _config
from numpy_lstm_steps import (
    _lstm_step,
    _lstm_step_backward,
    _rnn_step,
    _rnn_step_backward,
    _slstm_step,
    _slstm_step_backward,
)

Lengths = Sequence[int] | np.ndarray | None
Cache = dict[str, Any]


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
