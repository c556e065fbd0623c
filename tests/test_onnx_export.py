"""lstmkit → ONNX: every export run by onnxruntime and compared with lstmkit's forward (1e-5 float32).

The reference is onnxruntime (CPUExecutionProvider) executing the exported graph: the ONNX
LSTM/RNN operator where it expresses the variant, Scan graphs of the cell's equations for
every variant, half-precision layers through float32; the round trips go through
``from_onnx`` and compare parameters exactly. What the operator cannot express is refused.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lstmkit
from lstmkit.convert import from_onnx, to_onnx
from lstmkit.convert.onnx import MIN_OPSET, SCAN_MIN_OPSET, operator_refusal
from onnx_checks import _close, _reference, _session
from variants import LSTM_VARIANTS

CASES = {
    "single": dict(),
    "stacked2": dict(num_layers=2),
    "stacked3": dict(num_layers=3),
    "bidirectional": dict(bidirectional=True),
    "bidirectional_stacked": dict(num_layers=2, bidirectional=True),
    "peephole": dict(cell="peephole"),
    "peephole_bidirectional_stacked": dict(cell="peephole", num_layers=2, bidirectional=True),
    "cifg": dict(cell="cifg"),
    "cifg_peephole_stacked": dict(cell="cifg+peephole", num_layers=2, bidirectional=True),
    "no_bias": dict(bias=False, num_layers=2),
    "forget_bias": dict(cell="vanilla+fb=1"),
    "chrono_output_bias": dict(cell="peephole+chrono=20+ob=-1"),
    "batch_first": dict(batch_first=True, num_layers=2, bidirectional=True),
    "odd_sizes": dict(input_size=1, hidden_size=7, num_layers=2, cell="peephole"),
}


@pytest.mark.parametrize("initial_states", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_onnxruntime_and_round_trips(case, with_lengths, initial_states):
    kw = dict(CASES[case])
    I, H = kw.pop("input_size", 3), kw.pop("hidden_size", 5)
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H, **kw).eval()
    if case == "forget_bias":
        assert torch.equal(layer.gates()["forget"].b, torch.ones(H))
    proto = to_onnx(layer, initial_states=initial_states, sequence_lens=with_lengths)
    onnx.checker.check_model(proto, full_check=True)
    sess = _session(proto)
    for T, B in ((6, 4), (1, 1), (3, 1), (1, 3)):  # dynamic T and B; T = 1 and B = 1 included
        gen = torch.Generator().manual_seed(T * 10 + B)
        x = torch.randn(T, B, I, generator=gen)
        if layer.batch_first:
            x = x.transpose(0, 1).contiguous()
        feeds = {"X": x.numpy()}
        lengths, state = None, None
        if with_lengths:
            lengths = torch.randint(1, T + 1, (B,), generator=gen)
            feeds["sequence_lens"] = lengths.to(torch.int32).numpy()
        if initial_states:
            n = layer.num_layers * layer.num_directions
            state = (torch.randn(n, B, H, generator=gen), torch.randn(n, B, H, generator=gen))
            feeds["initial_h"], feeds["initial_c"] = state[0].numpy(), state[1].numpy()
        got = sess.run(["Y", "Y_h", "Y_c"], feeds)
        want = _reference(layer, x, lengths, state)
        for name, a, b in zip(("Y", "Y_h", "Y_c"), got, want):
            _close(f"{case}/{name}", a, b)
    back = from_onnx(proto)
    assert isinstance(back, lstmkit.LSTM) and back.batch_first == layer.batch_first
    assert back.spec == layer.spec  # fb=, chrono=, … too: the metadata records them (not the nodes)
    assert list(back.state_dict()) == list(layer.state_dict())
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(2, 5, I) if layer.batch_first else torch.randn(5, 2, I)
    with torch.no_grad():
        for a, b in zip(back(x)[0:1] + back(x)[1], layer(x)[0:1] + layer(x)[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_exports_to_the_rnn_operator(nonlinearity):
    torch.manual_seed(1)
    layer = lstmkit.RNN(4, 6, num_layers=2, bidirectional=True, nonlinearity=nonlinearity).eval()
    proto = to_onnx(layer, sequence_lens=True, initial_states=True)
    assert [n.op_type for n in proto.graph.node].count("RNN") == 2
    x = torch.randn(5, 3, 4)
    lengths = torch.tensor([5, 2, 4])
    h0 = torch.randn(4, 3, 6)
    y, h = _session(proto).run(None, {"X": x.numpy(), "sequence_lens": lengths.int().numpy(), "initial_h": h0.numpy()})
    want = _reference(layer, x, lengths, h0)
    _close(f"rnn_{nonlinearity}/Y", y, want[0])
    _close(f"rnn_{nonlinearity}/Y_h", h, want[1])
    back = from_onnx(proto)
    assert isinstance(back, lstmkit.RNN) and back.nonlinearity == nonlinearity
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_the_graph_is_the_layer_in_eval_mode_and_states_follow_torch_indexing():
    torch.manual_seed(2)
    layer = lstmkit.LSTM(3, 4, num_layers=3, bidirectional=True, dropout=0.5)
    proto = to_onnx(layer, initial_states=True)
    layer.eval()
    assert [n.op_type for n in proto.graph.node].count("LSTM") == 3
    assert [n.op_type for n in proto.graph.node].count("Dropout") == 0
    names = [i.name for i in proto.graph.input]
    assert names == ["X", "initial_h", "initial_c"]
    assert [o.name for o in proto.graph.output] == ["Y", "Y_h", "Y_c"]
    # Perturb the initial state of one layer-direction only: exactly that slice must matter.
    x = torch.randn(4, 2, 3)
    h0, c0 = torch.zeros(6, 2, 4), torch.zeros(6, 2, 4)
    h0[3] = 1.0  # layer 1, reverse direction
    got = _session(proto).run(None, {"X": x.numpy(), "initial_h": h0.numpy(), "initial_c": c0.numpy()})
    for a, b in zip(got, _reference(layer, x, None, (h0, c0))):
        _close("state_indexing", a, b)
    zero = _session(proto).run(None, {"X": x.numpy(), "initial_h": 0 * h0.numpy(), "initial_c": c0.numpy()})
    assert np.abs(zero[0] - got[0]).max() > 1e-3  # the slice was used


@pytest.mark.parametrize("opset", [MIN_OPSET, 21])
def test_opsets(opset):
    layer = lstmkit.LSTM(2, 3).eval()
    proto = to_onnx(layer, opset=opset)
    assert proto.opset_import[0].version == opset
    x = torch.randn(3, 2, 2)
    _close(f"opset{opset}", _session(proto).run(["Y"], {"X": x.numpy()})[0], _reference(layer, x, None, None)[0])


def test_float64_layer_exports_float32_by_default_and_double_on_request():
    torch.manual_seed(3)
    layer = lstmkit.LSTM(3, 4).double().eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y = _session(to_onnx(layer)).run(["Y"], {"X": x.float().numpy()})[0]
    _close("float64_as_float32", y, _reference(layer, x, None, None)[0].astype(np.float32))
    proto = to_onnx(layer, dtype=torch.float64)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    back = from_onnx(proto)
    assert back.weight_ih_l0.dtype == torch.float64
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


REFUSED = {
    "layernorm": ("layernorm", "no layer normalisation"),
    "deep": (lstmkit.CellSpec(gate_hidden={"f": (4,)}), "not MLPs"),
    "fgr": ("fgr", "gate-to-gate recurrence"),
    "nig": ("nig", "always computes the input gate"),
    "nfg": ("nfg", "always computes the forget gate"),
    "nog": ("nog", "always computes the output gate"),
    "niaf": ("niaf", "identity candidate"),
    "noaf": ("noaf", "identity output"),
    "clip": ("clip=0.5", "clip bounds the gate pre-activations"),
    "zoneout": ("zoneout=0.1", "no zoneout"),
}


@pytest.mark.parametrize("variant", list(REFUSED))
def test_the_operator_refuses_what_it_cannot_express(variant, tmp_path):
    cell, why = REFUSED[variant]
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=rf"onnx: .*{why}.*, so variant '{variant}' .* cannot be written with it; "
                                         r"method='scan' \(or 'auto'\) writes the cell's equations as a Scan"):
        to_onnx(lstmkit.LSTM(3, 4, cell=cell), path, method="operator")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_projection_and_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"onnx: the LSTM operator has no projection, so proj_size=2"):
        to_onnx(lstmkit.LSTM(3, 4, proj_size=2), method="operator")
    with pytest.raises(ValueError, match=rf"opset: expected an int in \[{MIN_OPSET}, \d+\], got 7"):
        to_onnx(lstmkit.LSTM(3, 4), opset=7)
    with pytest.raises(ValueError, match=r"opset: a layernorm cell .* needs opset >= 17, got 16"):
        to_onnx(lstmkit.LSTM(3, 4, cell="layernorm"), opset=16)
    with pytest.raises(ValueError, match=r"dtype: expected torch.float32 or torch.float64, got torch.float16"):
        to_onnx(lstmkit.LSTM(3, 4), dtype=torch.float16)
    with pytest.raises(ValueError, match=r"method: expected 'auto', 'operator' or 'scan', got 'loop'"):
        to_onnx(lstmkit.LSTM(3, 4), method="loop")
    with pytest.raises(TypeError, match=r"model: expected an lstmkit LSTM or RNN, got LSTM"):
        to_onnx(torch.nn.LSTM(3, 4))
    with pytest.raises(ValueError, match="path: directory .* does not exist"):
        to_onnx(lstmkit.LSTM(3, 4), tmp_path / "missing" / "m.onnx")
    with pytest.raises(TypeError, match="path: expected a file name .*, got int"):
        to_onnx(lstmkit.LSTM(3, 4), 3)
    with pytest.raises(ValueError, match="model: the layer's parameters are on the meta device"):
        to_onnx(lstmkit.LSTM(3, 4, device="meta"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make,method", [(lambda: lstmkit.LSTM(3, 4, cell="peephole"), "scan"),
                                         (lambda: lstmkit.RNN(3, 4), "auto")], ids=["lstm_scan", "rnn_operator"])
def test_weights_with_the_negation_bit_export_as_their_values(make, method):
    """A weight carrying torch's negation bit (its memory negated) raised "Can't call numpy() on
    Tensor that has negative bit set" wherever no cast or reorder copied it first: every Scan
    export, the RNN operator."""
    torch.manual_seed(0)
    layer = make().eval()
    x = torch.randn(5, 2, 3)
    want = layer(x)[0].detach().numpy()
    for name, p in list(layer.named_parameters()):
        setattr(layer, name, torch.nn.Parameter((-p.detach()).clone()._neg_view(), requires_grad=False))
    (got,) = _session(to_onnx(layer, method=method)).run(["Y"], {"X": x.numpy()})
    _close("negative views", got, want)


def test_to_onnx_writes_atomically_and_replaces(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    layer = lstmkit.LSTM(3, 4).eval()
    proto = to_onnx(layer, path)
    assert path.read_bytes() == proto.SerializeToString()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    onnx.checker.check_model(str(path), full_check=True)
    back = from_onnx(path)
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


# ---------------------------------------------------------------------------- Scan graphs


def _truth(layer, x, lengths, state):
    """lstmkit's forward in float64 on the same (float32) parameter values: the exact result
    the float32 graph approximates. Two float32 implementations of layer norm each differ
    from it by up to ~7e-6 in different directions, so the float32 graph is held to 1e-5 of
    this rather than of lstmkit's own float32 rounding."""
    import copy

    wide = copy.deepcopy(layer).double()
    st = None if state is None else tuple(s.double() for s in state) if isinstance(state, tuple) else state.double()
    return _reference(wide, x.double(), lengths, st)


