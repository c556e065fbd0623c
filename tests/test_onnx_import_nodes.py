"""ONNX → lstmkit: hand-written LSTM/RNN nodes read as onnxruntime computes them, compared
with onnxruntime (1e-5 float32).

A constant sequence_lens, Affine activations, activation names in any case (LSTM) or in the
standard's spelling (RNN), the layout attribute before opset 14, attributes outside the
operator; and stacked nodes joined as exporters join them (torch.onnx.export's dynamo exporter
included), the joins and outputs that would compute something else refused.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lstmkit.convert import from_onnx
from onnx_checks import _close, _hand_graph, _reference, _same_weights_and_onnxruntime, _session

# ------------------------------------------------ what onnxruntime computes, read as it computes it


def _run_hand(proto: onnx.ModelProto, layer, x: np.ndarray) -> None:
    """The layer's Y, Y_h, Y_c against onnxruntime's for the graph's one node (Y [T, D, B, H] merged)."""
    got = _session(proto).run(None, {"X": x})
    with torch.no_grad():
        y, st = layer(torch.from_numpy(x))
    T, D, B, H = got[0].shape
    _close("hand/Y", y.numpy(), got[0].transpose(0, 2, 1, 3).reshape(T, B, D * H))
    for name, a, b in zip(("Y_h", "Y_c"), st if isinstance(st, tuple) else (st,), got[1:]):
        _close(f"hand/{name}", a.numpy(), b)


@pytest.mark.parametrize("op", ["LSTM", "RNN"])
@pytest.mark.parametrize("kind", ["initializer", "Constant"])
def test_constant_sequence_lens_is_refused(op, kind):
    """onnxruntime masks the steps past a constant sequence_lens; a layer takes its lengths when it
    is called, so such a graph is refused (a graph input sequence_lens stays readable)."""
    rng = np.random.default_rng(7)
    G, H, I = (4 if op == "LSTM" else 1), 3, 2
    inits = [numpy_helper.from_array(rng.standard_normal((1, G * H, I)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, G * H, H)).astype(np.float32), "R")]
    lengths = np.array([4, 2], np.int32)
    nodes = []
    if kind == "initializer":
        inits.append(numpy_helper.from_array(lengths, "lens"))
    else:
        nodes.append(helper.make_node("Constant", [], ["lens"], value=numpy_helper.from_array(lengths)))
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    nodes.append(helper.make_node(op, ["X", "W", "R", "", "lens"], outs, hidden_size=H))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", I])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs], inits)
    opsets = [helper.make_opsetid("", 17)]
    proto = helper.make_model(g, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    x = rng.standard_normal((4, 2, I)).astype(np.float32)
    masked = _session(proto).run(["Y"], {"X": x})[0]
    assert np.all(masked[2:, :, 1] == 0) and np.abs(masked[2:, :, 0]).max() > 1e-3  # onnxruntime masks
    with pytest.raises(ValueError, match=rf"{op} node 0 \(''\): sequence_lens \('lens'\) is a constant \[4, 2\]; "
                                         r"an lstmkit layer takes the lengths when it is called"):
        from_onnx(proto)
    # The same node with sequence_lens a graph input: read, and equal given the same lengths.
    g = proto.graph
    for t in list(g.initializer):
        if t.name == "lens":
            g.initializer.remove(t)
    for n in list(g.node):
        if n.op_type == "Constant":
            g.node.remove(n)
    g.input.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["B"]))
    layer = from_onnx(proto)
    want = _session(proto).run(None, {"X": x, "lens": lengths})
    got = _reference(layer, torch.from_numpy(x), torch.from_numpy(lengths), None)
    _close("runtime_lengths/Y", got[0], want[0].reshape(4, 2, H))
    _close("runtime_lengths/Y_h", got[1], want[1])


