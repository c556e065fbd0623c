"""The reference kernel: the equations of :mod:`lstmkit.cell` in a Python time loop.

Autograd differentiates it. It runs every variant on every device and dtype, and it is
what the fused kernels are tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lstmkit import cell
from lstmkit.kernels.base import TRACE_KEYS, Kernel, KernelOut, hidden_keys, vmapped
from lstmkit.layout import GATES
from lstmkit.spec import CellSpec
from lstmkit.variants import cell_states

__all__ = ["ReferenceKernel"]


class ReferenceKernel(Kernel):
    """Plain torch ops, one step at a time (slow, obviously right)."""

    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    forward_ad = True  # torch operations: forward-mode derivatives go through them

    def unsupported(self, spec: CellSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def run(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
            params: dict[str, Tensor], spec: CellSpec, hidden_size: int,
            record: bool = False, keep: tuple[Tensor, Tensor] | None = None) -> KernelOut:
        y, h, c, rec = self.loop(x, lengths, h0, c0, params, spec, hidden_size, record, keep)
        device = y.device.type
        if h0.dtype == torch.float32 and device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            # the outputs in autocast's dtype, as the fused operator returns them (and torch's LSTM
            # operator, but for a projection's c_n); the loop's products ran in it, its cell
            # arithmetic, like theirs, in float32
            low = torch.get_autocast_dtype(device)
            y, h, c = y.to(low), h.to(low), None if c is None else c.to(low)
        trace = None
        if record:
            trace = {k: torch.stack(v) for k, v in rec.items() if v}
            if "c" in trace:  # the cell states side by side: one key each (the sLSTM: c, n, m)
                trace.update(zip(cell_states(spec), trace["c"].split(hidden_size, dim=-1)))
        return KernelOut(y, h, c, trace)

    def loop(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
             params: dict[str, Tensor], spec: CellSpec, hidden_size: int,
             record: bool = False, keep: tuple[Tensor, Tensor] | None = None
             ) -> tuple[Tensor, Tensor, Tensor | None, dict[str, list[Tensor]]]:
        """The time loop: ``(y, h_n, c_n, per-step values)``; with ``record`` the lists of
        ``i, f, g, o, c, h`` hold each step's graph nodes (h and c before padding is masked; ``c``
        the cell states side by side, (B, S·H))."""
        T, B = x.shape[0], x.shape[1]
        a = cell.input_projection(x, params, spec, hidden_size)  # (T, B, R)
        h, c = h0, c0
        s = None
        if spec.fgr:
            s = h0.new_zeros(B, len(spec.sigmoid_gates) * hidden_size)
        valid = None
        # a mask where a sequence ends early; always while compiling or exporting (no branch on the
        # values of lengths, which a graph does not have) and under vmap (a mask per member)
        if lengths is not None and (torch.compiler.is_compiling() or vmapped(lengths) or bool((lengths < T).any())):
            steps = torch.arange(T).unsqueeze(1)  # (T, 1)
            valid = (steps < lengths.unsqueeze(0)).to(x.device).unsqueeze(-1)  # (T, B, 1)
        ys: list[Tensor] = []
        rec: dict[str, list[Tensor]] = {k: [] for k in (*TRACE_KEYS, *hidden_keys(spec))}
        keeps = list(zip(*(m.unbind(0) for m in keep))) if keep is not None else None  # T × ((B, H), (B, H_out))
        for t, a_t in enumerate(a.unbind(0)):  # unbind once: indexing inside makes BPTT O(T²)
            out = cell.step(a_t, h, c, s, params, spec, hidden_size, keeps[t] if keeps else None)
            h_new, c_new, s_new = out.h, out.c, out.s
            if valid is not None:
                v = valid[t]  # (B, 1)
                ys.append(torch.where(v, h_new, torch.zeros_like(h_new)))
                h_new = torch.where(v, h_new, h)
                c_new = torch.where(v, c_new, c) if c is not None else None
                s_new = torch.where(v, s_new, s) if s is not None else None
            else:
                ys.append(h_new)
            if record:
                for k in GATES:
                    value = getattr(out, k)
                    if value is not None:
                        rec[k].append(value)
                if out.c is not None:
                    rec["c"].append(out.c)
                rec["h"].append(out.h)
                for k, value in (out.hidden or {}).items():
                    rec[k].append(value)
            h, c, s = h_new, c_new, s_new
        y = torch.stack(ys) if ys else x.new_zeros(0, B, h0.shape[-1])  # (T, B, H_out)
        return y, h, c, rec
