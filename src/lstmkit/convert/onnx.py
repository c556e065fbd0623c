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

The Scan graph is docs/cell.md written in ONNX ops: per layer and direction, the input
side ``x W_ihᵀ (LN) + b`` of all steps as one ``MatMul``, then a ``Scan`` whose body is
one step (``Gemm`` for ``h W_hhᵀ``, ``Split`` into gates, MLPs, peepholes, ``weight_gg``,
``Clip``, ``LayerNormalization`` — opset ≥ 17 —, projection). Lengths mask the body's
updates with ``Where`` (state kept, output 0) and the reverse direction reads each
sequence within its own length (``ReverseSequence``). The parameters are initializers
under their lstmkit names. Every variant is exported; ``tests/test_convert_onnx.py`` runs
each with onnxruntime against lstmkit. Dropout is a training-time operation and is not
exported (the graph is the layer in ``eval()`` mode).

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

from lstmkit._validate import check_bool, check_optional_bool
from lstmkit.cell import LN_EPS
from lstmkit.convert.onnx_import import METADATA_KEY, from_onnx, onnx_module
from lstmkit.kernels import onnx_export
from lstmkit.layout import suffix
from lstmkit.nn import LSTM, RNN
from lstmkit.variants import HARD_SIGMOID_SLOPES

__all__ = ["to_onnx", "from_onnx", "operator_refusal", "DEFAULT_OPSET", "MIN_OPSET"]

#: Opset written when none is given (LSTM-14 semantics; read by every current runtime).
DEFAULT_OPSET = 17
#: Oldest opset written: 14 is where ``LSTM``/``RNN`` last changed (``layout``), and
#: ``Slice``/``Reshape`` take their arguments as inputs from 13 on.
MIN_OPSET = 14
_METADATA_KEY = METADATA_KEY
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


def _operator_arrays(layer: LSTM | RNN, index: int, direction: int) -> dict[str, np.ndarray | None]:
    """ONNX W, R, B (or None), P (or None) of one layer-direction, as arrays (the permutation
    is :func:`lstmkit.kernels.onnx_export.operator_weights`, shared with ``torch.onnx.export``)."""
    p = {k: v.detach().cpu() for k, v in layer.layer_params(index, direction).items()}
    out = onnx_export.operator_weights(p, layer.spec, layer.hidden_size)
    return {k: (v.numpy().copy() if v is not None else None) for k, v in out.items()}


# ---------------------------------------------------------------------------- export