SCAN_CASES = dict(LSTM_VARIANTS, projection=lstmkit.CellSpec(peephole=True, layernorm=True))
#: The Scan variants whose graph is also checked as two layers and as one layer, batch-first, without
#: lengths or state, where the reverse direction is Scan's own: the stacking and that wrapper are the
#: same for every body, so a few bodies whose states or outputs differ (fgr's third state, a
#: projection's H_out, deep gates, layernorm with peephole and cifg) stand for all; every variant's
#: body runs in the first check (one bidirectional layer: each layer costs the traces of its input side).
SCAN_WRAPPER_CASES = ("fgr", "projection", "deep_all", "peephole+cifg+layernorm")


@pytest.mark.parametrize("variant", list(SCAN_CASES))
def test_every_variant_exports_as_a_scan_graph(variant):
    torch.manual_seed(6)
    proj = 2 if variant == "projection" else 0
    L = 2 if variant in SCAN_WRAPPER_CASES else 1
    layer = lstmkit.LSTM(3, 5, num_layers=L, bidirectional=True, proj_size=proj, cell=SCAN_CASES[variant]).eval()
    # the variant table says which variants the operator carries; onnxruntime then checks the graph
    expected_method = "operator" if operator_refusal(layer) is None else "scan"
    proto = to_onnx(layer, initial_states=True, sequence_lens=True)
    assert json.loads(proto.metadata_props[0].value)["onnx_method"] == expected_method
    assert ("Scan" in {n.op_type for n in proto.graph.node}) == (expected_method == "scan")
    sess = _session(proto)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, 3, generator=gen)
    lengths = torch.tensor([6, 2, 1, 5])
    state = (torch.randn(2 * L, 4, layer.output_size, generator=gen), torch.randn(2 * L, 4, 5, generator=gen))
    got = sess.run(None, {"X": x.numpy(), "sequence_lens": lengths.int().numpy(), "initial_h": state[0].numpy(),
                          "initial_c": state[1].numpy()})
    for name, a, b in zip(("Y", "Y_h", "Y_c"), got, _truth(layer, x, lengths, state)):
        _close(f"scan/{variant}/{name}", a, b.astype(np.float32))
    back = from_onnx(proto)
    if expected_method == "scan":
        assert back.spec == layer.spec  # the metadata carries the whole CellSpec
    assert list(back.state_dict()) == list(layer.state_dict())
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    if expected_method == "scan" and variant not in SCAN_WRAPPER_CASES:
        return
    # One layer, batch-first, no lengths and no state: the reverse direction is Scan's own.
    one = lstmkit.LSTM(3, 5, bidirectional=True, batch_first=True, proj_size=proj, cell=SCAN_CASES[variant]).eval()
    xb = torch.randn(4, 6, 3, generator=gen)
    got = _session(to_onnx(one)).run(None, {"X": xb.numpy()})
    for name, a, b in zip(("Y", "Y_h", "Y_c"), got, _truth(one, xb, None, None)):
        _close(f"scan/{variant}/{name}", a, b.astype(np.float32))


