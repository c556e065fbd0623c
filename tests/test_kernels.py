"""Every kernel row × every variant it claims × {float32, float64} × awkward shapes
matches the reference kernel: outputs, final states and the gradients of the input,
the initial states and every parameter (rel. 1e-5 float32, 1e-10 float64). Also inference
without gradients (bfloat16 too), record mode, negative views, zero-tensor gradients, NaN,
and the edge cases of the clip, the layer norm and the hard sigmoid on every CPU row.
How a row is chosen: test_kernel_selection.py; the fused kernel's own paths: test_fused_kernel.py."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from kernel_compare import DTYPES, FAST, FUSED, SHAPES, _kernel_variants, _weighted_sum, compare


@pytest.mark.parametrize("kernel_name", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_kernel_vanilla_shapes(kernel_name, shape, dtype):
    compare(kernel_name, lambda I, H, L, bd, P: lstmkit.LSTM(I, H, L, bidirectional=bd, proj_size=P),
            shape, dtype)


@pytest.mark.parametrize("kernel_name,cell", _kernel_variants(FAST))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", ["odd", "lengths", "stacked_bidir", "projection", "one_step"])
def test_kernel_every_claimed_variant(kernel_name, cell, dtype, shape):
    compare(kernel_name, lambda I, H, L, bd, P: lstmkit.LSTM(I, H, L, bidirectional=bd, proj_size=P, cell=cell),
            SHAPES[shape], dtype)


@pytest.mark.parametrize("cell", ["vanilla", "peephole+layernorm", "deep=3+zoneout=0.2/0.1", "slstm+heads=2"])
def test_negative_views_read_as_their_values(cell):
    """A tensor with torch's lazy negation bit (``x.conj().imag``, ``_neg_view()``) is its memory
    negated: the fused kernel, which reads memory, takes its values as the reference does — the
    input, the states, lengths and a parameter, forward and every gradient, with and without
    gradients, and the prepared calls that follow (the fused kernel read the memory: outputs off by
    0.49, the sweep's measurement)."""
    torch.manual_seed(0)
    fused_layer = lstmkit.LSTM(3, 4, cell=cell).double()
    ref = lstmkit.LSTM(3, 4, cell=cell, backend="reference").double()
    ref.load_state_dict(fused_layer.state_dict())
    S = len(fused_layer(torch.randn(2, 1, 3, dtype=torch.float64))[1]) - 1  # the cell states
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(1 + S)]
    lengths = torch.tensor([-5, -2, -4])._neg_view()
    assert lengths.is_neg() and x._neg_view().is_neg()

    for layer in (fused_layer, ref):  # a weight of the same values whose memory is negated
        w = layer.weight_hh_l0.detach()
        layer.weight_hh_l0 = torch.nn.Parameter((-w).clone()._neg_view())
        assert layer.weight_hh_l0.is_neg()

    def run(layer, **kw):
        out = layer(x._neg_view(), tuple(s._neg_view() for s in states), **kw)
        return out[0], *out[1]

    from torch.profiler import profile

    for kw in ({}, {"lengths": lengths}):
        for call in range(2):  # without lengths, the second call is prepared (checked below)
            with profile() as prof:
                got = run(fused_layer, **kw)
            prepared = "lstmkit::prepared_step" in {e.key for e in prof.key_averages()}
            assert prepared == (call == 1 and not kw and not fused_layer.spec.has_zoneout), (call, kw)  # (zoneout
            # in training draws a whole run's masks: the general path)
            want = run(ref, **kw)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            wrt = [x, *states, fused_layer.weight_hh_l0]
            ga = torch.autograd.grad(_weighted_sum(got), wrt)
            gb = torch.autograd.grad(_weighted_sum(want), [x, *states, ref.weight_hh_l0])
            for a, b in zip(ga, gb):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            for _ in range(2):
                for a, b in zip(run(fused_layer, **kw), run(ref, **kw)):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    cell_ = lstmkit.LSTMCell(3, 4).double()
    ref_cell = lstmkit.LSTMCell(3, 4, backend="reference").double()
    ref_cell.load_state_dict(cell_.state_dict())
    xs, hs, cs = (torch.randn(3, n, dtype=torch.float64) for n in (3, 4, 4))
    with torch.no_grad():
        for _ in range(2):
            for a, b in zip(cell_(xs._neg_view(), (hs._neg_view(), cs._neg_view())),
                            ref_cell(xs._neg_view(), (hs._neg_view(), cs._neg_view()))):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", ["vanilla", "deep=3+peephole", "slstm"])
