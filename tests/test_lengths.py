"""``lengths=``: variable lengths on a padded batch, without packing, = a PackedSequence of those
lengths (lstmkit's and ``torch.nn.LSTM``'s), values and gradients; bad lengths refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit

T, B, I, H = 6, 4, 3, 5
LENGTHS = [6, 2, 5, 1]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cell", ["vanilla", "peephole+layernorm"])
def test_lengths_equal_a_packed_sequence(cell, batch_first):
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=batch_first, cell=cell).double()
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64, requires_grad=True)
    y, (h, c) = layer(x, lengths=torch.tensor(LENGTHS))
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=batch_first, enforce_sorted=False)
    yp, (hp, cp) = layer(packed)
    yp, _ = pad_packed_sequence(yp, batch_first=batch_first, total_length=T)
    for a, b, what in ((y, yp, "output"), (h, hp, "h_n"), (c, cp, "c_n")):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=what)
    g = torch.autograd.grad((y.square().sum() + h.sum() + c.sum()), [x, *layer.parameters()])
    gp = torch.autograd.grad((yp.square().sum() + hp.sum() + cp.sum()), [x, *layer.parameters()])
    for a, b in zip(g, gp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if cell == "vanilla":  # and torch's own packed LSTM on the same weights
        ref = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=batch_first).double()
        ref.load_state_dict(layer.state_dict())
        yr, (hr, cr) = ref(packed)
        yr, _ = pad_packed_sequence(yr, batch_first=batch_first, total_length=T)
        for a, b in ((y, yr), (h, hr), (c, cr)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer_kind, cell", [("LSTM", "vanilla"), ("LSTM", "layernorm"), ("LSTM", "deep=3"),
                                              ("RNN", None)])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_what_the_padding_holds_is_never_read(layer_kind, cell, fill):
    """NaN or inf past each length (a padded batch's filler): accepted, as a PackedSequence of the
    same data is, and outputs and every gradient equal those of zeros there (the projection's
    dW_ih = dXGᵀ X computed 0 · NaN at the padding)."""
    torch.manual_seed(1)
    kw = {"cell": cell} if cell else {}
    layer = getattr(lstmkit, layer_kind)(I, H, num_layers=2, bidirectional=True, **kw).double()
    lengths = torch.tensor(LENGTHS)
    past_end = (torch.arange(T)[:, None] >= lengths[None, :])[..., None]  # (T, B, 1)
    x = torch.randn(T, B, I, dtype=torch.float64)
    results = []
    for padding in (fill, 0.0):
        xp = x.masked_fill(past_end, padding).requires_grad_()
        y, state = layer(xp, lengths=lengths)
        h = state[0] if isinstance(state, tuple) else state
        loss = y.square().sum() + h.sum()
        results.append((y, h, *torch.autograd.grad(loss, [xp, *layer.parameters()])))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rnn_lengths_as_list():
    torch.manual_seed(0)
    layer = lstmkit.RNN(I, H).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    y, h = layer(x, lengths=LENGTHS)
    ref = torch.nn.RNN(I, H).double()
    ref.load_state_dict(layer.state_dict())
    yr, hr = ref(pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False))
    torch.testing.assert_close(y, pad_packed_sequence(yr, total_length=T)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, hr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lengths, error, match", [
    ([6, 2, 5], ValueError, "one length per sequence"),
    ([6, 2, 0, 1], ValueError, r"in \[1, L = 6\]"),
    ([7, 2, 5, 1], ValueError, r"in \[1, L = 6\]"),
    (torch.tensor([6.0, 2, 5, 1]), TypeError, "integer tensor"),
    ([6, 2, True, 1], TypeError, "sequence of ints"),
    ("6251", TypeError, "sequence of ints"),
    (torch.tensor([[6, 2, 5, 1]]), TypeError, "1-D"),
    (np.array([6, 2, 5, 2**64 - 1], dtype=np.uint64), ValueError, r"in \[1, L = 6\], got max 18446744073709551615"),
    (torch.tensor([6, 2, 5, 1], device="meta"), ValueError, "meta device holds no values"),
])
def test_bad_lengths_are_refused(lengths, error, match):
    with pytest.raises(error, match=f"lengths: .*{match}"):
        lstmkit.LSTM(I, H)(torch.randn(T, B, I), lengths=lengths)


def test_lengths_need_a_padded_batch():
    layer = lstmkit.LSTM(I, H)
    x = torch.randn(T, B, I)
    with pytest.raises(ValueError, match="PackedSequence carries its own lengths"):
        layer(pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False), lengths=LENGTHS)
    with pytest.raises(ValueError, match="batched 3-D"):
        layer(x[:, 0], lengths=[3])


@pytest.mark.parametrize(("cell", "backend"), [("vanilla", None), ("layernorm", None), ("vanilla", "reference")])
def test_lengths_through_compile_and_export(cell, backend):
    """``lengths=`` under ``torch.compile(fullgraph=True)`` and ``torch.export``: the values'
    range check is an assertion in the graph (eager's is a Python branch on them, which a trace
    cannot take), so an exported program still refuses a length past L. The reference loop (also
    the fallback where the C++ kernel cannot be built) masks unconditionally there: its eager
    branch on the values failed both captures (found by a compile/export sweep)."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(5, 8, cell=cell, backend=backend)
    x, lengths = torch.randn(6, 3, 5), torch.tensor([6, 2, 4])
    want = layer(x, lengths=lengths)[0]
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, lengths=lengths)[0]
    torch.testing.assert_close(got, want)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = layer

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.rnn(x, lengths=lengths)[0]
    exported = torch.export.export(Model(), (x, lengths)).module()
    torch.testing.assert_close(exported(x, lengths), want)
    torch.testing.assert_close(exported(x, torch.tensor([1, 6, 6])), layer(x, lengths=torch.tensor([1, 6, 6]))[0])
    with pytest.raises(RuntimeError, match=r"lengths: each must be in \[1, L\], L the padded input's number of steps"):
        exported(x, torch.tensor([7, 2, 4]))
