"""The cell's equations as ONNX, traced from :mod:`lstmkit.cell` — never written node by node.

:func:`lstmkit.convert.to_onnx` writes a variant the ``LSTM``/``RNN`` operator cannot carry as
a ``Scan`` per layer and direction. Its two pieces come from ``torch.onnx.export`` of the
same functions every kernel is tested against:

* the input side of every step, :func:`lstmkit.cell.input_projection` (``x W_ihᵀ (LN) + b``),
  traced with dynamic T and B and grafted into the main graph (:func:`input_projection`);
* one step, :func:`lstmkit.kernels.onnx_export.masked_step` — :func:`lstmkit.cell.step` with
  the length mask, the function ``torch.onnx.export``'s own Scan runs — traced with a dynamic
  batch and used as the Scan's body (:func:`step_body`).

A traced graph reads the layer-direction's parameters as initializers named by the parameter
(``weight_hh``, …); grafting renames them to the main graph's initializers (``weight_hh_l0``,
…, named as the state dict) and every other value to a fresh name, so the same trace serves
every layer and direction. Traces are cached per cell, sizes, dtype and opset.

``torch.onnx.export`` builds its table of ONNX translations (torchlib's, some thousand
functions) anew on every call: 0.5-1.6 s a call on the machines here, more than tracing one
step takes, and a two-layer bidirectional Scan export makes three or four calls. The traces
here use one table per opset, kept for the process, through the exporter's own entry point
that takes a table (:func:`_exporter`); where this torch has no such entry point, the public
``torch.onnx.export`` runs as it is.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from lstmkit import cell
from lstmkit.kernels.onnx_export import masked_step
from lstmkit.spec import CellSpec
from lstmkit.variants import cell_states

__all__ = ["input_projection", "step_body", "graft"]

#: Traced graphs by cell, sizes, dtype and opset, the most recently used last; each holds the
#: weights of the layer it was traced from (as initializers), so only the last few are kept.
_CACHE: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
_CACHE_SIZE = 16


def _cached(key: tuple[Any, ...], trace: Callable[[], Any]) -> Any:
    """``_CACHE[key]``, traced by ``trace()`` first where it is not there (the least recently used
    dropped beyond :data:`_CACHE_SIZE`: exports of many shapes in one process kept every graph)."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
    else:
        _CACHE[key] = trace()
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return _CACHE[key]


class _Traced(torch.nn.Module):
    """``fn(*inputs, params)`` with the parameters registered under their own names, so the
    exported graph's initializers are named by them."""

    def __init__(self, fn: Any, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.names = list(params)
        for name, value in params.items():
            self.register_parameter(name, torch.nn.Parameter(value.detach().clone(), requires_grad=False))

    def forward(self, *inputs: Tensor) -> Any:
        return self.fn(*inputs, {n: getattr(self, n) for n in self.names})


@functools.cache
def _exporter(opset: int) -> Any:
    """``torch.onnx.export`` for ``opset`` with its translation table built once: the exporter's
    core ``export`` with the table ``torch.onnx.export`` would build (torchlib's at
    ``max(opset, the opset torchlib is written for)``: older opsets are converted down after),
    or None where this torch's exporter has no such entry point (the caller then runs
    ``torch.onnx.export``, which builds the table per call)."""
    try:
        from torch.onnx._internal.exporter import _constants, _core, _registration
        if "registry" not in inspect.signature(_core.export).parameters:
            return None
        registry = _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, _constants.TORCHLIB_OPSET))
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    return functools.partial(_core.export, registry=registry)


#: The loggers of the exporter's internals, quiet while tracing: they report torchvision's absence
#: and the fallback of each conversion to an older opset (a failed one is this module's error).
_EXPORTER_LOGGERS = ("torch.onnx", "onnxscript")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's loggers and warnings quiet, and no gradients, for the ``with`` block."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _trace(module: torch.nn.Module, inputs: list[tuple[str, Tensor, dict[int, Any]]], outputs: list[str],
           opset: int) -> Any:
    """``module`` as an ONNX model traced on ``inputs`` (name, example, dynamic dims), converted
    down to ``opset`` by the exporter where it can (else left at the exporter's own)."""
    examples = tuple(t for _, t, _ in inputs)
    options = dict(dynamic_shapes=(tuple(d for _, _, d in inputs),),  # forward(*inputs)
                   input_names=[n for n, _, _ in inputs], output_names=outputs, opset_version=opset,
                   optimize=False, verbose=False)
    with _quiet_exporter():
        export = _exporter(opset)
        program = (export(module, examples, None, **options) if export is not None
                   else torch.onnx.export(module, examples, **options))
    return program.model_proto


def _opset_of(proto: Any) -> int:
    return int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))


def _export(fn: Any, params: dict[str, Tensor], inputs: list[tuple[str, Tensor, dict[int, Any]]],
            outputs: list[str], opset: int) -> Any:
    """The ONNX graph of ``fn`` traced on ``inputs`` (name, example, dynamic dims) — checked
    to be at ``opset``. The exporter writes its own opset and converts down; where it cannot
    (an operator without a converter to ``opset``), the cell is refused with the lowest opset
    it reaches."""
    module = _Traced(fn, params)
    proto = _trace(module, inputs, outputs, opset)
    native = _opset_of(proto)
    if native != opset:
        needed = next((v for v in range(opset + 1, native) if _opset_of(_trace(module, inputs, outputs, v)) == v),
                      native)
        raise ValueError(f"opset: this cell's equations as ONNX need opset >= {needed}, got {opset}")
    return proto.graph


