"""Every variant against the independent float64 NumPy LSTM (tests/numpy_lstm.py):
outputs, final states and the gradients of every parameter, the input and the initial
states, with hand-written BPTT on the oracle's side and autograd on lstmkit's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
import numpy_lstm as oracle
from conftest import assert_close, zoneout_keep
from lstmkit import CellSpec
from lstmkit.spec import INIT_FIELDS
from variants import LSTM_VARIANTS, RNN_VARIANTS

T, B, I, H = 5, 3, 3, 4

# A float32 layer against the float64 truth: float32 rounding (eps 1.2e-7) accumulates
# over T steps, layer norms and two layers, so 1e-5 cannot hold for every element; the
# float64 runs carry the 1e-10 bound. Same-precision comparisons (torch.nn.LSTM, kernels
# against the reference) use 1e-5 in float32.
F32_VS_F64 = 1e-4


def assert_vs_oracle(actual, expected, dtype, what):
    if dtype == torch.float64:
        assert_close(actual, expected, dtype, what)
    else:  # norm-wise: max|a - b| <= 1e-4 · max|b| (float32 rounding through layer norms)
        err = (actual.double() - expected.double()).abs().max().item()
        scale = max(expected.abs().max().item(), 1e-3)
        assert err <= F32_VS_F64 * scale, f"{what}: max abs error {err:.3g} > {F32_VS_F64:g} × {scale:.3g}"


def oracle_variant(layer) -> dict:
    """The oracle's description of an lstmkit layer: its sizes and every field of its spec that
    changes what the cell computes (all but the initial values, ``INIT_FIELDS``; the RNN's: those
    off their defaults). Derived, not listed: a field the oracle does not know is refused by it
    ("variant keys not valid"), where a hand-made list left it out and the oracle computed the
    plain cell beside a kernel that did the same (a trial variant passed this test so)."""
    s = layer.spec
    v = {"hidden_size": layer.hidden_size, "bias": layer.bias}
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in INIT_FIELDS}
    if s.kind == "rnn":
        return {**v, **{k: x for k, x in fields.items() if k in ("kind", "nonlinearity", "heads")
                        or x != CellSpec.__dataclass_fields__[k].default}}
    fields.pop("nonlinearity")  # the plain RNN's
    return {**v, **fields, "gate_hidden": dict(s.gate_hidden), "proj_size": layer.proj_size}


def compare(layer, dtype, lengths=None, seed=0):
    """Run ``layer`` and the oracle on the same data; compare values and gradients."""
    torch.manual_seed(seed)
    layer = layer.to(dtype)
    with torch.no_grad():  # move weights away from torch's tiny init so every path matters
        for name, p in layer.named_parameters():
            if not name.startswith("ln_"):
                p.uniform_(-0.6, 0.6)
            else:
                p.add_(torch.empty_like(p).uniform_(-0.3, 0.3))
    lstm = layer.spec.is_lstm
    lead = layer.num_layers * layer.num_directions
    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal((T, B, I))
    h0_np = rng.standard_normal((lead, B, layer.output_size)) * 0.5
    c0_np = rng.standard_normal((lead, B, H)) * 0.5 if lstm else None
    variant = oracle_variant(layer)
    layers_np = oracle.unflatten_params(
        {k: v.detach().double().numpy() for k, v in layer.state_dict().items()},
        layer.num_layers, layer.bidirectional)
    lengths_np = None if lengths is None else np.array(lengths)
    y_np, hn_np, cn_np, cache = oracle.forward(x_np, layers_np, h0_np, c0_np, variant,
                                               lengths=lengths_np, bidirectional=layer.bidirectional,
                                               keep=zoneout_keep(layer, T, B))
    dy = rng.standard_normal(y_np.shape)
    dhn = rng.standard_normal(hn_np.shape)
    dcn = rng.standard_normal(cn_np.shape) if lstm else None
    dx_np, dlayers_np, dh0_np, dc0_np = oracle.backward(cache, dy, dhn, dcn)
    if lengths is not None:
        valid = np.arange(T)[:, None] < np.array(lengths)[None, :]
        y_np = y_np * valid[..., None]

    def t(a):
        return torch.tensor(a, dtype=dtype)

    x, h0 = t(x_np).requires_grad_(True), t(h0_np).requires_grad_(True)
    c0 = t(c0_np).requires_grad_(True) if lstm else None
    inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, st = layer(inp, (h0, c0) if lstm else h0)
    if lengths is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    h_n, c_n = st if lstm else (st, None)
    assert_vs_oracle(out, t(y_np), dtype, "output")
    assert_vs_oracle(h_n, t(hn_np), dtype, "h_n")
    if lstm:
        assert_vs_oracle(c_n, t(cn_np), dtype, "c_n")
    loss = (out * t(dy)).sum() + (h_n * t(dhn)).sum() + ((c_n * t(dcn)).sum() if lstm else 0)
    names = [n for n, _ in layer.named_parameters()]
    wrt = [x, h0] + ([c0] if lstm else []) + list(layer.parameters())
    grads = dict(zip(["input", "h_0", "c_0"][: 3 if lstm else 2] + names, torch.autograd.grad(loss, wrt)))
    expected = {"input": dx_np, "h_0": dh0_np, **oracle.flatten_params(dlayers_np)}
    if lstm:
        expected["c_0"] = dc0_np
    assert set(expected) == set(grads)
    for name, g in grads.items():
        assert_vs_oracle(g, t(expected[name]), dtype, f"grad of {name}")


DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


@DTYPES
@pytest.mark.parametrize("cell", list(LSTM_VARIANTS.values()), ids=list(LSTM_VARIANTS))
def test_variant_single_layer(cell, dtype):
    compare(lstmkit.LSTM(I, H, cell=cell), dtype)


@DTYPES
@pytest.mark.parametrize("cell", list(LSTM_VARIANTS.values()), ids=list(LSTM_VARIANTS))
def test_variant_stacked_bidirectional_projection_lengths(cell, dtype):
    layer = lstmkit.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2, cell=cell)
    compare(layer, dtype, lengths=[2, 5, 3])


@DTYPES
@pytest.mark.parametrize("cell", ["vanilla", "peephole+cifg+layernorm"])
def test_no_bias_three_layers(cell, dtype):
    compare(lstmkit.LSTM(I, H, num_layers=3, bias=False, cell=cell), dtype, lengths=[1, 4, 5])


@DTYPES
@pytest.mark.parametrize("nonlinearity", list(RNN_VARIANTS.values()), ids=list(RNN_VARIANTS))
def test_rnn(nonlinearity, dtype):
    compare(lstmkit.RNN(I, H, num_layers=2, bidirectional=True, nonlinearity=nonlinearity), dtype,
            lengths=[3, 5, 1])
