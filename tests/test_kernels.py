"""Every kernel row × every variant it claims × {float32, float64} × awkward shapes
matches the reference kernel: outputs, final states and the gradients of the input,
the initial states and every parameter (rel. 1e-5 float32, 1e-10 float64)."""

from __future__ import annotations

import importlib.util
import itertools
import math
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from conftest import assert_rel
from lstmkit import kernels
from lstmkit.kernels import abi, cpu_ext, fused
from lstmkit.kernels.fused import FusedKernel
from lstmkit.spec import CellSpec, resolve
from variants import HEADS_VARIANTS, LSTM_VARIANTS, RNN_VARIANTS, SLSTM_VARIANTS

# Rows that run layers on CPU tensors (onnx_export only writes ONNX during torch.onnx.export:
# tests/test_ops_transforms.py; triton runs CPU tensors only through Triton's interpreter: test_triton.py):
# the fused rows (hand-written BPTT, record mode) and torch's own operators (the cells torch has).
FUSED = [name for name, k in kernels.REGISTRY.items() if isinstance(k, FusedKernel) and name != "triton"]
FAST = FUSED + ["torch"]
DTYPES = [torch.float32, torch.float64]

# (T, B, I, H, proj, layers, bidirectional, lengths)
SHAPES = {
    "T1_B1_H1": (1, 1, 1, 1, 0, 1, False, None),
    "odd": (7, 3, 5, 11, 0, 1, False, None),
    "B1_long": (23, 1, 2, 3, 0, 1, False, None),
    "lengths": (6, 4, 3, 5, 0, 1, False, [6, 2, 5, 1]),
    "stacked_bidir": (5, 3, 4, 6, 0, 2, True, [5, 3, 1]),
    "projection": (5, 2, 3, 6, 4, 2, False, None),
    "big": (4, 9, 33, 70, 0, 1, True, None),
    "one_step": (1, 5, 3, 7, 4, 2, True, None),  # T = 1: the weights are read in place (BLAS), not packed
    "onednn_projection": (3, 90, 256, 256, 0, 1, True, None),  # T·B >= 256, I·R >= 256·1024
}


def _variants(kernel_name, rnn=False):
    kernel = kernels.REGISTRY[kernel_name]
    table = RNN_VARIANTS if rnn else LSTM_VARIANTS
    out = []
    for vid, cell in table.items():
        spec = lstmkit.CellSpec(kind="rnn", nonlinearity=cell) if rnn else resolve(cell)
        if kernel.unsupported(spec, torch.device("cpu"), torch.float64) is None:
            out.append(pytest.param(cell, id=vid))
    return out


def _kernel_variants(kernel_names):
    """(kernel row, cell) for every variant each row claims, as parameters whose ids name both
    (``-k peephole`` selects a variant's cases)."""
    return [pytest.param(name, p.values[0], id=f"{name}-{p.id}") for name in kernel_names for p in _variants(name)]


def _run(layer, x, h0, c0, lengths):
    inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, st = layer(inp, (h0, c0) if c0 is not None else h0)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    h_n, c_n = st if c0 is not None else (st, None)
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + (h_n * 0.7).sum()
    if c_n is not None:
        loss = loss + (c_n * torch.randn(c_n.shape, generator=g, dtype=out.dtype)).sum()
    wrt = [x, h0] + ([c0] if c0 is not None else []) + list(layer.parameters())
    return [out, h_n] + ([c_n] if c_n is not None else []), torch.autograd.grad(loss, wrt)


