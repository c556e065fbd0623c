"""Damaged and hostile model files: one clear ValueError naming the file and what is wrong, found
before anything large is built — no hang, no deep-inside exception, no silently different model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lstmkit
from lstmkit.convert import from_flashrnn, from_onnx, read_layer
from lstmkit.convert.layer_config import layer_config

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _lstm_model(attrs: dict | None = None, pre_nodes: tuple = (), x_name: str = "X", W=None) -> onnx.ModelProto:
    """One ONNX LSTM node (H = 4, I = 3) reading X (or ``x_name`` after ``pre_nodes``)."""
    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.standard_normal((1, 16, 3)).astype(np.float32), "W") if W is None else W
    R = numpy_helper.from_array(rng.standard_normal((1, 16, 4)).astype(np.float32), "R")
    node = helper.make_node("LSTM", [x_name, "W", "R"], ["Y", "Y_h", "Y_c"], name="n0", hidden_size=4,
                            **(attrs or {}))
    graph = helper.make_graph([*pre_nodes, node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                                       ["T", "B", 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=[W, R])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_plain_model_of_these_tests_reads():
    assert isinstance(from_onnx(_lstm_model()), lstmkit.LSTM)


@pytest.mark.parametrize("op", ["Identity", "Transpose"])
def test_a_cycle_in_front_of_the_layer_is_refused_not_followed_forever(op):
    attrs = {"perm": [1, 0, 2]} if op == "Transpose" else {}
    cycle = (helper.make_node(op, ["b"], ["a"], **attrs), helper.make_node(op, ["a"], ["b"], **attrs))
    with pytest.raises(ValueError, match="the graph has a cycle: tensor 'a' is computed from itself"):
        from_onnx(_lstm_model(pre_nodes=cycle, x_name="a"))


@pytest.mark.parametrize("attribute, value, kind", [
    ("activations", helper.make_attribute("activations", [1, 2, 3]), "INTS"),
    ("hidden_size", helper.make_attribute("hidden_size", 4.7), "FLOAT"),
    ("input_forget", helper.make_attribute("input_forget", 1.5), "FLOAT"),
    ("layout", helper.make_attribute("layout", 0.9), "FLOAT"),
    ("activation_alpha", helper.make_attribute("activation_alpha", 1.0), "FLOAT"),
])
def test_an_attribute_of_the_wrong_type_is_refused_not_converted(attribute, value, kind):
    """(an INTS ``activations`` raised AttributeError deep inside; a FLOAT hidden_size 4.7 was read as 4)"""
    model = _lstm_model()
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != attribute]
    del node.attribute[:]
    node.attribute.extend([*kept, value])
    with pytest.raises(ValueError, match=f"attribute {attribute} is {kind}; the LSTM operator takes"):
        from_onnx(model)


def test_a_tensor_of_an_unknown_data_type_is_refused_naming_it():
    W = numpy_helper.from_array(np.zeros((1, 16, 3), np.float32), "W")
    W.data_type = 999
    with pytest.raises(ValueError, match=r"tensor 'W' \(data_type 999, dims \[1, 16, 3\]\) cannot be read"):
        from_onnx(_lstm_model(W=W))


# ---------------------------------------------------------------------------- state dicts and safetensors


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in lstmkit.LSTM(3, 4).state_dict().items()}


def test_a_key_naming_a_huge_layer_is_refused_without_counting_to_it(tmp_path):
    """(``set(range(10**20))``: a 2 KB file exhausted the memory)"""
    sd = _state_dict()
    sd["weight_ih_l99999999999999999999"] = sd["weight_ih_l0"]
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"layers \[0, 99999999999999999999\] are not numbered"):
        read_layer(tmp_path / "m.pt")


@pytest.mark.parametrize("fmt", ["lstmkit-layer-1", "lstmkit-weights-1"])
def test_a_huge_num_layers_in_the_metadata_is_refused_before_building(tmp_path, fmt):
    """(a 2**31-layer probe was built on the meta device: minutes, gigabytes)"""
    layer = lstmkit.LSTM(3, 4)
    if fmt == "lstmkit-layer-1":
        tensors = {k: v.contiguous() for k, v in layer.state_dict().items()}
        config = dict(layer_config(layer), num_layers=2**31)
    else:
        tensors = {"rnn." + k: v.contiguous() for k, v in layer.state_dict().items()}
        config = {"model": "lstm", "hidden_size": 4, "num_layers": 2**31, "bidirectional": False, "cell": "vanilla"}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": fmt, "config": json.dumps(config)})
    with pytest.raises(ValueError, match="num_layers=2147483648, but the file holds 4 tensors"):
        read_layer(tmp_path / "m.safetensors")


@pytest.mark.parametrize("key, value, expected", [
    ("batch_first", "false", "boolean"), ("bidirectional", 1, "boolean"), ("hidden_size", "4", "integer"),
    ("hidden_size", 4.5, "integer"), ("num_layers", True, "integer"), ("dropout", "0.5", "number"),
])
def test_metadata_values_of_the_wrong_json_type_are_refused_not_converted(tmp_path, key, value, expected):
    """(``bool("false")`` is True: a time-major layer was read as batch-first)"""
    layer = lstmkit.LSTM(3, 4)
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "m.safetensors",
              metadata={"format": "lstmkit-layer-1", "config": json.dumps({**layer_config(layer), key: value})})
    with pytest.raises(ValueError, match=f"{key}: expected a JSON {expected}, got {value!r}"):
        read_layer(tmp_path / "m.safetensors")


def test_json_nested_too_deeply_is_refused(tmp_path):
    layer = lstmkit.LSTM(3, 4)
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "m.safetensors",
              metadata={"format": "lstmkit-layer-1", "config": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ValueError, match="JSON nested too deeply to read"):
        read_layer(tmp_path / "m.safetensors")


def test_a_one_dimensional_weight_in_a_training_file_is_refused(tmp_path):
    layer = lstmkit.LSTM(3, 4)
    tensors = {"rnn." + k: v.contiguous() for k, v in layer.state_dict().items()}
    tensors["rnn.weight_ih_l0"] = torch.zeros(16)
    config = {"model": "lstm", "hidden_size": 4, "num_layers": 1, "bidirectional": False, "cell": "vanilla"}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "lstmkit-weights-1",
                                                             "config": json.dumps(config)})
    with pytest.raises(ValueError, match="damaged metadata or no rnn weights"):
        read_layer(tmp_path / "m.safetensors")


@pytest.mark.parametrize("bad", ["nan", "overflow"])
def test_nan_or_a_value_beyond_the_dtype_is_refused_naming_the_parameter(tmp_path, bad):
    """(converted silently, into a file lstmkit's own from_onnx then refused)"""
    sd = _state_dict()
    if bad == "nan":
        sd["weight_hh_l0"][1, 2] = float("nan")
    else:  # float64 1e300 among float32 tensors: the layer takes the widest dtype, which holds it
        sd["weight_hh_l0"] = sd["weight_hh_l0"].double()
        sd["weight_hh_l0"][1, 2] = 1e300
    torch.save(sd, tmp_path / "m.pt")
    if bad == "nan":
        with pytest.raises(ValueError, match=r"weight_hh_l0: contains NaN or inf as torch.float32 \(1 of 64 values, "
                                             r"first at \(1, 2\)"):
            read_layer(tmp_path / "m.pt")
    else:
        layer = read_layer(tmp_path / "m.pt")
        assert layer.weight_hh_l0.dtype == torch.float64 and layer.weight_hh_l0[1, 2].item() == 1e300
    # a value beyond the layer's dtype: float64 1e300 into float32 flashrnn weights' layer is inf
    with pytest.raises(ValueError, match="bias_ih_l0: contains NaN or inf"):
        from_flashrnn(torch.randn(4, 2, 2, 2), torch.full((4, 2, 2), 1e300, dtype=torch.float64), torch.randn(16, 3))


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_a_sparse_or_meta_tensor_is_refused_naming_it(tmp_path, kind):
    sd = _state_dict()
    sd["weight_hh_l0"] = sd["weight_hh_l0"].to_sparse() if kind == "sparse" else sd["weight_hh_l0"].to("meta")
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(TypeError, match="weight_hh_l0: expected a dense tensor with values, got a (sparse_coo|meta) tensor"):
        read_layer(tmp_path / "m.pt")


def test_recorded_batch_first_that_the_graph_contradicts_is_refused():
    """(the metadata's batch_first overrode the graph's layout: a time-major graph imported as batch-first
    computed 0.25 off onnxruntime)"""
    model = _lstm_model()
    helper.set_model_props(model, {"lstmkit.config": json.dumps({"batch_first": True})})
    with pytest.raises(ValueError, match="batch_first=True, but the graph reads its input time-major"):
        from_onnx(model)
    helper.set_model_props(model, {"lstmkit.config": json.dumps({"batch_first": False})})
    assert from_onnx(model).batch_first is False


def test_a_weight_defined_twice_is_refused():
    """(W both an initializer and a Constant node's output: lstmkit read one, onnxruntime ran the other,
    0.85 apart)"""
    model = _lstm_model()
    value = numpy_helper.from_array(np.ones((1, 16, 3), np.float32), "W")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], name="c", value=value))
    with pytest.raises(ValueError, match="'W' is defined twice"):
        from_onnx(model)


