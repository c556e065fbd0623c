"""The kernel row that writes a layer as ONNX operators during ``torch.onnx.export``.

The fused operator ``lstmkit::recurrence`` is a compiled kernel that ONNX cannot run. While
``torch.onnx.export`` (the default, dynamo-based exporter) traces a user's model,
:func:`lstmkit.kernels.select` picks this row instead, and each layer-direction becomes:

* the ONNX ``LSTM`` / ``RNN`` operator where the variant fits it (:func:`operator_refusal`
  says why not otherwise), via ``torch.onnx.ops.symbolic_multi_out``, with the weights
  permuted to ONNX's gate order by :func:`operator_weights` — the same function
  :func:`lstmkit.convert.to_onnx` writes its files with;
* otherwise a ``Scan`` whose body is :func:`lstmkit.cell.step` itself: the step is traced
  with ``torch``'s ``scan`` higher-order operator, which the exporter writes as an ONNX
  ``Scan`` (the equations are written once, in :mod:`lstmkit.cell`).

Sequence lengths become the operator's ``sequence_lens`` (or, in a Scan, a mask that keeps
the state and outputs zeros past each length); T and B stay dynamic. The reverse direction
is the forward one on reversed sequences (:mod:`lstmkit.loop`), so nodes run forward only.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from lstmkit import cell, variants
from lstmkit.kernels.base import Kernel, KernelOut, Workload
from lstmkit.layout import ONNX_PEEPHOLE_ORDER, reorder_gates
from lstmkit.spec import CellSpec

__all__ = ["OnnxExportKernel", "operator_refusal", "operator_weights", "operator_activations", "masked_step",
           "exporting", "ONNX_ACTIVATIONS", "DEFAULT_ACTIVATIONS"]

#: lstmkit's activations as ONNX's activation names (hard sigmoids: ``HardSigmoid`` with alpha = slope).
ONNX_ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "hard_sigmoid": "HardSigmoid",
                    "hardsigmoid": "HardSigmoid"}
#: The operators' activations where a node names none, per direction: ``LSTM``'s (gates,
#: candidate, output), ``RNN``'s φ (the ONNX spec's defaults).
DEFAULT_ACTIVATIONS: dict[str, tuple[str, ...]] = {"lstm": ("Sigmoid", "Tanh", "Tanh"), "rnn": ("Tanh",)}


def _assume_constant_result(fn: Any) -> Any:
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` first:
    that import is most of ``import lstmkit``'s time (3.7 of 7.2 s on a slow 2-core machine
    here) and every eager call, every CLI command and every subprocess would pay it. The
    decorator only marks ``fn`` (tests/test_ops_transforms.py checks that this torch's decorator marks
    exactly so); where dynamo is loaded already, its own decorator runs."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def exporting() -> bool:
    """True while ``torch.onnx.export`` traces (also under its dynamo-strict capture, which
    would otherwise trace ``torch.onnx.is_in_onnx_export()`` as False)."""
    return torch.onnx.is_in_onnx_export()


def masked_step(spec: CellSpec, H: int, params: dict[str, Tensor], states: list[Tensor], a_t: Tensor,
                valid: Tensor | None) -> tuple[list[Tensor], Tensor]:
    """One step of a Scan: :func:`lstmkit.cell.step` on ``states`` = ``[h, c, s]`` (c for the
    LSTM, s for fgr) and ``a_t`` (B, R); rows where ``valid`` (B, 1) is False keep their state
    and output 0 (None: every row is valid). Returns the new states and ``y_t`` (B, H_out).
    ``torch.onnx.export``'s Scan and :func:`lstmkit.convert.to_onnx`'s Scan body both run this."""
    h, c = states[0], (states[1] if spec.is_lstm else None)
    s = states[-1] if spec.fgr else None
    out = cell.step(a_t, h, c, s, params, spec, H)
    new = [out.h] + ([out.c] if spec.is_lstm else []) + ([out.s] if spec.fgr else [])
    if valid is None:
        return new, out.h
    kept = [torch.where(valid, n, o) for n, o in zip(new, states)]  # past its length: unchanged
    return kept, torch.where(valid, out.h, torch.zeros_like(out.h))  # output 0 past its length


def operator_refusal(spec: CellSpec, proj_size: int = 0) -> str | None:
    """Why the ONNX ``LSTM``/``RNN`` operator cannot compute this cell (None if it can): the
    variant table's reasons (:func:`lstmkit.variants.onnx_refusal`), or the projection."""
    if spec.is_lstm and proj_size:
        return (f"the LSTM operator has no projection, so proj_size={proj_size} "
                f"(h_t = W_hr (o ⊙ tanh c_t)) cannot be written with it")
    return variants.onnx_refusal(spec)


