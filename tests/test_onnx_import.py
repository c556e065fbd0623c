"""ONNX → lstmkit: ``from_onnx`` on graphs it did not write, each read layer compared with
onnxruntime (1e-5 float32) and its parameters exactly.

Foreign graphs come from ``torch.onnx.export(nn.LSTM)`` and from ``onnx.helper`` by hand;
then weights in external data files, ONNX's own LSTM/RNN node tests with their weights given
through ``inputs=``, and the checks ``inputs=`` and stored weights pass (what is refused, and why).
"""

from __future__ import annotations

import functools
import importlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lstmkit
from lstmkit.convert import from_onnx, to_onnx
from onnx_checks import _close, _hand_graph, _reference, _same_weights_and_onnxruntime, _session

# ---------------------------------------------------------------------------- foreign graphs


def _torch_export(module: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), f, dynamo=False, input_names=["x"], output_names=["y", "h", "c"])
    return onnx.load_from_string(f.getvalue())


@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True, bias=False)],
                         ids=["single", "stacked_bidirectional", "batch_first_no_bias"])
def test_from_torch_onnx_export(kw):
    torch.manual_seed(5)
    ref = torch.nn.LSTM(3, 4, **kw).eval()
    x = torch.randn(2, 5, 3) if kw.get("batch_first") else torch.randn(5, 2, 3)
    proto = _torch_export(ref, x)
    layer = from_onnx(proto)
    assert layer.batch_first == ref.batch_first and layer.num_layers == ref.num_layers
    _same_weights_and_onnxruntime(layer, ref, proto, x, "torch_export")  # (torch reorders gates; we back)


def test_hand_written_input_forget_ignores_the_f_rows():
    """A foreign input_forget graph with non-zero f rows: onnxruntime ignores them, and so do we."""
    proto = _hand_graph({"input_forget": 1, "activations": ["Sigmoid", "Tanh", "Tanh"]})
    layer = from_onnx(proto)
    assert layer.spec.name == "cifg" and layer.weight_ih_l0.shape == (9, 2)
    x = torch.randn(4, 2, 2)
    y = _session(proto).run(None, {"X": x.numpy()})
    with torch.no_grad():
        ours = layer(x)
    _close("hand_input_forget/Y", ours[0].numpy(), y[0].reshape(4, 2, 3))
    _close("hand_input_forget/Y_c", ours[1][1].numpy(), y[2])


def test_hand_written_affine_identity_reads_as_niaf_noaf():
    proto = _hand_graph({"activations": ["Sigmoid", "Affine", "Affine"], "activation_alpha": [1.0, 1.0],
                         "activation_beta": [0.0, 0.0]})
    layer = from_onnx(proto)
    assert layer.spec.name == "niaf+noaf"
    x = torch.randn(4, 2, 2)
    y = _session(proto).run(None, {"X": x.numpy()})
    with torch.no_grad():
        ours = layer(x)
    _close("hand_affine/Y", ours[0].numpy(), y[0].reshape(4, 2, 3))
    _close("hand_affine/Y_c", ours[1][1].numpy(), y[2])


@pytest.mark.parametrize(("attrs", "name"), [
    ({"activations": ["HardSigmoid", "Relu", "Relu"]}, "cand_act=relu+out_act=relu+gate_act=hard_sigmoid"),
    ({"activations": ["HardSigmoid", "Tanh", "Tanh"], "activation_alpha": [1 / 6], "activation_beta": [0.5]},
     "gate_act=hardsigmoid"),
])
def test_hand_written_hard_sigmoid_and_relu_read_as_lstmkit_activations(attrs, name):
    proto = _hand_graph(attrs)
    layer = from_onnx(proto)
    assert layer.spec.name == name
    x = torch.randn(4, 2, 2)
    y = _session(proto).run(None, {"X": x.numpy()})
    with torch.no_grad():
        ours = layer(x)
    _close("hand_activations/Y", ours[0].numpy(), y[0].reshape(4, 2, 3))
    _close("hand_activations/Y_c", ours[1][1].numpy(), y[2])


