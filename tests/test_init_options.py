"""Initialisation options of the cell (``ib=``, ``fb=``, ``ob=``, ``chrono=``): the values
they put in the biases, their distribution, their names, their refusals, and that they
change no equation."""

from __future__ import annotations

import math

import pytest
import torch

import lstmkit
from lstmkit.spec import INIT_FIELDS, CellSpec, resolve


def _gate_bias(layer: lstmkit.LSTM, gate: int, layer_index: int = 0, direction: int = 0) -> torch.Tensor:
    """b_k = bias_ih + bias_hh of gate ``gate`` (0..3 = i, f, g, o: torch's documented row order)."""
    sfx = f"_l{layer_index}" + ("_reverse" if direction else "")
    H = layer.hidden_size
    rows = slice(gate * H, (gate + 1) * H)
    return (getattr(layer, "bias_ih" + sfx) + getattr(layer, "bias_hh" + sfx))[rows].detach()


@pytest.mark.parametrize("cell", [
    "vanilla+ib=-3", "fb=5", "ob=-1", "chrono=100", "peephole+chrono=50+ob=-2",
    "ib=-0.1+fb=0.123456789+ob=2.5", "layernorm+fb=3", "cifg+ib=-2", "clip=0.3+fb=1",
])
def test_name_round_trips(cell):
    spec = resolve(cell)
    assert resolve(spec.name) == spec
    assert resolve(spec.name).name == spec.name


def test_words_and_field_names():
    assert resolve("ib=-3+fb=5+ob=-1") == CellSpec(input_bias=-3.0, forget_bias=5.0, output_bias=-1.0)
    assert resolve("input_bias=-3+forget_bias=5+output_bias=-1") == resolve("ib=-3+fb=5+ob=-1")
    assert resolve("chrono=100") == CellSpec(chrono=100.0)
    assert resolve("vanilla+fb=5").name == "fb=5"
    assert resolve("peephole+chrono=50").name == "peephole+chrono=50"
    assert resolve("fb=0.1").name == "fb=0.1" and resolve("fb=0.123456789").forget_bias == 0.123456789


def test_constant_biases_land_in_their_gates_everywhere():
    torch.manual_seed(0)
    H = 6
    layer = lstmkit.LSTM(3, H, num_layers=2, bidirectional=True, cell="ib=-3+fb=5+ob=-1")
    bound = 1 / math.sqrt(H)
    for li in range(2):
        for d in range(2):
            assert torch.equal(_gate_bias(layer, 0, li, d), torch.full((H,), -3.0))
            assert torch.equal(_gate_bias(layer, 1, li, d), torch.full((H,), 5.0))
            assert torch.equal(_gate_bias(layer, 3, li, d), torch.full((H,), -1.0))
            sfx = f"_l{li}" + ("_reverse" if d else "")
            hh = getattr(layer, "bias_hh" + sfx).detach()
            assert torch.equal(hh[:2 * H], torch.zeros(2 * H)) and torch.equal(hh[3 * H:], torch.zeros(H))
            g = _gate_bias(layer, 2, li, d)  # the candidate keeps torch's initialisation (sum of two)
            assert g.abs().max() <= 2 * bound and g.unique().numel() == H


def test_chrono_distribution_and_input_bias():
    from scipy import stats  # here, not at collection: its import takes seconds

    torch.manual_seed(1)
    T_max, H = 40.0, 4000
    layer = lstmkit.LSTM(2, H, cell=f"chrono={T_max:g}", bidirectional=True)
    b_f = _gate_bias(layer, 1).double()
    assert torch.equal(_gate_bias(layer, 0), -_gate_bias(layer, 1))  # b_i = −b_f exactly
    u = b_f.exp()
    assert float(u.min()) >= 1 - 1e-5 and float(u.max()) <= T_max - 1 + 1e-4
    # u = exp(b_f) ~ U[1, T_max − 1]: Kolmogorov-Smirnov against that law
    assert stats.kstest(u.numpy(), "uniform", args=(1, T_max - 2)).pvalue > 1e-3
    assert stats.kstest(u.numpy(), "uniform", args=(1, T_max / 2)).pvalue < 1e-6  # the test can fail
    other = _gate_bias(layer, 1, 0, 1)  # the reverse direction draws its own sample
    assert not torch.equal(other, _gate_bias(layer, 1))
    torch.manual_seed(1)
    again = lstmkit.LSTM(2, H, cell=f"chrono={T_max:g}", bidirectional=True)
    assert torch.equal(_gate_bias(again, 1), _gate_bias(layer, 1))  # torch's generator: reproducible


def test_chrono_on_a_deep_forget_gate_sets_its_last_bias():
    torch.manual_seed(2)
    layer = lstmkit.LSTM(3, 50, cell=CellSpec(gate_hidden={"f": (4,)}, chrono=10.0))
    b_f = layer.mlp_f_bias1_l0.detach()
    assert b_f.shape == (50,) and float(b_f.min()) >= 0 and float(b_f.exp().max()) <= 9 + 1e-5
    assert torch.equal((layer.bias_ih_l0 + layer.bias_hh_l0)[:50].detach(), -b_f)  # i: first 50 rows


