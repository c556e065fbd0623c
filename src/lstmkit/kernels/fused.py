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
from lstmkit.kernels.base import Kernel, KernelOut
from lstmkit.spec import CellSpec

__all__ = ["FusedCPUKernel", "Recurrence"]

# Extra parameters the C++ recurrence takes, besides weight_hh (names as in docs/cell.md).
_EXTRAS = ("peephole_i", "peephole_f", "peephole_o", "weight_gg", "ln_hh_weight",
           "ln_c_weight", "ln_c_bias", "weight_hr")


class Recurrence(torch.autograd.Function):
    """``(y, h_n, c_n) = recurrence(xg, W_hh, h_0, c_0, *extras)`` with hand-written BPTT.

    Shapes: xg (T, B, R), W_hh (R, H_out), h_0 (B, H_out), c_0 (B, H) (empty for the RNN);
    y (T, B, H_out), h_n (B, H_out), c_n (B, H). Double backward is not supported: a
    backward with ``create_graph=True`` raises (torch's ``once_differentiable`` alone would
    silently drop the recurrence's second-order terms when the grad outputs are constants).
    """

    @staticmethod
    def forward(ctx: Any, sizes: tuple[CellSpec, int, int], save: bool, lengths: Tensor | None,
                names: tuple[str, ...], xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor,
                *extras: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        params = dict(zip(names, extras))
        y, h_n, c_n, saved = cpu_ext.recurrence_forward(
            xg, w_hh, h0, c0 if c0.numel() else None, lengths, params, *sizes, save=save)
        ctx.sizes, ctx.names = sizes, names
        ctx.set_materialize_grads(False)
        if save:
            ctx.save_for_backward(*saved)
        return y, h_n, (c_n if c_n is not None else h_n.new_empty(0))

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None, dh_n: Tensor | None, dc_n: Tensor | None
                 ) -> tuple[Tensor | None, ...]:
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
        return (None, None, None, None, dxg, dw_hh, dh0, dc0, *extras)


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
        xg = cell.input_projection(x, params, spec, hidden_size)  # (T, B, R)
        names = tuple(n for n in _EXTRAS if n in params)
        c0_t = c0 if c0 is not None else h0.new_empty(0)
        inputs = (xg, params["weight_hh"], h0, c0_t, *(params[n] for n in names))
        # Save for backward only when a gradient can flow (needs_input_grad is True even
        # under no_grad inside Function.forward, so decide here).
        save = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        y, h_n, c_n = Recurrence.apply((spec, hidden_size, proj), save, lengths, names, *inputs)
        return KernelOut(y, h_n, c_n if spec.is_lstm else None, None)