@pytest.mark.parametrize("attrs,kw,match", [
    ({"activations": ["Sigmoid", "Affine", "Tanh"], "activation_alpha": [2.0]}, {},
     r"Affine activation with alpha=2.0, beta=0.0; lstmkit computes the identity"),
    ({"activations": ["Sigmoid", "Tanh", "Tanh", "Sigmoid", "Relu", "Tanh"], "direction": "bidirectional"},
     {"D": 2}, "the directions use different activations"),
    ({"activations": ["Sigmoid", "Softsign", "Tanh"]}, {}, r"activations=\['Sigmoid', 'Softsign', 'Tanh'\]; "
     r"lstmkit's candidate activation is one of \['tanh', 'identity', 'relu'\], not 'softsign'"),
    ({"activations": ["HardSigmoid", "Tanh", "Tanh"], "activation_alpha": [0.3]}, {},
     r"HardSigmoid with alpha=0.3.*a = 0.2 \(hard_sigmoid\) or 1/6 \(hardsigmoid\)"),
    ({"activation_alpha": [1.0]}, {}, "activation_alpha"),
    ({"direction": "reverse"}, {}, "direction='reverse' runs only backwards"),
    ({}, {"w_input": True}, r"input W \('W'\) is computed at run time \(a graph input\); expected a constant "
                            r"\(an initializer or a Constant node\), or its value given as "
                            r"from_onnx\(..., inputs=\{'W': array\}\)"),
    ({}, {"initial_h": np.ones((1, 1, 3))}, "initial_h is a non-zero constant"),
    ({}, {"initial_c": np.zeros((1, 1, 5))},
     r"initial_c is a constant of shape \[1, 1, 5\], expected \[num_directions=1, batch, hidden_size=3\]"),
    ({}, {"initial_h": np.zeros((2, 1, 3))}, r"initial_h is a constant of shape \[2, 1, 3\]"),
    ({}, {"x_name": "X2", "extra_nodes": [helper.make_node("Relu", ["X"], ["X2"])]},
     r"comes from a Relu node .*cannot be read as one stacked layer"),
    ({}, {"x_name": "X2", "extra_nodes": [helper.make_node("Transpose", ["X"], ["X2"], perm=[0, 2, 1])]},
     r"transposed with perm=\[0, 2, 1\]"),
], ids=["affine_alpha", "mixed_directions", "activations", "hard_sigmoid_alpha", "alpha", "reverse", "w_runtime", "learned_state", "state_size", "state_directions", "not_a_chain",
          "odd_transpose"])
def test_foreign_graphs_lstmkit_cannot_compute_are_refused(attrs, kw, match):
    with pytest.raises(ValueError, match=match):
        from_onnx(_hand_graph(attrs, **kw))


def test_an_op_between_two_lstm_nodes_is_refused():
    proto = to_onnx(lstmkit.LSTM(3, 4, num_layers=2))
    second = [n for n in proto.graph.node if n.op_type == "LSTM"][1]
    proto.graph.node.insert(0, helper.make_node("Relu", [second.input[0]], ["relu_out"]))  # between the layers
    second.input[0] = "relu_out"
    with pytest.raises(ValueError, match=r"X input of LSTM node 1 .* comes from a Relu node"):
        from_onnx(proto)


def test_files_that_are_not_onnx_or_have_no_lstm(tmp_path):
    with pytest.raises(ValueError, match="no file at"):
        from_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe not a protobuf \x00\x01" * 10)
    with pytest.raises(ValueError, match=rf"{bad}: not a readable ONNX model|{bad}: not an ONNX model"):
        from_onnx(bad)
    g = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])])
    relu = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g), relu)
    with pytest.raises(ValueError, match=rf"{relu}: expected an ONNX model with LSTM or RNN nodes of the ONNX domain, found none "
                                         r"\(ops: \['Relu'\]\)"):
        from_onnx(relu)
    with pytest.raises(TypeError, match="model_or_path: expected an onnx.ModelProto or a path, got int"):
        from_onnx(3)


