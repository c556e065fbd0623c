"""The one interface every kernel implements.

A kernel runs one layer in one direction over a whole (padded) sequence. The loop in
:mod:`lstmkit.loop` handles layers, directions (it reverses sequences for the backward
direction), dropout and packing, and asks the registry for a kernel per layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor

from lstmkit import variants
from lstmkit._transforms import forward_mode_active, vmapped
from lstmkit.layout import GATES
from lstmkit.spec import CellSpec

__all__ = ["Kernel", "KernelOut", "Workload", "TRACE_KEYS", "FLOAT_DTYPES", "hidden_keys", "forward_mode_active",
           "vmapped"]

#: What a recording kernel returns per step, each (T, B, ·); absent gates are missing. Deep
#: gates add their MLPs' hidden activations under ``"<gate>.<layer>"`` (``"f.1"``, (T, B, n_1)).
#: The sLSTM's ``i`` and ``f`` are its stabilised gates ``i'``, ``f'``; it adds its normaliser
#: ``n`` and stabiliser ``m``.
TRACE_KEYS: tuple[str, ...] = (*GATES, *variants.STATES, "h")


#: The dtypes lstmkit computes in: a layer's parameters take one of them, and the compiled rows
#: run each (bfloat16 and float16 compute in float32). float8 types are storage formats: no
#: arithmetic on them.
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def hidden_keys(spec: CellSpec) -> list[str]:
    """The trace keys of a spec's deep gates' hidden activations, in order (``"f.1"``, …)."""
    return [f"{g}.{j}" for g, widths in spec.gate_hidden for j in range(1, len(widths) + 1)]


class Workload(NamedTuple):
    """One layer call's size and mode, for a row whose speed against the others depends on them
    (:meth:`Kernel.automatic`). Given only for plain eager tensors (no compile or export tracing,
    functorch transform or autocast)."""

    kind: str  # CellSpec.kind: "lstm" or "rnn"
    steps: int  # T
    batch: int  # B
    hidden: int  # H
    dtype: torch.dtype
    gradient: bool  # a gradient can flow back through the call
    lengths: bool  # variable lengths were given
    projection: bool  # proj_size > 0


class KernelOut(NamedTuple):
    """Result of one layer-direction."""

    y: Tensor                 # (T, B, H_out), zeros past each sequence's length
    h_n: Tensor               # (B, H_out) state after each sequence's last valid step
    c_n: Tensor | None        # (B, S·H) the cell states side by side ((B, H): c; sLSTM: c, n, m), None for the RNN
    trace: dict[str, Tensor] | None  # record=True: per-step activations, (T, B, H) each


class Kernel(ABC):
    """A way to run the recurrence of one layer-direction, with gradients.

    Attributes:
        name: the registry key, accepted by ``backend=``.
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
    """

    name: str
    devices: tuple[str, ...]
    #: Whether the row can record each step's activations (``record=True``, what a trace asks).
    records: bool = True
    #: Whether forward-mode differentiation (:func:`forward_mode_active`) goes through the row.
    forward_ad: bool = False

    def refuses(self, spec: CellSpec) -> str | None:
        """Why this kernel can never run ``spec``, on any device and in any dtype, or None.
        A layer built with ``backend=`` naming this kernel is refused at construction for it."""
        return None

    @abstractmethod
    def unsupported(self, spec: CellSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this kernel cannot run ``spec`` on ``device``/``dtype`` (including
        :meth:`refuses`), or None if it can."""

    def refuses_or_dtype(self, spec: CellSpec, dtype: torch.dtype) -> str | None:
        """:meth:`refuses`, then whether ``dtype`` is one of :data:`FLOAT_DTYPES` (the compiled
        rows' shared first checks in :meth:`unsupported`)."""
        why = self.refuses(spec)
        if why:
            return why
        if dtype not in FLOAT_DTYPES:
            *most, last = (str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
            return f"it runs {', '.join(most)} and {last}, not {dtype}"
        return None

    def automatic(self, device: torch.device, workload: Workload | None = None) -> bool:
        """Whether :func:`lstmkit.kernels.select` may choose this row by itself on ``device``
        for ``workload`` (None: a call not described) (False: only when ``backend=`` names it)."""
        return True

    def run_layers(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
                   params: list[list[dict[str, Tensor]]], spec: CellSpec, hidden_size: int,
                   dropout: float, training: bool) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """A whole stack of layers and directions in one call, for a row whose operator runs
        them so (torch's: one oneDNN or cuDNN call, no Python per layer); None: this call runs
        layer by layer through :meth:`run` (the default). Never asked to record or for zoneout.

        Args:
            x, lengths: as :meth:`run`.
            h0: (L·D, B, H_out); c0: (L·D, B, S·H) or None, as :func:`lstmkit.loop.run_stack`.
            params: ``params[layer][direction]``, names without suffix.
            dropout, training: dropout on the input of every layer but the first, in training.
        Returns:
            ``y`` (T, B, D·H_out), ``h_n`` (L·D, B, H_out), ``c_n`` (L·D, B, S·H) or None.
        """
        return None

    @abstractmethod
    def run(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
            params: dict[str, Tensor], spec: CellSpec, hidden_size: int,
            record: bool = False, keep: tuple[Tensor, Tensor] | None = None) -> KernelOut:
        """Run one layer-direction forward in time; autograd gives the gradients.

        Args:
            x: (T, B, I) layer input, time-major, zero-padded.
            lengths: (B,) int64 on the CPU, or None when every sequence has length T.
            h0: (B, H_out); c0: (B, S·H) the cell states side by side (the LSTM's c (B, H); the
                sLSTM's c, n, m (B, 3H): :func:`lstmkit.variants.cell_states`), None for the RNN.
            params: the layer-direction's parameters, names without suffix.
            record: also return the per-step activations (``TRACE_KEYS``).
            keep: zoneout's training masks ``d_c`` (T, B, H) and ``d_h`` (T, B, H_out), 1 where
                a unit keeps its previous state (:func:`lstmkit.cell.zoneout_masks`); None:
                evaluation, the expectation. Only for a spec with zoneout.
        """