def operator_activations(spec: CellSpec, directions: int) -> dict[str, Any]:
    """The ``activations`` (and ``activation_alpha``/``_beta``) attributes of the operator
    computing ``spec``: per direction (f, g, h) = (gates, candidate, output) for the LSTM,
    φ for the RNN; empty for the operator's defaults. A hard sigmoid is ``HardSigmoid`` with
    alpha = its slope and beta = 0.5; the runtime consumes the alphas of the activations that
    take one, in order."""
    if not spec.is_lstm:
        return {"activations": [spec.nonlinearity.capitalize()] * directions}
    names = [ONNX_ACTIVATIONS[a] for a in (spec.gate_activation, spec.candidate_activation, spec.output_activation)]
    if tuple(names) == DEFAULT_ACTIVATIONS["lstm"]:
        return {}
    attrs: dict[str, Any] = {"activations": names * directions}
    if spec.gate_activation in variants.HARD_SIGMOID_SLOPES:
        attrs["activation_alpha"] = [variants.HARD_SIGMOID_SLOPES[spec.gate_activation]] * directions
        attrs["activation_beta"] = [0.5] * directions
    return attrs


def operator_weights(params: dict[str, Tensor], spec: CellSpec, hidden_size: int) -> dict[str, Tensor | None]:
    """One layer-direction's ONNX operator inputs: ``W`` (G'H, I), ``R`` (G'H, H), ``B``
    (2G'H,) or None, ``P`` (3H,) or None, in ONNX's gate order (i, o, f, c; peepholes i, o, f).

    The LSTM has G' = 4 gates (cifg's absent f rows are zeros: the operator's
    ``input_forget=1`` computes f = 1 − i and never reads them); the RNN has one. Torch ops
    only: traceable, and :func:`lstmkit.convert.to_onnx` turns the result into arrays.
    """
    def rows(t: Tensor) -> Tensor:
        if not spec.is_lstm:
            return t
        if spec.coupled:  # (3H, …) i, g, o -> (4H, …) i, f = 0, g, o
            i, g, o = t.split(hidden_size, dim=0)
            t = torch.cat([i, torch.zeros_like(i), g, o], dim=0)
        return reorder_gates(t, "lstmkit", "onnx")

    out: dict[str, Tensor | None] = {"W": rows(params["weight_ih"]), "R": rows(params["weight_hh"]),
                                     "B": None, "P": None}
    if "bias_ih" in params:
        out["B"] = torch.cat([rows(params["bias_ih"]), rows(params["bias_hh"])])
    if spec.is_lstm and spec.peephole:
        zeros = params["weight_ih"].new_zeros(hidden_size)
        out["P"] = torch.cat([params.get(f"peephole_{g}", zeros) for g in ONNX_PEEPHOLE_ORDER])
    return out


