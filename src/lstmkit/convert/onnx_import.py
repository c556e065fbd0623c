"""ONNX → lstmkit: :func:`from_onnx`, the import side of :mod:`lstmkit.convert.onnx`.

Import (:func:`from_onnx`) reads a Scan graph written by :func:`to_onnx` from its
metadata and its initializers (named as the state dict), and any other graph as a chain
of ``LSTM`` (or ``RNN``) nodes: one node, or one per layer joined exactly as :func:`to_onnx`
and ``torch.onnx.export(nn.LSTM)`` (both exporters) join them — the node's Y
[T, D, B, H] through ``Transpose(perm=[0, 2, 1, 3])`` and a ``Reshape`` to [T, B, D·H]
(its shape a constant or read from the tensor's own shape), or ``Squeeze(axes=[1])`` for
one direction —, the first reading a graph input (batch-first through
``Transpose(perm=[1, 0, 2])``), and the graph's outputs the top node's Y (as written, or
merged the same way), the nodes' Y_h / Y_c or their concatenation — or what other ops compute
from them (a head on the stack, left out). Any other join or output is refused:
onnxruntime would run it, and it would not be the stack. It returns an
equivalent :class:`lstmkit.LSTM` / :class:`lstmkit.RNN` and refuses, with the reason,
what lstmkit cannot compute: activations other than lstmkit's (Sigmoid or ``HardSigmoid``
gates with alpha 0.2 or 1/6 and beta 0.5; Tanh, Relu or the identity — ``Affine`` with alpha 1
given and beta 0, read as niaf / noaf — for the candidate and the output; names read in any
case, defaults as onnxruntime's), ``clip``, ``direction="reverse"``, a non-zero constant
initial state, a constant (or computed) ``sequence_lens`` (a layer takes its lengths when
called: ``sequence_lens`` must be a graph input), weights computed at run time, attributes
outside the operator's values. ``layout=1`` is read by the ONNX definition (checked
against ONNX's own node tests; onnxruntime does not run it) for a single node only.
Loading parses the protobuf only (``onnx.load`` without external data); weights in an
external data file (``torch.onnx.export``'s default ``model.onnx.data``) are read by
lstmkit itself, only from a regular file inside the model's own directory (absolute
locations, ``..`` and links that lead outside are refused). Constant initial states must
have the node's sizes (and be zero). Nothing from the file executes.

Graphs that take their weights as graph inputs (ONNX's own ``LSTM`` / ``RNN`` node tests
do) are read when the values are given: ``from_onnx(model, inputs={"W": w, "R": r})``.
A given value is used exactly where an initializer of that name would be, and checked as
one is: floating (float32/float64 for W; R, B, P of W's dtype), finite, of the node's
shape. Every weight, given or stored, is checked before the layer is built (a Scan graph's: before
the first parameter is filled).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lstmkit._validate import loads_json
from lstmkit.convert._checks import expect_weights
from lstmkit.convert.onnx_graph import check_stack, node_attributes
from lstmkit.kernels.onnx_export import DEFAULT_ACTIVATIONS
from lstmkit.layout import ONNX_PEEPHOLE_ORDER, reorder_gates, suffix
from lstmkit.nn import LSTM, RNN
from lstmkit.spec import CellSpec, resolve, spec_choices
from lstmkit.variants import HARD_SIGMOID_SLOPES

__all__ = ["from_onnx", "onnx_module", "METADATA_KEY"]

#: The model metadata key under which :func:`lstmkit.convert.to_onnx` records the layer's configuration.
METADATA_KEY = "lstmkit.config"
#: The inputs of an LSTM / RNN node by position, as the operator names them.
_SLOTS = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")
#: The slots whose value ``inputs=`` may give: those an initializer would give (weights, constant states).
_GIVABLE = ("W", "R", "B", "initial_h", "initial_c", "P")
#: The attributes of ONNX's RNN operator and their types (LSTM's: these and input_forget).
_ATTRIBUTES = {"activation_alpha": "FLOATS", "activation_beta": "FLOATS", "activations": "STRINGS", "clip": "FLOAT",
               "direction": "STRING", "hidden_size": "INT", "layout": "INT"}
_LSTM_ATTRIBUTES = {**_ATTRIBUTES, "input_forget": "INT"}
#: The opset from which the operators have the ``layout`` attribute (LSTM-14, RNN-14).
_LAYOUT_OPSET = 14
#: The activation names of ONNX's LSTM and RNN operators, as the standard spells them.
_ONNX_ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh",
                     "HardSigmoid", "Elu", "Softsign", "Softplus")


def onnx_module() -> Any:
    """The ``onnx`` package, or an ImportError that says how to install it."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("onnx: the ONNX converters need the onnx package (pip install 'lstmkit[interop]')") \
            from None
    return onnx