def test_a_zero_tensor_gradient_and_inference_mode_inputs_train_as_on_the_reference(cell):
    """torch's ZeroTensor (no memory: the gradient sgn()'s backward hands on) reached the fused
    backward as a pointer ("its data is not allocated yet"); an input, states and lengths made
    under torch.inference_mode() could not be saved for the backward ("Inference tensors cannot be
    saved for backward") where the biases train and the weights are frozen. Both as on the
    reference row, first and prepared calls."""
    torch.manual_seed(0)
    ref = lstmkit.LSTM(3, 4, cell=cell, backend="reference").double()
    layer = lstmkit.LSTM(3, 4, cell=cell).double()
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        lengths = torch.tensor([5, 3])
        x_inf = torch.randn(5, 2, 3, dtype=torch.float64)
        hx = tuple(torch.randn(1, 2, 4, dtype=torch.float64) for _ in range(4 if "slstm" in cell else 2))

    def grads(m):
        out = []
        for _ in range(2):  # the second call: prepared where the first ran the fused kernel
            y, (h, *_) = m(x)
            out.append(torch.autograd.grad(y.sgn().sum() + h.square().sum(), [x, m.bias_ih_l0]))
            for name, p in m.named_parameters():
                p.requires_grad_(name.startswith("bias"))
            y2 = m(x_inf, hx, lengths=lengths)[0]
            out.append(torch.autograd.grad(y2.square().sum(), [m.bias_ih_l0]))
            for p in m.parameters():
                p.requires_grad_(True)
        return out

    for a, b in zip(grads(layer), grads(ref)):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel_name", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_kernel_rnn(kernel_name, dtype, nonlinearity):
    for shape in ("T1_B1_H1", "odd", "stacked_bidir"):
        compare(kernel_name, lambda I, H, L, bd, P: lstmkit.RNN(
            I, H, L, bidirectional=bd, nonlinearity=nonlinearity), SHAPES[shape], dtype, lstm=False)


@pytest.mark.parametrize("kernel_name", FUSED)
@pytest.mark.parametrize("cell", ["vanilla", "peephole+layernorm+cifg", "fgr+nog+clip=0.4", "nig+noaf"])
def test_kernel_gradcheck(kernel_name, cell):
    torch.manual_seed(0)
    layer = lstmkit.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2, cell=cell,
                         backend=kernel_name).double()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, h0, c0, *ps):
        packed = pack_padded_sequence(x, torch.tensor([4, 1, 3]), enforce_sorted=False)
        out, (h, c) = torch.func.functional_call(layer, dict(zip(names, ps)), (packed, (h0, c0)))
        return out.data, h, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kernel_name", FUSED)
def test_kernel_double_backward_raises_clearly(kernel_name):
    layer = lstmkit.LSTM(2, 3, backend=kernel_name).double()
    x = torch.randn(3, 1, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x)[0].sum(), x, create_graph=True)  # first order: fine
    with pytest.raises(RuntimeError, match=r"not differentiable .* backend='reference'"):
        torch.autograd.grad(g.sum(), x)  # second order through the hand-written backward
    # The reference row gives true second derivatives.
    ref = lstmkit.LSTM(2, 3, backend="reference").double()
    ref.load_state_dict(layer.state_dict())
    assert torch.autograd.gradgradcheck(lambda x: ref(x)[0], (x,))


@pytest.mark.parametrize("kernel_name", FUSED)
@pytest.mark.parametrize("cell", ["vanilla", "layernorm", "clip=1", "nig+niaf+noaf"])
def test_kernel_propagates_nan_like_torch(kernel_name, cell):
    layer = lstmkit.LSTM(3, 40, cell=cell, backend=kernel_name, check_finite=False)
    x = torch.randn(4, 2, 3)
    x[1, 0, 0] = float("nan")
    out, (h, c) = layer(x)
    assert torch.isnan(out[1:, 0]).all() and torch.isnan(c[:, 0]).all()  # NaN spreads through batch 0
    assert torch.isfinite(out[:, 1]).all()                                # batch 1 is untouched


