"""Gate views show the textbook matrices and write into the fused storage; describe counts."""

from __future__ import annotations

import io

import pytest
import torch

import lstmkit

I, H = 3, 4


def test_gate_views_are_slices_of_fused_storage():
    m = lstmkit.LSTM(I, H, num_layers=2, bidirectional=True).double()
    for layer in range(2):
        for d in range(2):
            p = m.layer_params(layer, d)
            g = m.gates(layer, d)
            assert list(g) == ["input", "forget", "candidate", "output"]
            for k, name in enumerate(g):
                v = g[name]
                rows = slice(k * H, (k + 1) * H)
                n_in = I if layer == 0 else 2 * H
                assert v.W.shape == (H, n_in + H)  # N_c × (N_i + N_c)
                torch.testing.assert_close(v.W, torch.cat([p["weight_ih"][rows], p["weight_hh"][rows]], 1))
                torch.testing.assert_close(v.b, p["bias_ih"][rows] + p["bias_hh"][rows])
                assert v.W_x.data_ptr() == p["weight_ih"][rows].data_ptr()  # a view, not a copy
            assert [g[n].activation for n in g] == ["sigmoid", "sigmoid", "tanh", "sigmoid"]


def test_textbook_step_from_gate_views_equals_layer():
    torch.manual_seed(0)
    m = lstmkit.LSTM(I, H, cell="peephole").double()
    g = m.gates()
    x = torch.randn(1, 2, I, dtype=torch.float64)
    h0 = torch.randn(1, 2, H, dtype=torch.float64)
    c0 = torch.randn(1, 2, H, dtype=torch.float64)
    xh = torch.cat([x[0], h0[0]], dim=1)  # [x_t, h_{t-1}]

    def pre(name):
        return xh @ g[name].W.T + g[name].b

    i = torch.sigmoid(pre("input") + g["input"].peephole * c0[0])
    f = torch.sigmoid(pre("forget") + g["forget"].peephole * c0[0])
    c = f * c0[0] + i * torch.tanh(pre("candidate"))
    o = torch.sigmoid(pre("output") + g["output"].peephole * c)
    h = o * torch.tanh(c)
    y, (h_n, c_n) = m(x, (h0, c0))
    torch.testing.assert_close(c_n[0], c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[0], h, rtol=1e-12, atol=1e-12)


def test_editing_gate_views_changes_output_as_equations_say():
    torch.manual_seed(0)
    m = lstmkit.LSTM(I, H).double()
    g = m.gates()
    x = torch.randn(5, 2, I, dtype=torch.float64)
    c0 = torch.randn(1, 2, H, dtype=torch.float64)
    h0 = torch.zeros(1, 2, H, dtype=torch.float64)
    # Forget gate wide open, input gate shut: the carousel keeps c exactly.
    g["forget"].W = torch.zeros(H, I + H, dtype=torch.float64)
    g["forget"].b = torch.full((H,), 60.0, dtype=torch.float64)
    g["input"].W = torch.zeros(H, I + H, dtype=torch.float64)
    g["input"].b = torch.full((H,), -60.0, dtype=torch.float64)
    assert torch.all(m.bias_ih_l0[H:2 * H] == 60.0) and torch.all(m.bias_hh_l0[H:2 * H] == 0.0)
    _, (_, c_n) = m(x, (h0, c0))
    torch.testing.assert_close(c_n, c0, rtol=1e-12, atol=1e-12)
    # Output gate shut: the output is zero whatever the cell holds.
    g["output"].W = torch.zeros(H, I + H, dtype=torch.float64)
    g["output"].b = torch.full((H,), -60.0, dtype=torch.float64)
    y, _ = m(x, (h0, c0))
    assert y.abs().max() < 1e-20
    with pytest.raises(ValueError, match=r"W: expected shape \(4, 7\)"):
        g["output"].W = torch.zeros(H, I)


@pytest.mark.parametrize("cell,absent", [
    ("nig", {"input": "i ≡ 1"}), ("nfg", {"forget": "f ≡ 1"}), ("nog", {"output": "o ≡ 1"}),
    ("cifg", {"forget": "f = 1 − i"}), ("niaf", {}),
])
def test_absent_gates_are_reported(cell, absent):
    m = lstmkit.LSTM(I, H, cell=cell)
    g = m.gates()
    for name, v in g.items():
        if name in absent:
            assert not v.present and absent[name] in v.note and v.W is None
        else:
            assert v.present
    if cell == "niaf":
        assert g["candidate"].activation == "identity"