def test_affine_is_read_only_as_the_identity_it_computes():
    """onnxruntime's Affine defaults are alpha=0, beta=0 (a zero function), not the identity: an
    Affine without its alpha is refused; alpha=1 with beta given or left at 0 is the identity."""
    x = np.random.default_rng(3).standard_normal((4, 2, 2)).astype(np.float32)
    default = _hand_graph({"activations": ["Sigmoid", "Affine", "Tanh"]})
    y_c = _session(default).run(["Y_c"], {"X": x})[0]
    assert np.all(y_c == 0)  # the candidate is 0·z + 0: c stays 0
    with pytest.raises(ValueError, match=r"Affine activation without activation_alpha: runtimes disagree on its "
                                         r"default \(onnxruntime computes 0·x \+ 0\)"):
        from_onnx(default)
    with pytest.raises(ValueError, match=r"Affine activation with alpha=1.0, beta=2.0"):
        from_onnx(_hand_graph({"activations": ["Sigmoid", "Affine", "Tanh"], "activation_alpha": [1.0],
                               "activation_beta": [2.0]}))
    for attrs, name in [({"activations": ["Sigmoid", "Affine", "Tanh"], "activation_alpha": [1.0]}, "niaf"),
                        ({"activations": ["HardSigmoid", "Tanh", "Affine"], "activation_alpha": [0.2, 1.0],
                          "activation_beta": [0.5, 0.0]}, "noaf+gate_act=hard_sigmoid")]:
        proto = _hand_graph(attrs)
        layer = from_onnx(proto)
        assert layer.spec.name == name
        _run_hand(proto, layer, x)


@pytest.mark.parametrize(("names", "spec"), [
    (["sigmoid", "tanh", "tanh"], "vanilla"),
    (["hardsigmoid", "relu", "relu"], "cand_act=relu+out_act=relu+gate_act=hard_sigmoid"),
    (["HARDSIGMOID", "Tanh", "affine"], "noaf+gate_act=hard_sigmoid"),
])
def test_activation_names_are_read_in_any_case_as_onnxruntime_reads_them(names, spec):
    """onnxruntime matches activation names in any case: 'hardsigmoid' is ONNX's HardSigmoid with
    its default alpha 0.2 (lstmkit's hard_sigmoid), not lstmkit's 1/6-slope 'hardsigmoid'."""
    attrs: dict = {"activations": names}
    if "affine" in names:
        attrs.update(activation_alpha=[0.2, 1.0], activation_beta=[0.5, 0.0])
    proto = _hand_graph(attrs)
    layer = from_onnx(proto)
    assert layer.spec.name == spec
    _run_hand(proto, layer, 3 * np.random.default_rng(4).standard_normal((4, 2, 2)).astype(np.float32))


