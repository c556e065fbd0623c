"""torch.autograd.gradcheck through whole layers, every variant, float64."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from variants import LSTM_VARIANTS, RNN_VARIANTS


def _check(module, lstm, lengths=None, T=3, B=2):
    torch.manual_seed(0)
    module = module.double()
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    lead = module.num_layers * module.num_directions
    x = torch.randn(T, B, module.input_size, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(lead, B, module.output_size, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(lead, B, module.hidden_size, dtype=torch.float64, requires_grad=True)

    def fn(x, h0, c0, *ps):
        state = dict(zip(names, ps))
        inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, st = torch.func.functional_call(module, state, (inp, (h0, c0) if lstm else h0))
        out = out if lengths is None else out.data
        return (out, *st) if lstm else (out, st)

    inputs = (x, h0, c0, *params) if lstm else (x, h0, c0.detach(), *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cell", list(LSTM_VARIANTS.values()), ids=list(LSTM_VARIANTS))
def test_gradcheck_lstm_variants(cell):
    _check(lstmkit.LSTM(2, 3, cell=cell), lstm=True)


@pytest.mark.parametrize("cell", ["vanilla", "peephole+layernorm", "fgr+cifg"])
def test_gradcheck_stacked_bidirectional_projection_lengths(cell):
    m = lstmkit.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2, cell=cell)
    _check(m, lstm=True, lengths=torch.tensor([2, 4, 1]), T=4, B=3)


@pytest.mark.parametrize("nonlinearity", list(RNN_VARIANTS.values()), ids=list(RNN_VARIANTS))
def test_gradcheck_rnn(nonlinearity):
    _check(lstmkit.RNN(2, 3, num_layers=2, bidirectional=True, nonlinearity=nonlinearity), lstm=False)


def test_lstmcell_matches_layer_step():
    torch.manual_seed(0)
    for cell in ("vanilla", "peephole+layernorm+cifg", LSTM_VARIANTS["deep_f"]):
        layer = lstmkit.LSTM(3, 4, cell=cell).double()
        step = lstmkit.LSTMCell(3, 4, cell=cell).double()
        step.load_state_dict({k[: -len("_l0")]: v for k, v in layer.state_dict().items()})
        x = torch.randn(1, 2, 3, dtype=torch.float64)
        h0, c0 = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
        y, (h, c) = layer(x, (h0[None], c0[None]))
        h1, c1 = step(x[0], (h0, c0))
        torch.testing.assert_close(h1, h[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c1, c[0], rtol=1e-12, atol=1e-12)
        hu, cu = step(x[0, 0], (h0[0], c0[0]))  # unbatched
        torch.testing.assert_close(hu, h1[0], rtol=1e-12, atol=1e-12)


def test_lstmcell_matches_torch():
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(3, 4).double()
    kit = lstmkit.LSTMCell(3, 4).double()
    kit.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, dtype=torch.float64)
    for a, b in zip(kit(x), ref(x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "sigmoid", "identity"])
def test_gradcheck_deep_gate_hidden_activations(act):
    _check(lstmkit.LSTM(2, 3, cell=lstmkit.CellSpec(gate_hidden=(3,), gate_hidden_activation=act)), lstm=True)