def _load_proto(model_or_path: Any) -> tuple[Any, str, Path | None]:
    """(model, its name for messages, the directory its external data may be read from)."""
    onnx = onnx_module()
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, "the ONNX model", None
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"model_or_path: expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}")
    p = Path(model_or_path)
    if not p.is_file():
        raise ValueError(f"model_or_path: no file at {p}")
    try:
        proto = onnx.load_model(str(p), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not ONNX
        raise ValueError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not proto.HasField("graph"):
        raise ValueError(f"{p}: not an ONNX model (no graph); expected a model with LSTM or RNN nodes")
    return proto, str(p), p.parent


def _external(t: Any, base: Path | None, where: str) -> np.ndarray:
    """The array of a tensor stored in an external data file (``torch.onnx.export`` writes
    ``model.onnx.data`` next to the model).

    Only a regular file inside the model's own directory is read: a location that is
    absolute, contains ``..``, or resolves (through links) outside that directory is
    refused, and so is a range that does not fit in the file or does not match the
    tensor's shape.
    """
    from onnx import helper

    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    what = f"{where}: tensor {t.name!r} is stored in the external data file {loc!r}"
    if base is None:
        raise ValueError(f"{what}; pass the model's path (not a ModelProto) so that it can be read next to the model")
    rel = Path(loc)
    if not loc or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{what}, outside the model's directory (an absolute path or '..'); refused")
    root = base.resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(root):
        raise ValueError(f"{what}, which leads outside the model's directory (a link to {target}); refused")
    if not target.is_file():
        raise ValueError(f"{what}, which does not exist next to the model")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    count = 1
    for d in t.dims:
        count *= int(d)
    nbytes = count * dtype.itemsize
    try:
        offset = int(info.get("offset", 0))
        length = int(info.get("length", nbytes))
    except ValueError:
        raise ValueError(f"{what}, with a damaged offset or length ({info})") from None
    size = target.stat().st_size
    if length != nbytes or offset < 0 or offset + nbytes > size:
        raise ValueError(f"{what}: {nbytes:,} bytes for its shape {list(t.dims)} at offset {offset:,} (length "
                         f"{length:,}) do not fit in the file's {size:,} bytes")
    with open(target, "rb") as fh:
        fh.seek(offset)
        raw = fh.read(nbytes)
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(int(d) for d in t.dims)).astype(dtype.newbyteorder("="))


def _tensor(t: Any, base: Path | None, where: str) -> np.ndarray:
    from onnx import numpy_helper

    if isinstance(t, np.ndarray):  # a value given through from_onnx(..., inputs=)
        return t
    if t.data_location == 1:  # TensorProto.EXTERNAL
        return _external(t, base, where)
    try:
        return numpy_helper.to_array(t)
    except (KeyError, ValueError, TypeError) as exc:  # an unknown data_type, raw_data of the wrong length, …
        raise ValueError(f"{where}: tensor {t.name!r} (data_type {t.data_type}, dims {list(t.dims)}) cannot be "
                         f"read: {type(exc).__name__}: {exc}"[:400]) from None


