"""One time step of each cell of the NumPy oracle (numpy_lstm.py), forward and hand-written
backward: the LSTM (cell.md "One step"), the sLSTM (cell.md "The sLSTM") and the plain RNN,
and the small building blocks they share (activations, gates, layer norms, deep gates' MLPs),
each with its exact backward. Written from ``docs/cell.md`` alone, with NumPy and the
standard library; ``test_numpy_oracle.py`` checks every backward against central finite
differences.
"""

from __future__ import annotations

import numpy as np

from numpy_lstm_config import Params, _Cfg, _full_recurrent, _stored_recurrent_grad

LN_EPS = 1e-5  # epsilon of every layer norm (cell.md: sqrt(var + 1e-5))


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