def _rnn_node_graph(activations: list[str], opset: int = 14) -> onnx.ModelProto:
    """One RNN node (H = 3, I = 4, no bias) with these activation names."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(-1, 1, (1, 3, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.uniform(-1, 1, (1, 3, 3)).astype(np.float32), "R")]
    node = helper.make_node("RNN", ["X", "W", "R"], ["Y", "Y_h"], hidden_size=3, activations=activations)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", 4])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h")], inits)
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(g, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


def test_rnn_activation_names_are_case_sensitive_as_onnxruntime_reads_them():
    """onnxruntime's RNN kernel takes the standard's spellings alone ('Relu'), where its LSTM kernel
    takes any case; 'relu' on an RNN node was imported although onnxruntime refuses the node
    (found by a converter sweep)."""
    x = np.random.default_rng(1).standard_normal((5, 2, 4)).astype(np.float32)
    proto = _rnn_node_graph(["Relu"])
    layer = from_onnx(proto)
    assert layer.nonlinearity == "relu"
    _run_hand(proto, layer, x)
    for name, match in [("relu", r"'relu' is spelled 'Relu'; onnxruntime refuses 'relu'"),
                        ("TANH", r"'TANH' is spelled 'Tanh'"), ("Gelu", r"'Gelu' is not one of them")]:
        proto = _rnn_node_graph([name])
        with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type
            _session(proto)
        with pytest.raises(ValueError, match=match):
            from_onnx(proto)


def test_layout_attribute_before_opset_14_is_refused_as_onnxruntime_refuses_it():
    """``layout`` is an attribute of LSTM-14 and RNN-14; an opset-13 model with it is invalid for
    onnxruntime and was imported as batch-first (found by a converter sweep)."""
    for opset, ok in ((13, False), (14, True)):
        proto = _hand_graph({"layout": 1})
        del proto.opset_import[:]
        proto.opset_import.append(helper.make_opsetid("", opset))
        if ok:
            assert from_onnx(proto).batch_first
            continue
        with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type
            _session(proto)
        with pytest.raises(ValueError, match=r"the layout attribute belongs to the LSTM operator from opset 14, "
                                             r"and this model imports opset 13"):
            from_onnx(proto)


@pytest.mark.parametrize(("attrs", "match"), [
    ({"input_forget": 2}, r"input_forget=2: expected 0 or 1"),
    ({"layout": 2}, r"layout=2: expected 0 \(time-major\) or 1 \(batch-major\)"),
    ({"foo": 1}, r"attributes \['foo'\] are not attributes of the LSTM operator"),
], ids=["input_forget", "layout", "unknown_attribute"])
def test_attributes_outside_the_operator_are_refused(attrs, match):
    with pytest.raises(ValueError, match=match):
        from_onnx(_hand_graph(attrs))
    with pytest.raises(ValueError, match=r"hidden_size=0: expected a positive size"):
        from_onnx(_zero_hidden_graph())


def _zero_hidden_graph() -> onnx.ModelProto:
    proto = _hand_graph({})
    for a in proto.graph.node[-1].attribute:
        if a.name == "hidden_size":
            a.i = 0
    return proto


# ------------------------------------------------ stacked nodes: the joins and outputs are checked


def _stack_graph(join, *, D=2, H=3, I=2, outputs=("Y2",), x_shape=("T", "B", 2), opset=17):
    """Two LSTM nodes (`D` directions) whose Y1 goes through ``join(Y1, add_init) -> (nodes, name)``
    into the second; the graph's outputs as named (Y2, Yh2, Yc2, Y1 or a join's output)."""
    rng = np.random.default_rng(11)
    inits = []

    def add_init(array, name):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    for k, i in ((1, I), (2, D * H)):
        add_init(0.7 * rng.standard_normal((D, 4 * H, i)).astype(np.float32), f"W{k}")
        add_init(0.7 * rng.standard_normal((D, 4 * H, H)).astype(np.float32), f"R{k}")
    attrs = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
    nodes = [helper.make_node("LSTM", ["X", "W1", "R1"], ["Y1", "Yh1", "Yc1"], name="first", **attrs)]
    between, x2 = join("Y1", add_init)
    nodes += between
    nodes.append(helper.make_node("LSTM", [x2, "W2", "R2"], ["Y2", "Yh2", "Yc2"], name="second", **attrs))
    extra, outs = [], []
    for o in outputs:
        if callable(o):
            more, o = o("Y2", add_init)
            extra += more
        outs.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
    g = helper.make_graph(nodes + extra, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                          outs, inits)
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(g, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


def _merge(shape, perm=(0, 2, 1, 3), allowzero=None):
    def join(y, add_init):
        kw = {} if allowzero is None else {"allowzero": allowzero}
        return [helper.make_node("Transpose", [y], [y + "_t"], perm=list(perm)),
                helper.make_node("Reshape", [y + "_t", add_init(np.array(shape, np.int64), y + "_shape")],
                                 [y + "_m"], **kw)], y + "_m"
    return join


def _computed_merge(y, add_init):
    """The join torch.onnx.export (dynamo, dynamic shapes) writes: the shape read from the tensor."""
    t, s = y + "_t", y + "_s"
    c = [add_init(np.array([v], np.int64), f"{y}_c{v}") for v in range(5)]
    return [helper.make_node("Transpose", [y], [t], perm=[0, 2, 1, 3]),
            helper.make_node("Shape", [t], [s], start=0),
            helper.make_node("Slice", [s, c[0], c[1]], [s + "0"]),
            helper.make_node("Slice", [s, c[1], c[2]], [s + "1"]),
            helper.make_node("Slice", [s, c[2], c[3]], [s + "2"]),
            helper.make_node("Slice", [s, c[3], c[4]], [s + "3"]),
            helper.make_node("Mul", [s + "2", s + "3"], [s + "23"]),
            helper.make_node("Concat", [s + "0", s + "1", s + "23"], [s + "_new"], axis=0),
            helper.make_node("Reshape", [t, s + "_new"], [y + "_m"])], y + "_m"


def _squeeze(axes):
    def join(y, add_init):
        return [helper.make_node("Squeeze", [y, add_init(np.array(axes, np.int64), y + "_axes")], [y + "_m"])], \
            y + "_m"
    return join


def _inert_dropout(y, add_init):
    nodes, m = _merge([0, 0, -1])(y, add_init)
    off = add_init(np.array(False), y + "_training")
    return nodes + [helper.make_node("Dropout", [m, "", off], [m + "_d"]),
                    helper.make_node("Identity", [m + "_d"], [m + "_i"])], m + "_i"


def _training_dropout(y, add_init):
    nodes, m = _merge([0, 0, -1])(y, add_init)
    on = add_init(np.array(True), y + "_training")
    return nodes + [helper.make_node("Dropout", [m, add_init(np.array(0.5, np.float32), "ratio"), on], [m + "_d"])], \
        m + "_d"


@pytest.mark.parametrize(("join", "kw"), [
    (_merge([0, 0, -1]), {}),
    (_merge([0, -1, 6]), {}),
    (_merge([5, 3, 6]), {"x_shape": (5, 3, 2)}),
    (_computed_merge, {}),
    (_inert_dropout, {}),
    (_squeeze([1]), {"D": 1}),
    (_merge([0, 0, -1]), {"outputs": ("Y2", "Yh2", "Yc2", _merge([0, 0, -1]))}),
], ids=["torch", "inferred_batch", "fixed_sizes", "computed_shape", "inert_dropout", "squeeze", "merged_output"])
def test_stacked_nodes_joined_as_exporters_join_them_match_onnxruntime(join, kw):
    D = kw.get("D", 2)
    proto = _stack_graph(join, **kw)
    layer = from_onnx(proto)
    assert layer.num_layers == 2 and layer.num_directions == D
    x = np.random.default_rng(5).standard_normal((5, 3, 2)).astype(np.float32)
    got = _session(proto).run(None, {"X": x})
    with torch.no_grad():
        y, (h, c) = layer(torch.from_numpy(x))
    _close("stack/Y2", y.numpy(), got[0].transpose(0, 2, 1, 3).reshape(5, 3, D * 3))
    if len(got) > 1:
        _close("stack/Yh2", h[D:].numpy(), got[1])
        _close("stack/Yc2", c[D:].numpy(), got[2])
        _close("stack/merged", y.numpy(), got[3])


def _relu_output(y, add_init):
    return [helper.make_node("Relu", [y], [y + "_relu"])], y + "_relu"


@pytest.mark.parametrize(("join", "kw", "match"), [
    (_merge([0, -1, 6], perm=(0, 1, 2, 3)), {}, r"Transpose with perm=\[0, 1, 2, 3\] \(expected \[0, 2, 1, 3\]\)"),
    (_merge([0, 0, -1], perm=(0, 2, 3, 1)), {}, r"Transpose with perm=\[0, 2, 3, 1\]"),
    (lambda y, add: ([helper.make_node("Reshape", [y, add(np.array([0, -1, 6], np.int64), "s")], ["m"])], "m"), {},
     r"through \['Reshape'\]: not a join lstmkit reads"),
    (_merge([-1, 3, 6]), {"x_shape": ("T", 3, 2)}, None),  # T inferred, B the input's: correct
    (_merge([-1, 3, 6]), {}, r"a Reshape to \[-1, 3, 6\], expected \[T, B, 6\]"),  # B may differ from 3
    (_merge([5, -1, 6]), {}, r"a Reshape to \[5, -1, 6\], expected \[T, B, 6\]"),
    (_merge([0, 0, -1], allowzero=1), {}, r"a Reshape to \[0, 0, -1\]"),
    (_squeeze([1]), {}, r"Squeeze cannot merge 2 directions"),
    (_squeeze([0]), {"D": 1}, r"Squeeze with axes=\[0\] \(expected axes=\[1\]\)"),
    (_training_dropout, {}, r"a Dropout that may run in training mode"),
    (_merge([0, 0, -1]), {"outputs": ("Y1",)}, r"graph output 'Y1' is the Y of LSTM node 0 \('first'\), not of "
                                              r"the last node 1"),
    (_merge([0, 0, -1]), {"outputs": ("Yh1",)}, r"no graph output comes from the last LSTM node \('second'\)"),
    (_merge([0, 0, -1]), {"outputs": (_merge([0, -1, 6]),)}, None),
    (_merge([0, 0, -1]), {"outputs": (_merge([0, 0, -1], perm=(0, 2, 3, 1)),)},
     r"graph output 'Y2_m' is the Y of node 1 through \['Transpose', 'Reshape'\]: Transpose with perm"),
], ids=["no_transpose", "wrong_perm", "reshape_only", "inferred_time", "fixed_batch", "fixed_time", "allowzero", "squeeze_two",
        "squeeze_axis", "training_dropout", "first_y_out", "second_unused", "merged_out", "bad_out"])
def test_stacked_nodes_joined_otherwise_are_refused(join, kw, match):
    """Joins that scramble the layout (onnxruntime runs them: the stack would differ), outputs that
    are not the stack's: each refused with what was found and what is read."""
    proto = _stack_graph(join, **kw)
    x = np.random.default_rng(6).standard_normal((5, 3, 2)).astype(np.float32)
    if match is None:  # the near misses that are correct are read
        layer = from_onnx(proto)
        y = _session(proto).run(None, {"X": x})[0]
        with torch.no_grad():
            ours = layer(torch.from_numpy(x))[0].numpy()
        _close("stack_ok", ours, y if y.ndim == 3 else y.transpose(0, 2, 1, 3).reshape(5, 3, -1))
        return
    if not any(word in match for word in ("training", "Squeeze", "allowzero", r"\[0, 0, -1\]")):
        y = _session(proto).run(None, {"X": x})[0]  # a graph onnxruntime runs, and not as lstmkit's stack would
        if "outputs" not in kw and r"expected \[T, B" not in match:  # (a fixed size is right at that size only)
            reference = _stack_graph(_merge([0, 0, -1]), **kw)
            want = _session(reference).run(None, {"X": x})[0]
            assert y.shape != want.shape or np.abs(y - want).max() > 1e-3
    with pytest.raises(ValueError, match=match):
        from_onnx(proto)