def _constants(graph: Any, where: str) -> dict[str, Any]:
    """Name -> TensorProto for initializers and ``Constant`` nodes' ``value``; a name given two
    values (an ONNX graph defines each name once; runtimes would each pick one) is refused."""
    out: dict[str, Any] = {}
    for t in graph.initializer:
        if t.name in out:
            raise ValueError(f"{where}: initializer {t.name!r} is defined twice")
        out[t.name] = t
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    if n.output[0] in out:
                        raise ValueError(f"{where}: {n.output[0]!r} is defined twice (an initializer, and the output "
                                         f"of Constant node {n.name!r})")
                    out[n.output[0]] = a.t
    return out


def _given(inputs: Any, graph: Any, where: str) -> dict[str, np.ndarray]:
    """``from_onnx``'s ``inputs=``: checked to be a mapping from graph input names to arrays.

    Raises:
        TypeError: not a mapping, a key that is not a string, a value that is not an array.
        ValueError: names that are not graph inputs (all of them named).
    """
    if inputs is None:
        return {}
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs: expected a mapping from graph input names to NumPy arrays, got "
                        f"{type(inputs).__name__}")
    for key in inputs:
        if not isinstance(key, str):
            raise TypeError(f"inputs: expected graph input names (str) as keys, got {type(key).__name__} ({key!r})")
    graph_inputs = [v.name for v in graph.input]
    unknown = [k for k in inputs if k not in graph_inputs]
    if unknown:
        raise ValueError(f"inputs: {unknown} {'is not a graph input' if len(unknown) == 1 else 'are not graph inputs'}"
                         f" of {where} (its graph inputs: {graph_inputs})")
    out = {}
    for key, value in inputs.items():
        try:
            out[key] = np.asarray(value)
        except Exception as exc:  # a tensor that requires grad, a tensor on a GPU, ...
            raise TypeError(f"inputs[{key!r}]: expected a NumPy array, got {type(value).__name__} "
                            f"({type(exc).__name__}: {exc})"[:300]) from None
    return out


def _refuse_runtime_inputs(given: dict[str, np.ndarray], rec: list[Any]) -> None:
    """Refuse an ``inputs=`` name that no LSTM/RNN node reads where an initializer would be read (its X,
    sequence_lens, or a graph input read by another op): the value would change nothing."""
    roles: dict[str, list[tuple[str, str]]] = {}  # name -> (slot, where it is read)
    for k, n in enumerate(rec):
        for slot, name in zip(_SLOTS, n.input):
            if name:
                roles.setdefault(name, []).append((slot, f"the {slot} input of {n.op_type} node {k} ({n.name!r})"))
    for name in given:
        got = roles.get(name, [])
        if not any(slot in _GIVABLE for slot, _ in got):
            what = " and ".join(d for _, d in got) or "a graph input that no LSTM or RNN node reads directly"
            raise ValueError(f"inputs: {name!r} is {what}; inputs= gives values only where an initializer would "
                             f"be read ({', '.join(_GIVABLE)}): the layer takes X, sequence_lens (a PackedSequence) "
                             f"and its state at run time")


def _array(name: str, what: str, consts: dict[str, Any], where: str, base: Path | None,
           graph_inputs: frozenset[str] = frozenset()) -> np.ndarray:
    if name not in consts:
        if name in graph_inputs:
            raise ValueError(f"{where}: input {what} ({name!r}) is computed at run time (a graph input); expected "
                             f"a constant (an initializer or a Constant node), or its value given as "
                             f"from_onnx(..., inputs={{{name!r}: array}})")
        raise ValueError(f"{where}: input {what} ({name!r}) is computed at run time; expected a constant "
                         f"(an initializer or a Constant node)")
    label = f"{where}: input {what}" + (f" (inputs[{name!r}])" if isinstance(consts[name], np.ndarray) else "")
    return _tensor(consts[name], base, label)