@pytest.mark.parametrize("cell, pattern", [
    ("nfg+chrono=10", "chrono: .*nfg removes the forget gate"),
    ("nig+chrono=10", "chrono: .*nig removes the input gate"),
    ("cifg+chrono=10", "chrono: .*cifg has no forget-gate bias"),
    ("chrono=10+fb=1", "chrono: .*drop fb="),
    ("chrono=10+ib=-1+fb=1", "drop fb= and ib= or drop chrono="),
    ("chrono=2", r"chrono: expected T_max > 2"),
    ("chrono=-5", r"chrono: expected T_max > 2"),
    ("nig+ib=-1", r"input_bias: the input gate has no bias of its own here \(nig"),
    ("nog+ob=-1", r"output_bias: the output gate has no bias of its own here \(nog"),
    ("cifg+fb=1", r"forget_bias: the forget gate has no bias of its own here \(cifg"),
    ("rnn+ib=1", r"the plain RNN .*\['input_bias'\]"),
    ("fb=nan", "forget_bias: expected a finite number"),
    ("ob=inf", "output_bias: expected a finite number"),
    ("chrono=abc", "cannot read 'chrono=abc'"),
])
def test_refusals_say_why(cell, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve(cell)


def test_refusals_of_values_and_layers_without_bias():
    with pytest.raises(ValueError, match="input_bias: expected a finite number"):
        CellSpec(input_bias=True)
    with pytest.raises(ValueError, match="chrono=20.0 needs biases"):
        lstmkit.LSTM(3, 4, bias=False, cell="chrono=20")
    with pytest.raises(ValueError, match="input_bias=-1.0, output_bias=1.0 need biases"):
        lstmkit.LSTM(3, 4, bias=False, cell="ib=-1+ob=1")


def test_init_options_change_no_equation():
    for cell in ("ib=-3", "fb=5", "ob=-1", "chrono=30", "ib=1+fb=2+ob=3"):
        spec = resolve(cell)
        assert spec.is_vanilla and spec.without_init() == CellSpec(), cell
        assert all(getattr(spec.without_init(), f) is None for f in INIT_FIELDS)
    assert not resolve("peephole+chrono=30").is_vanilla
    assert resolve("peephole+chrono=30").without_init() == resolve("peephole")
    torch.manual_seed(3)
    x = torch.randn(7, 2, 3)
    for cell, plain in (("peephole+chrono=30+ob=-1", "peephole"), ("layernorm+ib=-2+fb=4", "layernorm")):
        a = lstmkit.LSTM(3, 5, cell=cell)
        b = lstmkit.LSTM(3, 5, cell=plain)
        b.load_state_dict(a.state_dict())
        ya, (ha, ca) = a(x)
        yb, (hb, cb) = b(x)
        assert torch.equal(ya, yb) and torch.equal(ca, cb), cell


def test_a_large_forget_bias_keeps_the_carousel_gradient():
    """The reason for the option: the gradient of the last output with respect to the first
    input, at initialisation, over 100 steps, grows by many orders of magnitude with b_f."""
    grads = {}
    for cell in ("vanilla", "fb=1", "fb=5", "chrono=100"):
        torch.manual_seed(4)
        layer = lstmkit.LSTM(2, 32, cell=cell)
        x = torch.randn(100, 8, 2, requires_grad=True)
        y, (h, c) = layer(x)
        c.sum().backward()
        grads[cell] = float(x.grad[0].abs().mean())
    assert grads["fb=5"] > 1e6 * grads["vanilla"] and grads["fb=5"] > 1e3 * grads["fb=1"]
    assert grads["chrono=100"] > 100 * grads["fb=1"]


@pytest.mark.parametrize("cell", ["vanilla", "fb=1+layernorm", "deep=f:3x2+chrono=20", "slstm"])
def test_a_cell_resets_its_parameters_as_it_made_them(cell):
    """LSTMCell.reset_parameters (it had none: a cell made on the meta device kept uninitialised
    memory after to_empty): the same draw as the construction's under the same seed, the layer
    norms' and initial biases' values, and finite weights after meta -> to_empty -> reset."""
    torch.manual_seed(7)
    made = lstmkit.LSTMCell(3, 4, cell=cell)
    with torch.device("meta"):
        meta = lstmkit.LSTMCell(3, 4, cell=cell)
    meta.to_empty(device="cpu")
    torch.manual_seed(7)
    meta.reset_parameters()
    assert made.state_dict().keys() == meta.state_dict().keys()
    for name, value in made.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name
    if "fb=1" in cell:
        assert torch.equal(meta.ln_c_weight, torch.ones(4)) and (meta.bias_ih[4:8] == 1).all()

