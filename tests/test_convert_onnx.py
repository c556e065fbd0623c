"""ONNX ⇄ lstmkit: every export run by onnxruntime and compared with lstmkit's forward (1e-5 float32).

The reference is onnxruntime (CPUExecutionProvider) executing the exported graph; the
round trips go through ``from_onnx`` and compare parameters exactly. Foreign graphs come
from ``torch.onnx.export(nn.LSTM)`` and from ``onnx.helper`` by hand.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstmkit.convert import from_onnx, to_onnx
from lstmkit.convert.onnx import MIN_OPSET, SCAN_MIN_OPSET, operator_refusal
from variants import LSTM_VARIANTS

RTOL = ATOL = 1e-5  # float32, as the issue states


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _close(case: str, actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, f"{case}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=case)


def _reference(layer, x, lengths, state):
    """lstmkit's own forward: output (padded with zeros past each length) and final states."""
    with torch.no_grad():
        if lengths is None:
            y, st = layer(x, state)
        else:
            xt = x.transpose(0, 1) if layer.batch_first else x
            packed = pack_padded_sequence(xt, lengths, enforce_sorted=False)
            y, st = layer(packed, state)
            y, _ = pad_packed_sequence(y, total_length=xt.shape[0], batch_first=layer.batch_first)
    states = list(st) if isinstance(st, tuple) else [st]
    return [y.numpy()] + [s.numpy() for s in states]


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


def _same_weights_and_onnxruntime(layer, ref, proto, x, what: str) -> None:
    """``layer`` read from ``proto`` holds ``ref``'s weights exactly and computes onnxruntime's
    Y, Y_h, Y_c on ``x`` (the graph's one input, named ``x``)."""
    for k, v in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k
    y_ort = _session(proto).run(None, {"x": x.numpy()})
    with torch.no_grad():
        y, (h, c) = layer(x)
    for name, a, b in zip(("Y", "Y_h", "Y_c"), (y, h, c), y_ort):
        _close(f"{what}/{name}", a.numpy(), b)


def _hand_graph(attrs: dict, *, H=3, I=2, D=1, extra_nodes=(), x_name="X", initial_h=None, initial_c=None,
                w_input=False):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((D, 4 * H, H)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.standard_normal((D, 8 * H)).astype(np.float32), "B")]
    if not w_input:
        inits.append(numpy_helper.from_array(rng.standard_normal((D, 4 * H, I)).astype(np.float32), "W"))
    ins = [x_name, "W", "R", "B", "", ""]
    if initial_h is not None:
        inits.append(numpy_helper.from_array(initial_h.astype(np.float32), "h0"))
        ins[5] = "h0"
    if initial_c is not None:
        inits.append(numpy_helper.from_array(initial_c.astype(np.float32), "c0"))
        ins.append("c0")
    nodes = list(extra_nodes) + [helper.make_node("LSTM", ins, ["Y", "Y_h", "Y_c"], hidden_size=H, **attrs)]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", I])]
    if w_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [D, 4 * H, I]))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")]
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17)]
    return helper.make_model(g, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


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