def input_projection(spec: CellSpec, params: dict[str, Tensor], hidden_size: int, opset: int) -> Any:
    """The graph ``in_x [T, B, I] -> out_a [T, B, R]`` of :func:`lstmkit.cell.input_projection`."""
    names = [n for n in ("weight_ih", "bias_ih", "bias_hh", "ln_ih_weight") if n in params]
    p = {n: params[n] for n in names}
    w = p["weight_ih"]
    key = ("input", spec, hidden_size, tuple(w.shape), tuple(names), w.dtype, opset)

    def trace() -> Any:
        T, B = torch.export.Dim("T", min=2), torch.export.Dim("B", min=2)
        x = torch.zeros(3, 2, w.shape[1], dtype=w.dtype)

        def project(xx: Tensor, pp: dict[str, Tensor]) -> Tensor:
            return cell.input_projection(xx, pp, spec, hidden_size)
        return _export(project, p, [("in_x", x, {0: T, 1: B})], ["out_a"], opset)
    return _cached(key, trace)


def step_body(spec: CellSpec, params: dict[str, Tensor], hidden_size: int, lengths: bool, opset: int) -> Any:
    """The graph of one step, the Scan's body: inputs the states ``in_h`` [B, H_out] (``in_c``
    [B, H] — the sLSTM's c, n, m side by side, [B, 3H] —, ``in_s`` [B, |S|·H] for fgr), the
    scanned ``in_a_t`` [B, R] (and, with lengths, the step ``in_t`` and ``in_lengths`` [B],
    which the caller binds to the outer scope); outputs
    the new states and the step's output (``out_h``, …, ``out_y`` [B, H_out])."""
    p = {n: v for n, v in params.items() if n not in ("weight_ih", "bias_ih", "bias_hh", "ln_ih_weight")}
    H = hidden_size
    R = params["weight_hh"].shape[0]
    h_out = params["weight_hr"].shape[0] if "weight_hr" in params else H
    dtype = params["weight_hh"].dtype
    key = ("step", spec, H, R, h_out, tuple(sorted(p)), dtype, lengths, opset)

    def trace() -> Any:
        B = torch.export.Dim("B", min=2)
        widths = [("in_h", h_out)] + ([("in_c", len(cell_states(spec)) * H)] if spec.is_lstm else []) + \
            ([("in_s", len(spec.sigmoid_gates) * H)] if spec.fgr else [])
        inputs: list[tuple[str, Tensor, dict[int, Any]]] = [(n, torch.zeros(2, w, dtype=dtype), {0: B})
                                                            for n, w in widths]
        inputs.append(("in_a_t", torch.zeros(2, R, dtype=dtype), {0: B}))
        if lengths:
            inputs += [("in_t", torch.tensor(0), {}), ("in_lengths", torch.ones(2, dtype=torch.int64), {0: B})]
        n_states = len(widths)

        def one_step(*args: Any) -> tuple[Tensor, ...]:
            *ins, pp = args
            states, a_t = list(ins[:n_states]), ins[n_states]
            valid = (ins[n_states + 1] < ins[n_states + 2]).unsqueeze(1) if lengths else None  # (B, 1)
            new, y = masked_step(spec, H, pp, states, a_t, valid)
            return (*new, y)
        outputs = [f"out_{n[3:]}" for n, _ in widths] + ["out_y"]
        return _export(one_step, p, inputs, outputs, opset)
    return _cached(key, trace)


def graft(graph: Any, fresh: Any, inputs: dict[str, str], params: dict[str, str]) -> tuple[list[Any], list[Any],
                                                                                          list[str]]:
    """A traced graph's nodes with its inputs and parameters bound to outer names.

    Args:
        fresh: ``fresh(hint) -> str``, unique names of the graph the nodes go into.
        inputs: the traced graph's input names -> the names they take.
        params: parameter initializer names -> the outer initializers' names.

    Returns:
        ``(nodes, initializers, outputs)``: the renamed nodes (in order), the traced graph's
        other initializers (constants, renamed) and the names of its outputs.
    """
    from onnx import helper, numpy_helper

    rename = {**inputs, **params}
    initializers = []
    for t in graph.initializer:
        if t.name in params:
            continue
        new = fresh("c")
        rename[t.name] = new
        arr = numpy_helper.to_array(t)
        initializers.append(numpy_helper.from_array(arr, new))

    def name(v: str) -> str:
        if v == "":
            return v
        if v not in rename:
            rename[v] = fresh("v")
        return rename[v]
    nodes = []
    for node in graph.node:
        copy = helper.make_node(node.op_type, [name(v) for v in node.input], [name(v) for v in node.output],
                                name=fresh(node.op_type), domain=node.domain)
        copy.attribute.extend(node.attribute)
        nodes.append(copy)
    outputs: list[str] = []
    for o in graph.output:  # one value given as two outputs (a step's h and y): a graph output is named once
        out = name(o.name)
        if out in outputs:
            nodes.append(helper.make_node("Identity", [out], [dup := fresh("v")], name=fresh("Identity")))
            out = dup
        outputs.append(out)
    return nodes, initializers, outputs