class _Builder:
    """Collects nodes (of one graph or a Scan body) and constants (always the main graph's,
    which a body reads from the outer scope); every generated name is unique."""

    def __init__(self, np_dtype: np.dtype, inits: list[Any] | None = None, counter: list[int] | None = None) -> None:
        self.np_dtype = np_dtype
        self.nodes: list[Any] = []
        self.inits: list[Any] = [] if inits is None else inits
        self._counter = [0] if counter is None else counter

    def sub(self) -> _Builder:
        """A builder for a subgraph: own nodes, shared constants and names."""
        return _Builder(self.np_dtype, self.inits, self._counter)

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
            [L·D, B, H]); without them the states start at zero.
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
        ``Y_c`` [L·D, B, H].

    Raises:
        ValueError: ``method="operator"`` and a variant the operator cannot carry (the
            message says which and why); an unsupported opset, dtype or method.
        TypeError: ``model`` is not an lstmkit LSTM or RNN.
    """
    check_optional_bool("batch_first", batch_first)
    check_bool("initial_states", initial_states)
    check_bool("sequence_lens", sequence_lens)
    onnx = _onnx()
    from onnx import TensorProto, helper

    reason = operator_refusal(model)
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
    if use_scan and model.spec.layernorm and opset < 17:
        raise ValueError(f"opset: a layernorm cell is written with LayerNormalization, which needs opset >= 17, "
                         f"got {opset}")
    batch_first = model.batch_first if batch_first is None else bool(batch_first)
    np_dtype, elem = _np_dtype(dtype)
    is_lstm = isinstance(model, LSTM)
    L, D, H, I = model.num_layers, model.num_directions, model.hidden_size, model.input_size
    h_out = model.output_size
    g = _Builder(np_dtype)

    inputs = [helper.make_tensor_value_info("X", elem, ["B", "T", I] if batch_first else ["T", "B", I])]
    state_names = ["initial_h", "initial_c"] if is_lstm else ["initial_h"]
    if sequence_lens:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]))
    if initial_states:
        inputs.append(helper.make_tensor_value_info("initial_h", elem, [L * D, "B", h_out]))
        if is_lstm:
            inputs.append(helper.make_tensor_value_info("initial_c", elem, [L * D, "B", H]))
    x = g.op("Transpose", ["X"], "X_time_major", perm=[1, 0, 2]) if batch_first else "X"  # [T, B, I]
    ctx = {"lengths": "sequence_lens" if sequence_lens else None, "states": state_names if initial_states else None}
    if use_scan:
        ctx.update(_scan_context(g, x, sequence_lens))
    y_h, y_c = [], []
    for index in range(L):
        layer_fn = _scan_layer if use_scan else _operator_layer
        x, hs, cs = layer_fn(g, model, index, x, ctx)  # [T, B, D·H_out], [D, B, H_out], [D, B, H]
        y_h.append(hs)
        y_c.append(cs)
    g.op("Transpose", [x], outputs=["Y"], perm=[1, 0, 2]) if batch_first else g.op("Identity", [x], outputs=["Y"])
    g.op("Concat", y_h, outputs=["Y_h"], axis=0) if L > 1 else g.op("Identity", y_h, outputs=["Y_h"])
    outputs = [helper.make_tensor_value_info("Y", elem, ["B", "T", D * h_out] if batch_first
                                             else ["T", "B", D * h_out]),
               helper.make_tensor_value_info("Y_h", elem, [L * D, "B", h_out])]
    if is_lstm:
        g.op("Concat", y_c, outputs=["Y_c"], axis=0) if L > 1 else g.op("Identity", y_c, outputs=["Y_c"])
        outputs.append(helper.make_tensor_value_info("Y_c", elem, [L * D, "B", H]))
    graph = helper.make_graph(g.nodes, "lstmkit_" + ("lstm" if is_lstm else "rnn"), inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="lstmkit",
                              ir_version=helper.find_min_ir_version_for(opsets))
    from lstmkit._atomic import check_writable, write_bytes
    from lstmkit.convert.layer_config import layer_config

    config = {**layer_config(model), "batch_first": batch_first, "onnx_method": "scan" if use_scan else "operator"}
    helper.set_model_props(proto, {_METADATA_KEY: json.dumps(config)})
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        check_writable(path, overwrite=True, what="DST")
        write_bytes(path, proto.SerializeToString(), what="DST")
    return proto


def _operator_layer(g: _Builder, model: LSTM | RNN, index: int, x: str, ctx: dict[str, Any]
                    ) -> tuple[str, str, str]:
    """One layer as one ONNX ``LSTM``/``RNN`` node; returns Y [T, B, D·H], Y_h, Y_c [D, B, H]."""
    is_lstm = isinstance(model, LSTM)
    D, H = model.num_directions, model.hidden_size
    arrays = [_operator_arrays(model, index, d) for d in range(D)]

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
    return y, outs[1], (outs[2] if is_lstm else "")


# ---------------------------------------------------------------------------- Scan export


def _act(g: _Builder, name: str, v: str) -> str:
    """``name`` applied to ``v`` (hard sigmoids: ``HardSigmoid`` with alpha = their slope)."""
    if name == "identity":
        return v
    if name in HARD_SIGMOID_SLOPES:
        return g.op("HardSigmoid", [v], alpha=HARD_SIGMOID_SLOPES[name], beta=0.5)
    return g.op(onnx_export.ONNX_ACTIVATIONS[name], [v])


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


def _chunk_layernorm(g: _Builder, v: str, widths: list[int], rank: int) -> str:
    """Layer norm without gain of each gate's chunk of the last axis (cell.chunk_layernorm)."""
    if len(set(widths)) == 1:
        n, G = widths[0], len(widths)
        keep = [0] * (rank - 1)
        v4 = g.op("Reshape", [v, g.ints(keep + [G, n])])
        ln = g.op("LayerNormalization", [v4, g.floats(np.ones(n))], axis=-1, epsilon=LN_EPS)
        return g.op("Reshape", [ln, g.ints(keep + [G * n])])
    parts = g.op("Split", [v, g.ints(widths)], outputs=len(widths), axis=-1)
    normed = [g.op("LayerNormalization", [p, g.floats(np.ones(w))], axis=-1, epsilon=LN_EPS)
              for p, w in zip(parts, widths)]
    return g.op("Concat", normed, axis=-1)