# ----------------------------------------------------------------------------- external data


def _external(tmp_path, layer, name="m.onnx", location="m.onnx.data"):
    """``layer`` exported and saved as torch.onnx.export saves by default: weights in ``location``."""
    path = tmp_path / name
    onnx.save_model(to_onnx(layer), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


@pytest.mark.parametrize("cell", ["vanilla", "layernorm+cifg"], ids=["operator", "scan"])
def test_external_data_next_to_the_model_is_read(tmp_path, cell):
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, num_layers=2, cell=cell).eval()
    path = _external(tmp_path, layer)
    proto = onnx.load_model(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    back = from_onnx(path)
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(ValueError, match=r"stored in the external data file 'm.onnx.data'; pass the model's path"):
        from_onnx(proto)  # a ModelProto has no directory to read it from


def _relocate(path, location):
    proto = onnx.load_model(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(proto.SerializeToString())


def test_external_data_outside_the_model_directory_is_refused(tmp_path):
    layer = lstmkit.LSTM(3, 4).eval()
    inner = tmp_path / "model"
    inner.mkdir()
    path = _external(inner, layer)
    data = (inner / "m.onnx.data").read_bytes()
    (tmp_path / "secret.data").write_bytes(data)  # the same bytes, outside the model's directory
    for location in ("../secret.data", str(tmp_path / "secret.data")):
        _relocate(path, location)
        with pytest.raises(ValueError, match=r"outside the model's directory \(an absolute path or '..'\); refused"):
            from_onnx(path)
    _relocate(path, "m.onnx.data")
    (inner / "m.onnx.data").unlink()
    (inner / "m.onnx.data").symlink_to(tmp_path / "secret.data")  # a link that leads out
    with pytest.raises(ValueError, match=r"leads outside the model's directory \(a link to .*secret.data\); refused"):
        from_onnx(path)
    (inner / "m.onnx.data").unlink()
    (inner / "m.onnx.data").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"do not fit in the file's"):
        from_onnx(path)
    (inner / "m.onnx.data").unlink()
    with pytest.raises(ValueError, match=r"which does not exist next to the model"):
        from_onnx(path)


# ------------------------------------------------ ONNX's own node tests: weights given as inputs=

#: Node tests lstmkit refuses, with the reason the refusal must give.
NODE_TEST_REFUSALS = {
    "test_lstm_reverse": r"LSTM node 0 \(''\): direction='reverse' runs only backwards",
    "test_simple_rnn_reverse": r"RNN node 0 \(''\): direction='reverse' runs only backwards",
}
_NODE_TEST_PREFIXES = ("test_lstm_", "test_rnn_", "test_simple_rnn_")


@functools.cache
def _node_tests() -> list[tuple[str, onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(name, model, inputs by name, expected outputs by name) of ONNX's LSTM/RNN node tests.

    Read from ``onnx/backend/test/data/node/<name>/`` (``model.onnx`` and ``test_data_set_0``)
    where the installed onnx ships that directory; otherwise (onnx >= 1.2x wheels leave it
    out) from the generators that write it, ``onnx.backend.test.case.node``: the same models
    and the same numpy-computed outputs.
    """
    root = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    dirs = sorted(d for prefix in _NODE_TEST_PREFIXES for d in root.glob(prefix + "*") if d.is_dir())
    out = []
    if dirs:
        for d in dirs:
            model = onnx.load(str(d / "model.onnx"))
            data = d / "test_data_set_0"

            def read(kind: str, names: list[str], data=data) -> dict[str, np.ndarray]:
                paths = sorted(data.glob(f"{kind}_*.pb"), key=lambda q: int(q.stem.split("_")[1]))
                return {n: numpy_helper.to_array(onnx.load_tensor(str(q))) for n, q in zip(names, paths)}

            out.append((d.name, model, read("input", [v.name for v in model.graph.input]),
                        read("output", [v.name for v in model.graph.output])))
        return out
    from onnx.backend.test.case import node as cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # other operators' generators warn about casts and overflows
        if hasattr(cases, "_NodeTestCases"):
            # Only the LSTM and RNN generators: importing one defines its cases (collect_testcases
            # imports every operator's, ~25 s of pooling and the like for 12 cases)
            for module in ("lstm", "rnn"):
                importlib.import_module(f"{cases.__name__}.{module}")
            everything = cases._NodeTestCases
        else:
            everything = cases.collect_testcases()
        found = list({c.name: c for c in everything if c.name.startswith(_NODE_TEST_PREFIXES)}.values())
    for c in found:
        ins, outs = c.data_sets[0]
        g = c.model.graph
        out.append((c.name, c.model, dict(zip([v.name for v in g.input], ins, strict=True)),
                    dict(zip([v.name for v in g.output], outs, strict=True))))
    return out


def _run_node_test(layer, node, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The layer's outputs for the node's run-time inputs (X, sequence_lens, initial_h/c), in the node's layout."""
    ins = dict(zip(("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"), node.input))
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    x = torch.from_numpy(values[ins["X"]])
    assert layer.batch_first == (layout == 1)
    T, B = (x.shape[1], x.shape[0]) if layout else (x.shape[0], x.shape[1])
    D, H = layer.num_directions, layer.hidden_size

    def state(slot: str) -> torch.Tensor:
        if not ins.get(slot):
            return torch.zeros(D, B, H)
        s = torch.from_numpy(values[ins[slot]])
        return s.transpose(0, 1).contiguous() if layout else s  # [batch, D, H] -> [D, batch, H]

    st = (state("initial_h"), state("initial_c")) if isinstance(layer, lstmkit.LSTM) else state("initial_h")
    lengths = values[ins["sequence_lens"]].tolist() if ins.get("sequence_lens") else None
    ys = _reference(layer, x, lengths, st)
    y = ys[0].reshape(B, T, D, H) if layout else ys[0].reshape(T, B, D, H).transpose(0, 2, 1, 3)
    outs = {"Y": y}
    for k, name in enumerate(("Y_h", "Y_c")[: len(ys) - 1], start=1):
        outs[name] = ys[k].transpose(1, 0, 2) if layout else ys[k]
    return {n: outs[slot] for slot, n in zip(("Y", "Y_h", "Y_c"), node.output) if n}


def test_onnx_node_tests_with_weights_given_as_inputs():
    """Every LSTM/RNN node test of the installed onnx: read with its W, R, B, P given through
    ``inputs=``, the layer's outputs match the test's expected outputs (1e-5); the ones lstmkit
    cannot compute are refused with the reason in NODE_TEST_REFUSALS. Without ``inputs=`` every
    one is refused with a message that says how to give the weights."""
    tests = _node_tests()
    assert len(tests) >= 12, [t[0] for t in tests]  # onnx 1.23: 6 LSTM, 6 RNN
    read, refused = [], []
    for name, model, values, expected in tests:
        (node,) = [n for n in model.graph.node if n.op_type in ("LSTM", "RNN")]
        weights = {n: values[n] for slot, n in zip(("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"),
                                                    node.input) if n and slot in ("W", "R", "B", "P")}
        with pytest.raises(ValueError, match=r"computed at run time \(a graph input\).*inputs=|direction='reverse'"):
            from_onnx(model)
        if name in NODE_TEST_REFUSALS:
            with pytest.raises(ValueError, match=NODE_TEST_REFUSALS[name]):
                from_onnx(model, inputs=weights)
            refused.append(name)
            continue
        layer = from_onnx(model, inputs=weights)
        assert isinstance(layer, lstmkit.LSTM if node.op_type == "LSTM" else lstmkit.RNN), name
        ours = _run_node_test(layer, node, values)
        assert set(ours) == set(expected), (name, sorted(ours), sorted(expected))
        for out_name, want in expected.items():
            _close(f"{name}/{out_name}", ours[out_name], want)
        read.append(name)
    assert sorted(refused) == sorted(NODE_TEST_REFUSALS), refused
    assert len(read) + len(refused) == len(tests) and len(read) >= 10, read


# ------------------------------------------------ inputs= and weights checked as torch checks arguments


def _weight_graph(H=3, I=2, D=1, op="LSTM", initial_h=False, with_p=False):
    """An LSTM/RNN node whose W, R, B (and P, initial_h) are graph inputs, as ONNX's node tests write it;
    with the values that make it valid."""
    rng = np.random.default_rng(0)
    G = 4 if op == "LSTM" else 1
    values = {"W": rng.standard_normal((D, G * H, I)).astype(np.float32),
              "R": rng.standard_normal((D, G * H, H)).astype(np.float32),
              "B": rng.standard_normal((D, 2 * G * H)).astype(np.float32)}
    ins = ["X", "W", "R", "B", "seq", "h0" if initial_h else ""]
    if with_p:
        values["P"] = rng.standard_normal((D, 3 * H)).astype(np.float32)
        ins += ["", "P"]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", I]),
                    helper.make_tensor_value_info("seq", TensorProto.INT32, ["N"])]
    graph_inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in values.items()]
    if initial_h:
        graph_inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [D, "N", H]))
    nodes = [helper.make_node(op, ins, ["Y", "Y_h"], hidden_size=H),
             helper.make_node("Shape", ["X"], ["shape"])]
    graph_inputs.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1]))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h")]
    g = helper.make_graph(nodes, "g", graph_inputs, outputs)
    opsets = [helper.make_opsetid("", 17)]
    return helper.make_model(g, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)), values


