"""The fused recurrence as a PyTorch operator in 16 bits: autocast (an input in its dtype, a
backward inside it, outputs in its dtype on every backend, cells and steps) and bfloat16 /
float16 layers on the fused kernel, against float32 or float64 and at least as accurate as
the reference loop in 16 bits; the 16-bit input projection with and without the CPU's 16-bit
units, and the bfloat16 products on every shape they take."""

from __future__ import annotations

import pytest
import torch

import lstmkit
from lstmkit import kernels
from lstmkit.kernels import cpu_ext, fused
from lstmkit.kernels.machine import cpu_vendor
from ops_variants import FUSED, make


def _bf16_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-3)).item()


@pytest.mark.parametrize("variant", list(FUSED))
def test_bf16_autocast_and_bf16_layers_on_the_fused_kernel(variant):
    """bf16 storage and GEMM inputs, fp32 accumulation and cell state: against float32, at
    least as accurate as the reference kernel computing in bf16 (or within 2 % of the
    output's scale; measured: 0.3-0.5 %, layernorm 7 % where the bf16 reference is off 17 %)."""
    torch.manual_seed(0)
    layer = make(variant, I=8, H=16, num_layers=2)
    x = torch.randn(12, 4, 8)
    xr = x.clone().requires_grad_()
    ref = layer(xr)[0]
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in layer.parameters()]
    bf16_ref = make(variant, I=8, H=16, num_layers=2, backend="reference")
    bf16_ref.load_state_dict(layer.state_dict())
    bound = max(0.02, _bf16_error(bf16_ref.to(torch.bfloat16)(x.bfloat16())[0], ref))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)[0]
    assert y.dtype == torch.bfloat16 and _bf16_error(y, ref) <= bound
    low = make(variant, I=8, H=16, num_layers=2)
    low.load_state_dict(layer.state_dict())
    low = low.to(torch.bfloat16)
    assert kernels.select(low.spec, x.device, torch.bfloat16).name == "cpu_fused"
    xb = x.bfloat16().requires_grad_()
    yb = low(xb)[0]
    assert yb.dtype == torch.bfloat16 and _bf16_error(yb, ref) <= bound
    yb.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and _bf16_error(xb.grad, xr.grad) <= 2 * bound
    for (name, p), q in zip(low.named_parameters(), ref_grads):
        assert p.grad.dtype == torch.bfloat16
        assert _bf16_error(p.grad, q) <= 3 * bound, name