@pytest.mark.parametrize("kernel_name", FUSED)
@pytest.mark.parametrize("cell", ["vanilla", "cifg", "nig+nog", "layernorm", "fgr+peephole", "rnn"])
def test_record_mode_matches_reference(kernel_name, cell):
    """The fused kernel's record mode returns what it computed, equal to the reference's
    per-step activations on every valid step; absent gates are absent."""
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True)
    ref = lstmkit.RNN(3, 4, **kw) if cell == "rnn" else lstmkit.LSTM(3, 4, cell=cell, **kw)
    ref = ref.double()
    fast = lstmkit.RNN(3, 4, **kw) if cell == "rnn" else lstmkit.LSTM(3, 4, cell=cell, **kw)
    fast = fast.double()
    fast.load_state_dict(ref.state_dict())
    ref.backend, fast.backend = "reference", kernel_name
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False)
    _, _, _, a = ref._run(packed, None, record=True)
    _, _, _, b = fast._run(packed, None, record=True)
    valid = (torch.arange(6)[:, None] < torch.tensor([6, 2, 4])[None, :]).unsqueeze(-1)  # (T, B, 1)
    for layer in range(2):
        for d in range(2):
            ta, tb = a.traces[layer][d], b.traces[layer][d]
            assert set(ta) == set(tb), (set(ta), set(tb))
            for k in ta:
                torch.testing.assert_close(tb[k] * valid, ta[k] * valid, rtol=1e-10, atol=1e-10, msg=k)
    if cell == "nig+nog":
        assert "i" not in tb and "o" not in tb
    # Recording changes nothing else: outputs and gradients equal a plain run's.
    out_rec = fast._run(x, None, record=True)[0]
    torch.testing.assert_close(out_rec, fast(x)[0], rtol=0, atol=0)
    g_rec = torch.autograd.grad(fast._run(x, None, record=True)[0].sum(), list(fast.parameters()))
    g_plain = torch.autograd.grad(fast(x)[0].sum(), list(fast.parameters()))
    for p, q in zip(g_rec, g_plain):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


INFERENCE_SHAPES = {  # (T, B, I, H, proj, layers, bidirectional, lengths): B >= 8 (the projection in the loop)
    "in_loop": (6, 10, 5, 7, 4, 2, True, [6, 2, 5, 1, 6, 3, 4, 6, 1, 2]),
    "in_loop_wide": (3, 8, 40, 33, 0, 1, False, None),
    "one_step_B1": (1, 1, 3, 4, 0, 2, False, None),
}


@pytest.mark.parametrize("kernel_name,cell", _kernel_variants(FUSED))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("shape", list(INFERENCE_SHAPES), ids=list(INFERENCE_SHAPES))
def test_inference_every_claimed_variant(kernel_name, cell, dtype, shape, forward_infer_calls):
    """Without gradients (the input projection inside the compiled loop, forward_infer) every variant
    matches the float64 reference: outputs and final states, lengths, stacked, bidirectional,
    projection; the in-loop path is checked to have run."""
    from lstmkit.kernels import fused

    T, B, I, H, P, L, bidir, lengths = INFERENCE_SHAPES[shape]
    calls = forward_infer_calls
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 4e-2}[dtype]
    torch.manual_seed(0)
    ref = lstmkit.LSTM(I, H, L, bidirectional=bidir, proj_size=P, cell=cell, backend="reference").double().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not name.startswith("ln_"):
                p.uniform_(-0.5, 0.5)
    layer = lstmkit.LSTM(I, H, L, bidirectional=bidir, proj_size=P, cell=cell, backend=kernel_name)
    layer = layer.to(dtype).eval()
    layer.load_state_dict(ref.state_dict())
    ref.load_state_dict(layer.state_dict())  # the same (rounded) weights on both sides
    D = 2 if bidir else 1
    x, h0, c0 = (torch.randn(s, dtype=torch.float64).to(dtype).double()
                 for s in ((T, B, I), (L * D, B, P or H), (L * D, B, H)))
    kw = {} if lengths is None else {"lengths": lengths}
    before = len(calls)
    with torch.no_grad():
        want = ref(x, (h0, c0), **kw)
        got = layer(x.to(dtype), (h0.to(dtype), c0.to(dtype)), **kw)
    assert len(calls) - before == L * D, f"{cell}: the in-loop inference path did not run"
    for a, b, what in ((got[0], want[0], "output"), (got[1][0], want[1][0], "h_n"), (got[1][1], want[1][1], "c_n")):
        err = (a.double() - b).abs().max().item()
        assert err <= tol * max(b.abs().max().item(), 1.0), f"{cell}: {what} error {err:.3g}"
    assert fused.in_loop_projection(torch.empty(T, B, I), torch.empty(4 * H, I))


