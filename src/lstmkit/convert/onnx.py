"""ONNX ⇄ lstmkit: export to the ONNX ``LSTM`` / ``RNN`` operators (or a ``Scan``), and read them back.

Export (:func:`to_onnx`) writes one ``LSTM`` node per layer (``RNN`` for
:class:`lstmkit.RNN`), with the gate blocks permuted to ONNX's order i, o, f, c
(:data:`lstmkit.layout.ORDERS`). What the operator's inputs and attributes carry:

=======================  ==================================================================
lstmkit                  ONNX ``LSTM``
=======================  ==================================================================
``weight_ih/hh``         ``W`` [D, 4H, I], ``R`` [D, 4H, H] (i, o, f, c)
``bias_ih/hh``           ``B`` [D, 8H] = [Wb, Rb]; omitted for ``bias=False`` (zeros)
``peephole``             ``P`` [D, 3H] in the order i, o, f; o peeks at the new ``c_t``
``cifg`` (f = 1 − i)     ``input_forget=1``; onnxruntime computes exactly f = 1 − i (its
                         f rows of W, R, B and P are written as zeros and never read)
``bidirectional``        ``direction="bidirectional"``; between layers the node's
                         Y [T, 2, B, H] is transposed and reshaped to [T, B, 2H]
``h_0, c_0``             optional graph inputs ``initial_h`` / ``initial_c``
                         [L·D, B, H], sliced per layer
lengths (PackedSequence) optional graph input ``sequence_lens`` [B] (int32)
``batch_first``          a ``Transpose`` around the stack (onnxruntime refuses ``layout=1``)
initial biases (``fb=``,  nothing to do: they are *initial values* already stored in
``ib=``, ``ob=``,        ``bias_ih`` (spec.py, ``INIT_FIELDS``), not added at run time; a
``chrono=``)             model read back has them cleared from its spec
=======================  ==================================================================

What the operator cannot express is written as a ``Scan`` graph instead
(``method="auto"``, the default; ``method="operator"`` refuses it with the reason, a
``ValueError`` naming the variant). ``clip=c``: the operator's ``clip`` attribute bounds the
gate *pre-activations* (checked numerically against onnxruntime) while lstmkit's
``cell_clip`` bounds ``c_t``: different functions, so the attribute is never used.
``layernorm``, deep gates, ``fgr``, ``nig``/``nfg``/``nog``, ``niaf``/``noaf`` and
projection (``proj_size``) have no place in the operator either.

The Scan graph is :mod:`lstmkit.cell` traced, not rewritten (:mod:`lstmkit.convert.onnx_trace`):
per layer and direction, the input side ``x W_ihᵀ (LN) + b`` of all steps (the trace of
``cell.input_projection``), then a ``Scan`` whose body is the trace of one step (``cell.step``
with the length mask, the function ``torch.onnx.export``'s own Scan runs). Lengths mask the
body's updates (state kept, output 0) and the reverse direction reads each sequence within
its own length (``ReverseSequence``). The parameters are initializers under their lstmkit
names, which the traced graphs read. A Scan graph needs opset ≥ 15 (``SCAN_MIN_OPSET``; 17
with layer norm). Every variant is exported; ``tests/test_onnx_export.py`` runs each with
onnxruntime against lstmkit. Dropout is a training-time operation and is not exported, and
zoneout is its expectation (the graph is the layer in ``eval()`` mode).

Graph inputs: ``X`` [T, B, I] (or [B, T, I] with ``batch_first``), then optionally
``sequence_lens`` [B] (int32) and ``initial_h`` [L·D, B, H_out] (and ``initial_c``
[L·D, B, H] for an LSTM). Outputs: ``Y`` [T, B, D·H_out] (or [B, T, D·H_out]), ``Y_h``
[L·D, B, H_out] and, for an LSTM, ``Y_c`` [L·D, B, H]: exactly ``output, (h_n, c_n)`` of
the layer. ``T`` and ``B`` are dynamic axes. The model's metadata ``lstmkit.config``
records the layer's configuration (JSON).

Import (:func:`from_onnx`) lives in :mod:`lstmkit.convert.onnx_import`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from lstmkit._atomic import check_writable, write_bytes
from lstmkit._validate import check_bool, check_optional_bool
from lstmkit.convert import onnx_trace
from lstmkit.convert._checks import require_values
from lstmkit.convert.onnx_import import METADATA_KEY, from_onnx, onnx_module
from lstmkit.kernels import onnx_export
from lstmkit.layout import suffix
from lstmkit.nn import LSTM, RNN
from lstmkit.variants import cell_states

__all__ = ["to_onnx", "from_onnx", "operator_refusal", "DEFAULT_OPSET", "MIN_OPSET", "SCAN_MIN_OPSET"]

#: Opset written when none is given (LSTM-14 semantics; read by every current runtime).
DEFAULT_OPSET = 17
#: Oldest opset written: 14 is where ``LSTM``/``RNN`` last changed (``layout``), and
#: ``Slice``/``Reshape`` take their arguments as inputs from 13 on.
MIN_OPSET = 14
#: Oldest opset of a Scan graph: the traced cell reads sizes with ``Shape``'s start/end (15).
SCAN_MIN_OPSET = 15
_onnx = onnx_module


# ---------------------------------------------------------------------------- what fits


def operator_refusal(layer: LSTM | RNN) -> str | None:
    """Why the ONNX ``LSTM``/``RNN`` operator cannot carry ``layer`` (None if it can; then
    :func:`to_onnx` uses the operator, else a Scan graph)."""
    if not isinstance(layer, (LSTM, RNN)):
        raise TypeError(f"model: expected an lstmkit LSTM or RNN, got {type(layer).__name__}")
    return onnx_export.operator_refusal(layer.spec, layer.proj_size)


def _np_dtype(dtype: Any) -> tuple[np.dtype, int]:
    onnx = _onnx()
    if dtype == torch.float32:
        return np.dtype(np.float32), onnx.TensorProto.FLOAT
    if dtype == torch.float64:
        return np.dtype(np.float64), onnx.TensorProto.DOUBLE
    raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype!r}")


# ---------------------------------------------------------------------------- weights


def _operator_arrays(layer: LSTM | RNN, index: int, direction: int, dtype: torch.dtype
                     ) -> dict[str, np.ndarray | None]:
    """ONNX W, R, B (or None), P (or None) of one layer-direction, as arrays of the graph's
    ``dtype`` (the permutation is :func:`lstmkit.kernels.onnx_export.operator_weights`, shared
    with ``torch.onnx.export``). The parameters are cast first, as the Scan graph's are: a
    float16 or bfloat16 layer is written exactly in float32 (or float64)."""
    p = {k: v.detach().cpu().to(dtype) for k, v in layer.layer_params(index, direction).items()}
    out = onnx_export.operator_weights(p, layer.spec, layer.hidden_size)
    return {k: (v.resolve_neg().numpy().copy() if v is not None else None) for k, v in out.items()}


# ---------------------------------------------------------------------------- export


class _Builder:
    """Collects nodes (of one graph or a Scan body) and constants (always the main graph's,
    which a body reads from the outer scope); every generated name is unique."""

    def __init__(self, np_dtype: np.dtype, inits: list[Any] | None = None, counter: list[int] | None = None,
                 opset: int = 0) -> None:
        self.np_dtype = np_dtype
        self.opset = opset
        self.nodes: list[Any] = []
        self.inits: list[Any] = [] if inits is None else inits
        self._counter = [0] if counter is None else counter

    def sub(self) -> _Builder:
        """A builder for a subgraph: own nodes, shared constants and names."""
        return _Builder(self.np_dtype, self.inits, self._counter, self.opset)

    def fresh(self, hint: str) -> str:
        self._counter[0] += 1
        return f"{hint}_{self._counter[0]}"

    def const(self, array: Any, hint: str = "const", name: str | None = None) -> str:
        from onnx import numpy_helper

        name = name or self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def floats(self, values: Any, hint: str = "const") -> str:
        return self.const(np.asarray(values, dtype=self.np_dtype), hint)

    def ints(self, values: Any, hint: str = "shape") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int | list[str] = 1,
           **attrs: Any) -> Any:
        from onnx import helper

        names = outputs if isinstance(outputs, list) else [self.fresh(hint or op_type.lower())
                                                          for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.fresh(op_type), **attrs))
        return names[0] if len(names) == 1 else names


def to_onnx(model: LSTM | RNN, path: str | os.PathLike[str] | None = None, *, opset: int | None = None,
            batch_first: bool | None = None, initial_states: bool = False, sequence_lens: bool = False,
            dtype: torch.dtype = torch.float32, method: str = "auto") -> Any:
    """The ONNX model computing ``model`` (in ``eval()`` mode); written to ``path`` if given.

    Args:
        model: an lstmkit ``LSTM`` (any variant) or ``RNN``.
        path: where to write the ``.onnx`` file, atomically (a temporary file in the same
            directory replaces ``path`` only once complete; nothing is left on error).
        opset: the ``ai.onnx`` opset, ``MIN_OPSET`` ≤ opset ≤ onnx's newest
            (default ``DEFAULT_OPSET``); a Scan graph with layer norm needs ≥ 17.
        batch_first: the layout of ``X`` and ``Y``; default ``model.batch_first``.
        initial_states: add graph inputs ``initial_h`` [L·D, B, H_out] (and ``initial_c``
            [L·D, B, H]; the sLSTM also ``initial_n``, ``initial_m``); without them the states
            start at zero.
        sequence_lens: add the graph input ``sequence_lens`` [B] (int32): steps
            ``t ≥ len_b`` leave the state unchanged and output zeros, as a PackedSequence.
        dtype: the graph's float type. float32 by default, whatever the layer's dtype:
            onnxruntime's LSTM kernel runs float32 only (it refuses double at run time).
            ``torch.float64`` writes a valid double graph for runtimes that have one.
        method: ``"operator"``: the ``LSTM``/``RNN`` operators, refusing variants they
            cannot express; ``"scan"``: the cell's equations as a ``Scan`` body, for every
            variant; ``"auto"``: the operator where it can, else the Scan.

    Returns:
        ``onnx.ModelProto`` with inputs ``X`` [T, B, I] (``[B, T, I]`` batch-first) and the
        optional ones above; outputs ``Y`` [T, B, D·H_out], ``Y_h`` [L·D, B, H_out] and (LSTM)
        ``Y_c`` [L·D, B, H] (the sLSTM: ``Y_c``, ``Y_n``, ``Y_m``).

    Each weight is read as the layer computes with it: a parametrized one (``weight_norm``,
    ``register_parametrization``) computed from its parametrization; one that a forward pre-hook
    sets (``torch.nn.utils.prune``, the hook-based ``weight_norm``) as that hook last set it, i.e. as
    of the layer's last call — call the layer once after changing the tensors such a hook reads.

    Raises:
        ValueError: ``method="operator"`` and a variant the operator cannot carry (the
            message says which and why); an unsupported opset, dtype or method; a layer on the
            meta device; ``path`` in a directory that does not exist.
        TypeError: ``model`` is not an lstmkit LSTM or RNN; ``path`` is not a file name.
    """
    check_optional_bool("batch_first", batch_first)
    check_bool("initial_states", initial_states)
    check_bool("sequence_lens", sequence_lens)
    reason = operator_refusal(model)
    if path is not None:
        check_writable(path, overwrite=True, what="path")
    require_values(model, "model")
    onnx = _onnx()
    from onnx import TensorProto, helper

    if method not in ("auto", "operator", "scan"):
        raise ValueError(f"method: expected 'auto', 'operator' or 'scan', got {method!r}")
    if method == "operator" and reason is not None:
        raise ValueError(f"onnx: {reason}; method='scan' (or 'auto') writes the cell's equations as a Scan "
                         f"graph instead")
    use_scan = method == "scan" or reason is not None
    newest = onnx.defs.onnx_opset_version()
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset: expected an int in [{MIN_OPSET}, {newest}], got {opset!r}")
    if use_scan and opset < SCAN_MIN_OPSET:
        raise ValueError(f"opset: cell {model.spec.name!r} is written as a Scan graph, which needs opset >= "
                         f"{SCAN_MIN_OPSET}, got {opset} (the LSTM/RNN operator alone needs {MIN_OPSET})")
    if use_scan and model.spec.layernorm and opset < 17:
        raise ValueError(f"opset: a layernorm cell is written with LayerNormalization, which needs opset >= 17, "
                         f"got {opset}")
    batch_first = model.batch_first if batch_first is None else bool(batch_first)
    np_dtype, elem = _np_dtype(dtype)
    is_lstm = isinstance(model, LSTM)
    L, D, H, I = model.num_layers, model.num_directions, model.hidden_size, model.input_size
    h_out = model.output_size
    cells = cell_states(model.spec)  # c (the sLSTM: c, n, m); none for the RNN
    g = _Builder(np_dtype, opset=opset)

    inputs = [helper.make_tensor_value_info("X", elem, ["B", "T", I] if batch_first else ["T", "B", I])]
    state_names = ["initial_h"] + [f"initial_{k}" for k in cells]
    if sequence_lens:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]))
    if initial_states:
        inputs.append(helper.make_tensor_value_info("initial_h", elem, [L * D, "B", h_out]))
        for k in cells:
            inputs.append(helper.make_tensor_value_info(f"initial_{k}", elem, [L * D, "B", H]))
    x = g.op("Transpose", ["X"], "X_time_major", perm=[1, 0, 2]) if batch_first else "X"  # [T, B, I]
    ctx = {"lengths": "sequence_lens" if sequence_lens else None, "states": state_names if initial_states else None}
    if use_scan:
        ctx.update(_scan_context(g, x, sequence_lens))
    y_h: list[str] = []
    y_c: list[list[str]] = [[] for _ in cells]
    for index in range(L):
        layer_fn = _scan_layer if use_scan else _operator_layer
        x, hs, cs = layer_fn(g, model, index, x, ctx)  # [T, B, D·H_out], [D, B, H_out], per cell state [D, B, H]
        y_h.append(hs)
        for k, c in enumerate(cs):
            y_c[k].append(c)
    g.op("Transpose", [x], outputs=["Y"], perm=[1, 0, 2]) if batch_first else g.op("Identity", [x], outputs=["Y"])
    g.op("Concat", y_h, outputs=["Y_h"], axis=0) if L > 1 else g.op("Identity", y_h, outputs=["Y_h"])
    outputs = [helper.make_tensor_value_info("Y", elem, ["B", "T", D * h_out] if batch_first
                                             else ["T", "B", D * h_out]),
               helper.make_tensor_value_info("Y_h", elem, [L * D, "B", h_out])]
    for k, parts in zip(cells, y_c):  # Y_c (the sLSTM: Y_c, Y_n, Y_m)
        g.op("Concat", parts, outputs=[f"Y_{k}"], axis=0) if L > 1 else g.op("Identity", parts, outputs=[f"Y_{k}"])
        outputs.append(helper.make_tensor_value_info(f"Y_{k}", elem, [L * D, "B", H]))
    graph = helper.make_graph(g.nodes, "lstmkit_" + ("lstm" if is_lstm else "rnn"), inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="lstmkit",
                              ir_version=helper.find_min_ir_version_for(opsets))
    from lstmkit.convert.layer_config import layer_config

    config = {**layer_config(model), "batch_first": batch_first, "onnx_method": "scan" if use_scan else "operator"}
    helper.set_model_props(proto, {METADATA_KEY: json.dumps(config)})
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        write_bytes(path, proto.SerializeToString(), what="path")
    return proto


def _operator_layer(g: _Builder, model: LSTM | RNN, index: int, x: str, ctx: dict[str, Any]
                    ) -> tuple[str, str, list[str]]:
    """One layer as one ONNX ``LSTM``/``RNN`` node; returns Y [T, B, D·H], Y_h and [Y_c] [D, B, H]."""
    is_lstm = isinstance(model, LSTM)
    D, H = model.num_directions, model.hidden_size
    dtype = torch.float64 if g.np_dtype == np.float64 else torch.float32
    arrays = [_operator_arrays(model, index, d, dtype) for d in range(D)]

    def stacked(key: str) -> str:
        return g.const(np.stack([a[key] for a in arrays]).astype(g.np_dtype), name=f"{key}_l{index}")

    ins = [x, stacked("W"), stacked("R"), stacked("B") if model.bias else "", ctx["lengths"] or "", "", ""]
    if ctx["states"] is not None:
        if model.num_layers == 1:
            ins[5:5 + len(ctx["states"])] = ctx["states"]
        else:
            start, end, axis = g.ints([index * D]), g.ints([(index + 1) * D]), g.ints([0])
            for k, name in enumerate(ctx["states"]):
                ins[5 + k] = g.op("Slice", [name, start, end, axis], f"{name}_l{index}")  # [D, B, H] of this layer
    if is_lstm and model.spec.peephole:
        ins.append(stacked("P"))
    while ins[-1] == "":
        ins.pop()
    attrs: dict[str, Any] = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
    if is_lstm and model.spec.coupled:
        attrs["input_forget"] = 1
    attrs.update(onnx_export.operator_activations(model.spec, D))
    outs = [f"Y_l{index}", f"Y_h_l{index}"] + ([f"Y_c_l{index}"] if is_lstm else [])
    g.op("LSTM" if is_lstm else "RNN", ins, outputs=outs, **attrs)  # Y [T, D, B, H], Y_h/Y_c [D, B, H]
    y = g.op("Transpose", [outs[0]], f"Y_l{index}_t", perm=[0, 2, 1, 3])  # [T, B, D, H]
    y = g.op("Reshape", [y, g.ints([0, 0, -1])], f"Y_l{index}_merged")  # [T, B, D·H]
    return y, outs[1], ([outs[2]] if is_lstm else [])


# ---------------------------------------------------------------------------- Scan export


def _scan_context(g: _Builder, x: str, sequence_lens: bool) -> dict[str, Any]:
    """Names every layer's Scan shares: the batch size, zero states' shapes, lengths, step indices."""
    shape = g.op("Shape", [x])  # [3]: T, B, I
    batch = g.op("Slice", [shape, g.ints([1]), g.ints([2]), g.ints([0])], "batch")  # [1]
    out: dict[str, Any] = {"batch": batch}
    if sequence_lens:
        T = g.op("Gather", [shape, g.ints(0)], "T", axis=0)  # scalar
        out["lengths64"] = g.op("Cast", ["sequence_lens"], "lengths64", to=7)  # int64 [B]
        out["steps"] = g.op("Range", [g.ints(0), T, g.ints(1)], "steps")  # [T]: 0 .. T-1
    return out


def _zeros(g: _Builder, ctx: dict[str, Any], width: int) -> str:
    from onnx import helper

    shape = g.op("Concat", [ctx["batch"], g.ints([width])], "zeros_shape", axis=0)
    value = helper.make_tensor("zero", helper.np_dtype_to_tensor_dtype(g.np_dtype), [1], [0.0])
    return g.op("ConstantOfShape", [shape], "zeros", value=value)  # [B, width]


def _scan_layer(g: _Builder, model: LSTM | RNN, index: int, x: str, ctx: dict[str, Any]
                ) -> tuple[str, str, list[str]]:
    """One layer as one ``Scan`` per direction: the input side and the body traced from
    :mod:`lstmkit.cell` (:mod:`lstmkit.convert.onnx_trace`), reading the layer-direction's
    parameters from initializers named as the state dict. The body carries ``h``, the cell
    states side by side [B, S·H] (the sLSTM's c, n, m) and fgr's ``s``. Returns ``y``, ``h``
    [D, B, H_out] and each cell state [D, B, H]."""
    from onnx import helper

    spec, H, D = model.spec, model.hidden_size, model.num_directions
    h_out = model.output_size
    cells = cell_states(spec)
    S = len(cells)
    lengths = ctx.get("lengths64")
    dtype = torch.float64 if g.np_dtype == np.float64 else torch.float32
    ys: list[str] = []
    hs: list[str] = []
    cs: list[list[str]] = [[] for _ in cells]
    for d in range(D):
        # (a weight with torch's negation bit made plain: NumPy reads memory)
        tensors = {base: v.detach().cpu().to(dtype).resolve_neg() for base, v in model.layer_params(index, d).items()}
        names = {base: g.const(v.numpy(), name=base + suffix(index, d)) for base, v in tensors.items()}
        # The input side of every step at once: x W_ihᵀ (LN) + b, [T, B, R].
        traced = onnx_trace.input_projection(spec, tensors, H, g.opset)
        nodes, inits, (a,) = onnx_trace.graft(traced, g.fresh, {"in_x": x}, names)
        g.nodes.extend(nodes)
        g.inits.extend(inits)
        reverse = d == 1
        if reverse and lengths is not None:  # each sequence backwards within its own length
            a = g.op("ReverseSequence", [a, lengths], "a_reversed", batch_axis=1, time_axis=0)
        parts = []
        for k, width in enumerate([h_out] + [H] * S):
            if ctx["states"] is not None:
                parts.append(g.op("Gather", [ctx["states"][k], g.ints(index * D + d)], axis=0))  # [B, width]
            else:
                parts.append(_zeros(g, ctx, width))
        states = parts[:1]
        if S:  # the cell states side by side, [B, S·H], as cell.step carries them
            states.append(g.op("Concat", parts[1:], "cells", axis=1) if S > 1 else parts[1])
        if spec.fgr:
            states.append(_zeros(g, ctx, len(spec.sigmoid_gates) * H))
        # The body: one step; its t and lengths inputs: the scanned step index and the outer lengths.
        step = onnx_trace.step_body(spec, tensors, H, lengths is not None, g.opset)
        body_inputs = [v.name for v in step.input]
        bound = {"in_lengths": lengths} if lengths is not None else {}
        inner = {n: g.fresh(n) for n in body_inputs if n not in bound}
        nodes, inits, outs = onnx_trace.graft(step, g.fresh, {**inner, **bound}, names)
        g.inits.extend(inits)
        elem = helper.np_dtype_to_tensor_dtype(g.np_dtype)
        widths = [h_out, S * H, len(spec.sigmoid_gates) * H][: len(states)] if spec.is_lstm else [h_out]
        state_in = [helper.make_tensor_value_info(inner[n], elem, ["B", w])
                    for n, w in zip(body_inputs[: len(states)], widths)]
        scan_in = [helper.make_tensor_value_info(inner["in_a_t"], elem, ["B", spec.gate_rows(H)])]
        if lengths is not None:
            scan_in.append(helper.make_tensor_value_info(inner["in_t"], 7, []))
        out_info = [helper.make_tensor_value_info(o, elem, ["B", w]) for o, w in zip(outs, widths + [h_out])]
        body = helper.make_graph(nodes, g.fresh("cell_step"), state_in + scan_in, out_info)
        scan_inputs = [a] if lengths is None else [a, ctx["steps"]]
        direction = [1 if reverse and lengths is None else 0]
        outs = g.op("Scan", states + scan_inputs, "scan", outputs=len(states) + 1, body=body,
                    num_scan_inputs=len(scan_inputs), scan_input_directions=direction * len(scan_inputs),
                    scan_output_directions=direction)
        y = outs[-1]  # [T, B, H_out]
        if reverse and lengths is not None:
            y = g.op("ReverseSequence", [y, lengths], "y", batch_axis=1, time_axis=0)
        ys.append(y)
        hs.append(g.op("Unsqueeze", [outs[0], g.ints([0])]))
        if S:
            split = g.op("Split", [outs[1], g.ints([H] * S)], "cell_split", outputs=S, axis=1) if S > 1 else outs[1]
            for k, c in enumerate([split] if S == 1 else split):
                cs[k].append(g.op("Unsqueeze", [c, g.ints([0])]))
    y = g.op("Concat", ys, "layer_y", axis=2) if D == 2 else ys[0]
    h = g.op("Concat", hs, "layer_h", axis=0) if D == 2 else hs[0]
    return y, h, [g.op("Concat", c, "layer_c", axis=0) if D == 2 else c[0] for c in cs]
