"""The cell equations, written once, in plain torch ops (see ``docs/cell.md``).

This is the reference every fused kernel is tested against, and the documentation of
what a layer computes. A step is split in two, as the kernels split it:

* :func:`input_projection` — the part that depends only on ``x``, computed for all
  time steps at once: ``a = x W_ihᵀ (LN) + b_ih + b_hh``, shape (T, B, R);
* :func:`step` — one step of the recurrence, given ``a_t`` and the previous state.

For the vanilla LSTM (H cells, I inputs)::

    i = σ(W_i [x, h] + b_i)   f = σ(W_f [x, h] + b_f)   g = tanh(W_g [x, h] + b_g)
    o = σ(W_o [x, h] + b_o)   c' = f ⊙ c + i ⊙ g        h' = o ⊙ tanh(c')

where each ``W_k = [W_ik | W_hk]`` is H × (I + H), stored fused as ``weight_ih`` (4H × I)
and ``weight_hh`` (4H × H).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmkit._transforms import forward_mode_active
from lstmkit.spec import CellSpec, gate_slices
from lstmkit.variants import HARD_SIGMOID_SLOPES

__all__ = ["input_projection", "summed_bias", "step", "StepOut", "LN_EPS", "activation", "gate_activation",
           "zoneout_masks", "block_diagonal", "recurrent"]

#: Epsilon of every layer norm in the cell.
LN_EPS = 1e-5

Params = dict[str, Tensor]


def activation(name: str, v: Tensor) -> Tensor:
    """Apply a named activation (``tanh``, ``relu``, ``sigmoid``, ``identity``)."""
    if name == "tanh":
        return torch.tanh(v)
    if name == "sigmoid":
        return torch.sigmoid(v)
    if name == "relu":
        return torch.relu(v)
    return v


def gate_activation(spec: CellSpec, u: Tensor) -> Tensor:
    """The activation of the gates i, f, o: σ, or a hard sigmoid ``clamp(slope · u + 1/2, 0, 1)``."""
    if spec.gate_activation == "sigmoid":
        return torch.sigmoid(u)
    v = HARD_SIGMOID_SLOPES[spec.gate_activation] * u + 0.5
    inside = (v > 0.0) & (v < 1.0)  # the ramp; the derivative is 0 on the flat parts and at the kinks
    return torch.where(inside, v, (v >= 1.0).to(v.dtype))


def zoneout_masks(spec: CellSpec, c_shape: tuple[int, ...], h_shape: tuple[int, ...], like: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """Training masks of zoneout, drawn from torch's generator: ``d_c`` (shape ``c_shape``) is
    1 where a unit keeps its previous ``c`` (probability ``z_c``), ``d_h`` likewise for ``h``;
    dtype and device of ``like``.

    Each element is ``floor(v)`` for ``v`` uniform on ``[z, 1 + z)`` — 1 exactly when ``v >= 1``,
    with probability ``z`` — drawn in float32 (float64 for a float64 layer, never 16 bits, whose
    coarse steps would bend the probability): two in-place operations on a fresh tensor, with no
    Python number to wrap as a tensor (which ``torch.rand(...) < z`` needs). On the CPU, one EPYC
    core: a (1, 1, 32) mask 10 µs against 16 for ``rand`` then ``lt_``, a (1, 32, 256) one 54
    against 59; ``torch.bernoulli_`` draws at about half the rate on large masks (111 µs there).
    Under ``torch.func`` transforms (``vmap``'s ``randomness="different"`` gives each sample its
    own masks, as it does ``nn.Dropout``'s) ``torch.rand`` then ``+ z`` draws the same values out
    of place, 2 µs more a mask (rounding aside: one element in 2 million differed, float32, z =
    0.3). ``z`` is capped at 1 - 2⁻²³ for the draw, so that ``1 + z`` stays below 2 in float32
    (a float32 uniform has steps of 2⁻²⁴ anyway)."""
    z_c, z_h = spec.zoneout
    draw = torch.float64 if like.dtype == torch.float64 else torch.float32

    def mask(shape: tuple[int, ...], z: float) -> Tensor:
        z = min(z, 1.0 - 2.0**-23)
        if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
            keep = torch.empty(shape, dtype=draw, device=like.device).uniform_(z, 1.0 + z).floor_()
        else:  # under vmap, whose randomness="different" refuses a draw in place into a fresh
            # (unbatched) tensor, and torch.func's other transforms: drawn out of place
            keep = torch.rand(shape, dtype=draw, device=like.device).add_(z).floor_()
        return keep if keep.dtype == like.dtype else keep.to(like.dtype)  # (a no-op `to` still dispatches)
    return mask(c_shape, z_c), mask(h_shape, z_h)


def chunk_layernorm(v: Tensor, spec: CellSpec, hidden_size: int) -> Tensor:
    """Layer norm (no gain) of each gate's chunk of the R pre-activations separately.

    Args:
        v: (..., R) pre-activations.
    """
    widths = [s.stop - s.start for s in gate_slices(spec, hidden_size).values()]
    # split, not a reshape to (..., G, n): no view of symbolic sizes, which a Scan body
    # exported to ONNX (torch's scan of cell.step) cannot carry
    parts = [F.layer_norm(p, (p.shape[-1],), eps=LN_EPS) for p in v.split(widths, dim=-1)]
    return torch.cat(parts, dim=-1)


def block_diagonal(w_hh: Tensor, spec: CellSpec, hidden_size: int) -> Tensor:
    """The full recurrent matrix ``W_hh`` (R, H_out) from its stored form.

    Without heads that is ``weight_hh`` itself. With ``k = spec.heads`` each gate's ``n`` rows
    are k blocks of ``n/k`` rows, and block j reads only the j-th ``H_out/k`` entries of
    ``h_{t-1}``: the stored ``weight_hh`` (R, H_out/k) holds each row's block, and the full
    matrix has them on the diagonal of each gate's rows, zeros elsewhere::

        W_g = [[W_g^0, 0, …], [0, W_g^1, …], …]        W_g^j: (n/k, H_out/k)

    Args:
        w_hh: (R, H_out/k) stored recurrent weights.
    Returns:
        (R, H_out) the textbook matrix (differentiable: its gradient lands on the blocks).
    """
    k = spec.heads
    if k == 1:
        return w_hh
    return torch.cat([torch.block_diag(*w_hh[rows].chunk(k, dim=0))  # (n, H_out) per gate
                      for rows in gate_slices(spec, hidden_size).values()], dim=0)


def recurrent(h: Tensor, w_hh: Tensor, spec: CellSpec, hidden_size: int) -> Tensor:
    """``r = h_{t-1} W_hhᵀ`` (B, R) with the full (block-diagonal, with heads) ``W_hh``: with k
    heads, block j of each gate times the j-th part of ``h`` (the zeros are not multiplied).

    Args:
        h: (B, H_out) previous hidden state; w_hh: (R, H_out/k) stored weights.
    """
    k = spec.heads
    if k == 1:
        return torch.matmul(h, w_hh.t())
    hk = h.unflatten(-1, (k, -1))  # (B, k, H_out/k)
    return torch.cat([torch.einsum("bkd,kod->bko", hk, w_hh[rows].unflatten(0, (k, -1))).flatten(-2)  # (B, n)
                      for rows in gate_slices(spec, hidden_size).values()], dim=-1)


Linear = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def input_projection(x: Tensor, p: Params, spec: CellSpec, hidden_size: int,
                     linear: Linear | None = None) -> Tensor:
    """The input side of every step at once: ``x W_ihᵀ`` (layer-normed) plus both biases.

    Args:
        x: (T, B, I) inputs of the layer.
        p: the layer-direction's parameters, names without suffix.
        linear: ``linear(x2d, W, b) = x2d Wᵀ + b`` for x2d (T·B, I); defaults to
            ``F.linear``. A kernel may pass a faster GEMM.
    Returns:
        (T, B, R) pre-activations from the input.
    """
    T, B = x.shape[0], x.shape[1]
    w = p["weight_ih"]
    lin = linear or F.linear
    bias = summed_bias(p)  # (R,) or None
    x2d = x.reshape(T * B, x.shape[-1])
    if not spec.layernorm:
        return lin(x2d, w, bias).view(T, B, w.shape[0])  # the bias rides in the GEMM
    a = chunk_layernorm(lin(x2d, w, None), spec, hidden_size)  # (T·B, R)
    a = a * p["ln_ih_weight"] if bias is None else torch.addcmul(bias, a, p["ln_ih_weight"])
    return a.view(T, B, w.shape[0])


class _BiasSum(torch.autograd.Function):
    """``b_ih + b_hh`` whose backward gives each bias a gradient tensor of its own, as
    ``nn.LSTM``'s two biases have: a plain sum hands both the same tensor (``torch.autograd.grad``
    returns one object twice), and under ``torch.compile`` the two ``.grad`` then share memory,
    so an in-place update of one (``clip_grad_norm_``, gradient accumulation) hits both."""

    generate_vmap_rule = True

    @staticmethod
    def forward(b_ih: Tensor, b_hh: Tensor) -> Tensor:
        return b_ih + b_hh

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, grad.clone()


def summed_bias(p: Params) -> Tensor | None:
    """``b_ih + b_hh`` (R,), each bias's gradient its own tensor (:class:`_BiasSum`) where a
    gradient is taken; None without biases. A plain sum where no gradient flows, and while a
    forward-mode derivative is taken (a Function needs a ``jvp`` for that, which
    ``torch.compile`` refuses; tangents are not accumulated into ``.grad``)."""
    if "bias_ih" not in p:
        return None
    b_ih, b_hh = p["bias_ih"], p["bias_hh"]
    if torch.is_grad_enabled() and (b_ih.requires_grad or b_hh.requires_grad) and not forward_mode_active():
        return _BiasSum.apply(b_ih, b_hh)
    return b_ih + b_hh


class StepOut(NamedTuple):
    """Everything one step computes. Absent gates are ``None`` (not tensors of ones)."""

    h: Tensor                  # (B, H_out) new hidden state / output
    c: Tensor | None           # (B, H) new cell state (None for the RNN); the sLSTM's c, n, m side by side (B, 3H)
    s: Tensor | None           # (B, |S|·H) sigmoid-gate activations for fgr, else None
    i: Tensor | None           # (B, H) gate activations, None when absent (sLSTM: i' and f', the stabilised ones)
    f: Tensor | None
    g: Tensor
    o: Tensor | None
    hidden: dict[str, Tensor] | None = None  # deep gates: "f.1" -> (B, n_1), the MLPs' hidden activations


def step(a_t: Tensor, h: Tensor, c: Tensor | None, s: Tensor | None, p: Params,
         spec: CellSpec, hidden_size: int, keep: tuple[Tensor, Tensor] | None = None) -> StepOut:
    """One step of the recurrence.

    Args:
        a_t: (B, R) this step's input pre-activations from :func:`input_projection`.
        h: (B, H_out) previous hidden state; c: (B, H) previous cell state (None for RNN); the
            sLSTM's c, n, m side by side, (B, 3H) (:func:`lstmkit.variants.cell_states`).
        s: (B, |S|·H) previous sigmoid-gate activations (fgr only, else None).
        p: parameters of the layer-direction (names without suffix).
        keep: zoneout's masks of this step, ``d_c`` (B, H) and ``d_h`` (B, H_out): 1 where a
            unit keeps its previous state (training); None: the expectation ``(z_c, z_h)``
            (evaluation). Ignored without zoneout.
    """
    r = recurrent(h, p["weight_hh"], spec, hidden_size)  # (B, R)
    if spec.layernorm:
        r = chunk_layernorm(r, spec, hidden_size) * p["ln_hh_weight"]
    z = a_t + r  # (B, R)
    if not spec.is_lstm:
        h_new = activation(spec.nonlinearity, z)
        return StepOut(h_new, None, None, None, None, h_new, None)
    if spec.slstm:
        return slstm_step(z, c, spec, hidden_size)

    u: dict[str, Tensor] = {}
    hidden: dict[str, Tensor] = {}
    for gate, rows in gate_slices(spec, hidden_size).items():
        zk = z[:, rows]  # (B, n_k)
        widths = spec.hidden_widths(gate)
        for j in range(1, len(widths) + 1):  # deep gate: an MLP over [x, h]
            zk = activation(spec.gate_hidden_activation, zk)  # (B, n_j)
            hidden[f"{gate}.{j}"] = zk
            zk = F.linear(zk, p[f"mlp_{gate}_weight{j}"], p.get(f"mlp_{gate}_bias{j}"))  # (B, n_{j+1})
        u[gate] = zk  # (B, H)
    if spec.peephole:
        for gate in ("i", "f"):
            if gate in u:
                u[gate] = u[gate] + p[f"peephole_{gate}"] * c
    if spec.fgr:
        sig = spec.sigmoid_gates
        rec = torch.matmul(s, p["weight_gg"].t()).split(hidden_size, dim=-1)  # |S| × (B, H)
        for gate, extra in zip(sig, rec):
            u[gate] = u[gate] + extra

    i = gate_activation(spec, u["i"]) if "i" in u else None
    if "f" in u:
        f = gate_activation(spec, u["f"])
    elif spec.coupled:
        f = 1.0 - i
    else:
        f = None  # nfg: f ≡ 1
    g = activation(spec.candidate_activation, u["g"])
    kept = c if f is None else f * c  # what the forget gate keeps of c_{t-1}
    c_new = kept + (g if i is None else i * g)
    if spec.cell_clip is not None and spec.cell_clip < torch.finfo(c_new.dtype).max:
        c_new = c_new.clamp(-spec.cell_clip, spec.cell_clip)  # (a bound beyond the dtype's range: none)
    o = None
    if "o" in u:
        uo = u["o"] + p["peephole_o"] * c_new if spec.peephole else u["o"]
        o = gate_activation(spec, uo)
    m = c_new
    if spec.layernorm:
        m = F.layer_norm(c_new, (hidden_size,), p["ln_c_weight"], p["ln_c_bias"], eps=LN_EPS)
    h_new = activation(spec.output_activation, m)
    if o is not None:
        h_new = o * h_new
    if "weight_hr" in p:
        h_new = torch.matmul(h_new, p["weight_hr"].t())  # (B, P)
    s_new = None
    if spec.fgr:
        s_new = torch.cat([{"i": i, "f": f, "o": o}[k] for k in spec.sigmoid_gates], dim=-1)
    if spec.has_zoneout:  # each unit keeps its previous state with probability z
        d_c, d_h = keep if keep is not None else spec.zoneout
        c_new = c_new + d_c * (c - c_new)  # d_c c_{t-1} + (1 − d_c) c̃_t
        h_new = h_new + d_h * (h - h_new)  # (B, H_out)
    return StepOut(h_new, c_new, s_new, i, f, g, o, hidden or None)


def slstm_step(z: Tensor, state: Tensor, spec: CellSpec, hidden_size: int) -> StepOut:
    """One step of the sLSTM (Beck et al. 2024) from its pre-activations (docs/cell.md, "The sLSTM").

    The input and forget gates are exponential. ``exp`` overflows, so the cell keeps its state
    scaled by ``exp(−m_t)``, the stabiliser ``m_t`` being the largest log-weight of the step: the
    stabilised gates ``i', f'`` are at most 1, and ``h = o ⊙ c / n`` does not depend on ``m``
    (``c`` and ``n`` are scaled alike). An empty cell (``n_{t−1} = 0``, e.g. the zero initial
    state) has nothing to keep: there ``m_t = ĩ`` and ``f' = 0`` (``exp(kept − ĩ)`` would be
    unbounded: it overflowed to inf for ``ĩ`` below about −88, and inf times the empty cell's 0 is NaN).

    Args:
        z: (B, 4H) pre-activations ``ĩ, f̃, z̃, õ`` (``x W_ihᵀ + h W_hhᵀ + b``).
        state: (B, 3H) the previous ``c, n, m`` side by side.
    Returns:
        ``StepOut`` with ``c`` the new ``c, n, m`` (B, 3H), ``i``, ``f`` the stabilised gates
        ``i', f'``, ``g = tanh(z̃)`` and ``o = σ(õ)``.
    """
    c, n, m = state.split(hidden_size, dim=-1)  # (B, H) each
    u_i, u_f, u_z, u_o = z.split(hidden_size, dim=-1)  # ĩ, f̃, z̃, õ (B, H) each
    log_f = u_f if spec.forget_activation == "exp" else F.logsigmoid(u_f)  # log of the forget gate
    kept = log_f + m  # log-weight of what is kept, on the previous step's scale
    empty = n == 0  # (B, H)
    m_new = torch.where(empty, u_i, torch.maximum(kept, u_i))  # the stabiliser (B, H)
    i = torch.exp(u_i - m_new)  # i' ≤ 1
    f = torch.exp(torch.where(empty, -math.inf, kept - m_new))  # f' ≤ 1; 0 where empty (its gradient too)
    g = torch.tanh(u_z)
    o = torch.sigmoid(u_o)
    c_new = f * c + i * g
    n_new = f * n + i  # the normaliser: the same sum of weights, without the values
    if spec.n_clamp:  # FlashRNN: n_t ≥ 1 (gradient 0 where the floor holds n)
        n_new = torch.clamp_min(n_new, 1.0)
    state_new = torch.cat([c_new, n_new, m_new], dim=-1)  # (B, 3H)
    # h reads c_t and n_t from the state it returns, so that the state's node is upstream of h too (the
    # gradient with respect to it, lstmkit.gradient_flow's ∂L/∂c_t, is then the total one)
    c_out, n_out, _ = state_new.split(hidden_size, dim=-1)
    h_new = o * (c_out / n_out)
    return StepOut(h_new, state_new, None, i, f, g, o)