def test_given_weights_compute_what_onnxruntime_computes():
    proto, values = _weight_graph(with_p=True)
    layer = from_onnx(proto, inputs=values)
    assert layer.spec.name == "peephole"
    x = np.random.default_rng(1).standard_normal((4, 2, 2)).astype(np.float32)
    feed = {"X": x, "seq": np.array([4, 4], np.int32), "unused": np.zeros(1, np.float32), **values}
    y = _session(proto).run(None, feed)
    with torch.no_grad():
        ours = layer(torch.from_numpy(x))
    _close("given/Y", ours[0].numpy(), y[0].reshape(4, 2, 3))
    # A given value replaces an initializer of the same name (an initializer is a default a run can override).
    stored = _hand_graph({})
    w = np.zeros((1, 12, 2), np.float32)
    stored.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [1, 12, 2]))
    assert torch.equal(from_onnx(stored, inputs={"W": w}).weight_ih_l0, torch.zeros(12, 2))


def test_inputs_refuses_what_is_not_a_weight_input():
    proto, values = _weight_graph(initial_h=True)
    with pytest.raises(TypeError, match=r"^inputs: expected a mapping from graph input names to NumPy arrays, got list"):
        from_onnx(proto, inputs=[("W", values["W"])])
    with pytest.raises(TypeError, match=r"^inputs: expected graph input names \(str\) as keys, got int \(0\)"):
        from_onnx(proto, inputs={0: values["W"]})
    with pytest.raises(ValueError, match=r"^inputs: \['w', 'Bias'\] are not graph inputs of the ONNX model "
                                         r"\(its graph inputs: \['X', 'seq', 'W', 'R', 'B', 'h0', 'unused'\]\)"):
        from_onnx(proto, inputs={**values, "w": values["W"], "Bias": values["B"]})
    with pytest.raises(ValueError, match=r"^inputs: \['Wt'\] is not a graph input"):
        from_onnx(proto, inputs={"Wt": values["W"]})
    for name, role in [("X", r"the X input of LSTM node 0 \(''\)"), ("seq", r"the sequence_lens input of LSTM node 0 \(''\)"),
                       ("unused", "a graph input that no LSTM or RNN node reads directly")]:
        with pytest.raises(ValueError, match=rf"^inputs: '{name}' is {role}; inputs= gives values only where an "
                                             r"initializer would be read \(W, R, B, initial_h, initial_c, P\)"):
            from_onnx(proto, inputs={**values, name: np.zeros((1, 2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"LSTM node 0 \(''\): input R \('R'\) is computed at run time \(a graph "
                                         r"input\).*inputs=\{'R': array\}"):
        from_onnx(proto, inputs={"W": values["W"]})
    # A given initial state is a constant, as an initializer is: zero reads, non-zero is a learned state.
    from_onnx(proto, inputs={**values, "h0": np.zeros((1, 2, 3), np.float32)})
    with pytest.raises(ValueError, match="initial_h is a non-zero constant"):
        from_onnx(proto, inputs={**values, "h0": np.ones((1, 2, 3), np.float32)})
    scan = to_onnx(lstmkit.LSTM(3, 4, cell="layernorm"))
    with pytest.raises(ValueError, match=r"^inputs: \['X'\]: the ONNX model is a Scan graph written by to_onnx"):
        from_onnx(scan, inputs={"X": np.zeros((1, 1, 3), np.float32)})


@pytest.mark.parametrize("op", ["LSTM", "RNN"])
def test_given_weights_are_checked_as_initializers_are(op):
    proto, values = _weight_graph(op=op)
    where = rf"{op} node 0 \(''\)"
    cases = [({"W": values["W"].astype(np.int64)}, TypeError,
              rf"{where}: W \(inputs\['W'\]\): expected a floating array \(float16, float32 or float64\), got int64"),
             ({"R": values["R"] > 0}, TypeError, r"R \(inputs\['R'\]\): expected a floating array .* got bool"),
             ({"B": np.where(np.arange(values["B"].size) == 3, np.nan, values["B"]).astype(np.float32)}, ValueError,
              rf"{where}: B \(inputs\['B'\]\): contains NaN or inf \(1 of {values['B'].size} values, first at "
              r"\(0, 3\)\)"),
             ({"W": np.full_like(values["W"], np.inf)}, ValueError, r"W \(inputs\['W'\]\): contains NaN or inf"),
             ({"W": values["W"][:, :-1]}, ValueError, r"W: expected shape \(1, \d+, input_size\), got \(1, "),
             ({"B": values["B"][:, :-1]}, ValueError, r"B: expected shape"),
             ({"W": values["W"].astype(np.float16), "R": values["R"].astype(np.float16),
               "B": values["B"].astype(np.float16)}, ValueError, r"W, R: expected float32 or float64, got float16"),
             ({"B": values["B"].astype(np.float64)}, ValueError, r"W, B: expected one dtype, got float32 and float64")]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            from_onnx(proto, inputs={**values, **change})
    doubled = from_onnx(proto, inputs={k: v.astype(np.float64) for k, v in values.items()})
    assert doubled.weight_ih_l0.dtype == torch.float64


def test_stored_weights_with_nan_are_refused():
    """The same checks apply to initializers: a NaN in a file is refused, not read into every output."""
    proto = to_onnx(lstmkit.LSTM(3, 4))
    init = next(t for t in proto.graph.initializer if t.name.startswith("W"))
    bad = numpy_helper.to_array(init).copy()
    bad.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(bad, init.name))
    with pytest.raises(ValueError, match=rf"LSTM node 0 .*: W: contains NaN or inf \(1 of {bad.size} values"):
        from_onnx(proto)
    scan = to_onnx(lstmkit.LSTM(3, 4, cell="layernorm"))
    init = next(t for t in scan.graph.initializer if t.name == "weight_hh_l0")
    bad = numpy_helper.to_array(init).copy()
    bad.flat[2] = np.inf
    init.CopyFrom(numpy_helper.from_array(bad, init.name))
    with pytest.raises(ValueError, match=r"initializer 'weight_hh_l0': contains NaN or inf"):
        from_onnx(scan)