@pytest.mark.parametrize("variant", list(FUSED))
def test_autocast_takes_an_input_in_its_dtype_and_a_backward_inside_it(variant):
    """Under autocast the layer takes what an autocast ``nn.Linear`` before it returns (bfloat16
    into float32 parameters), as nn.LSTM does; and a backward run inside the autocast region
    works (the kernel's backward products are not recast: it raised a dtype mismatch before).
    Values: the same call on the float32 input (autocast casts it there); gradients: the same
    backward outside the region (within bfloat16's rounding: autocast recasts the float32 input
    projection's own backward products inside it)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(5, 3, 6)
    layer = make(variant, I=4, H=6 if variant in ("heads", "slstm") else 5)
    outs, grads = [], []
    for inside in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u = lin(x)
            assert u.dtype == torch.bfloat16
            y = layer(u)[0]
            ref = layer(u.float())[0]
            if inside:
                y.float().sum().backward()
        if not inside:
            y.float().sum().backward()
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, ref)
        outs.append(y)
        grads.append([p.grad.clone() for p in layer.parameters()])
    torch.testing.assert_close(outs[1], outs[0])
    for g_in, g_out in zip(*grads[::-1]):
        assert _bf16_error(g_in, g_out) <= 0.02


@pytest.mark.parametrize("variant", list(FUSED))
def test_autocast_outputs_in_its_dtype_on_every_backend(variant):
    """A layer under autocast returns its output and final states in autocast's dtype, as nn.LSTM
    does, whichever row runs it — the reference loop (forced, or taken for a trace) as the fused
    operator — with its float32 values within bfloat16's rounding, and gradients for every
    parameter. (Two layers: the second takes the first's bfloat16 output.)"""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4)
    fast = make(variant, num_layers=2)
    slow = make(variant, num_layers=2, backend="reference")
    slow.load_state_dict(fast.state_dict())
    for layer in (fast, slow):
        with torch.no_grad():
            y32, state32 = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state = layer(x)
        states, states32 = (s if isinstance(s, tuple) else (s,) for s in (state, state32))
        assert {t.dtype for t in (y, *states)} == {torch.bfloat16}, (layer.backend, variant)
        for got, want in zip((y, *states), (y32, *states32)):
            assert _bf16_error(got, want) <= 0.03, (layer.backend, variant)
        y.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    for layer in (fast.double(), slow.double()):  # float64 is left alone by autocast, as nn.LSTM's is
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state = layer(x.double())
        states = state if isinstance(state, tuple) else (state,)
        assert {t.dtype for t in (y, *states)} == {torch.float64}, (layer.backend, variant)


def test_autocast_input_to_a_cell_and_a_step():
    """Under autocast a cell returns float32 states, as nn.LSTMCell does (so a loop of steps carries c
    unrounded), computing its step in float32; a layer's step returns the autocast dtype, as
    nn.LSTM does."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    cell, layer = lstmkit.LSTMCell(4, 5), lstmkit.LSTM(4, 5)
    state = (torch.randn(3, 5), torch.randn(3, 5))
    want = cell(x, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(t.dtype == torch.float32 for t in torch.nn.LSTMCell(4, 5)(x, state))
        for _ in range(2):  # (the second call: a kept signature, if one were kept)
            h, c = cell(x.bfloat16(), state)  # an input from an autocast nn.Linear: bfloat16
            assert h.dtype == c.dtype == torch.float32
            torch.testing.assert_close(h, want[0], rtol=0, atol=1e-2)  # (the input rounded to bfloat16)
            h, c = cell(x, state)
            assert torch.equal(h, want[0]) and torch.equal(c, want[1])
        y, _ = layer.step(x.bfloat16(), (torch.zeros(1, 3, 5), torch.zeros(1, 3, 5)))
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, layer.step(x)[0], atol=1e-3, rtol=1.6e-2)
    with pytest.raises(TypeError, match="does not match the layer's parameters"):
        layer.step(x.bfloat16())  # outside autocast: the dtypes must agree


def test_bf16_products_run_on_the_matrix_unit_where_the_cpu_has_one():
    """bfloat16 layers' per-step products run in bfloat16 on AMX tiles wherever torch reports
    the unit (else the recurrence computes them in float32, as before)."""
    assert cpu_ext.bf16_unit() == ("amx" if torch.cpu._is_amx_tile_supported() else "float32")


def test_sixteen_bit_units_are_the_ones_that_outpace_float32():
    """AMX tiles count for bfloat16 (AMX-FP16 for float16); AVX512_BF16's dot products only on CPUs
    other than Intel's (on an Intel Xeon without AMX they ran at half the float32 FMAs' rate); and
    this process's table is the rule applied to this CPU."""
    units = fused.sixteen_bit_units
    assert units(True, False, True, "GenuineIntel") == {torch.bfloat16: True, torch.float16: False}
    assert units(False, False, True, "GenuineIntel")[torch.bfloat16] is False
    assert units(False, False, True, "AuthenticAMD")[torch.bfloat16] is True
    assert units(False, False, False, "AuthenticAMD")[torch.bfloat16] is False
    assert units(False, True, False, None)[torch.float16] is True
    assert fused.SIXTEEN_BIT_UNITS == units(torch.cpu._is_amx_tile_supported(), torch.cpu._is_amx_fp16_supported(),
                                            torch.cpu._is_avx512_bf16_supported(), cpu_vendor())