def _scan_layer(g: _Builder, model: LSTM | RNN, index: int, x: str, ctx: dict[str, Any]) -> tuple[str, str, str]:
    """One layer as one ``Scan`` per direction running the cell's equations (docs/cell.md)."""
    spec, H, D = model.spec, model.hidden_size, model.num_directions
    h_out = model.output_size
    lengths = ctx.get("lengths64")
    ys, hs, cs = [], [], []
    for d in range(D):
        p = {base: g.const(v.detach().cpu().numpy().astype(g.np_dtype), name=base + suffix(index, d))
             for base, v in model.layer_params(index, d).items()}  # initializers named as the state dict
        widths = [spec.first_width(k, H) for k in spec.computed_gates]
        # The input side of every step at once (cell.input_projection): x W_ihᵀ (LN) + b.
        a = g.op("MatMul", [x, g.op("Transpose", [p["weight_ih"]], perm=[1, 0])], "a")  # [T, B, R]
        if spec.layernorm:
            a = g.op("Mul", [_chunk_layernorm(g, a, widths, 3), p["ln_ih_weight"]])
        if model.bias:
            a = g.op("Add", [a, g.op("Add", [p["bias_ih"], p["bias_hh"]])])
        reverse = d == 1
        if reverse and lengths is not None:  # each sequence backwards within its own length
            a = g.op("ReverseSequence", [a, lengths], "a_reversed", batch_axis=1, time_axis=0)
        states = []
        for k, width in enumerate([h_out, H] if spec.is_lstm else [h_out]):
            if ctx["states"] is not None:
                states.append(g.op("Gather", [ctx["states"][k], g.ints(index * D + d)], axis=0))  # [B, width]
            else:
                states.append(_zeros(g, ctx, width))
        if spec.fgr:
            states.append(_zeros(g, ctx, len(spec.sigmoid_gates) * H))
        body = _cell_body(g, model, p, len(states), lengths)
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
        if spec.is_lstm:
            cs.append(g.op("Unsqueeze", [outs[1], g.ints([0])]))
    y = g.op("Concat", ys, "layer_y", axis=2) if D == 2 else ys[0]
    h = g.op("Concat", hs, "layer_h", axis=0) if D == 2 else hs[0]
    c = (g.op("Concat", cs, "layer_c", axis=0) if D == 2 else cs[0]) if spec.is_lstm else ""
    return y, h, c