def test_a_one_dimensional_projection_in_a_state_dict_is_refused(tmp_path):
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in lstmkit.LSTM(3, 4, proj_size=2).state_dict().items()}
    sd["weight_hr_l0"] = sd["weight_hr_l0"].reshape(-1)
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"weight_hr_l0 must be a 2-D \(proj_size, hidden_size\) matrix"):
        read_layer(tmp_path / "m.pt")


@pytest.mark.parametrize("make", [lambda t: t.to_sparse(), lambda t: t.to("meta"), lambda t: t.to(torch.float8_e4m3fn)],
                         ids=["sparse", "meta", "float8"])
def test_peer_state_dicts_of_tensors_without_dense_values_are_refused(make):
    from lstmkit.convert import from_xlstm_slstm

    R, b = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2)
    with pytest.raises(TypeError, match="R: expected a"):
        from_flashrnn(make(R), b)
    with pytest.raises(TypeError, match=r"state_dict\['_recurrent_kernel_'\]: expected a"):
        from_xlstm_slstm({"_recurrent_kernel_": make(torch.randn(2, 8, 2)), "_bias_": torch.randn(16)})
    with pytest.raises(TypeError, match=r"state_dict: expected names \(str\) as keys, got \[0\]"):
        from_xlstm_slstm({0: torch.randn(2, 8, 2)})