@pytest.mark.parametrize("kwargs", [
    dict(cell="vanilla"), dict(cell="peephole+layernorm", num_layers=2, bidirectional=True),
    dict(cell="fgr+cifg", proj_size=2), dict(cell=lstmkit.CellSpec(gate_hidden={"f": (5, 3), "g": (2,)})),
    dict(cell="nig+nog+clip=2", bias=False),
])
def test_describe_counts_every_parameter(kwargs):
    m = lstmkit.LSTM(I, H, **kwargs)
    buf = io.StringIO()
    text = lstmkit.describe(m, file=buf)
    assert buf.getvalue() == text
    total = sum(p.numel() for p in m.parameters())
    assert f"parameters: {total:,}" in text
    body = [line for line in text.splitlines() if line[:1].isdigit()]
    assert sum(int(line.split()[-1]) for line in body) == total  # the rows add up
    assert "n × (I + H)" in text


def test_describe_vanilla_rows_and_rnn():
    text = lstmkit.describe(lstmkit.LSTM(10, 20), file=io.StringIO())
    assert "20 × (10 + 20)" in text and text.count("sigmoid") == 3 and "tanh" in text
    assert "parameters: 2,560" in text  # 4·20·(10+20) + 2·4·20
    rnn = lstmkit.describe(lstmkit.RNN(10, 20), file=io.StringIO())
    assert "parameters: 640" in rnn
    with pytest.raises(ValueError, match="model: expected an lstmkit LSTM, RNN or LSTMCell"):
        lstmkit.describe(torch.nn.Linear(2, 2), file=io.StringIO())


@pytest.mark.parametrize("cell", ["peephole", "cifg+layernorm", lstmkit.CellSpec(gate_hidden=(3,)), "heads=2",
                                  "slstm"])
def test_describe_and_gates_take_an_lstm_cell(cell):
    """An LSTMCell is tabulated as a one-layer, one-direction layer (it was left out, and the
    total fell short by its parameters); its gates are views of its parameters."""
    model = torch.nn.ModuleDict({"enc": lstmkit.LSTM(I, H), "dec": lstmkit.LSTMCell(H, H, cell=cell)})
    text = lstmkit.describe(model, file=io.StringIO())
    assert f"dec: LSTMCell({H} → {H})" in text
    assert f"total parameters: {sum(p.numel() for p in model.parameters()):,}" in text
    body = [line for line in text.split("dec: ")[1].splitlines() if line[:1].isdigit()]
    assert sum(int(line.split()[-1]) for line in body) == sum(p.numel() for p in model["dec"].parameters())
    gate = model["dec"].gates()["g"]
    with torch.no_grad():
        gate.W_x.fill_(0.25)
    assert int((model["dec"].weight_ih == 0.25).sum()) == gate.W_x.numel()  # the view wrote the parameter
    with pytest.raises(ValueError, match="layer"):
        model["dec"].gates(layer=1)


def test_describe_model_with_several_layers():
    model = torch.nn.Sequential(lstmkit.LSTM(3, 4), torch.nn.Linear(4, 2))
    text = lstmkit.describe(model, file=io.StringIO())
    assert "0: LSTM(3 → 4)" in text


def test_describe_prints_to_a_stream_that_cannot_encode_its_symbols():
    """An ASCII stream (a C-locale terminal, a file opened so) got UnicodeEncodeError at '→'."""
    model = torch.nn.ModuleDict({"zoné": lstmkit.LSTM(3, 4)})
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    text = lstmkit.describe(model, file=stream)
    stream.flush()
    printed = raw.getvalue().decode("ascii")
    assert "zoné: LSTM(3 → 4)" in text  # the returned text as it is
    assert "zon?: LSTM(3 -> 4)" in printed and "4 x (3 + 4)" in printed
    assert printed.count("\n") == text.count("\n")


@pytest.mark.parametrize("cell, want", [
    ("gate_act=hard_sigmoid", ["hard_sigmoid", "hard_sigmoid", "tanh", "hard_sigmoid"]),
    ("cifg+gate_act=hardsigmoid+cand_act=relu", ["hardsigmoid", "hardsigmoid", "relu", "hardsigmoid"]),
    ("slstm", ["exp", "sigmoid", "tanh", "sigmoid"]),
    ("slstm+forget_act=exp", ["exp", "exp", "tanh", "sigmoid"]),
])
def test_each_gate_names_the_activation_it_computes(cell, want):
    """(Every gate but the candidate said "sigmoid", whatever ``gate_act`` or the sLSTM.)"""
    layer = lstmkit.LSTM(I, H, cell=cell)
    assert [v.activation for v in layer.gates().values()] == want
    assert all(f" {a} " in lstmkit.describe(layer, file=io.StringIO()) for a in set(want))