def test_a_head_on_the_stack_is_left_out():
    """A graph that computes more from the stack's output (here a Relu of the top Y; a
    classifier in practice) gives the stack: the layer's output is the head's input."""
    proto = _stack_graph(_merge([0, 0, -1]), outputs=(_relu_output,))
    x = np.random.default_rng(6).standard_normal((5, 3, 2)).astype(np.float32)
    layer = from_onnx(proto)
    with torch.no_grad():
        ours = layer(torch.from_numpy(x))[0].numpy()  # (T, B, D·H)
    y = _session(proto).run(None, {"X": x})[0]  # Relu of the top node's Y, (T, D, B, H)
    _close("head", np.maximum(ours.reshape(5, 3, 2, 3).transpose(0, 2, 1, 3), 0.0), y)


def test_a_reshape_the_stack_reads_before_the_first_node_is_refused():
    """Only Transpose(perm=[1, 0, 2]) (batch-first) may stand between the graph input and node 0."""
    reshape = helper.make_node("Reshape", ["X", "X_shape"], ["X2"])
    proto = _hand_graph({}, x_name="X2", extra_nodes=[reshape])
    proto.graph.initializer.append(numpy_helper.from_array(np.array([0, -1, 2], np.int64), "X_shape"))
    with pytest.raises(ValueError, match=r"the input of LSTM node 0 is passed through Reshape; expected \[1, 0, 2\]"):
        from_onnx(proto)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_shapes"])
def test_from_torch_dynamo_export(dynamic):
    """torch.onnx.export's dynamo exporter joins layers with Transpose and a Reshape to the fixed
    sizes (or to sizes read from the tensor with dynamic shapes): read, equal to onnxruntime."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(8)
    ref = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(2, 5, 3)
    shapes = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("time")},) if dynamic else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(ref, (x,), dynamo=True, input_names=["x"], dynamic_shapes=shapes).model_proto
    layer = from_onnx(proto)
    assert layer.batch_first and layer.num_layers == 2
    _same_weights_and_onnxruntime(layer, ref, proto, x, "dynamo")