def test_scan_and_operator_graphs_agree():
    torch.manual_seed(8)
    for layer in (lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, cell="peephole+cifg").eval(),
                  lstmkit.RNN(3, 4, num_layers=2, bidirectional=True, nonlinearity="relu").eval()):
        x = torch.randn(5, 3, 3)
        lengths = torch.tensor([5, 1, 3])
        feeds = {"X": x.numpy(), "sequence_lens": lengths.int().numpy()}
        via_op = _session(to_onnx(layer, sequence_lens=True, method="operator")).run(None, feeds)
        scan = to_onnx(layer, sequence_lens=True, method="scan")
        via_scan = _session(scan).run(None, feeds)
        for a, b, c in zip(via_scan, via_op, _reference(layer, x, lengths, None)):
            _close("scan_vs_operator", a, b)
            _close("scan_vs_operator", a, c)
        back = from_onnx(scan)
        assert type(back) is type(layer) and all(torch.equal(back.state_dict()[k], v)
                                                 for k, v in layer.state_dict().items())


def test_scan_traces_with_the_kept_translation_table_equal_the_public_exporter(monkeypatch):
    # onnx_trace keeps torch.onnx.export's translation table per opset and calls the exporter's
    # core with it; a torch without that entry point takes the public torch.onnx.export. Both
    # must write the same graph, node for node.
    from lstmkit.convert import onnx_trace
    layer = lstmkit.LSTM(3, 4, cell="layernorm+clip=0.5").eval()
    monkeypatch.setattr(onnx_trace, "_CACHE", collections.OrderedDict())
    assert onnx_trace._exporter(17) is not None  # this torch has the entry point: the kept table runs
    kept = to_onnx(layer, sequence_lens=True)
    monkeypatch.setattr(onnx_trace, "_CACHE", collections.OrderedDict())
    monkeypatch.setattr(onnx_trace, "_exporter", lambda opset: None)
    public = to_onnx(layer, sequence_lens=True)
    assert kept.graph == public.graph
    x = torch.randn(5, 3, 3)
    got = _session(kept).run(None, {"X": x.numpy(), "sequence_lens": np.array([5, 2, 4], np.int32)})
    for a, b in zip(got, _reference(layer, x, torch.tensor([5, 2, 4]), None)):
        _close("kept_table", a, b)