@pytest.mark.parametrize("how", ["layer", "autocast"])
@pytest.mark.parametrize("units", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_input_projection_with_and_without_units(monkeypatch, dtype, units, how):
    """A 16-bit input projection — a 16-bit layer's, or a float32 layer's under autocast: torch's
    own 16-bit GEMM where the CPU has units for the dtype, else the float32 product of the widened
    operands rounded once — bit for bit ``F.linear`` in float32, and so are its gradients. Either
    way within one rounding of the float64 product."""
    monkeypatch.setitem(fused.SIXTEEN_BIT_UNITS, dtype, units)
    torch.manual_seed(0)
    x, w, b = torch.randn(300, 64), torch.randn(256, 64) * 0.1, torch.randn(256)
    x, w, b = (t.to(dtype) for t in (x, w, b))  # values a 16-bit dtype holds
    if how == "autocast":
        x, w, b = (t.float() for t in (x, w, b))
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    with torch.autocast("cpu", dtype=dtype, enabled=how == "autocast"):
        out = fused.input_linear(x, w, b)
    assert out.dtype == dtype
    assert (type(out.grad_fn).__name__ == "ToCopyBackward0") == (not units)  # widened, then rounded once
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    eps = torch.finfo(dtype).eps
    assert ((out.double() - exact).abs() <= eps * exact.abs() + 1e-6).all()
    g = torch.randn(300, 256).to(dtype)
    out.backward(g)
    if not units:
        x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, w, b))
        want = torch.nn.functional.linear(x32, w32, b32)
        assert torch.equal(out, want.to(dtype))
        want.backward(g.float())
        for got, ref in ((x.grad, x32.grad), (w.grad, w32.grad), (b.grad, b32.grad)):
            assert torch.equal(got.float(), ref.to(dtype).float() if how == "layer" else ref)
    dx = g.double() @ w.double()
    assert ((x.grad.double() - dx).abs() <= 4 * eps * dx.abs().max()).all()


def test_autocast_leaves_a_float64_projection_alone(monkeypatch):
    """Autocast lowers float32 alone: a float64 layer's projection stays float64 (no float32 detour)."""
    monkeypatch.setitem(fused.SIXTEEN_BIT_UNITS, torch.bfloat16, False)
    x, w, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused.input_linear(x, w, b.double())
    assert out.dtype == torch.float64
    assert torch.allclose(out, x @ w.t() + b.double(), rtol=1e-12, atol=1e-12)


BF16_SHAPES = {  # (I, H, layer options): odd K (padded to even), widths that leave a narrow last panel
    "odd": (5, 33, {}),
    "wide": (64, 70, {"bidirectional": True}),
    "heads": (8, 32, {"heads": 2}),
    "proj": (6, 33, {"proj_size": 20}),
    "fgr": (6, 24, {"cell": "fgr"}),
    "layernorm": (6, 24, {"cell": "layernorm"}),
    "deep": (6, 24, {"cell": lstmkit.CellSpec(gate_hidden=(9,))}),
    "slstm": (6, 32, {"cell": "slstm", "heads": 2}),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", list(BF16_SHAPES))
def test_bf16_training_on_every_product_shape(shape, threads):
    """The bfloat16 products (AMX panels where present) on shapes that exercise their edges — odd
    K, a last panel narrower than 16 columns, heads' blocks, the projection, fgr's, layer norm's
    and deep gates' own products, the sLSTM — on one and two threads, with lengths: outputs and
    every gradient against float64 on the same rounded weights, as accurate as the reference
    loop computing in bfloat16 (or within 2 % of the scale)."""
    I, H, kw = BF16_SHAPES[shape]
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H, **kw).bfloat16()
    exact = lstmkit.LSTM(I, H, **kw, backend="reference").double()
    exact.load_state_dict(layer.state_dict())
    bf16_ref = lstmkit.LSTM(I, H, **kw, backend="reference").bfloat16()
    bf16_ref.load_state_dict(layer.state_dict())
    x = torch.randn(9, 11, I).bfloat16()
    lengths = torch.tensor([9, 3, 9, 1, 7, 9, 2, 8, 9, 5, 6])
    xr = x.double().requires_grad_()
    want = exact(xr, lengths=lengths)[0]
    want.sum().backward()
    with torch.no_grad():
        bound = max(0.02, _bf16_error(bf16_ref(x, lengths=lengths)[0], want))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xb = x.clone().requires_grad_()
        got = layer(xb, lengths=lengths)[0]
        got.float().sum().backward()
    finally:
        torch.set_num_threads(old)
    assert _bf16_error(got, want) <= bound
    assert _bf16_error(xb.grad, xr.grad) <= 2 * bound
    for (name, p), q in zip(layer.named_parameters(), exact.parameters()):
        assert _bf16_error(p.grad, q.grad) <= 3 * bound, name


def test_float16_runs_on_the_cpu():
    torch.manual_seed(0)
    layer = lstmkit.LSTM(8, 16)
    x = torch.randn(10, 3, 8)
    half = lstmkit.LSTM(8, 16)
    half.load_state_dict(layer.state_dict())
    y = half.half()(x.half())[0]
    assert y.dtype == torch.float16 and _bf16_error(y, layer(x)[0]) < 0.005