class OnnxExportKernel(Kernel):
    """Writes each layer-direction as ONNX operators while ``torch.onnx.export`` traces
    (:func:`lstmkit.kernels.select` picks it then, and only then)."""

    name = "onnx_export"
    devices = ("cpu", "cuda", "meta")

    def automatic(self, device: torch.device, workload: Workload | None = None) -> bool:
        return False  # select() picks it first while exporting, and never otherwise

    def unsupported(self, spec: CellSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        if not exporting():
            return "it writes ONNX operators, during torch.onnx.export only"
        return None

    def run(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
            params: dict[str, Tensor], spec: CellSpec, hidden_size: int,
            record: bool = False, keep: tuple[Tensor, Tensor] | None = None) -> KernelOut:
        if record:
            raise ValueError("record: the ONNX export records no trace")
        if keep is not None:
            raise ValueError("zoneout: the model is in training mode; export it in eval() mode (ONNX graphs "
                             "compute zoneout's expectation)")
        proj = params["weight_hr"].shape[0] if "weight_hr" in params else 0
        if operator_refusal(spec, proj) is None and x.dtype == torch.float32:
            return self._operator(x, lengths, h0, c0, params, spec, hidden_size)
        return self._scan(x, lengths, h0, c0, params, spec, hidden_size)

    @staticmethod
    def _operator(x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None, params: dict[str, Tensor],
                  spec: CellSpec, H: int) -> KernelOut:
        """One ``LSTM`` / ``RNN`` node, direction forward."""
        T, B = x.shape[0], x.shape[1]
        w = operator_weights(params, spec, H)
        seq = lengths.to(device=x.device, dtype=torch.int32) if lengths is not None else None
        inputs: list[Tensor | None] = [x, w["W"].unsqueeze(0), w["R"].unsqueeze(0),
                                       None if w["B"] is None else w["B"].unsqueeze(0), seq, h0.unsqueeze(0)]
        attrs: dict[str, Any] = {"hidden_size": H, "direction": "forward"}
        if spec.is_lstm:
            inputs += [c0.unsqueeze(0) if c0 is not None else None, w["P"]]
            if w["P"] is not None:
                inputs[-1] = w["P"].unsqueeze(0)
            if spec.coupled:
                attrs["input_forget"] = 1
            op, n_out = "LSTM", 3
        else:
            op, n_out = "RNN", 2
        attrs.update(operator_activations(spec, 1))
        while inputs[-1] is None:
            inputs.pop()
        shapes = [(T, 1, B, H), (1, B, H), (1, B, H)][:n_out]  # Y [T, D, B, H], Y_h, Y_c [D, B, H]
        outs = torch.onnx.ops.symbolic_multi_out(op, inputs, attrs, dtypes=[x.dtype] * n_out, shapes=shapes,
                                                 version=17)
        return KernelOut(outs[0].squeeze(1), outs[1].squeeze(0), outs[2].squeeze(0) if spec.is_lstm else None,
                         None)

    @staticmethod
    def _scan(x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None, params: dict[str, Tensor],
              spec: CellSpec, H: int) -> KernelOut:
        """A ``Scan`` over :func:`lstmkit.cell.step` (what the reference kernel loops over)."""
        from torch._higher_order_ops.scan import scan

        T, B = x.shape[0], x.shape[1]
        # Inference only: nothing entering the Scan carries autograd (the exporter's passes
        # would otherwise trace scan's backward, which fails on symbolic sizes).
        params = {k: v.detach() for k, v in params.items()}
        # The states are fresh tensors: a layer's h0 / c0 is often a view into the stack's
        # (L·D, B, H) state at a storage offset of k·B·H, symbolic in B, which torch.export's
        # non-strict capture cannot give to scan's body (it fails, and torch.onnx.export then
        # retries the whole capture in strict mode at twice the time; a model of four stacks,
        # one of them bidirectional, failed in both modes).
        x, h0 = x.detach(), h0.detach().clone()
        c0 = None if c0 is None else c0.detach().clone()
        a = cell.input_projection(x, params, spec, H).clone()  # (T, B, R)
        valid = (torch.ones(T, B, 1, dtype=torch.bool, device=x.device) if lengths is None else
                 (torch.arange(T, device=x.device).unsqueeze(1) < lengths.to(x.device).unsqueeze(0)).unsqueeze(-1))
        states = [h0] + ([c0] if spec.is_lstm else [])
        if spec.fgr:
            states.append(h0.new_zeros(B, len(spec.sigmoid_gates) * H))

        def step(carry: list[Tensor], xs: tuple[Tensor, Tensor]) -> tuple[list[Tensor], Tensor]:
            a_t, v = xs  # (B, R), (B, 1)
            return masked_step(spec, H, params, carry, a_t, v)
        final, y = scan(step, states, (a, valid))
        return KernelOut(y, final[0], final[1] if spec.is_lstm else None, None)