def test_the_kept_traces_are_bounded(monkeypatch):
    """Each kept trace holds the weights it was traced from; exports of many shapes in one process
    kept them all (20 MiB after eight layernorm layers at H = 256-480). The least recently used go."""
    from lstmkit.convert import onnx_trace
    monkeypatch.setattr(onnx_trace, "_CACHE", collections.OrderedDict())
    monkeypatch.setattr(onnx_trace, "_CACHE_SIZE", 3)
    layers = [lstmkit.LSTM(3, h, cell="layernorm").eval() for h in (4, 5, 6)]
    first = to_onnx(layers[0])
    for layer in layers[1:]:
        to_onnx(layer)
        assert len(onnx_trace._CACHE) <= 3
    assert to_onnx(layers[0]).graph == first.graph  # traced again after it was dropped, the same graph


def test_scan_graph_at_the_oldest_opset():
    layer = lstmkit.LSTM(3, 4, cell="fgr+clip=0.5", proj_size=2).eval()
    with pytest.raises(ValueError, match=rf"written as a Scan graph, which needs opset >= {SCAN_MIN_OPSET}, got "
                                         rf"{MIN_OPSET} \(the LSTM/RNN operator alone needs {MIN_OPSET}\)"):
        to_onnx(layer, opset=MIN_OPSET)
    proto = to_onnx(layer, opset=SCAN_MIN_OPSET)
    x = torch.randn(5, 2, 3)
    for a, b in zip(_session(proto).run(None, {"X": x.numpy()}), _reference(layer, x, None, None)):
        _close("scan_opset14", a, b)


