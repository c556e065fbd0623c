"""Converters: exact round trips, and outputs proven equal by each framework's own equations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import lstmkit
from lstmkit.convert import from_haste, from_tf1, from_torch, to_haste, to_tf1, to_torch


@pytest.mark.parametrize("num_layers,bidirectional,proj_size,bias,batch_first",
                         list(itertools.product([1, 2], [False, True], [0, 2], [True, False], [False, True])))
def test_torch_round_trip_every_flag(num_layers, bidirectional, proj_size, bias, batch_first):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size,
                        bias=bias, batch_first=batch_first).double()
    kit = from_torch(ref)
    back = to_torch(kit)
    assert type(back) is torch.nn.LSTM and back.batch_first == batch_first and back.proj_size == proj_size
    for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    if batch_first:
        x = x.detach().transpose(0, 1).contiguous().requires_grad_(True)
    ya, (ha, ca) = ref(x)
    yb, (hb, cb) = kit(x)
    for a, b in ((ya, yb), (ha, hb), (ca, cb)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad(ya.sum() + ca.sum(), [x, *ref.parameters()])
    gb = torch.autograd.grad(yb.sum() + cb.sum(), [x, *kit.parameters()])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_torch_rnn_round_trip_and_refusals():
    ref = torch.nn.RNN(3, 4, num_layers=2, nonlinearity="relu").double()
    kit = from_torch(ref)
    assert isinstance(kit, lstmkit.RNN) and kit.nonlinearity == "relu"
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(kit(x)[0], ref(x)[0], rtol=1e-10, atol=1e-10)
    assert type(to_torch(kit)) is torch.nn.RNN
    with pytest.raises(ValueError, match=r"torch.nn.LSTM computes only the vanilla cell; this layer is 'peephole'"):
        to_torch(lstmkit.LSTM(3, 4, cell="peephole"))
    to_torch(lstmkit.LSTM(3, 4, cell="vanilla+fb=1"))  # an initial forget bias is still vanilla
    with pytest.raises(TypeError, match="expected torch.nn.LSTM or torch.nn.RNN, got GRU"):
        from_torch(torch.nn.GRU(3, 4))


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def tf1_lstm(x, kernel, bias, forget_bias, h, c):
    """TF1 LSTMCell / LSTMBlockCell, written from TF1's conventions (gate order i, j, f, o)."""
    ys = []
    for x_t in x:
        z = np.concatenate([x_t, h], axis=1) @ kernel + bias
        i, j, f, o = np.split(z, 4, axis=1)
        c = _sigmoid(f + forget_bias) * c + _sigmoid(i) * np.tanh(j)
        h = _sigmoid(o) * np.tanh(c)
        ys.append(h)
    return np.stack(ys), h, c


def haste_lstm(x, kernel, recurrent_kernel, bias, h, c):
    """haste's LSTM (gate order i, g, f, o; kernel over x, recurrent_kernel over h)."""
    ys = []
    for x_t in x:
        z = x_t @ kernel + h @ recurrent_kernel + bias
        i, g, f, o = np.split(z, 4, axis=1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        ys.append(h)
    return np.stack(ys), h, c


@pytest.mark.parametrize("forget_bias", [1.0, 0.0])
def test_tf1_layout_proven_by_tf1_equations(forget_bias):
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 5, num_layers=2).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    y, (h_n, c_n) = layer(x)
    arrays0 = to_tf1(layer, 0, forget_bias=forget_bias)
    arrays1 = to_tf1(layer, 1, forget_bias=forget_bias)
    assert arrays0["kernel"].shape == (3 + 5, 20) and arrays1["kernel"].shape == (5 + 5, 20)
    zeros = np.zeros((2, 5))
    y0, h0, c0 = tf1_lstm(x.numpy(), arrays0["kernel"], arrays0["bias"], forget_bias, zeros, zeros)
    y1, h1, c1 = tf1_lstm(y0, arrays1["kernel"], arrays1["bias"], forget_bias, zeros, zeros)
    np.testing.assert_allclose(y1, y.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c0, c_n[0].detach().numpy(), rtol=1e-10, atol=1e-12)
    # Back into a fresh layer: same outputs.
    other = lstmkit.LSTM(3, 5, num_layers=2).double()
    from_tf1(other, **arrays0, index=0, forget_bias=forget_bias)
    from_tf1(other, **arrays1, index=1, forget_bias=forget_bias)
    torch.testing.assert_close(other(x)[0], y, rtol=1e-12, atol=1e-12)


def test_haste_layout_proven_by_haste_equations():
    torch.manual_seed(1)
    layer = lstmkit.LSTM(3, 4, bidirectional=True).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y, _ = layer(x)
    zeros = np.zeros((2, 4))
    fwd = to_haste(layer, 0, 0)
    y_f, _, _ = haste_lstm(x.numpy(), **fwd, h=zeros, c=zeros)
    bwd = to_haste(layer, 0, 1)
    y_b, _, _ = haste_lstm(x.numpy()[::-1], **bwd, h=zeros, c=zeros)
    np.testing.assert_allclose(np.concatenate([y_f, y_b[::-1]], axis=2), y.detach().numpy(), rtol=1e-10, atol=1e-12)
    other = lstmkit.LSTM(3, 4, bidirectional=True).double()
    from_haste(other, **fwd, index=0, direction=0)
    from_haste(other, **bwd, index=0, direction=1)
    torch.testing.assert_close(other(x)[0], y, rtol=1e-12, atol=1e-12)


def test_tf_converters_refuse_what_the_format_cannot_carry():
    with pytest.raises(ValueError, match=r"the TF1 layout computes only the vanilla LSTM without projection; this layer is .peephole."):
        to_tf1(lstmkit.LSTM(3, 4, cell="peephole"))
    with pytest.raises(ValueError, match=r"haste layout .* .vanilla with proj_size=2."):
        to_haste(lstmkit.LSTM(3, 4, proj_size=2))
    layer = lstmkit.LSTM(3, 4)
    with pytest.raises(ValueError, match=r"kernel: expected shape \(7, 16\), got \(6, 16\)"):
        from_tf1(layer, np.zeros((6, 16)), np.zeros(16))
    with pytest.raises(ValueError, match=r"recurrent_kernel: expected shape \(4, 16\)"):
        from_haste(layer, np.zeros((3, 16)), np.zeros((5, 16)), np.zeros(16))
    with pytest.raises(ValueError, match="non-zero bias but the layer has bias=False"):
        from_haste(lstmkit.LSTM(3, 4, bias=False), np.zeros((3, 16)), np.zeros((4, 16)), np.ones(16))


def test_is_vanilla_ignores_only_the_initial_forget_bias():
    from lstmkit.spec import resolve

    assert resolve("vanilla").is_vanilla and resolve("vanilla+fb=1").is_vanilla
    assert resolve("ib=-3+ob=-1").is_vanilla and resolve("chrono=100").is_vanilla
    for cell in ("peephole", "cifg", "layernorm", "clip=3", "nfg", "rnn"):
        assert not resolve(cell).is_vanilla, cell
