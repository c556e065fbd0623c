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