def test_a_cell_the_exporter_cannot_write_at_an_opset_is_refused_with_the_one_it_needs(capfd):
    """heads: the traced step holds an operator without a converter from opset 16 to 15 — refused
    naming 16 (not the exporter's own 18), and written at 16; the exporter's internal logging
    (torchvision's absence, each conversion's fallback, a failed one's traceback) stays quiet."""
    layer = lstmkit.LSTM(3, 8, cell="heads=2").eval()
    with pytest.raises(ValueError, match=r"this cell's equations as ONNX need opset >= 16, got 15"):
        to_onnx(layer, opset=15)
    proto = to_onnx(layer, opset=16)
    assert proto.opset_import[0].version == 16
    x = torch.randn(5, 2, 3)
    for a, b in zip(_session(proto).run(None, {"X": x.numpy()}), _reference(layer, x, None, None)):
        _close("heads_opset16", a, b)
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_a_tampered_scan_graph_is_refused():
    proto = to_onnx(lstmkit.LSTM(3, 4, cell="layernorm"))
    for t in proto.graph.initializer:
        if t.name == "ln_c_weight_l0":
            t.CopyFrom(numpy_helper.from_array(np.ones(5, dtype=np.float32), "ln_c_weight_l0"))
    with pytest.raises(ValueError, match=r"ln_c_weight_l0: expected shape \(4,\) for lstmkit.LSTM\(3, 4, "
                                         r"cell='layernorm'\), got \(5,\)"):
        from_onnx(proto)
    config = json.loads(proto.metadata_props[0].value)
    proto.metadata_props[0].value = json.dumps({**config, "hidden_size": 10**6})  # hostile: asks for terabytes
    with pytest.raises(ValueError, match=r"weight_ih_l0: expected shape \(4000000, 3\) for lstmkit.LSTM\(3, "
                                         r"1000000, .*got \(16, 3\)"):
        from_onnx(proto)  # refused from the shapes alone, nothing allocated
    kept = [n for n in proto.graph.node if n.op_type != "Scan"]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    with pytest.raises(ValueError, match="the metadata says the layer was written as Scan graphs, but there is no "
                                         "Scan node"):
        from_onnx(proto)