def test_gates_by_letter_and_the_errors_of_inspection():
    layer = lstmkit.LSTM(I, H, cell="peephole")
    g = layer.gates()
    assert g["f"] is g["forget"] and g["i"].name == "input"
    with pytest.raises(KeyError, match=r"'forgets': the gates are 'input', 'forget', 'candidate', 'output'"):
        g["forgets"]
    with pytest.raises(TypeError, match="model: expected an lstmkit LSTM, RNN or LSTMCell"):
        lstmkit.describe(3)
    flow = lstmkit.gradient_flow(layer, torch.randn(4, 2, I), lambda y: y.sum())
    with pytest.raises(ValueError, match="layer"):
        flow.summary(layer=7)


@pytest.mark.parametrize("file", ["out.txt", "path", 3, b"out.txt"], ids=["str", "pathlib", "int", "bytes"])
def test_describe_refuses_a_file_without_write_before_building_the_table(file, monkeypatch, tmp_path):
    """``file="out.txt"`` built the whole table, then raised AttributeError: 'str' object has no
    attribute 'write'. ``file`` is a stream (the docstring's IO[str]): anything else is a
    TypeError naming it, before any work; nothing is written anywhere."""
    import pathlib

    import lstmkit.inspect as inspect_module

    monkeypatch.chdir(tmp_path)
    file = pathlib.Path("out.txt") if file == "path" else file
    built = []
    monkeypatch.setattr(inspect_module, "_rows_of", lambda layer: built.append(layer) or [])
    with pytest.raises(TypeError, match=r"^file: expected a text stream with a write method .* got "
                                        rf"{type(file).__name__}"):
        lstmkit.describe(lstmkit.LSTM(I, H), file=file)
    assert built == [] and list(tmp_path.iterdir()) == []
    if isinstance(file, (str, pathlib.Path)):
        with pytest.raises(TypeError, match=r"a path\? pass an open text file"):
            lstmkit.describe(lstmkit.LSTM(I, H), file=file)


