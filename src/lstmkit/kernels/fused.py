"""The fused CPU kernel row: the C++ recurrence (``cpu_ext``) adapted to autograd.

The input side ``x W_ihᵀ (+LN) + b`` for every step is one GEMM in plain torch ops
(:func:`lstmkit.cell.input_projection`), so autograd turns its gradient into the large
GEMMs ``dW_ih = dAᵀ X`` and ``dX = dA W_ih`` after the loop. The recurrence — per step
one GEMM and one fused pointwise pass, forward and hand-written BPTT backward — runs in
C++ through :class:`Recurrence`, one ``torch.autograd.Function``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lstmkit import cell
from lstmkit.kernels import cpu_ext
from lstmkit.kernels.base import TRACE_KEYS, Kernel, KernelOut
from lstmkit.spec import CellSpec

__all__ = ["FusedCPUKernel", "Recurrence"]

# Extra parameters the C++ recurrence takes, besides weight_hh (names as in docs/cell.md).
_EXTRAS = ("peephole_i", "peephole_f", "peephole_o", "weight_gg", "ln_hh_weight",
           "ln_c_weight", "ln_c_bias", "weight_hr", "ln_ih_weight", "bias")


class Recurrence(torch.autograd.Function):
    """``(y, h_n, c_n) = recurrence(xg, W_hh, h_0, c_0, *extras)`` with hand-written BPTT.

    Shapes: xg (T, B, R), W_hh (R, H_out), h_0 (B, H_out), c_0 (B, H) (empty for the RNN);
    y (T, B, H_out), h_n (B, H_out), c_n (B, H). Double backward is not supported: a
    backward with ``create_graph=True`` raises (torch's ``once_differentiable`` alone would
    silently drop the recurrence's second-order terms when the grad outputs are constants).
    """

    @staticmethod
    def forward(ctx: Any, sizes: tuple[CellSpec, int, int], save: bool, record: bool,
                lengths: Tensor | None, names: tuple[str, ...], xg: Tensor, w_hh: Tensor, h0: Tensor,
                c0: Tensor, *extras: Tensor) -> tuple[Tensor, ...]:
        params = dict(zip(names, extras))
        y, h_n, c_n, saved = cpu_ext.recurrence_forward(
            xg, w_hh, h0, c0 if c0.numel() else None, lengths, params, *sizes, save=save or record)
        ctx.sizes, ctx.names = sizes, names
        ctx.set_materialize_grads(False)
        if save:
            ctx.save_for_backward(*saved)
        out = (y, h_n, (c_n if c_n is not None else h_n.new_empty(0)))
        if not record:
            return out
        # What the kernel computed and kept, per step: no second pass over the sequence.
        trace = cpu_ext.trace_from_saved(saved, sizes[0], sizes[1])
        # h (and the RNN's g) is y itself: the caller takes it from the differentiable output.
        values = tuple(trace[k] if k in trace and trace[k] is not y else h_n.new_empty(0) for k in TRACE_KEYS)
        ctx.mark_non_differentiable(*values)
        return out + values

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None, dh_n: Tensor | None, dc_n: Tensor | None,
                 *_trace_grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a higher-order gradient was asked for
            raise RuntimeError(
                "lstmkit: the fused CPU kernel's hand-written backward is not differentiable "
                "(double backward / create_graph=True); build the layer with backend='reference' "
                "for higher-order gradients")
        saved = ctx.saved_tensors
        if dc_n is not None and dc_n.numel() == 0:
            dc_n = None
        dxg, dw_hh, dh0, dc0, dparams = cpu_ext.recurrence_backward(saved, dy, dh_n, dc_n, *ctx.sizes)
        extras = tuple(dparams.get(n) for n in ctx.names)
        return (None, None, None, None, None, dxg, dw_hh, dh0, dc0, *extras)


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(x2d: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x2d wᵀ + b`` through oneDNN with the weight reordered (prepacked) for this call."""
    ops = torch.ops.mkldnn
    return ops._linear_pointwise(x2d, ops._reorder_linear_weight(w, x2d.shape[0]), b, "none", [], "")


def _use_onednn(rows: int, w: Tensor) -> bool:
    # Measured here (2 threads): oneDNN 209-223 GFLOP/s vs MKL sgemm 155-169 from
    # I·R >= 256·1024 up; equal at 128·512, slower below. float32 only.
    return (_ONEDNN and w.dtype == torch.float32 and rows >= 256
            and w.shape[0] * w.shape[1] >= 256 * 1024)


class _Linear(torch.autograd.Function):
    """``Y = X Wᵀ + b`` (T·B, R) for the input projection of all steps: one large GEMM
    through oneDNN; backward ``dX = dY W`` (oneDNN likewise), ``dW = dYᵀ X`` (one GEMM
    over all steps) and ``db = Σ dY``."""

    @staticmethod
    def forward(ctx: Any, x2d: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x2d, w)
        return _onednn_linear(x2d, w, b)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError("lstmkit: the fused kernel's input projection has no double backward; "
                               "use backend='reference'")
        x2d, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            wt = w.t().contiguous()  # (I, R): dX = dY W is a linear layer with weight Wᵀ
            dx = _onednn_linear(dy.contiguous(), wt, None) if _use_onednn(dy.shape[0], wt) else dy.mm(w)
        if ctx.needs_input_grad[1]:
            dw = dy.t().mm(x2d)
        if ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db


def input_linear(x2d: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x2d wᵀ + b`` for the input projection: oneDNN's GEMM where measured faster, else MKL's."""
    if _use_onednn(x2d.shape[0], w):
        return _Linear.apply(x2d.contiguous(), w, b)
    return torch.nn.functional.linear(x2d, w, b)


class FusedCPUKernel(Kernel):
    """The C++ recurrence on the CPU, float32 and float64, every variant but deep gates."""

    name = "cpu_fused"
    devices = ("cpu",)

    def unsupported(self, spec: CellSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in (torch.float32, torch.float64):
            return f"it runs float32 and float64, not {dtype}"
        if spec.gate_hidden:
            return "deep gates (gate_hidden) run on the 'reference' kernel"
        if not cpu_ext.available():
            return "the C++ extension could not be built (see the warning above)"
        return None

    def run(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
            params: dict[str, Tensor], spec: CellSpec, hidden_size: int,
            record: bool = False) -> KernelOut:
        proj = params["weight_hr"].shape[0] if "weight_hr" in params else 0
        if spec.layernorm:
            # The kernel normalises the raw projection per step (in cache) and adds the bias
            # after the norm: xg is x W_ihᵀ alone, and the summed bias is a parameter.
            T, B = x.shape[0], x.shape[1]
            w = params["weight_ih"]
            xg = input_linear(x.reshape(T * B, x.shape[-1]), w, None).view(T, B, w.shape[0])
            params = dict(params)
            if "bias_ih" in params:
                params["bias"] = params["bias_ih"] + params["bias_hh"]  # (R,)
        else:
            xg = cell.input_projection(x, params, spec, hidden_size, linear=input_linear)  # (T, B, R)
        names = tuple(n for n in _EXTRAS if n in params)
        c0_t = c0 if c0 is not None else h0.new_empty(0)
        inputs = (xg, params["weight_hh"], h0, c0_t, *(params[n] for n in names))
        # Save for backward only when a gradient can flow (needs_input_grad is True even
        # under no_grad inside Function.forward, so decide here).
        save = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        y, h_n, c_n, *rec = Recurrence.apply((spec, hidden_size, proj), save, record, lengths, names, *inputs)
        trace = None
        if record:
            trace = {k: v for k, v in zip(TRACE_KEYS, rec) if v.numel()}
            trace["h"] = y.detach()
            if not spec.is_lstm:
                trace["g"] = trace["h"]  # the RNN's activation is its output
            if spec.coupled:
                trace["f"] = 1.0 - trace["i"]  # cifg: the forget gate is derived, not absent
        return KernelOut(y, h_n, c_n if spec.is_lstm else None, trace)