def test_clip_attribute_is_not_lstmkit_cell_clip():
    """The reason clip is refused, shown with onnxruntime: ONNX clips pre-activations, not c_t."""
    torch.manual_seed(4)
    clipped = lstmkit.LSTM(3, 4, cell="clip=0.3").eval()
    plain = lstmkit.LSTM(3, 4).eval()
    plain.load_state_dict(clipped.state_dict())
    proto = to_onnx(plain)
    for n in proto.graph.node:
        if n.op_type == "LSTM":
            n.attribute.append(helper.make_attribute("clip", 0.3))
    x = 3 * torch.randn(6, 2, 3)
    y = _session(proto).run(["Y_c"], {"X": x.numpy()})[0]
    with torch.no_grad():
        c_kit = clipped(x)[1][1].numpy()
    assert np.abs(y - c_kit).max() > 1e-2  # different functions
    assert np.abs(c_kit).max() <= 0.3 + 1e-7 < np.abs(y).max()  # lstmkit bounds c_t; ONNX does not
    with pytest.raises(ValueError, match=r"clip=0.3.* bounds the gate pre-activations"):
        from_onnx(proto)


# ------------------------------------------------ to_onnx: half-precision layers


@pytest.mark.parametrize("method", ["operator", "scan"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_export_through_float32(dtype, method):
    """A bfloat16 / float16 layer is written in float32 (exact), by the operator as by the Scan:
    onnxruntime computes what the layer computes in float32."""
    torch.manual_seed(9)
    layer = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True).to(dtype).eval()
    proto = to_onnx(layer, method=method)
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    wide = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True).eval()
    wide.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(5, 2, 3)
    got = _session(proto).run(None, {"X": x.numpy()})
    for name, a, b in zip(("Y", "Y_h", "Y_c"), got, _reference(wide, x, None, None)):
        _close(f"{dtype}/{method}/{name}", a, b)
    back = from_onnx(proto)
    for k, v in wide.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("cell", ["peephole+fb=1", "chrono=20", "gate_act=hard_sigmoid+ib=-1+ob=0.5"])
def test_the_operator_path_keeps_what_its_metadata_records(cell, tmp_path):
    """A layer written as ONNX LSTM nodes reads back with the initial biases and the dropout that
    to_onnx records in the metadata (the nodes cannot say them; they were lost), as the Scan path
    and .safetensors do — and a graph whose nodes compute another cell keeps the nodes' cell."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, num_layers=2, dropout=0.25, cell=cell)
    path = tmp_path / "m.onnx"
    lstmkit.convert.to_onnx(layer, path, method="operator")
    back = lstmkit.convert.from_onnx(path)
    assert back.spec == layer.spec and repr(back) == repr(layer)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(back.eval()(x)[0], layer.eval()(x)[0])
    model = onnx.load(path)  # the metadata made to say another cell: the nodes decide
    entry = next(p for p in model.metadata_props if p.key == "lstmkit.config")
    config = json.loads(entry.value)
    config["cell_spec"]["peephole"] = not config["cell_spec"]["peephole"]
    entry.value = json.dumps(config)
    onnx.save(model, path)
    assert lstmkit.convert.from_onnx(path).spec.peephole == layer.spec.peephole