def _results(kernel_name, make_layer, state, shape, dtype, lstm):
    T, B, I, H, P, L, bidir, lengths = shape
    layer = make_layer(I, H, L, bidir, P).to(dtype)
    layer.load_state_dict(state)
    layer.backend = kernel_name
    D = 2 if bidir else 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    h0 = torch.randn(L * D, B, P or H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    c0 = None
    if lstm:
        c0 = torch.randn(L * D, B, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    values, grads = _run(layer, x, h0, c0, lengths)
    names = ["output", "h_n"] + (["c_n"] if lstm else []) + ["grad of input", "grad of h_0"]
    names += (["grad of c_0"] if lstm else []) + [f"grad of {n}" for n, _ in layer.named_parameters()]
    return dict(zip(names, [*values, *grads]))


def compare(kernel_name, make_layer, shape, dtype, lstm=True):
    """float64: kernel vs reference to 1e-10 (norm-wise relative). float32: the kernel is as
    accurate as the float32 reference, both measured against the float64 reference:
    error <= max(1e-5, 2 x the reference's own float32 error)."""
    T, B, I, H, P, L, bidir, lengths = shape
    torch.manual_seed(0)
    base = make_layer(I, H, L, bidir, P).double()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if not name.startswith("ln_"):
                p.uniform_(-0.5, 0.5)
    state = base.state_dict()
    truth = _results("reference", make_layer, state, shape, torch.float64, lstm)
    if dtype == torch.float64:
        fast = _results(kernel_name, make_layer, state, shape, torch.float64, lstm)
        for name in truth:
            assert_rel(fast[name], truth[name], dtype, name)
        return
    fast = _results(kernel_name, make_layer, state, shape, torch.float32, lstm)
    ref32 = _results("reference", make_layer, state, shape, torch.float32, lstm)
    for name, t in truth.items():
        scale = max(t.abs().max().item(), 1e-3) if t.numel() else 1.0
        err_fast = (fast[name].double() - t).abs().max().item() / scale if t.numel() else 0.0
        err_ref = (ref32[name].double() - t).abs().max().item() / scale if t.numel() else 0.0
        assert err_fast <= max(1e-5, 2 * err_ref), (
            f"{name}: float32 kernel error {err_fast:.2e} vs the float32 reference's {err_ref:.2e}")


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


def _weighted_sum(outs) -> torch.Tensor:
    """A loss that weighs every element of ``outs`` differently (linspace(-1, 1) over each)."""
    return sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum() for o in outs)


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


def test_create_graph_through_the_onednn_input_projection():
    """A first-order gradient with create_graph=True (a penalty on a read-out's gradient) where the
    input projection runs on oneDNN (float32, T·B >= 256, I·4H >= 256·1024): its backward refused
    any call in grad mode; now the first-order gradients equal those without create_graph, and a
    second order through the read-out alone runs, as for nn.LSTM."""
    from lstmkit.kernels.fused import _use_onednn

    torch.manual_seed(0)
    rnn, head = lstmkit.LSTM(256, 256), torch.nn.Linear(256, 1)
    assert _use_onednn(16 * 16, rnn.weight_ih_l0)
    x = torch.randn(16, 16, 256, requires_grad=True)
    params = [x, *rnn.parameters(), *head.parameters()]
    plain = torch.autograd.grad(head(rnn(x)[0]).square().mean(), params)
    graph = torch.autograd.grad(head(rnn(x)[0]).square().mean(), params, create_graph=True)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    (second,) = torch.autograd.grad(graph[-2].square().sum(), head.weight)  # through the read-out only
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_registry_rows_and_selection():
    assert "reference" in kernels.REGISTRY
    cpu = torch.device("cpu")
    deep = lstmkit.CellSpec(gate_hidden=(3,))
    assert kernels.select(resolve("vanilla"), torch.device("meta"), torch.float32).name == "reference"
    assert kernels.select(resolve("vanilla"), cpu, torch.complex64).name == "reference"
    if FUSED:
        assert kernels.select(resolve("peephole"), cpu, torch.float32).name == FUSED[0]
        assert kernels.select(deep, cpu, torch.float32).name == FUSED[0]
        with pytest.raises(ValueError, match=r"cannot run this layer: it runs float32, float64"):
            kernels.select(deep, cpu, torch.complex64, backend=FUSED[0])
    assert kernels.REGISTRY["triton"].refuses(deep) is None
    assert kernels.REGISTRY["triton"].refuses(lstmkit.CellSpec(gate_hidden=(3,), layernorm=True)) is None


def test_a_row_that_lacks_a_step_refuses_it_by_name():
    """A fused row declares the variant table's flags it computes (the two rows here: every one,
    abi.FLAGS); a row that lacks some names each part it does not compute, and points to cpu_fused
    only where that row computes the whole cell."""
    from lstmkit.kernels import abi
    from lstmkit.kernels.fused import FusedKernel

    assert kernels.REGISTRY["cpu_fused"].implements == kernels.REGISTRY["triton"].implements == frozenset(abi.FLAGS)

    class Partial(FusedKernel):
        name, implements = "partial", frozenset({"peephole"})

        def unsupported(self, spec, device, dtype):
            return self.refuses_or_dtype(spec, dtype)

    why = Partial().refuses(resolve("peephole+layernorm+deep=3+heads=1"))
    assert why == ("its kernels do not compute deep gates (gate_hidden), layernorm: such layers run on the "
                   "'reference' kernel (on the CPU, 'cpu_fused' computes them)")
    assert Partial().refuses(resolve("peephole")) is None


def _workload(**kw):
    base = dict(kind="lstm", steps=100, batch=32, hidden=128, dtype=torch.float32, gradient=False, lengths=False,
                projection=False)
    return kernels.Workload(**{**base, **kw})


def test_cpu_vanilla_selects_onednn_where_measured_faster(monkeypatch):
    """On the CPU the vanilla LSTM's calls go to torch's operator (oneDNN) where the table says it
    is faster, every other call and cell to the fused kernel; a forced backend is kept."""
    from lstmkit.kernels import torch_native

    cpu, vanilla = torch.device("cpu"), resolve("vanilla")

    def chosen(spec=vanilla, **kw):
        return kernels.select(spec, cpu, kw.get("dtype", torch.float32), workload=_workload(**kw)).name

    big = dict(batch=64, hidden=256)  # float32 inference on oneDNN (B >= 32, H = 256-512)
    # the table was measured on Intel's CPUs at torch's AVX-512 capability; on another vendor's (AMD's)
    # and held to AVX2 the fused kernel keeps every call
    for vendor, capability, cell_row in (("AuthenticAMD", "AVX512", FUSED[0]), (None, "AVX512", "torch"),
                                         ("GenuineIntel", "AVX2", FUSED[0]), ("GenuineIntel", "AVX512", "torch")):
        monkeypatch.setattr(torch_native, "cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(torch_native, "_capability", lambda c=capability: c)
        kernels.forget_choices()
        assert chosen(**big) == cell_row, (vendor, capability)
    assert chosen(**big) == "torch" and chosen(batch=32, hidden=512) == "torch"
    assert chosen(batch=32, hidden=256) == "torch" and chosen(batch=16, hidden=512) == FUSED[0]  # B < 32
    assert chosen(batch=16, hidden=1024) == FUSED[0] and chosen(batch=64, hidden=1024) == FUSED[0]  # H = 1,024
    assert chosen(batch=128, hidden=128) == FUSED[0] and chosen() == FUSED[0]  # H = 128
    assert chosen(gradient=True, **big) == FUSED[0] and chosen(gradient=True) == FUSED[0]  # training: the fused kernel
    assert chosen(steps=10, **big) == FUSED[0]
    assert chosen(lengths=True, **big) == FUSED[0] and chosen(projection=True, **big) == FUSED[0]
    assert chosen(dtype=torch.float64, **big) == FUSED[0] and chosen(kind="rnn", **big) == FUSED[0]
    assert chosen(resolve("peephole"), **big) == FUSED[0] and chosen(resolve("vanilla+fb=1"), **big) == "torch"
    assert kernels.select(vanilla, cpu, torch.float32).name == FUSED[0]  # a call not described
    with monkeypatch.context() as m:  # oneDNN switched off (torch.backends.mkldnn.flags): aten's own loop, slower
        m.setattr(torch._C, "_get_mkldnn_enabled", lambda: False)
        assert chosen(**big) == FUSED[0]
    assert kernels.select(vanilla, cpu, torch.float32, record=True, workload=_workload(**big)).name == FUSED[0]
    assert kernels.select(vanilla, cpu, torch.float32, backend=FUSED[0], workload=_workload(**big)).name == FUSED[0]
    monkeypatch.setattr(torch_native, "_onednn_amx", lambda: True)
    kernels.forget_choices()  # (a fact that does not change in a process: the choices made stand)
    assert chosen(dtype=torch.bfloat16) == "torch" and chosen(dtype=torch.bfloat16, hidden=1024) == FUSED[0]
    assert chosen(dtype=torch.bfloat16, gradient=True) == "torch"
    assert chosen(dtype=torch.bfloat16, gradient=True, batch=16) == FUSED[0]
    monkeypatch.setattr(torch_native, "_onednn_amx", lambda: False)
    kernels.forget_choices()  # (a fact that does not change in a process: the choices made stand)
    assert chosen(dtype=torch.bfloat16) == FUSED[0]

    # A layer's call: oneDNN where chosen (the same values as the fused kernel; the torch row's
    # gradients are tested with its other rows), the fused kernel in training, under autocast, in a
    # trace and for lengths.
    ran = []
    real = torch_native.TorchKernel._call
    monkeypatch.setattr(torch_native.TorchKernel, "_call", lambda self, *a, **k: ran.append(1) or real(self, *a, **k))
    torch.manual_seed(0)
    layer = lstmkit.LSTM(16, 256)
    fused = lstmkit.LSTM(16, 256, backend=FUSED[0])
    fused.load_state_dict(layer.state_dict())
    x = torch.randn(60, 64, 16)
    with torch.no_grad():
        (y, _), (y_fused, _) = layer(x), fused(x)
    assert len(ran) == 1
    torch.testing.assert_close(y, y_fused, rtol=1e-5, atol=1e-5)
    layer(x[:, :16].requires_grad_())  # float32 training: the fused kernel
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
        lstmkit.trace(layer, x)
        layer(x, lengths=torch.full((64,), 59))
    assert len(ran) == 1


def test_cpu_vendor_is_the_one_proc_cpuinfo_names():
    """The vendor checks (the oneDNN table's, the 16-bit units') read the first processor's
    vendor_id (None without one)."""
    from pathlib import Path

    from lstmkit.kernels import machine

    info = Path("/proc/cpuinfo")
    lines = info.read_text(errors="replace").split("\n\n")[0].splitlines() if info.exists() else []
    named = [line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == "vendor_id"]
    assert machine.cpu_vendor() == (named[0] if named else None)


def test_cuda_layers_select_cudnn_then_triton_or_the_reference_row():
    """On CUDA: torch's own operator (cuDNN) for the cells it computes, Triton for the rest,
    and for a trace (record mode) the first row that records."""
    import importlib.util

    cuda = torch.device("cuda")
    fast = "triton" if importlib.util.find_spec("triton") else "reference"
    for cell in ("vanilla", "vanilla+fb=1", CellSpec(kind="rnn", nonlinearity="relu")):
        assert kernels.select(resolve(cell), cuda, torch.float32).name == "torch"
        assert kernels.select(resolve(cell), cuda, torch.float32, record=True).name == fast
    assert kernels.select(resolve("vanilla"), cuda, torch.float32, backend="triton").name == fast
    for cell in ("peephole+layernorm", "zoneout=0.1", "cand_act=relu"):
        assert kernels.select(resolve(cell), cuda, torch.float32).name == fast


def test_build_failure_falls_back_to_reference_with_one_warning(monkeypatch):
    from lstmkit.kernels import cpu_ext

    def broken_build(cap, verbose=False):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(cpu_ext, "_ext", None)
    monkeypatch.setattr(cpu_ext, "_failed", None)
    monkeypatch.setattr(cpu_ext, "_build", broken_build)
    layer = lstmkit.LSTM(3, 4).double()
    ref = lstmkit.LSTM(3, 4, backend="reference").double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="could not be built.*simulated compiler failure") as rec:
        out = layer(x)[0]
        layer(x)  # a second call warns no more
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(out, ref(x)[0], rtol=0, atol=0)
    assert kernels.select(layer.spec, x.device, x.dtype).name == "reference"


@pytest.mark.parametrize("kernel_name", FUSED)
@pytest.mark.parametrize("cell", ["vanilla", "layernorm", "clip=1", "nig+niaf+noaf"])
def test_kernel_propagates_nan_like_torch(kernel_name, cell):
    layer = lstmkit.LSTM(3, 40, cell=cell, backend=kernel_name, check_finite=False)
    x = torch.randn(4, 2, 3)
    x[1, 0, 0] = float("nan")
    out, (h, c) = layer(x)
    assert torch.isnan(out[1:, 0]).all() and torch.isnan(c[:, 0]).all()  # NaN spreads through batch 0
    assert torch.isfinite(out[:, 1]).all()                                # batch 1 is untouched


def test_onednn_input_projection_matches_linear():
    torch.manual_seed(0)
    x = torch.randn(300, 256, dtype=torch.float64)
    w = torch.randn(1024, 256, dtype=torch.float64) * 0.05
    b = torch.randn(1024, dtype=torch.float64)
    assert fused._use_onednn(300, w.float()) and not fused._use_onednn(300, w)  # float32 only
    assert not fused._use_onednn(300, torch.zeros(512, 128))                    # small: MKL
    xs, ws, bs = (t.float().requires_grad_(True) for t in (x, w, b))
    xd, wd, bd = (t.clone().requires_grad_(True) for t in (x, w, b))
    out = fused.input_linear(xs, ws, bs)
    ref = torch.nn.functional.linear(xd, wd, bd)
    assert out.grad_fn is not None and "_Linear" in type(out.grad_fn).__name__
    g = torch.randn(300, 1024, dtype=torch.float64)
    (out * g.float()).sum().backward()
    (ref * g).sum().backward()
    for name, a, e in (("out", out, ref), ("dx", xs.grad, xd.grad), ("dw", ws.grad, wd.grad),
                       ("db", bs.grad, bd.grad)):
        err = (a.double() - e).abs().max() / e.abs().max()
        assert err < 1e-5, f"{name}: {err:.2e}"


@pytest.mark.parametrize("cell, proj", [("vanilla", 16), ("layernorm+peephole", 0), ("heads=2+fgr", 0),
                                        (CellSpec(gate_hidden={"f": (8, 4), "g": (8,)}), 0), ("heads=2+layernorm", 0)],
                         ids=["projection", "layernorm", "heads+fgr", "deep", "heads+layernorm"])
@pytest.mark.parametrize("split", ["rows", "panels"])
def test_two_threads_split_a_step_by_rows_or_by_panels(cell, proj, split):
    """With two threads the kernel splits each step's GEMMs by the batch's rows (each thread every
    panel of its own rows, no barrier in the time loop: where each thread has a register tile of rows
    and the weights are small, gemm.h's split_by_rows) or by panels (a barrier between the phases).
    Both, forced through the extension's test hook (so that the machine's cache size does not
    choose), on every phase that has a GEMM (projection, layernorm's chunked dW_hh, heads' K-split
    groups, fgr's W_gg, deep gates' MLPs), two layers, both directions, lengths, an odd batch — values,
    every gradient and inference (the input projection in the loop) against the reference, float64.
    (H = 32: each step's work is enough for the kernel to take both threads, choose_threads.)"""
    ext = cpu_ext.load()
    B = 17
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    ext._force_split(1 if split == "rows" else 2)
    try:
        g = torch.Generator().manual_seed(3)
        lengths = torch.randint(1, 8, (B,), generator=g).tolist()
        compare(FUSED[0], lambda I, H, L, bd, P: lstmkit.LSTM(I, H, L, bidirectional=bd, proj_size=P, cell=cell),
                (7, B, 5, 32, proj, 2, True, lengths), torch.float64)
        torch.manual_seed(0)
        ref = lstmkit.LSTM(5, 32, 2, bidirectional=True, proj_size=proj, cell=cell, backend="reference").double()
        fast = lstmkit.LSTM(5, 32, 2, bidirectional=True, proj_size=proj, cell=cell, backend=FUSED[0]).double()
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(7, B, 5, dtype=torch.float64, generator=g)
        with torch.no_grad():
            assert_rel(fast(x, lengths=lengths)[0], ref(x, lengths=lengths)[0], torch.float64, "inference")
    finally:
        ext._force_split(0)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_narrow_gemm_tiles_match_the_reference(batch):
    """Batches of 1-3 rows take the recurrent GEMM's narrow tiles (k split over several register
    sets, summed at the end; K = 5 and 7 leave a remainder), 7 rows a full AVX2 tile plus one:
    values and every gradient against the reference, float64, over a run (packed weights)."""
    torch.manual_seed(batch)
    ref = lstmkit.LSTM(5, 7, num_layers=2, cell="peephole", backend="reference").double()
    fast = lstmkit.LSTM(5, 7, num_layers=2, cell="peephole", backend=FUSED[0]).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, batch, 5, dtype=torch.float64)
    grads = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y, (h, c) = layer(xi)
        (y.square().sum() + h.sum() + c.sum()).backward()
        grads.append([y.detach(), xi.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_fused_activations_accuracy_and_nan(dtype):
    """The kernel's own vectorised exp / tanh / sigmoid / log sigmoid (the sLSTM's, through its
    log1p on [0, 1]) against torch's, over a wide range, with odd lengths (vector tails), extremes
    and NaN."""
    from lstmkit.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.fail("the fused kernel did not build")
    x = torch.cat([torch.linspace(-30, 30, 20001, dtype=torch.float64), torch.randn(777, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -100.0, 500.0, -500.0, float("nan")],
                                dtype=torch.float64)]).to(dtype)
    for which, fn in enumerate((torch.exp, torch.tanh, torch.sigmoid, torch.nn.functional.logsigmoid)):
        got = cpu_ext._ext._act_test(x, which)
        want = fn(x.double())
        finite = torch.isfinite(want) & (want.abs() < 1e30)
        rel = ((got.double() - want).abs() / want.abs().clamp_min(1e-30))[finite]
        tol = 4e-7 if dtype == torch.float32 else 1e-15
        assert rel.max() < tol, f"{fn.__name__}: max relative error {rel.max():.2e}"
        assert torch.isnan(got[-1]), f"{fn.__name__} swallowed NaN"
        if fn in (torch.tanh, torch.sigmoid):  # never beyond their range (float32 rounding reached 1 + 2 ulp)
            assert got[:-1].abs().max() <= 1, f"{fn.__name__}: {got[:-1].abs().max().item()!r} beyond 1"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_step_gemm_every_path_against_float64(dtype):
    """The kernel's per-step GEMM, C (+)= A Wᵀ (+ bias), on every path it takes: W packed ahead (a
    weight that several steps read) or read in place (one step: BLAS gemv for one row, gemm for two
    or three, from four rows on each panel packed at use — AVX-512 builds: BLAS gemm at every row
    count, the path measured faster there), W row- or column-major, one and two
    threads, partial panels and K not a multiple of the vector width — against float64 matmul."""
    from lstmkit.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.fail("the fused kernel did not build")
    gen = torch.Generator().manual_seed(0)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for M, N, K in [(1, 40, 37), (2, 16, 8), (3, 33, 5), (4, 16, 1), (7, 37, 64), (13, 70, 19), (32, 128, 96)]:
        A = torch.randn(M, K, generator=gen, dtype=torch.float64)
        W = torch.randn(N, K, generator=gen, dtype=torch.float64)
        bias = torch.randn(N, generator=gen, dtype=torch.float64)
        C0 = torch.randn(M, N, generator=gen, dtype=torch.float64)
        for uses, column_major, with_bias, acc, threads in itertools.product((1, 2), (False, True), (False, True),
                                                                           (False, True), (1, 2)):
            w = W.t().contiguous().t() if column_major else W  # the same values, strides (1, N)
            got = cpu_ext._ext._gemm_test(A.to(dtype), w.to(dtype), bias.to(dtype) if with_bias else torch.empty(0, dtype=dtype),
                                          C0.to(dtype).clone(), acc, uses, threads)
            want = A.to(dtype).double() @ W.to(dtype).double().t() + (C0.to(dtype).double() if acc else 0)
            if with_bias:
                want = want + bias.to(dtype).double()
            where = f"M={M} N={N} K={K} uses={uses} column_major={column_major} bias={with_bias} acc={acc} threads={threads}"
            torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, where=where: f"{where}: {m}")


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