def _weights(name: str, what: str, consts: dict[str, Any], where: str, base: Path | None,
             graph_inputs: frozenset[str]) -> np.ndarray:
    """A weight input of a node (W, R, B, P), checked floating and finite (:func:`expect_weights`)."""
    given = isinstance(consts.get(name), np.ndarray)
    label = f"{where}: {what}" + (f" (inputs[{name!r}])" if given else "")
    return expect_weights(label, _array(name, what, consts, where, base, graph_inputs))


def from_onnx(model_or_path: Any, *, inputs: Mapping[str, np.ndarray] | None = None) -> LSTM | RNN:
    """An lstmkit LSTM (or RNN) computing what the ONNX model's chain of LSTM (RNN) nodes computes.

    Args:
        model_or_path: an ``onnx.ModelProto`` or the path of an ``.onnx`` file.
        inputs: values for graph inputs by name, used exactly where an initializer of that
            name would be: a node's weights W [D, G·H, I], R [D, G·H, H], B [D, 2·G·H],
            P [D, 3H] (G = 4 for LSTM, 1 for RNN) and constant (zero) initial_h / initial_c.
            Checked as initializers are (floating, finite, the node's shapes). A name that is
            not a graph input, or one the layer takes at run time (X, sequence_lens), is refused.

    Returns:
        The layer, parameters in the model's dtype (float32 or float64); ``batch_first``
        from the ``layout`` attribute or the metadata :func:`to_onnx` writes.

    Raises:
        TypeError: ``inputs`` is not a mapping of names to arrays; a weight is not floating.
        ValueError: not an ONNX file, no LSTM/RNN node, or something lstmkit cannot
            compute (the message names the node, attribute and value); nodes not joined,
            or outputs not taken, as one stack (the message names the ops found); a
            ``sequence_lens`` that is not a graph input; a weight that is a graph input
            without a value in ``inputs``; a NaN or inf in a weight.
    """
    proto, where, base = _load_proto(model_or_path)
    graph = proto.graph
    given = _given(inputs, graph, where)
    meta = {p.key: p.value for p in proto.metadata_props}
    config = None
    if METADATA_KEY in meta:
        try:
            config = loads_json(meta[METADATA_KEY], "metadata")
        except ValueError:
            raise ValueError(f"{where}: damaged metadata {METADATA_KEY!r} (not JSON, or a key given twice)") from None
        if not isinstance(config, dict):
            raise ValueError(f"{where}: damaged metadata {METADATA_KEY!r} (not an object)")
        if config.get("onnx_method") == "scan":
            if given:
                raise ValueError(f"inputs: {sorted(given)}: {where} is a Scan graph written by to_onnx, which "
                                 f"holds every parameter as an initializer; inputs= gives weights to LSTM/RNN nodes")
            return _from_scan(graph, config, where, base)
    rec = [n for n in graph.node if n.op_type in ("LSTM", "RNN") and n.domain in ("", "ai.onnx")]
    if not rec:
        ops = sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in graph.node})
        raise ValueError(f"{where}: expected an ONNX model with LSTM or RNN nodes of the ONNX domain, found none "
                         f"(ops: {ops})")
    kinds = {n.op_type for n in rec}
    if len(kinds) > 1:
        raise ValueError(f"{where}: the graph mixes LSTM and RNN nodes; an lstmkit layer is one or the other")
    op = rec[0].op_type
    is_lstm = op == "LSTM"
    _refuse_runtime_inputs(given, rec)
    consts = {**_constants(graph, where), **given}  # a given value overrides an initializer's default, as at run time
    graph_inputs = frozenset(v.name for v in graph.input)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    read = [_read_node(n, k, consts, where, is_lstm, base, graph_inputs, opset) for k, n in enumerate(rec)]
    def constant(name: str) -> np.ndarray | None:  # a constant's value, read as the weights are
        t = consts.get(name)
        return None if t is None else _tensor(t, base, f"{where}: constant {name!r}")

    input_batch_first = check_stack(rec, read, graph, constant, consts, where)
    first = read[0]
    for k, r in enumerate(read[1:], start=1):
        for key in ("hidden_size", "D", "bias", "peephole", "coupled", "activations", "dtype"):
            if r[key] != first[key]:
                raise ValueError(f"{where}: {op} node {k} has {key}={r[key]!r} but node 0 has {first[key]!r}; "
                                 f"an lstmkit layer has one value for all its layers")
        want = first["D"] * first["hidden_size"]
        if r["input_size"] != want:
            raise ValueError(f"{where}: {op} node {k} reads inputs of size {r['input_size']}, expected "
                             f"{want} (directions × hidden_size of the node below)")
    H, D = first["hidden_size"], first["D"]
    batch_first = (first["layout"] == 1) != input_batch_first  # the graph's layout decides
    recorded = batch_first if config is None else config.get("batch_first", batch_first)
    if recorded is not batch_first:  # (a damaged or hand-edited 'lstmkit.config' would change the model)
        raise ValueError(f"{where}: damaged metadata 'lstmkit.config': batch_first={recorded!r}, but the graph "
                         f"reads its input {'batch' if batch_first else 'time'}-major")
    dtype = torch.float64 if first["dtype"] == np.float64 else torch.float32
    kw = dict(num_layers=len(read), bias=first["bias"], batch_first=batch_first, bidirectional=D == 2, dtype=dtype)
    if is_lstm:
        gate, candidate, output = first["activations"]
        cell = CellSpec(peephole=first["peephole"], coupled=first["coupled"], gate_activation=gate,
                        candidate_activation=candidate, output_activation=output)
        cell, kw["dropout"] = _recorded_settings(cell, config, len(read))
        out: LSTM | RNN = LSTM(first["input_size"], H, cell=cell, **kw)
    else:
        out = RNN(first["input_size"], H, nonlinearity=first["nonlinearity"], **kw)
    with torch.no_grad():
        for index, r in enumerate(read):
            for d in range(D):
                for name, value in r["params"][d].items():
                    getattr(out, name + suffix(index, d)).copy_(torch.from_numpy(value))
    out.eval()
    return out