def _cell_body(outer: _Builder, model: LSTM | RNN, p: dict[str, str], n_states: int, lengths: str | None) -> Any:
    """The Scan body: one step of docs/cell.md. Inputs: the states (h, c[, s]), a_t [B, R]
    [and t]; outputs: the new states and y_t [B, H_out]. Parameters are outer-scope names."""
    from onnx import helper

    spec, H = model.spec, model.hidden_size
    h_out = model.output_size
    elem = helper.np_dtype_to_tensor_dtype(outer.np_dtype)
    g = outer.sub()
    h, c, s = (g.fresh("h_prev"), g.fresh("c_prev") if spec.is_lstm else None,
               g.fresh("s_prev") if spec.fgr else None)
    a_t, t = g.fresh("a_t"), g.fresh("t") if lengths is not None else None
    widths = [spec.first_width(k, H) for k in spec.computed_gates]
    r = g.op("Gemm", [h, p["weight_hh"]], "r", transB=1)  # h W_hhᵀ [B, R]
    if spec.layernorm:
        r = g.op("Mul", [_chunk_layernorm(g, r, widths, 2), p["ln_hh_weight"]])
    z = g.op("Add", [a_t, r], "z")
    new_states: list[str]
    if not spec.is_lstm:
        h_new = _act(g, spec.nonlinearity, z)
        new_states, y = [h_new], h_new
    else:
        parts = g.op("Split", [z, g.ints(widths)], outputs=len(widths), axis=1) if len(widths) > 1 else [z]
        parts = parts if isinstance(parts, list) else [parts]
        u: dict[str, str] = {}
        for gate, zk in zip(spec.computed_gates, parts):
            hidden = spec.hidden_widths(gate)
            for j in range(1, len(hidden) + 1):  # a deep gate: an MLP over [x, h]
                zk = _act(g, spec.gate_hidden_activation, zk)
                bias = [p[f"mlp_{gate}_bias{j}"]] if f"mlp_{gate}_bias{j}" in p else []
                zk = g.op("Gemm", [zk, p[f"mlp_{gate}_weight{j}"], *bias], f"u_{gate}", transB=1)
            u[gate] = zk
        if spec.peephole:
            for gate in ("i", "f"):
                if gate in u:
                    u[gate] = g.op("Add", [u[gate], g.op("Mul", [p[f"peephole_{gate}"], c])])
        if spec.fgr:
            rec = g.op("Gemm", [s, p["weight_gg"]], "rec", transB=1)
            n = len(spec.sigmoid_gates)
            chunks = g.op("Split", [rec, g.ints([H] * n)], outputs=n, axis=1) if n > 1 else [rec]
            chunks = chunks if isinstance(chunks, list) else [chunks]
            for gate, extra in zip(spec.sigmoid_gates, chunks):
                u[gate] = g.op("Add", [u[gate], extra])
        i = _act(g, spec.gate_activation, u["i"]) if "i" in u else None
        if "f" in u:
            f = _act(g, spec.gate_activation, u["f"])
        elif spec.coupled:
            f = g.op("Sub", [g.floats(1.0), i], "f")
        else:
            f = None
        gg = _act(g, spec.candidate_activation, u["g"])
        keep = c if f is None else g.op("Mul", [f, c])
        c_new = g.op("Add", [keep, gg if i is None else g.op("Mul", [i, gg])], "c")
        if spec.cell_clip is not None:
            c_new = g.op("Clip", [c_new, g.floats(-spec.cell_clip), g.floats(spec.cell_clip)], "c_clipped")
        o = None
        if "o" in u:
            uo = g.op("Add", [u["o"], g.op("Mul", [p["peephole_o"], c_new])]) if spec.peephole else u["o"]
            o = _act(g, spec.gate_activation, uo)
        m = c_new
        if spec.layernorm:
            m = g.op("LayerNormalization", [c_new, p["ln_c_weight"], p["ln_c_bias"]], axis=-1, epsilon=LN_EPS)
        h_new = _act(g, spec.output_activation, m)
        if o is not None:
            h_new = g.op("Mul", [o, h_new])
        if "weight_hr" in p:
            h_new = g.op("Gemm", [h_new, p["weight_hr"]], "h_projected", transB=1)
        if spec.zoneout != (0.0, 0.0):  # evaluation: the expectation d = z
            z_c, z_h = spec.zoneout
            c_new = g.op("Add", [c_new, g.op("Mul", [g.floats(z_c), g.op("Sub", [c, c_new])])], "c_zoned")
            h_new = g.op("Add", [h_new, g.op("Mul", [g.floats(z_h), g.op("Sub", [h, h_new])])], "h_zoned")
        new_states, y = [h_new, c_new], h_new
        if spec.fgr:
            act = {"i": i, "f": f, "o": o}
            new_states.append(g.op("Concat", [act[k] for k in spec.sigmoid_gates], "s", axis=1))
    prev = [h, c, s][: n_states] if spec.is_lstm else [h]
    if lengths is not None:  # steps t >= len_b change nothing and output zeros
        valid = g.op("Unsqueeze", [g.op("Less", [t, lengths]), g.ints([1])], "valid")  # [B, 1]
        new_states = [g.op("Where", [valid, n, o_], "kept") for n, o_ in zip(new_states, prev)]
        y = g.op("Where", [valid, y, g.floats(0.0)], "y_t")
    outs_named = [g.op("Identity", [v], "state_out") for v in new_states] + [g.op("Identity", [y], "y_out")]
    widths_of = [h_out, H, len(spec.sigmoid_gates) * H][: n_states] if spec.is_lstm else [h_out]
    state_in = [helper.make_tensor_value_info(n, elem, ["B", w]) for n, w in zip(prev, widths_of)]
    a_in = [helper.make_tensor_value_info(a_t, elem, ["B", spec.gate_rows(H)])]
    t_in = [helper.make_tensor_value_info(t, 7, [])] if t is not None else []
    outs = [helper.make_tensor_value_info(n, elem, ["B", w]) for n, w in zip(outs_named, widths_of + [h_out])]
    return helper.make_graph(g.nodes, g.fresh("cell_step"), state_in + a_in + t_in, outs)