def test_torch_row_runs_the_whole_stack_in_one_call_but_dropout_layer_by_layer(monkeypatch):
    """torch's operator runs every layer and direction at once (:meth:`Kernel.run_layers`); with
    dropout in training the loop runs it layer by layer, drawing the masks every row draws, so the
    torch row and the fused kernel agree under one seed."""
    from lstmkit.kernels import torch_native

    calls = []
    real = torch_native.TorchKernel._call
    monkeypatch.setattr(torch_native.TorchKernel, "_call", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    torch.manual_seed(0)
    layer = lstmkit.LSTM(5, 7, num_layers=3, bidirectional=True, dropout=0.5, backend="torch").double()
    fused = lstmkit.LSTM(5, 7, num_layers=3, bidirectional=True, dropout=0.5, backend=FUSED[0]).double()
    fused.load_state_dict(layer.state_dict())
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    layer.eval(), fused.eval()
    (y, (h, c)), (y_f, (h_f, c_f)) = layer(x), fused(x)
    assert len(calls) == 1
    for a, b in ((y, y_f), (h, h_f), (c, c_f)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    layer.train(), fused.train()
    torch.manual_seed(1)
    y, (h, c) = layer(x)
    torch.manual_seed(1)
    y_f, (h_f, c_f) = fused(x)
    assert len(calls) == 1 + 3 * 2  # one call per layer-direction
    for a, b in ((y, y_f), (h, h_f), (c, c_f)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y, layer.eval()(x)[0])  # dropout did act


#: The rows these edge cases run on: the CPU ones, and Triton where its interpreter runs.
_EVERY_ROW = ["reference", "cpu_fused"] + (
    ["triton"] if importlib.util.find_spec("triton") and os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.parametrize("backend", _EVERY_ROW)
def test_a_layer_norm_whose_variance_overflows_is_nan_as_torchs(backend):
    """float32 pre-activations beyond about 1.8e19 overflow the layer norm's variance: torch's
    layer_norm (the reference equations) gives NaN; the fused kernels gave 1/sqrt(inf) = 0, every
    normed value 0, and finite wrong outputs. Below the overflow both agree."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, cell="layernorm", backend=backend)
    ref = lstmkit.LSTM(3, 4, cell="layernorm", backend="reference")
    ref.load_state_dict(layer.state_dict())
    for scale, nan in ((1e18, False), (1e20, True)):
        x = torch.ones(2, 1, 3) * scale
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                y, want = layer(x)[0], ref(x)[0]
            assert bool(y.isnan().all()) == nan and bool(want.isnan().all()) == nan, (scale, grad)
            if not nan:
                torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", _EVERY_ROW)
@pytest.mark.parametrize(("dtype", "clip"), [(torch.float16, 1e5), (torch.float32, 1e39), (torch.bfloat16, 1e39)])
def test_a_clip_beyond_the_dtypes_range_clips_nothing(backend, dtype, clip):
    """A clip bound the layer's dtype cannot hold bounds nothing; the reference equations raised
    torch's "value cannot be converted to type Half without overflow" from their clamp."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, cell=lstmkit.CellSpec(cell_clip=clip), backend=backend).to(dtype)
    plain = lstmkit.LSTM(3, 4, backend=backend).to(dtype)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(5, 2, 3).to(dtype)
    torch.testing.assert_close(layer(x)[0], plain(x)[0], rtol=0, atol=0)
    cell = lstmkit.LSTMCell(3, 4, cell=lstmkit.CellSpec(cell_clip=clip), backend=backend).to(dtype)
    assert cell(x[0])[1].isfinite().all()


@pytest.mark.parametrize("backend", _EVERY_ROW)
@pytest.mark.parametrize("cell", ["nfg+nig+clip=0.3", "cifg+clip=0.3", "clip=0.3+zoneout=0.2"])
def test_the_clip_passes_the_gradient_at_its_boundary_as_clamp_does(backend, cell):
    """Where the new cell state lands exactly on ±clip, torch.clamp (the reference equations,
    the NumPy oracle's rule) passes the gradient; the fused kernels keep c after the clip, where
    'exactly clip' and 'clipped to clip' look alike, and stopped it. They recompute the state
    before the clip from the kept gates now. Values: a state at the boundary with the gates'
    contributions zero (all weights 0: f = 1 or 1 − i, i·g = 0), and one beyond it."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(1, 2, cell=cell, backend=backend).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    x = torch.zeros(1, 1, 1, dtype=torch.float64)
    h0 = torch.zeros(1, 1, 2, dtype=torch.float64)
    f = 1.0 if "nfg" in cell else 0.5  # σ(0), or cifg's 1 − σ(0); nfg: f ≡ 1
    z = 0.2 if "zoneout" in cell else 0.0  # evaluation: c_t = c~ + z (c_{t-1} − c~)
    for c_value, passed in ((0.3 / f, 1.0), (-0.3 / f, 1.0), (0.31 / f, 0.0)):
        c0 = torch.full((1, 1, 2), c_value, dtype=torch.float64, requires_grad=True)
        _, (_, c_n) = layer(x, (h0, c0))
        c_n.sum().backward()
        want = (1 - z) * passed * f + z  # dc_t / dc_{t-1}
        torch.testing.assert_close(c0.grad, torch.full_like(c0, want), msg=f"{backend} {cell} c0={c_value}")


@pytest.mark.parametrize("backend", _EVERY_ROW)
@pytest.mark.parametrize("gate_act,half_width", [("hardsigmoid", 3.0), ("hard_sigmoid", 2.5)])
def test_the_hard_sigmoid_is_flat_at_its_kinks(backend, gate_act, half_width):
    """At u = ±half-width the hard sigmoid is exactly 0 or 1 and its derivative 0 (the reference
    equations, the NumPy oracle, torch.nn.Hardsigmoid). float64's 1/6 rounds down, and the fused
    kernel's one multiply-add for 1/6·u + 1/2 gave 2.8e-17 at u = −3: inside the ramp, the slope
    as derivative. Values: zero input, state and weights; the gates' biases at the kinks (i at
    −w, +w; f at +w, −w; o at −w, +w) and the candidate's 0.5."""
    w = half_width
    layer = lstmkit.LSTM(1, 2, cell=f"gate_act={gate_act}", backend=backend).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.bias_ih_l0.copy_(torch.tensor([-w, w, w, -w, 0.5, 0.5, -w, w], dtype=torch.float64))
    x = torch.zeros(1, 1, 1, dtype=torch.float64)
    h0 = torch.zeros(1, 1, 2, dtype=torch.float64)
    c0 = torch.tensor([[[0.7, -0.4]]], dtype=torch.float64, requires_grad=True)
    y, (_, c_n) = layer(x, (h0, c0))
    (y.sum() + c_n.sum()).backward()
    g = math.tanh(0.5)
    assert c_n[0, 0, 0].item() == 0.7 and y[0, 0, 0].item() == 0.0  # i = 0, f = 1, o = 0: exactly
    torch.testing.assert_close(c_n[0, 0, 1].item(), g, rtol=0, atol=1e-15)  # i = 1, f = 0
    torch.testing.assert_close(y[0, 0, 1].item(), math.tanh(g), rtol=0, atol=1e-15)  # o = 1
    grad = layer.bias_ih_l0.grad
    assert grad[:4].tolist() == [0.0] * 4 and grad[6:].tolist() == [0.0] * 2, f"{backend}: {grad.tolist()}"
    assert grad[5].item() != 0.0  # the candidate's, where i = 1
    assert c0.grad.flatten().tolist() == [1.0, 0.0]