def _from_scan(graph: Any, config: dict[str, Any], where: str, base: Path | None) -> LSTM | RNN:
    """A graph :func:`to_onnx` wrote with Scan: the configuration from the metadata, every
    parameter from the initializer of the same name (the ones the Scan bodies compute with)."""

    from lstmkit.convert.layer_config import layer_from_config

    if not any(n.op_type == "Scan" for n in graph.node):
        raise ValueError(f"{where}: the metadata says the layer was written as Scan graphs, but there is no Scan "
                         f"node; the file was changed after export")
    inits = {t.name: t for t in graph.initializer}
    first = inits.get("weight_ih_l0")
    if first is None:
        raise ValueError(f"{where}: no initializer 'weight_ih_l0'; expected the parameters of an lstmkit layer")
    dtype = torch.float64 if first.data_type == 11 else torch.float32  # TensorProto.DOUBLE
    # Shapes are checked against the metadata before the layer is allocated.
    layer = layer_from_config(config, dtype, where, {k: tuple(t.dims) for k, t in inits.items()}, extra_ok=True)
    # Every parameter is read and checked before the first copy.
    arrays = {name: expect_weights(f"{where}: initializer {name!r}", _tensor(inits[name], base, where))
              for name in layer.state_dict()}
    with torch.no_grad():
        for name, param in layer.state_dict().items():
            param.copy_(torch.from_numpy(arrays[name].copy()))
    return layer.eval()


def _recorded_settings(cell: CellSpec, config: dict[str, Any] | None, layers: int) -> tuple[CellSpec, float]:
    """What the nodes cannot say but :func:`to_onnx`'s metadata records — the initial biases
    (``fb=``, ``ib=``, ``ob=``, ``chrono=``) and the stack's dropout — taken where that metadata's
    cell computes what the nodes compute (else the nodes' cell, no dropout)."""
    if config is None or config.get("kind") != "lstm":
        return cell, 0.0
    try:
        recorded = resolve(config["cell_spec"])
        dropout, same_stack = float(config.get("dropout", 0.0)), int(config["num_layers"]) == layers
    except (KeyError, TypeError, ValueError):  # damaged metadata: the nodes alone
        return cell, 0.0
    if not same_stack or recorded.without_init() != cell or not 0.0 <= dropout <= 1.0:
        return cell, 0.0
    return recorded, dropout