def test_fused_kernel_releases_the_gil():
    """Another Python thread runs while the compiled recurrence does, and two threads
    running layers at once get the same results as one after the other."""
    import threading
    import time

    from lstmkit.kernels import cpu_ext

    torch.manual_seed(0)
    layer = lstmkit.LSTM(64, 256, backend="cpu_fused")
    x = torch.randn(50, 8, 64)
    with torch.no_grad():
        layer(x[:5])  # build / load the extension first
    counts = {"n": 0}
    running = threading.Event()
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            if running.is_set():
                counts["n"] += 1

    def rate_while(fn) -> float:
        counts["n"] = 0
        running.set()
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        running.clear()
        return counts["n"] / elapsed

    xg = torch.randn(6000, 8, 4 * 256)  # (T, B, 4H) pre-activations: ~0.5 s of recurrence
    w, h0, c0 = layer.weight_hh_l0.detach(), torch.zeros(8, 256), torch.zeros(8, 256)
    worker = threading.Thread(target=count)
    worker.start()
    try:
        idle = rate_while(lambda: time.sleep(0.3))  # the counter's speed with the GIL free
        nothing = [torch.empty(0)] * len(abi.PARAMS)
        busy = rate_while(lambda: cpu_ext.forward(xg, w, h0, c0, torch.empty(0, dtype=torch.long), *nothing,
                                                  abi.flags(resolve("vanilla")), [], *abi.scalars(resolve("vanilla")),
                                                  256, 0, True))
    finally:
        done.set()
        worker.join()
    # Holding the GIL, the counter would run only around the call (measured: ~0.1 x idle).
    assert busy > 0.4 * idle, (busy, idle)

    # Two layers on two threads: results equal to running them one after the other.
    other = lstmkit.LSTM(64, 256, backend="cpu_fused")
    expected = [m(x)[0].detach() for m in (layer, other)]
    got: list = [None, None]

    def run(k: int, m) -> None:
        got[k] = m(x)[0].detach()

    threads = [threading.Thread(target=run, args=(k, m)) for k, m in enumerate((layer, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


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


def test_in_loop_projection_rule():
    """The input projection runs inside the loop for one step always; for a sequence with rows
    enough for the register tile while W_ih fits L2, with fewer rows only while it fits L1."""
    rule = fused.in_loop_projection
    assert rule(torch.empty(1, 1, 512), torch.empty(2048, 512))          # one step
    assert rule(torch.empty(100, 32, 128), torch.empty(512, 128))        # 256 KiB, 32 rows
    assert not rule(torch.empty(100, 32, 512), torch.empty(2048, 512))   # 4 MiB
    assert rule(torch.empty(100, 1, 32), torch.empty(128, 32))           # 16 KiB, one row
    assert not rule(torch.empty(100, 4, 64), torch.empty(256, 64))       # 64 KiB, four rows


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


_ALL_VARIANTS = {**LSTM_VARIANTS, **RNN_VARIANTS, **HEADS_VARIANTS, **SLSTM_VARIANTS}


@pytest.mark.parametrize("name", list(_ALL_VARIANTS))
def test_workspaces_are_written_before_they_are_read(name):
    """A call's workspace parts that its GEMMs write before the cell reads them (r and xg_t,
    Carve::take_rows) are not zeroed. With the extension's test hook filling them with NaN instead,
    every variant must give the same results bit for bit: two layers, both directions, lengths, an
    odd batch — training (values and every gradient), inference (the input projection in the loop);
    one time step (T = 1: the weights read in place through BLAS, a gemm at B = 3 and a gemv at
    B = 1), in inference and in training, each twice (the second call takes the prepared step); and a
    bfloat16 layer's training forward (its xg_t widened row by row into the workspace)."""
    cell = _ALL_VARIANTS[name]
    ext = cpu_ext.load()
    rnn = name in RNN_VARIANTS
    kind = lstmkit.RNN if rnn else lstmkit.LSTM
    opts = {"nonlinearity": cell} if rnn else {"cell": cell}
    lengths = [5, 3, 4]

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        layer = kind(6, 8, 2, bidirectional=True, backend=FUSED[0], **opts)
        x = torch.randn(5, 3, 6, requires_grad=True)
        out = layer(x, lengths=lengths)[0]
        (out * torch.randn_like(out)).sum().backward()
        results = [out, x.grad, *(p.grad for p in layer.parameters())]
        with torch.no_grad():
            layer.eval()
            results.append(layer(x, lengths=lengths)[0])
        single = kind(6, 8, backend=FUSED[0], **opts)
        for x1 in (x[:1].detach(), x[:1, :1].detach()):  # one step: (1, 3, I) and (1, 1, I)
            for _ in range(2):
                with torch.no_grad():
                    results.append(single.eval()(x1)[0])
                x1g = x1.clone().requires_grad_(True)
                out1 = single.train()(x1g)[0]
                out1.sum().backward()
                results += [out1, x1g.grad]
        if not rnn:
            layer16 = kind(6, 8, backend=FUSED[0], dtype=torch.bfloat16, **opts)
            results.append(layer16(x.detach().to(torch.bfloat16).requires_grad_(True))[0].float())
        return results

    expected = run()
    ext._poison_workspaces(True)
    try:
        got = run()
    finally:
        ext._poison_workspaces(False)
    for k, (a, e) in enumerate(zip(got, expected)):
        assert torch.equal(a, e), f"result {k} differs with the workspaces poisoned"


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