def test_a_pt_whose_record_expands_a_thousandfold_is_refused_before_loading(tmp_path):
    """(a 1 MB .pt with a deflated 1 GiB storage record: 1.28 GB allocated before any check)"""
    import zipfile

    torch.save(_state_dict(), tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as good, \
            zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as bomb:
        for info in good.infolist():
            data = good.read(info)
            if "/data/" in info.filename and info.filename.rsplit("/", 1)[-1].isdigit():
                data = data + bytes(32 * 2**20)  # a storage far larger than its shape says
            bomb.writestr(info.filename, data)
    with pytest.raises(ValueError, match="expands from .* bytes; torch.save stores records uncompressed"):
        read_layer(tmp_path / "bomb.pt")
    assert isinstance(read_layer(tmp_path / "m.pt"), lstmkit.LSTM)


def test_a_weights_h5_claiming_more_than_it_holds_is_refused_before_building(tmp_path):
    """(a 14 KB file of unallocated datasets claiming units=12000 allocated 5 GB before failing)"""
    h5py = pytest.importorskip("h5py")
    from lstmkit.convert import write_layer

    path = tmp_path / "m.weights.h5"
    write_layer(lstmkit.LSTM(3, 4), path)
    assert isinstance(read_layer(path), lstmkit.LSTM)
    units = 12000
    with h5py.File(path, "r+") as fh:
        variables = fh["layers/lstm/cell/vars"]
        for key, shape in (("0", (3, 4 * units)), ("1", (units, 4 * units)), ("2", (4 * units,))):
            del variables[key]
            variables.create_dataset(key, shape=shape, dtype="f4", chunks=True)
    with pytest.raises(ValueError, match="its datasets claim 2,304,768,000 bytes of weights but the file holds"):
        read_layer(path)


def test_a_configuration_field_of_the_wrong_type_is_named_once(tmp_path):
    layer = lstmkit.LSTM(3, 4)
    for key, value, message in (("proj_size", None, "proj_size: expected a JSON integer, got None"),
                                ("kind", 3, "kind: expected a JSON string, got 3")):
        save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "m.safetensors",
                  metadata={"format": "lstmkit-layer-1", "config": json.dumps({**layer_config(layer), key: value})})
        with pytest.raises(ValueError) as info:
            read_layer(tmp_path / "m.safetensors")
        assert str(info.value).count("damaged configuration") == 1 and message in str(info.value)


def test_flashrnn_tensors_with_an_empty_side_are_refused_naming_them():
    """(They were refused as input_size = 0 or CellSpec.heads = 0: names the caller never gave.)"""
    R, b = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match=r"^W: expected \(4H, I\) with 4H = 24 and I >= 1, got \(24, 0\)"):
        from_flashrnn(R, b, torch.randn(24, 0))
    with pytest.raises(ValueError, match=r"^R: expected \(4, NH, D, D\) .*NH, D >= 1\), got \(4, 0, 3, 3\)"):
        from_flashrnn(torch.randn(4, 0, 3, 3), torch.randn(4, 0, 3))
    with pytest.raises(ValueError, match=r"^R: .*got \(4, 2, 0, 0\)"):
        from_flashrnn(torch.randn(4, 2, 0, 0), torch.randn(4, 2, 0))