def _activations(a: dict[str, Any], D: int, is_lstm: bool, what: str) -> tuple[str, ...]:
    """The node's activations as lstmkit names: (gates, candidate, output) for an LSTM —
    ``Affine`` with alpha 1 and beta 0 is the identity (niaf / noaf), ``HardSigmoid`` with
    beta 0.5 and a slope lstmkit has is a hard-sigmoid gate —, (φ,) for an RNN.

    Read as onnxruntime reads them: an LSTM node's names in any case, an RNN node's only as
    the standard spells them (``Relu``; its RNN kernel refuses ``relu``) (``hardsigmoid`` is ONNX's
    HardSigmoid, alpha 0.2 unless given, not lstmkit's 1/6 slope); alphas and betas consumed
    in order by the activations that take them; defaults HardSigmoid 0.2 / 0.5. Affine's
    alpha has no default runtimes agree on (onnxruntime: 0, a zero candidate), so it must be
    given; its beta defaults to 0."""
    names = [s.decode("utf-8", "replace") if isinstance(s, bytes) else s for s in a.get("activations", [])]
    per = 3 if is_lstm else 1
    names = names or list(DEFAULT_ACTIVATIONS["lstm" if is_lstm else "rnn"]) * D
    alphas, betas = list(a.get("activation_alpha", [])), list(a.get("activation_beta", []))
    if len(names) != per * D:
        raise ValueError(f"{what}: activations={names}: expected {per * D} names ({per} per direction)")
    slopes = {round(v, 6): k for k, v in HARD_SIGMOID_SLOPES.items()}
    out = []
    for name in names:
        key = name.lower()
        if not is_lstm and name not in _ONNX_ACTIVATIONS:
            spelled = next((n for n in _ONNX_ACTIVATIONS if n.lower() == key), None)
            raise ValueError(f"{what}: activations={names}: the RNN operator's names are case-sensitive"
                             + (f" ({name!r} is spelled {spelled!r}; onnxruntime refuses {name!r})" if spelled
                                else f" and {name!r} is not one of them ({', '.join(_ONNX_ACTIVATIONS)})"))
        if key == "affine":  # alpha·x + beta; consumes one alpha and one beta, in order
            if not alphas:
                raise ValueError(f"{what}: Affine activation without activation_alpha: runtimes disagree on its "
                                 f"default (onnxruntime computes 0·x + 0); lstmkit reads Affine only as the "
                                 f"identity, with alpha=1 (and beta=0) given")
            alpha = alphas.pop(0)
            beta = betas.pop(0) if betas else 0.0
            if (alpha, beta) != (1.0, 0.0):
                raise ValueError(f"{what}: Affine activation with alpha={alpha}, beta={beta}; lstmkit computes the "
                                 f"identity (alpha=1, beta=0) only")
            out.append("identity")
        elif key == "hardsigmoid":  # clamp(alpha·x + beta, 0, 1); defaults 0.2, 0.5
            alpha = alphas.pop(0) if alphas else 0.2
            beta = betas.pop(0) if betas else 0.5
            if beta != 0.5 or round(alpha, 6) not in slopes:
                raise ValueError(f"{what}: HardSigmoid with alpha={alpha}, beta={beta}; lstmkit's hard sigmoids are "
                                 f"clamp(a·x + 0.5, 0, 1) with a = 0.2 (hard_sigmoid) or 1/6 (hardsigmoid)")
            out.append(slopes[round(alpha, 6)])
        else:
            out.append(key)  # Sigmoid, Tanh, Relu: lstmkit's words in lower case
    if alphas or betas:
        raise ValueError(f"{what}: activation_alpha/beta {a.get('activation_alpha')}/{a.get('activation_beta')} "
                         f"parametrise activations lstmkit does not have ({names})")
    if out[:per] != out[per:] and D == 2:
        raise ValueError(f"{what}: the directions use different activations ({names}); an lstmkit layer has one cell")
    acts = tuple(out[:per])
    fields = ("gate_activation", "candidate_activation", "output_activation") if is_lstm else ("nonlinearity",)
    for field, act in zip(fields, acts):
        if act not in spec_choices(field):
            kinds = {"gate_activation": "gates", "candidate_activation": "candidate", "output_activation": "output",
                     "nonlinearity": "RNN"}
            raise ValueError(f"{what}: activations={names}; lstmkit's {kinds[field]} activation is one of "
                             f"{list(spec_choices(field))}, not {act!r}")
    return acts