def _state(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _same_state(layer: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = layer.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


BAD_GATE_VALUES = {
    "float": (1.0, TypeError, r"expected a tensor of shape .*, got float; convert it, e\.g\. torch\.(full|zeros)"),
    "numpy": ("numpy", TypeError, r"expected a tensor of shape .*, got ndarray; convert it, e\.g\. torch\.from_numpy"),
    "list": ("list", TypeError, r"expected a tensor of shape"),
    "meta": ("meta", TypeError, r"expected a dense tensor with values, got a meta tensor"),
    "sparse": ("sparse", TypeError, r"expected a dense tensor with values, got a sparse_coo tensor"),
    "complex": ("complex", TypeError, r"expected a floating-point tensor .* got torch\.complex64"),
    "int": ("int", TypeError, r"expected a floating-point tensor .* got torch\.int64"),
    "shape": ("shape", ValueError, r"expected shape"),
    "nan": ("nan", ValueError, r"contains NaN or inf as torch\.float32 \(1 of \d+ values, first at \(0,"),
    "inf": ("inf", ValueError, r"contains NaN or inf"),
    "beyond_float32": ("big", ValueError, r"contains NaN or inf as torch\.float32 .*beyond the dtype's range"),
}


def _bad_value(kind, shape):
    import numpy as np

    if not isinstance(kind, str):
        return kind
    good = torch.randn(shape)
    return {"numpy": lambda: np.zeros(shape, dtype=np.float32), "list": lambda: good.tolist(),
            "meta": lambda: torch.zeros(shape, device="meta"), "sparse": lambda: good.to_sparse(),
            "complex": lambda: good.to(torch.complex64), "int": lambda: good.long(),
            "shape": lambda: torch.zeros(shape[0] + 1, *shape[1:]),
            "nan": lambda: _one_at_0(good, float("nan")), "inf": lambda: _one_at_0(good, float("inf")),
            "big": lambda: _one_at_0(good.double(), 1e300)}[kind]()


def _one_at_0(t, value):
    t.view(-1)[0] = value
    return t


@pytest.mark.parametrize("attr", ["W", "b"])
@pytest.mark.parametrize("case", list(BAD_GATE_VALUES.values()), ids=list(BAD_GATE_VALUES))
def test_gate_setters_refuse_what_is_not_a_weight_by_name(attr, case):
    """W = / b = took anything: 1.0 raised AttributeError ('float' has no attribute 'shape'), a
    NumPy array a raw TypeError, a meta tensor NotImplementedError, a complex tensor was stored
    without its imaginary part, NaN/inf were written (every later call NaN)."""
    kind, error, message = case
    layer = lstmkit.LSTM(I, H)
    view = layer.gates()["forget"]
    shape = (H, I + H) if attr == "W" else (H,)
    before = _state(layer)
    with pytest.raises(error, match=rf"^{attr}: {message}"):
        setattr(view, attr, _bad_value(kind, shape))
    assert _same_state(layer, before)


def test_gate_setters_refuse_a_layer_on_the_meta_device():
    """A write into a meta layer's gate returned normally and wrote nothing (a parametrized one:
    torch's "Tensor.item() cannot be called on meta tensors")."""
    layer = lstmkit.LSTM(I, H, device="meta")
    with pytest.raises(ValueError, match="b: the layer's parameters are on the meta device"):
        layer.gates()["forget"].b = torch.zeros(H)


def _plain_copy(layer: torch.nn.Module) -> torch.nn.Module:
    """A layer without parametrizations holding ``layer``'s effective weights."""
    plain = lstmkit.LSTM(layer.input_size, layer.hidden_size)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(getattr(layer, name))
    return plain


def test_gate_setters_write_through_parametrizations():
    """A parametrized parameter (weight_norm, a parametrization with right_inverse) is computed on
    each read: W = wrote W_x and lost W_h (copied into a throw-away tensor), and b = kept the
    parametrized bias's old value. Now the whole tensor is assigned, through right_inverse."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Twice(torch.nn.Module):
        def forward(self, x):
            return 2 * x

        def right_inverse(self, x):
            return x / 2

    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H)
    weight_norm(layer, "weight_hh_l0")
    parametrize.register_parametrization(layer, "bias_hh_l0", Twice())
    W, b = torch.randn(H, I + H), torch.randn(H)
    others = layer.gates()["input"].W
    view = layer.gates()["forget"]
    view.W, view.b = W, b
    for v in (view, layer.gates()["forget"]):  # the same view and a new one read what the layer reads
        torch.testing.assert_close(v.W, W)
        torch.testing.assert_close(v.b, b)
    torch.testing.assert_close(layer.gates()["input"].W, others)  # the other gates' rows as they were
    torch.testing.assert_close(layer.weight_hh_l0[H:2 * H], W[:, I:])
    assert torch.equal(layer.bias_hh_l0[H:2 * H], torch.zeros(H))
    x = torch.randn(5, 2, I)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], _plain_copy(layer)(x)[0])
        plain = lstmkit.LSTM(I, H)
        plain.load_state_dict(_plain_copy(layer).state_dict())
        plain.gates()["forget"].W, plain.gates()["forget"].b = W, b
        torch.testing.assert_close(layer(x)[0], plain(x)[0])

    cell = lstmkit.LSTMCell(I, H)  # a cell's parameters carry no suffix
    weight_norm(cell, "weight_hh")
    cell.gates()["o"].W = W
    torch.testing.assert_close(cell.gates()["o"].W, W)


def test_gate_setters_refuse_writes_that_would_be_lost_and_leave_the_layer_unchanged():
    """A weight that pruning or the hook-based weight_norm computes before each call took the
    write and lost it at the next call; a parametrization without right_inverse, or one that
    cannot hold the value (weight_norm: a row of zeros reads back NaN), cannot take it."""
    import warnings

    import torch.nn.utils.prune as prune
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class NoInverse(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    def pruned():
        layer = lstmkit.LSTM(I, H)
        prune.l1_unstructured(layer, "weight_hh_l0", amount=0.5)
        return layer

    def hook_norm():
        layer = lstmkit.LSTM(I, H)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(layer, "weight_hh_l0")
        return layer

    def no_inverse():
        layer = lstmkit.LSTM(I, H)
        parametrize.register_parametrization(layer, "bias_hh_l0", NoInverse())
        return layer

    def normed():
        layer = lstmkit.LSTM(I, H)
        weight_norm(layer, "weight_hh_l0")
        return layer

    cases = [
        (pruned, "W", torch.ones(H, I + H), r"W: weight_hh_l0 is not a parameter but a tensor computed before "
                                            r"each call by torch\.nn\.utils\.prune .*prune\.remove\(layer, "
                                            r"'weight_hh_l0'\)"),
        (hook_norm, "W", torch.ones(H, I + H), r"W: weight_hh_l0 is not a parameter .*hook-based "
                                               r"torch\.nn\.utils\.weight_norm.*remove_weight_norm"),
        (no_inverse, "b", torch.ones(H), r"b: parameter bias_hh_l0 is parametrized by NoInverse, which has no "
                                         r"right_inverse.*remove_parametrizations"),
        (normed, "W", torch.zeros(H, I + H), r"W: parameter weight_hh_l0 is parametrized \(_WeightNorm\); .*reads "
                                             r"back as NaN or inf.*row of zeros.*left unchanged"),
    ]
    x = torch.randn(5, 2, I)
    for build, attr, value, message in cases:
        torch.manual_seed(0)
        layer = build()
        with torch.no_grad():
            y = layer(x)[0]
        before = _state(layer)
        with pytest.raises(ValueError, match=message):
            setattr(layer.gates()["forget"], attr, value)
        assert _same_state(layer, before)  # weight_ih_l0, written before weight_hh_l0 failed, restored too
        with torch.no_grad():
            assert torch.equal(layer(x)[0], y)
