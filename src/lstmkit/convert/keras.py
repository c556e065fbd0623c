"""Keras 3 (``KERAS_BACKEND=torch``) ⇄ lstmkit.

Keras' LSTM uses the same gate order (i, f, c, o = lstmkit's i, f, g, o) with transposed
matrices and one bias: ``kernel`` (I, 4H) = ``weight_ihᵀ``, ``recurrent_kernel``
(H, 4H) = ``weight_hhᵀ``, ``bias`` (4H,) = ``bias_ih + bias_hh``. Keras is batch-first, so
converted layers are ``batch_first=True``.

Supported: ``keras.layers.LSTM``, ``keras.layers.Bidirectional(LSTM)`` with
``merge_mode="concat"``, and ``Sequential``/functional models made only of those (all of
one hidden size and direction count, each but the last with ``return_sequences=True``; a
functional model must chain them: its one input into the first, each layer's sequence into
the next, every output from the last). Refused: ``stateful=True`` (Keras carries states
across batches), and a ``Bidirectional`` whose forward layer has ``go_backwards=True``
(Keras' fused cuDNN path and its per-direction path compute it differently).
A ``go_backwards=True`` LSTM reads its input reversed and returns the reversed sequence;
when it is the first (or only) layer, the lstmkit twin of the whole stack is fed
``x.flip(1)`` (a warning says so; ``allow_go_backwards=False`` refuses it, as files do,
since no lstmkit file records the reversal). A later layer with ``go_backwards=True``
reverses time between layers, which one lstmkit LSTM cannot compute: refused. Keras
imports happen inside these functions.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lstmkit._optional import require
from lstmkit._validate import check_bool
from lstmkit.convert._checks import expect_shape, native_array, require_values
from lstmkit.layout import ORDERS
from lstmkit.nn import LSTM
from lstmkit.spec import CellSpec

__all__ = ["keras_activations", "require_keras_lstm", "from_keras", "to_keras", "from_keras_file"]

assert ORDERS["keras"] == ORDERS["lstmkit"]  # same gate order: only transposes below


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    require("lstmkit.convert.keras", "keras")
    import keras

    return keras


#: Keras' activation names -> lstmkit's: ``activation`` (the candidate's and the output's, one
#: function in Keras) and ``recurrent_activation`` (the gates'). Keras 3's ``hard_sigmoid`` is
#: ``clamp(x / 6 + 1/2, 0, 1)``: lstmkit's ``hardsigmoid``.
_FROM_KERAS = {"activation": {"tanh": "tanh", "relu": "relu", "linear": "identity"},
               "recurrent_activation": {"sigmoid": "sigmoid", "hard_sigmoid": "hardsigmoid"}}


def keras_activations(spec: CellSpec) -> tuple[str, str] | str:
    """Keras' ``(activation, recurrent_activation)`` computing ``spec``'s activations, or why none
    can (Keras has one function for the candidate and the output)."""
    act = {v: k for k, v in _FROM_KERAS["activation"].items()}
    rec = {v: k for k, v in _FROM_KERAS["recurrent_activation"].items()}
    if spec.candidate_activation != spec.output_activation:
        return (f"keras.layers.LSTM applies one activation to the candidate and the output, this cell has "
                f"{spec.candidate_activation!r} and {spec.output_activation!r}")
    if spec.gate_activation not in rec:
        return (f"keras.layers.LSTM's hard_sigmoid is clamp(x/6 + 1/2) (lstmkit's hardsigmoid), not "
                f"{spec.gate_activation!r}")
    return act[spec.candidate_activation], rec[spec.gate_activation]


def _lstm_layers(obj: Any) -> list[Any]:
    """The LSTM / Bidirectional layers of ``obj`` in order, checked for what we can carry."""
    keras = _keras()
    if isinstance(obj, (keras.layers.LSTM, keras.layers.Bidirectional)):
        layers = [obj]
    elif isinstance(obj, keras.Model):
        layers = [layer for layer in obj.layers if not isinstance(layer, keras.layers.InputLayer)]
    else:
        raise TypeError(f"keras: expected a keras LSTM, Bidirectional(LSTM) or a model of them, "
                        f"got {type(obj).__name__}")
    if not layers:
        raise ValueError(f"keras: model {obj.name!r} has no LSTM layer")
    for layer in layers:
        bidir = isinstance(layer, keras.layers.Bidirectional)
        inner = layer.forward_layer if bidir else layer
        if not isinstance(inner, keras.layers.LSTM):
            raise ValueError(f"keras: layer {layer.name!r} ({type(layer).__name__}) is not an LSTM; convert "
                             f"the LSTM layers one by one")
        if bidir and not isinstance(layer.backward_layer, keras.layers.LSTM):
            raise ValueError(f"keras: {layer.name!r}'s backward layer {layer.backward_layer.name!r} "
                             f"({type(layer.backward_layer).__name__}) is not an LSTM")
        if bidir and layer.merge_mode != "concat":
            raise ValueError(f"keras: {layer.name!r} merges directions with {layer.merge_mode!r}; only "
                             f"'concat' matches lstmkit's bidirectional output")
        if bidir and layer.forward_layer.go_backwards:
            raise ValueError(f"keras: {layer.name!r} has go_backwards=True on its forward layer, which Keras' fused "
                             f"cuDNN path ignores and its per-direction path honours; no lstmkit LSTM matches both")
        for sub in [layer.forward_layer, layer.backward_layer] if bidir else [layer]:
            if sub.stateful:
                raise ValueError(f"keras: {sub.name!r} has stateful=True: Keras carries its states from one batch "
                                 f"into the next, an lstmkit LSTM does not; rebuild it with stateful=False")
            if (sub.units, sub.use_bias) != (inner.units, inner.use_bias):
                raise ValueError(f"keras: {layer.name!r}'s directions differ in (units, use_bias): "
                                 f"{(inner.units, inner.use_bias)} and {(sub.units, sub.use_bias)}; an lstmkit "
                                 f"LSTM has one of each")
    sizes = {(_units(layer), isinstance(layer, keras.layers.Bidirectional), _use_bias(layer)) for layer in layers}
    if len(sizes) != 1:
        raise ValueError(f"keras: the stack mixes (units, bidirectional, use_bias) = {sorted(sizes)}; an lstmkit "
                         f"LSTM has one of each: convert the layers one by one")
    if isinstance(obj, keras.Model):
        _check_chain(obj, layers)
    return layers


def _check_chain(model: Any, layers: list[Any]) -> None:
    """Raise unless ``model`` computes ``layers`` one after the other: the model's one input
    feeds the first layer, each layer's output sequence is the next layer's only input, and
    every output of the model is the last layer's. A ``Sequential`` model is such a chain by
    construction; a functional model is checked on its graph (so a layer fed twice, two
    layers reading the same tensor, or an operation between layers are refused)."""
    keras = _keras()
    if isinstance(model, keras.Sequential):
        return
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError(f"keras: {model.name!r} ({type(model).__name__}) is a subclassed model whose call() "
                         f"can compute anything; only Sequential and functional models of LSTM layers are read")
    names = [layer.name for layer in layers]
    what = f"keras: model {model.name!r} is not one chain of its LSTM layers {names}"
    if len(inputs) != 1:
        raise ValueError(f"{what}: it has {len(inputs)} inputs")
    histories = {(id(t._keras_history.operation), t._keras_history.node_index) for t in outputs}
    last = outputs[0]._keras_history
    if len(histories) != 1 or last.operation is not layers[-1]:
        producers = sorted({t._keras_history.operation.name for t in outputs})
        raise ValueError(f"{what}: its outputs come from {producers}, not all from the last layer "
                         f"{layers[-1].name!r}")
    node_index = last.node_index
    for k in range(len(layers) - 1, -1, -1):
        layer = layers[k]
        node = layer._inbound_nodes[node_index]
        tensors = node.arguments.keras_tensors
        if len(tensors) != 1:
            raise ValueError(f"{what}: {layer.name!r} is called with {len(tensors)} tensors (initial states "
                             f"or a mask?); only the sequence is read")
        history = tensors[0]._keras_history
        source = history.operation
        if k == 0:
            if any(source is other for other in layers):
                raise ValueError(f"{what}: the first layer {layer.name!r} reads the output of {source.name!r}, "
                                 f"so a layer is run more than once")
            if tensors[0] is not inputs[0]:
                raise ValueError(f"{what}: the first layer {layer.name!r} reads "
                                 f"{getattr(source, 'name', 'a tensor')!r}, not the model's input")
        elif source is not layers[k - 1] or history.tensor_index != 0:
            raise ValueError(f"{what}: {layer.name!r} reads {getattr(source, 'name', 'a tensor')!r}, not the "
                             f"output sequence of {layers[k - 1].name!r}")
        node_index = history.node_index


def _cell_of(layers: list[Any]) -> CellSpec:
    """The lstmkit cell computing every LSTM of ``layers`` (their activations; they must agree)."""
    keras = _keras()
    seen: dict[tuple[str, str], str] = {}
    for layer in layers:
        for sub in ([layer.forward_layer, layer.backward_layer]
                    if isinstance(layer, keras.layers.Bidirectional) else [layer]):
            acts = (keras.activations.serialize(sub.cell.activation),
                    keras.activations.serialize(sub.cell.recurrent_activation))
            if acts[0] not in _FROM_KERAS["activation"] or acts[1] not in _FROM_KERAS["recurrent_activation"]:
                raise ValueError(f"keras: {sub.name!r} uses (activation, recurrent_activation) = {acts}; lstmkit "
                                 f"computes activation in {sorted(_FROM_KERAS['activation'])} and "
                                 f"recurrent_activation in {sorted(_FROM_KERAS['recurrent_activation'])}")
            seen.setdefault(acts, sub.name)
    if len(seen) > 1:
        raise ValueError(f"keras: the layers use different activations {sorted(seen)}; an lstmkit LSTM has one cell: "
                         f"convert the layers one by one")
    (act, rec), = seen
    cand = _FROM_KERAS["activation"][act]
    return CellSpec(candidate_activation=cand, output_activation=cand,
                    gate_activation=_FROM_KERAS["recurrent_activation"][rec])


def _units(layer: Any) -> int:
    return (layer.forward_layer if hasattr(layer, "forward_layer") else layer).units


def _use_bias(layer: Any) -> bool:
    return (layer.forward_layer if hasattr(layer, "forward_layer") else layer).use_bias


def _readable(a: np.ndarray) -> np.ndarray:
    """A Keras weight as torch reads it: a bfloat16 array (ml_dtypes' type, which torch does not
    read) widened to float32, where its every value is exact; others in native order (native_array)."""
    if a.dtype.kind == "V" and a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    return native_array(a)


def from_keras(obj: Any, *, allow_go_backwards: bool = True) -> LSTM:
    """An lstmkit LSTM (``batch_first=True``) computing what the Keras LSTM stack computes.

    Args:
        allow_go_backwards: accept a first layer with ``go_backwards=True`` (the returned
            layer must then be fed ``x.flip(1)``; a warning says so).

    Raises:
        TypeError / ValueError: something Keras-specific that an lstmkit LSTM cannot carry.
    """
    check_bool("allow_go_backwards", allow_go_backwards)
    keras = _keras()
    layers = _lstm_layers(obj)
    first = layers[0]
    bidir = isinstance(first, keras.layers.Bidirectional)
    if not first.built:
        raise ValueError(f"keras: layer {first.name!r} is not built yet (call it once or build it)")
    H, bias = _units(first), _use_bias(first)
    input_size = (first.forward_layer if bidir else first).cell.kernel.shape[0]
    out = LSTM(input_size, H, num_layers=len(layers), bias=bias, batch_first=True, bidirectional=bidir,
               dtype=torch.float32, cell=_cell_of(layers))
    for index, layer in enumerate(layers):
        subs = [layer.forward_layer, layer.backward_layer] if bidir else [layer]
        for direction, sub in enumerate(subs):
            if sub.go_backwards and not bidir:
                if index > 0:
                    raise ValueError(f"keras: {sub.name!r} (layer {index} of the stack) has go_backwards=True: it "
                                     f"reverses time between layers, which one lstmkit LSTM cannot compute; convert "
                                     f"the layers one by one")
                if not allow_go_backwards:
                    raise ValueError(f"keras: {sub.name!r} has go_backwards=True (it reads its input reversed); an "
                                     f"lstmkit layer does not record that, so the converted file would compute "
                                     f"something else. Use lstmkit.convert.from_keras in Python and feed the layer "
                                     f"x.flip(1), or save the Keras model without go_backwards")
                warnings.warn(f"keras: {sub.name!r} has go_backwards=True; feed its lstmkit twin the "
                              f"time-reversed input x.flip(1)", UserWarning, stacklevel=2)
            # bfloat16 weights (ml_dtypes', which torch does not read) widened to float32: exact
            weights = [_readable(np.asarray(keras.ops.convert_to_numpy(w))) for w in sub.cell.weights]
            p = out.layer_params(index, direction)
            n_in = p["weight_ih"].shape[1]
            expect_shape(f"{sub.name}.kernel", weights[0], (n_in, 4 * H))
            expect_shape(f"{sub.name}.recurrent_kernel", weights[1], (H, 4 * H))
            with torch.no_grad():
                p["weight_ih"].copy_(torch.from_numpy(weights[0].T.copy()))
                p["weight_hh"].copy_(torch.from_numpy(weights[1].T.copy()))
                if bias:
                    expect_shape(f"{sub.name}.bias", weights[2], (4 * H,))
                    p["bias_ih"].copy_(torch.from_numpy(weights[2].copy()))
                    p["bias_hh"].zero_()
    return out


def require_keras_lstm(layer: object) -> None:
    """Raise ValueError (TypeError for another kind of object) unless keras.layers.LSTM can carry
    ``layer``: the vanilla cell, up to the activations Keras has, without projection."""
    if not isinstance(layer, LSTM):
        raise TypeError(f"layer: expected an lstmkit LSTM, got {type(layer).__name__}")
    plain = layer.spec.replace(**dict.fromkeys(("candidate_activation", "output_activation"), "tanh"),
                               gate_activation="sigmoid")
    why = keras_activations(layer.spec)
    if not plain.is_vanilla or layer.proj_size or isinstance(why, str):
        name = layer.spec.name + (f" with proj_size={layer.proj_size}" if layer.proj_size else "")
        detail = why if isinstance(why, str) else "it computes the vanilla LSTM (with its activations) only"
        raise ValueError(f"layer: keras.layers.LSTM cannot carry {name!r}: {detail}")


def to_keras(layer: LSTM, return_sequences: bool = True, return_state: bool = False) -> Any:
    """A built Keras model of ``layer.num_layers`` LSTM layers, weights copied.

    Inputs are batch-first (B, T, I), as Keras expects.

    Raises:
        ValueError: a variant Keras' LSTM cannot carry (anything but the vanilla cell with the
            activations Keras has, :func:`keras_activations`; projection).
    """
    check_bool("return_sequences", return_sequences)
    check_bool("return_state", return_state)
    require_keras_lstm(layer)
    require_values(layer)
    activation, recurrent_activation = keras_activations(layer.spec)  # type: ignore[misc]
    keras = _keras()
    H = layer.hidden_size
    blocks = []
    for index in range(layer.num_layers):
        last = index == layer.num_layers - 1
        kw = dict(units=H, use_bias=layer.bias, return_sequences=return_sequences or not last,
                  return_state=return_state and last, activation=activation,
                  recurrent_activation=recurrent_activation)
        blocks.append(keras.layers.Bidirectional(keras.layers.LSTM(**kw)) if layer.bidirectional
                      else keras.layers.LSTM(**kw))
    x = keras.Input((None, layer.input_size))  # (B, T, I)
    y = x
    for block in blocks:
        y = block(y)
    model = keras.Model(x, y)
    for index, block in enumerate(blocks):
        subs = [block.forward_layer, block.backward_layer] if layer.bidirectional else [block]
        for direction, sub in enumerate(subs):
            p = layer.layer_params(index, direction)
            # (.resolve_neg(): a weight with torch's negation bit as its values; NumPy reads memory)
            weights = [p["weight_ih"].detach().double().resolve_neg().numpy().T,
                       p["weight_hh"].detach().double().resolve_neg().numpy().T]
            if layer.bias:
                weights.append((p["bias_ih"] + p["bias_hh"]).detach().double().numpy())
            sub.cell.set_weights([w.astype(np.float32) for w in weights])
    return model


def from_keras_file(path: str | os.PathLike[str], model: Any = None, *, allow_go_backwards: bool = True) -> LSTM:
    """Read an LSTM from a saved ``.keras`` file, or load ``.weights.h5`` into ``model`` first.

    ``.keras`` files are loaded with ``safe_mode=True`` (no code from the file runs).
    A ``.weights.h5`` file holds weights without the architecture (its layers are keyed by
    name, not order), so the Keras ``model`` they belong to must be given.

    Raises:
        ValueError: unknown extension, missing model for ``.weights.h5``, unreadable file.
    """
    check_bool("allow_go_backwards", allow_go_backwards)
    keras = _keras()
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path: no file at {p}")
    if p.name.endswith(".weights.h5"):
        if model is None:
            raise ValueError(f"path: {p.name} holds weights without the architecture; pass the Keras "
                             f"model it belongs to (model=...)")
        try:
            model.load_weights(str(p))
        except (OSError, KeyError) as exc:
            raise ValueError(f"path: cannot read {p} as a Keras weights file ({_cause(exc)})") from None
        except ValueError as exc:
            raise ValueError(f"path: cannot load the weights in {p} into the given Keras model "
                             f"({_cause(exc)})") from None
        return from_keras(model, allow_go_backwards=allow_go_backwards)
    if p.suffix == ".keras":
        if not zipfile.is_zipfile(p):
            raise ValueError(f"path: {p} is not a .keras model: a .keras file is a zip archive and this one is "
                             f"not (empty, truncated or another format)")
        try:
            loaded = keras.saving.load_model(str(p), safe_mode=True)
        except Exception as exc:  # zip, HDF5 and deserialisation errors of a damaged or foreign archive
            raise ValueError(f"path: cannot load {p} as a Keras model ({type(exc).__name__}: "
                             f"{_cause(exc)})") from None
        return from_keras(loaded, allow_go_backwards=allow_go_backwards)
    raise ValueError(f"path: expected a .keras or .weights.h5 file, got {p.name!r}")


def _cause(exc: BaseException) -> str:
    """One line saying why Keras failed: the example error of its "A total of N objects could
    not be loaded" report (without the variable's values), else the first line."""
    parts = [part.strip() for part in str(exc).split("\n\n") if part.strip()]
    if not parts:
        return type(exc).__name__
    text = parts[1] if len(parts) > 1 and parts[0].startswith("A total of") else parts[0]
    text = " ".join(text.split(" Target variable:")[0].split())
    return text if len(text) <= 300 else text[:297] + "..."