def _read_node(n: Any, k: int, consts: dict[str, Any], where: str, is_lstm: bool, base: Path | None,
               graph_inputs: frozenset[str] = frozenset(), opset: int | None = None) -> dict[str, Any]:
    """Parameters (lstmkit names and layout) and facts of one LSTM/RNN node (``opset``: the
    model's version of the ONNX domain, None if it names none)."""
    from onnx import AttributeProto

    what = f"{where}: {n.op_type} node {k} ({n.name!r})"
    a = node_attributes(n)
    allowed = _LSTM_ATTRIBUTES if is_lstm else _ATTRIBUTES
    unknown = sorted(set(a) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: attributes {unknown} are not attributes of the {n.op_type} operator (onnxruntime "
                         f"refuses such a node)")
    if "layout" in a and opset is not None and opset < _LAYOUT_OPSET:
        raise ValueError(f"{what}: the layout attribute belongs to the {n.op_type} operator from opset "
                         f"{_LAYOUT_OPSET}, and this model imports opset {opset} (onnxruntime refuses such a node)")
    for attribute in n.attribute:  # (a hidden_size of 4.7, activations as INTS: onnxruntime refuses them too)
        got = AttributeProto.AttributeType.Name(attribute.type) if attribute.type in \
            AttributeProto.AttributeType.values() else str(attribute.type)
        if got != allowed[attribute.name]:
            raise ValueError(f"{what}: attribute {attribute.name} is {got}; the {n.op_type} operator takes "
                             f"{allowed[attribute.name]}")
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction == "reverse":
        raise ValueError(f"{what}: direction='reverse' runs only backwards; an lstmkit layer runs forward or "
                         f"bidirectional (feed a forward layer the time-reversed input instead)")
    if direction not in ("forward", "bidirectional"):
        raise ValueError(f"{what}: direction: expected 'forward' or 'bidirectional', got {direction!r}")
    D = 2 if direction == "bidirectional" else 1
    if "clip" in a:
        raise ValueError(f"{what}: clip={a['clip']!r} bounds the gate pre-activations, which lstmkit does not "
                         f"do (its cell_clip bounds c_t, a different function)")
    acts = _activations(a, D, is_lstm, what)
    nonlinearity = acts[0] if not is_lstm else "tanh"
    if "hidden_size" not in a:
        raise ValueError(f"{what}: has no hidden_size attribute")
    H = int(a["hidden_size"])
    if H < 1:
        raise ValueError(f"{what}: hidden_size={H}: expected a positive size")
    layout = int(a.get("layout", 0))
    if layout not in (0, 1):
        raise ValueError(f"{what}: layout={layout}: expected 0 (time-major) or 1 (batch-major)")
    input_forget = int(a.get("input_forget", 0)) if is_lstm else 0
    if input_forget not in (0, 1):
        raise ValueError(f"{what}: input_forget={input_forget}: expected 0 or 1 (1 couples the input and "
                         f"forget gates)")
    coupled = input_forget == 1
    ins = list(n.input) + [""] * (8 - len(n.input))
    if ins[4] and (ins[4] in consts or ins[4] not in graph_inputs):
        if ins[4] in consts:
            lengths = _array(ins[4], "sequence_lens", consts, what, base).reshape(-1).tolist()
            how = f"a constant {lengths[:8]}{' …' if len(lengths) > 8 else ''}"
        else:
            how = "computed in the graph"
        raise ValueError(f"{what}: sequence_lens ({ins[4]!r}) is {how}; an lstmkit layer takes the lengths when "
                         f"it is called (lengths=, or a PackedSequence), so a graph whose lengths are not a graph "
                         f"input cannot be carried")
    G = 4 if is_lstm else 1
    W = _weights(ins[1], "W", consts, what, base, graph_inputs)
    R = _weights(ins[2], "R", consts, what, base, graph_inputs)
    if W.ndim != 3 or W.shape[:2] != (D, G * H):
        raise ValueError(f"{what}: W: expected shape ({D}, {G * H}, input_size), got {W.shape}")
    if R.shape != (D, G * H, H):
        raise ValueError(f"{what}: R: expected shape {(D, G * H, H)}, got {R.shape}")
    if W.dtype not in (np.float32, np.float64) or R.dtype != W.dtype:
        raise ValueError(f"{what}: W, R: expected float32 or float64, got {W.dtype} and {R.dtype}")
    B = _weights(ins[3], "B", consts, what, base, graph_inputs) if ins[3] else None
    if B is not None and B.shape != (D, 2 * G * H):
        raise ValueError(f"{what}: B: expected shape {(D, 2 * G * H)}, got {B.shape}")
    P = _weights(ins[7], "P", consts, what, base, graph_inputs) if is_lstm and ins[7] else None
    if P is not None and P.shape != (D, 3 * H):
        raise ValueError(f"{what}: P: expected shape {(D, 3 * H)}, got {P.shape}")
    for slot, extra in (("B", B), ("P", P)):
        if extra is not None and extra.dtype != W.dtype:
            raise ValueError(f"{what}: W, {slot}: expected one dtype, got {W.dtype} and {extra.dtype}")
    for slot, name in ((5, "initial_h"), (6, "initial_c")):
        if ins[slot] not in consts:
            continue  # a graph input: given at run time
        state = _array(ins[slot], name, consts, what, base, graph_inputs)
        if state.ndim != 3 or state.shape[0] != D or state.shape[2] != H or state.shape[1] < 1:
            raise ValueError(f"{what}: {name} is a constant of shape {list(state.shape)}, expected [num_directions="
                             f"{D}, batch, hidden_size={H}]: the graph does not compute what its attributes say")
        if np.any(state != 0):
            raise ValueError(f"{what}: {name} is a non-zero constant (a learned initial state), which an "
                             f"lstmkit layer does not hold; pass it as h_0/c_0 at run time instead")
    params = []
    for d in range(D):
        t = {"weight_ih": torch.from_numpy(W[d].copy()), "weight_hh": torch.from_numpy(R[d].copy())}
        if B is not None:
            t["bias_ih"] = torch.from_numpy(B[d, :G * H].copy())
            t["bias_hh"] = torch.from_numpy(B[d, G * H:].copy())
        if is_lstm:
            for key in list(t):
                rows = reorder_gates(t[key], "onnx", "lstmkit")  # (4H, ...) in i, f, g, o
                if coupled:  # onnxruntime never reads the f rows under input_forget
                    i, _, g, o = rows.split(H, dim=0)
                    rows = torch.cat([i, g, o], dim=0)
                t[key] = rows
            if P is not None:
                by_gate = dict(zip(ONNX_PEEPHOLE_ORDER, torch.from_numpy(P[d].copy()).split(H)))
                for gate in ("i", "o") if coupled else ("i", "f", "o"):
                    t[f"peephole_{gate}"] = by_gate[gate]
        params.append({k: v.contiguous().numpy() for k, v in t.items()})
    return {"hidden_size": H, "D": D, "bias": B is not None, "peephole": P is not None, "coupled": coupled,
            "nonlinearity": nonlinearity, "activations": acts, "dtype": W.dtype, "layout": layout,
            "input_size": W.shape[2], "params": params}
