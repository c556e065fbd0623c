"""Bad input gets a clear ValueError/TypeError naming the argument, expected and actual."""

from __future__ import annotations

import re

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstmkit
from lstmkit import CellSpec
from variants import LSTM_VARIANTS

I, H = 4, 5


@pytest.fixture
def lstm():
    return lstmkit.LSTM(I, H, num_layers=2)


def test_wrong_rank(lstm):
    with pytest.raises(ValueError, match=r"input: expected a 2-D .* got 4-D of shape \(2, 3, 1, 4\)"):
        lstm(torch.randn(2, 3, 1, I))
    with pytest.raises(ValueError, match=r"got 1-D"):
        lstm(torch.randn(I))


def test_wrong_input_size(lstm):
    with pytest.raises(ValueError, match=r"input: expected input size .* 4, got 7"):
        lstm(torch.randn(3, 2, 7))


@pytest.mark.parametrize("bad,expected", [
    ((3, 2, 5), r"hx: h_0 .* must have shape \(2, 2, 5\) .* got \(3, 2, 5\)"),
    ((2, 7, 5), r"batch size 7 does not match the input's 2"),
    ((2, 2, 6), r"got \(2, 2, 6\)"),
    ((2, 5), r"got \(2, 5\)"),
])
def test_hx_wrong_shape(lstm, bad, expected):
    x = torch.randn(3, 2, I)
    with pytest.raises(ValueError, match=expected):
        lstm(x, (torch.zeros(bad), torch.zeros(2, 2, H)))


def test_cx_wrong_shape_and_batch_mismatch(lstm):
    x = torch.randn(3, 2, I)
    with pytest.raises(ValueError, match=r"c_0 .* got \(2, 3, 5\).*batch size 3"):
        lstm(x, (torch.zeros(2, 2, H), torch.zeros(2, 3, H)))


def test_unbatched_needs_2d_state(lstm):
    with pytest.raises(ValueError, match=r"unbatched 2-D input must have shape \(2, 5\)"):
        lstm(torch.randn(3, I), (torch.zeros(2, 1, H), torch.zeros(2, 1, H)))


def test_hx_not_a_pair(lstm):
    with pytest.raises(TypeError, match=r"hx: expected a tuple \(h_0, c_0\)"):
        lstm(torch.randn(3, 2, I), torch.zeros(2, 2, H))
    with pytest.raises(TypeError, match=r"hx: expected a tensor h_0"):
        lstmkit.RNN(I, H)(torch.randn(3, 2, I), (torch.zeros(1, 2, H),))


def test_dtypes(lstm):
    with pytest.raises(TypeError, match=r"input: expected a floating-point tensor, got dtype torch.int64"):
        lstm(torch.ones(3, 2, I, dtype=torch.long))
    with pytest.raises(TypeError, match=r"input: dtype torch.float64 does not match .* \(torch.float32\)"):
        lstm(torch.randn(3, 2, I, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"hx: h_0 has dtype torch.float64, expected torch.float32"):
        lstm(torch.randn(3, 2, I), (torch.zeros(2, 2, H, dtype=torch.float64), torch.zeros(2, 2, H)))


def test_devices(lstm):
    meta = torch.empty(3, 2, I, device="meta")
    with pytest.raises(ValueError, match=r"input: on device meta, but the layer's parameters are on cpu"):
        lstm(meta)
    with pytest.raises(ValueError, match=r"hx: c_0 is on device meta, expected cpu"):
        lstm(torch.randn(3, 2, I), (torch.zeros(2, 2, H), torch.zeros(2, 2, H, device="meta")))


def test_zero_length(lstm):
    with pytest.raises(ValueError, match=r"input: expected a sequence length L >= 1, got L = 0"):
        lstm(torch.randn(0, 2, I))
    # the shape as given (it said the batched, time-major one it had made: (0, 1, I), (0, 2, I))
    with pytest.raises(ValueError, match=rf"got L = 0 \(shape \(0, {I}\)\)"):
        lstm(torch.randn(0, I))
    first = lstmkit.LSTM(I, H, batch_first=True)
    with pytest.raises(ValueError, match=rf"got L = 0 \(shape \(2, 0, {I}\)\)"):
        first(torch.randn(2, 0, I))
    # A hand-made PackedSequence with a zero-length sequence (pack_padded_sequence refuses those).
    packed = pack_padded_sequence(torch.randn(3, 2, I), torch.tensor([3, 1]))
    bad = PackedSequence(packed.data, torch.tensor([2, 1, 1]), None, None)
    out, _ = lstm(bad)  # valid: shows the hand-made object is accepted when lengths are fine
    assert out.data.shape == (4, H)


def test_non_finite_input_and_state(lstm):
    x = torch.randn(3, 2, I)
    x[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="input: contains NaN or inf"):
        lstm(x)
    x[1, 0, 2] = float("inf")
    with pytest.raises(ValueError, match="input: contains NaN or inf"):
        lstm(x)
    h = torch.zeros(2, 2, H)
    h[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="hx: h_0 contains NaN or inf"):
        lstm(torch.randn(3, 2, I), (h, torch.zeros(2, 2, H)))
    unchecked = lstmkit.LSTM(I, H, check_finite=False)
    x[1, 0, 2] = float("nan")
    assert torch.isnan(unchecked(x)[0]).any()  # opted out: NaN propagates as in torch


def test_wrong_input_type(lstm):
    with pytest.raises(TypeError, match=r"input: expected a Tensor or a PackedSequence, got list"):
        lstm([[1.0] * I])


@pytest.mark.parametrize("kwargs,exc,expected", [
    (dict(hidden_size=0), ValueError, r"hidden_size: expected an int >= 1, got 0"),
    (dict(hidden_size=2.5), TypeError, r"hidden_size: expected an int, got float"),
    (dict(num_layers=0), ValueError, r"num_layers: expected an int >= 1, got 0"),
    (dict(dropout=1.5), ValueError, r"dropout: expected a number in \[0, 1\], got 1.5"),
    (dict(proj_size=5), ValueError, r"proj_size: expected a value smaller than hidden_size \(5\), got 5"),
    (dict(proj_size=-1), ValueError, r"proj_size: expected an int >= 0, got -1"),
    (dict(cell="nfg+cifg"), ValueError, r"cifg .* cannot also be removed"),
    (dict(cell="nig+cifg"), ValueError, r"f = 1 − i ≡ 0"),
    (dict(cell="peephole+nig+nfg+nog"), ValueError, r"peephole .* computes none of them"),
    (dict(cell="fgr+nig+nfg+nog"), ValueError, r"fgr .* computes none of them"),
    (dict(cell="nfg+fb=1"), ValueError, r"forget_bias: the forget gate has no bias of its own here \(nfg"),
    (dict(cell="vanilla+fb=1", bias=False), ValueError, r"forget_bias=1.0 needs biases"),
    (dict(cell="bogus"), ValueError, r"cell: unknown variant 'bogus'"),
    (dict(cell="clip=x"), ValueError, r"cannot read 'clip=x'"),
    (dict(cell="clip=-1"), ValueError, r"cell_clip: expected a finite number > 0"),
    (dict(cell="rnn"), ValueError, r"use lstmkit.RNN"),
    (dict(cell=42), TypeError, r"cell: expected a preset name"),
    (dict(backend="nope"), ValueError, r"backend: unknown kernel 'nope'"),
])
def test_constructor_errors(kwargs, exc, expected):
    args = dict(input_size=I, hidden_size=H)
    args.update(kwargs)
    with pytest.raises(exc, match=expected):
        lstmkit.LSTM(**args)


def test_spec_errors():
    with pytest.raises(ValueError, match=r"kind='rnn'.*\['peephole'\] cannot apply"):
        lstmkit.CellSpec(kind="rnn", peephole=True)
    with pytest.raises(ValueError, match=r"gate_hidden: gate 'f' .* not computed"):
        lstmkit.CellSpec(coupled=True, gate_hidden={"f": (3,)})
    with pytest.raises(ValueError, match=r"gate_hidden\['i'\]: expected positive integer widths"):
        lstmkit.CellSpec(gate_hidden={"i": (0,)})
    with pytest.raises(ValueError, match=r"gate_hidden: unknown gate 'z'"):
        lstmkit.CellSpec(gate_hidden={"z": (3,)})
    with pytest.raises(TypeError, match=r"CellSpec.peephole: expected a bool"):
        lstmkit.CellSpec(peephole=1)
    with pytest.raises(ValueError, match=r"nonlinearity"):
        lstmkit.CellSpec(nonlinearity="relu")


def test_lstmcell_errors():
    c = lstmkit.LSTMCell(I, H)
    with pytest.raises(ValueError, match=r"input: expected a 1-D \(4,\) or 2-D"):
        c(torch.randn(2, 3, I))
    with pytest.raises(ValueError, match=r"hx: h must have shape \(2, 5\), got \(3, 5\)"):
        c(torch.randn(2, I), (torch.zeros(3, H), torch.zeros(2, H)))
    with pytest.raises(ValueError, match=r"fgr keeps the previous gate activations"):
        lstmkit.LSTMCell(I, H, cell="fgr")


def test_gates_bad_index():
    m = lstmkit.LSTM(I, H)
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 0\], got 1"):
        m.gates(layer=1)
    with pytest.raises(ValueError, match=r"direction: expected an int in \[0, 0\], got 1"):
        m.gates(direction=1)


def test_forced_backend_that_cannot_run():
    from lstmkit import kernels

    class Picky(kernels.Kernel):
        name, devices = "picky", ("cpu",)

        def unsupported(self, spec, device, dtype):
            return "it runs only the vanilla cell" if spec.peephole else None

        def run(self, *a, **k):  # pragma: no cover - never selected here
            raise AssertionError

    kernels.register(Picky())
    try:
        m = lstmkit.LSTM(I, H, cell="peephole", backend="picky")
        with pytest.raises(ValueError, match=r"backend: kernel 'picky' cannot run this layer: it runs only"):
            m(torch.randn(2, 1, I))
    finally:
        del kernels.REGISTRY["picky"]


def test_scalar_input_gets_the_rank_message():
    """As LSTMCell: a 0-D tensor is a wrong rank, not an IndexError."""
    with pytest.raises(ValueError, match=r"input: expected a 2-D \(L, 3\) unbatched or 3-D batched tensor, got 0-D"):
        lstmkit.LSTM(3, 4)(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"input: expected a 1-D \(3,\) or 2-D"):
        lstmkit.LSTMCell(3, 4)(torch.tensor(1.0))


@pytest.mark.parametrize("kwargs,exc,expected", [
    (dict(dtype=torch.int32), TypeError, r"dtype: expected one of torch.float32, .* got torch.int32"),
    (dict(dtype="float32"), TypeError, r"dtype: expected one of torch.float32, .* got 'float32'"),
    (dict(device="nowhere"), ValueError, r"device: 'nowhere' is not a device"),
    (dict(cell="deep=2147483648"), ValueError,
     r"gate_hidden\['i'\]: expected positive integer widths of at most 1,048,576 \(a sane bound\), got \(2147483648,\)"),
    (dict(hidden_size=100_000, num_layers=100), ValueError,
     r"input_size, hidden_size, num_layers, cell: the parameters would take [\d,.]+ GiB .* more than this machine's"),
])
def test_constructor_arguments_are_named(kwargs, exc, expected):
    args = dict(input_size=I, hidden_size=H)
    args.update(kwargs)
    with pytest.raises(exc, match=expected):
        lstmkit.LSTM(**args)
    if "dtype" in kwargs:
        with pytest.raises(exc, match=expected):
            lstmkit.LSTMCell(I, H, dtype=kwargs["dtype"])


def test_cuda_without_cuda_names_the_argument():
    if torch.cuda.is_available():  # the message is for machines without CUDA; here the layer is made
        assert lstmkit.LSTM(I, H, device="cuda").weight_ih_l0.is_cuda
        return
    with pytest.raises(ValueError, match=r"device: 'cuda' asks for CUDA, but this torch sees no CUDA device"):
        lstmkit.LSTM(I, H, device="cuda")


def test_fx_symbolic_trace_is_refused_with_the_leaf_tracer_that_works():
    """torch.fx.symbolic_trace of a model holding an lstmkit layer raised "input: expected a Tensor or
    a PackedSequence, got Proxy" (of the bare layer: a lengths error though none was given); the
    message now names the tracer that keeps lstmkit layers whole, which traces exactly."""
    class Model(torch.nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn, self.out = rnn, torch.nn.Linear(H, 2)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    for model in (Model(lstmkit.LSTM(I, H)), lstmkit.LSTM(I, H), lstmkit.RNN(I, H), lstmkit.LSTMCell(I, H)):
        with pytest.raises(TypeError, match=r"torch.fx.symbolic_trace cannot trace through an lstmkit layer"):
            torch.fx.symbolic_trace(model)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, (lstmkit.LSTM, lstmkit.RNN, lstmkit.LSTMCell)) or super().is_leaf_module(m, name)

    model = Model(lstmkit.LSTM(I, H))
    traced = torch.fx.GraphModule(model, Tracer().trace(model))
    x = torch.randn(4, 2, I)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)

    class Stepper(torch.nn.Module):  # step() is not forward: a leaf keeps only forward whole
        def __init__(self):
            super().__init__()
            self.rnn = lstmkit.LSTM(I, H)

        def forward(self, x):
            return self.rnn.step(x)[0]

    with pytest.raises(TypeError, match=r"cannot trace through an lstmkit layer's step\(\)"):
        Tracer().trace(Stepper())


def test_sparse_parameters_and_lengths_are_refused_by_name():
    """A sparse (or mkldnn) parameter passed the shape checks and crashed inside the fused kernels
    ("Cannot access data pointer of Tensor that doesn't have storage"); sparse lengths raised torch's
    NotImplementedError for aten::ge on SparseCPU."""
    layer = lstmkit.LSTM(I, H)
    weight = layer.weight_hh_l0.detach()
    for bad in (weight.to_sparse(), weight.to_mkldnn()):
        params = {**dict(layer.named_parameters()), "weight_hh_l0": bad}
        with pytest.raises(TypeError, match="parameter weight_hh_l0: expected a dense"):
            torch.func.functional_call(layer, params, (torch.randn(4, 2, I),))
    with pytest.raises(TypeError, match="lengths: expected a dense"):
        layer(torch.randn(4, 2, I), lengths=torch.tensor([4, 2]).to_sparse())


def test_gate_hidden_widths_must_be_ints():
    for bad in (16.5, "16", (4, 2.0), True):
        with pytest.raises(ValueError, match=r"gate_hidden\['f'\]: expected positive integer widths"):
            lstmkit.CellSpec(gate_hidden={"f": bad})
    assert lstmkit.CellSpec(gate_hidden={"f": 16}).gate_hidden == (("f", (16,)),)
    import numpy as np  # an array's == () compared elementwise: NumPy's "truth value ... is ambiguous"
    for bad in (np.array([16]), np.array([])):
        with pytest.raises(TypeError, match=r"gate_hidden: expected a tuple of hidden widths"):
            lstmkit.CellSpec(gate_hidden=bad)


def test_lstmcell_checks_nan_and_inf_like_lstm():
    c = lstmkit.LSTMCell(I, H)
    x = torch.randn(2, I)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="input: contains NaN or inf"):
        c(x)
    h = torch.zeros(2, H)
    h[0, 1] = float("inf")
    with pytest.raises(ValueError, match="hx: h contains NaN or inf"):
        c(torch.randn(2, I), (h, torch.zeros(2, H)))
    assert torch.isnan(lstmkit.LSTMCell(I, H, check_finite=False)(x)[0]).any()  # opted out


def test_inconsistent_packed_sequence_is_named(lstm):
    packed = pack_padded_sequence(torch.randn(3, 2, I), torch.tensor([3, 1]))  # 4 rows, batch_sizes [2, 1, 1]
    cases = [
        (PackedSequence(torch.randn(5, I), packed.batch_sizes, None, None),
         r"PackedSequence.data has 5 rows but its batch_sizes add up to 4"),
        (PackedSequence(packed.data, torch.tensor([1, 2, 1]), None, None),
         r"batch_sizes must be positive and non-increasing, got \[1, 2, 1\]"),
        (PackedSequence(packed.data, torch.tensor([2.0, 1.0, 1.0]), None, None),
         r"batch_sizes must be a non-empty 1-D int64 CPU tensor"),
        (PackedSequence(packed.data, packed.batch_sizes, torch.tensor([0, 0]), torch.tensor([0, 1])),
         r"sorted_indices must be a permutation of 0..1"),
        (PackedSequence(packed.data, packed.batch_sizes, torch.tensor([1, 0]), torch.tensor([0, 1])),
         r"unsorted_indices must be the inverse of sorted_indices"),
        (PackedSequence(packed.data[:, 0], packed.batch_sizes, None, None), r"PackedSequence.data must be a 2-D"),
    ]
    for bad, expected in cases:
        with pytest.raises(ValueError, match=expected):
            lstm(bad)
        with pytest.raises(ValueError, match=expected.replace("input", "x")):
            lstmkit.trace(lstm, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finite_check_of_a_large_input_split_among_threads(dtype):
    """The compiled check splits a large tensor among torch's threads: a NaN or inf anywhere (the
    first element, the middle, the last, a lane past the vector loop) is found, in every dtype,
    whatever the thread count; a finite one passes."""
    from lstmkit.kernels import cpu_ext

    assert cpu_ext.available(), "the fused CPU kernel must build here (make test installs what it needs)"
    n = (1 << 19) + 7  # several grains, and a tail past the vectors
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            clean = torch.randn(n).to(dtype)
            assert cpu_ext.first_nonfinite([clean]) == -1
            for at in (0, n // 2, n - 8, n - 1):
                for bad in (float("nan"), float("inf"), -float("inf")):
                    x = clean.clone()
                    x[at] = bad
                    assert cpu_ext.first_nonfinite([clean, x]) == 1, (t, at, bad)
    finally:
        torch.set_num_threads(threads)
    layer = lstmkit.LSTM(8, 4).to(dtype)
    x = torch.randn(n // 8 // 16, 16, 8).to(dtype)
    x[-1, -1, -1] = float("nan")
    with pytest.raises(ValueError, match="input: contains NaN or inf"):
        layer(x)


def _shorter(t: torch.Tensor) -> torch.nn.Parameter:
    """``t`` without its last row (a 1-D tensor: its last entry), as a new parameter."""
    return torch.nn.Parameter(t.detach()[:-1].clone())


@pytest.mark.parametrize("variant", list(LSTM_VARIANTS))
def test_a_parameter_of_another_shape_is_named(variant):
    """Every parameter of every variant: one replaced by a tensor one row short is refused with
    its name before any work — by forward, by step and by a cell — instead of read past its end;
    one of another dtype likewise. (Before, a peephole one entry short ran, reading memory past it.)"""
    layer = lstmkit.LSTM(3, 4, cell=LSTM_VARIANTS[variant])
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        layer(x)  # a kept signature: the next calls may take the prepared road
    for name, p in list(layer.named_parameters()):
        setattr(layer, name, _shorter(p))
        with pytest.raises(ValueError, match=re.escape(f"parameter {name}: this layer's cell reads shape {tuple(p.shape)}")):
            layer(x)
        if not layer.spec.fgr:
            with pytest.raises(ValueError, match=rf"parameter {name}:"):
                layer.step(x[0])
        setattr(layer, name, torch.nn.Parameter(p.detach().double()))
        if name != "weight_ih_l0":  # (the first parameter sets the dtype the others are compared with)
            with pytest.raises(TypeError, match=rf"parameter {name}: torch.float64"):
                layer(x)
        setattr(layer, name, p)
    assert torch.isfinite(layer(x)[0]).all()
    if layer.spec.fgr:
        return
    cell = lstmkit.LSTMCell(3, 4, cell=LSTM_VARIANTS[variant])
    for name, p in list(cell.named_parameters()):
        setattr(cell, name, _shorter(p))
        with pytest.raises(ValueError, match=rf"parameter {name}:"):
            cell(x[0])
        setattr(cell, name, p)


def test_a_deep_gate_weight_transposed_is_named():
    """A deep gate's second-layer weight (H, n_1) given as (n_1, H) has the same number of
    entries; its shape names it."""
    layer = lstmkit.LSTM(3, 4, cell=CellSpec(gate_hidden={"f": (2,)}))
    w = layer.mlp_f_weight1_l0
    layer.mlp_f_weight1_l0 = torch.nn.Parameter(w.detach().t().contiguous())
    with pytest.raises(ValueError, match=r"parameter mlp_f_weight1_l0: this layer's cell reads shape \(4, 2\)"):
        layer(torch.randn(5, 2, 3))


def test_a_parameter_set_through_data_is_seen_by_the_prepared_step():
    """``.data`` swaps a parameter's tensor without replacing the parameter, so the prepared
    step's identity check passes; the kept layer's own check refuses it as a fresh module does
    (ValueError naming the parameter and both shapes)."""
    cell = lstmkit.LSTMCell(3, 4, cell="peephole")
    x = torch.randn(2, 3)
    with torch.no_grad():
        for _ in range(2):
            cell(x)
        cell.peephole_i.data = torch.zeros(3)
        with pytest.raises(ValueError, match=r"parameter peephole_i: this layer's cell reads shape \(4,\), got \(3,\)"):
            cell(x)


@pytest.mark.parametrize("cell", ["vanilla", "layernorm", "deep=3", "slstm", "fgr", "zoneout=0.2"])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_an_empty_batch_gives_empty_results(cell, backend):
    """A batch of no sequences (B = 0) runs as nn.LSTM runs it: empty outputs and states, and a
    backward that leaves zero gradients (it was refused, while lstmkit.LSTMCell took it)."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(4, 6, cell=cell, backend=backend, num_layers=2, bidirectional=True)
    want = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True)(torch.randn(5, 0, 4))
    for _ in range(2):  # the second call: a kept signature where there is one
        y, state = layer(torch.randn(5, 0, 4, requires_grad=True))
        assert y.shape == want[0].shape and all(s.shape == want[1][0].shape for s in state)
        (y.sum() + sum(s.sum() for s in state)).backward()
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    # given initial states get their (empty) gradients, as nn.LSTM's: c0's was None on the fused
    # kernel (a state of no rows read as an absent one), and autograd.grad on it raised
    state0 = [torch.zeros(s.shape, requires_grad=True) for s in layer(torch.randn(5, 0, 4))[1]]
    y, state = layer(torch.randn(5, 0, 4), tuple(state0))
    grads = torch.autograd.grad(y.sum() + sum(s.sum() for s in state), state0)
    assert [g.shape for g in grads] == [s.shape for s in state0]
    assert layer(torch.randn(5, 0, 4), lengths=torch.zeros(0, dtype=torch.long))[0].shape == want[0].shape
    traced = lstmkit.trace(layer, torch.randn(5, 0, 4))  # (a kept buffer of no rows is not an absent one)
    assert traced[1][1]["h"].shape == (5, 0, 6) and traced[1][1]["f"].shape == (5, 0, 6)
    if not layer.spec.fgr:
        single = lstmkit.LSTM(4, 6, cell=cell, backend=backend, num_layers=2)
        assert single.step(torch.randn(0, 4))[0].shape == (0, 6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["vanilla", "slstm", "deep=2"])
def test_an_empty_batch_of_a_16_bit_layer(cell, dtype):
    """B = 0 in a 16-bit layer: empty results in its dtype (the kernel left the empty states
    unwidened and failed an internal assert, or read 16-bit memory as float32), with gradients and
    without, a step, a cell, a frozen copy; under autocast the output is autocast's dtype (it came
    back float32)."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(4, 6, cell=cell, num_layers=2).to(dtype)
    cell_mod = lstmkit.LSTMCell(4, 6, cell=cell).to(dtype)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for _ in range(2):  # and a kept signature
                y, state = layer(torch.randn(5, 0, 4, dtype=dtype, requires_grad=grad))
                assert y.shape == (5, 0, 6) and y.dtype == dtype and all(s.dtype == dtype for s in state)
                assert layer.step(torch.randn(0, 4, dtype=dtype))[0].dtype == dtype
                assert all(s.shape == (0, 6) and s.dtype == dtype for s in cell_mod(torch.randn(0, 4, dtype=dtype)))
            if grad:
                (y.sum() + sum(s.sum() for s in state)).backward()
    with torch.no_grad():
        assert lstmkit.freeze(layer)(torch.randn(5, 0, 4, dtype=dtype))[0].dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lstmkit.LSTM(4, 6, cell=cell)(torch.randn(5, 0, 4))[0].dtype == torch.bfloat16


def test_tensors_of_other_layouts_are_named():
    """Sparse, mkldnn and nested inputs (and states) are named before any work — also where a
    dense call of the same shape was kept (its signature includes the layout)."""
    layer, cell = lstmkit.LSTM(I, H), lstmkit.LSTMCell(I, H)
    x = torch.randn(5, 2, I)
    with torch.no_grad():
        for _ in range(2):
            layer(x), layer.step(x[0]), cell(x[0])
    for what, call in [
        ("input", lambda: layer(x.to_sparse())), ("input", lambda: layer.step(x[0].to_sparse())),
        ("input", lambda: cell(x[0].to_sparse())), ("input", lambda: cell(x[0].to_mkldnn())),
        ("input", lambda: layer(torch.nested.nested_tensor([torch.randn(5, I), torch.randn(4, I)]))),
        ("hx: h_0", lambda: layer(x, (torch.zeros(1, 2, H).to_sparse(), torch.zeros(1, 2, H)))),
        ("hx: c", lambda: cell(x[0], (torch.zeros(2, H), torch.zeros(2, H).to_sparse()))),
    ]:
        with pytest.raises(TypeError, match=f"{what}: expected a dense \\(strided\\) tensor"):
            call()


def test_initial_values_the_dtype_cannot_hold_and_storage_only_dtypes():
    with pytest.raises(ValueError, match=r"initial bias of gate f \(100000\) does not fit in torch.float16"):
        lstmkit.LSTM(I, H, cell="fb=1e5", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"initial bias of gate f \(1e\+39\) does not fit in torch.float32"):
        lstmkit.LSTM(I, H, cell="fb=1e39")
    with pytest.raises(TypeError, match="dtype: expected one of torch.float32, torch.float64, torch.bfloat16, torch.float16"):
        lstmkit.LSTM(I, H, dtype=torch.float8_e4m3fn)
    layer = lstmkit.LSTM(I, H, cell="chrono=1e30", dtype=torch.float16)  # drawn in float32: log(U) fits
    assert torch.isfinite(layer.bias_ih_l0).all()
    # a cell clip that rounds to 0 in the dtype clipped every state to 0: every output 0, silently
    with pytest.raises(ValueError, match=r"clip=1e-300 rounds to 0 in torch.float32"):
        lstmkit.LSTM(I, H, cell="clip=1e-300")
    with pytest.raises(ValueError, match=r"clip=1e-10 rounds to 0 in torch.float16"):
        lstmkit.LSTMCell(I, H, cell="clip=1e-10", dtype=torch.float16)
    lstmkit.LSTM(I, H, cell="clip=1e-40")  # a subnormal float32: held, not refused
    converted = lstmkit.LSTM(I, H, cell="clip=1e-10").half()  # converted after it was built: refused by the call
    with pytest.raises(ValueError, match=r"clip=1e-10 rounds to 0 in torch.float16"):
        converted(torch.randn(3, 2, I).half())


def test_lengths_as_numpy_and_out_of_range_ints():
    import numpy as np

    layer = lstmkit.LSTM(I, H)
    x = torch.randn(5, 2, I)
    torch.testing.assert_close(layer(x, lengths=np.array([5, 3]))[0], layer(x, lengths=[5, 3])[0])
    with pytest.raises(ValueError, match=r"lengths: each must be in \[1, L = 5\]"):
        layer(x, lengths=[2**64, 3])


@pytest.mark.parametrize("module,x,owner", [
    (lambda: lstmkit.LSTM(I, H), torch.randn(3, 2, I), "layer"),
    (lambda: lstmkit.LSTMCell(I, H), torch.randn(2, I), "cell"),
])
def test_input_refused_alike_by_layer_and_cell(module, x, owner):
    """A layer and a cell check their input with one function: the same refusals, each naming its module."""
    m = module()
    with pytest.raises(TypeError, match=rf"input: dtype torch.float64 does not match the {owner}'s parameters "
                                        rf"\(torch.float32\); convert one of them, e.g. {owner}.to\(torch.float64\)"):
        m(x.double())
    with pytest.raises(TypeError, match="input: expected a floating-point tensor, got dtype torch.int64"):
        m(x.long())
    with pytest.raises(TypeError, match="input: expected a dense"):
        m(x.to_sparse())
    with pytest.raises(ValueError, match=rf"input: expected input size \(last dimension\) {I}, got {I + 1}"):
        m(torch.randn(*x.shape[:-1], I + 1))


def test_a_missing_optional_package_is_named_with_its_install_line(monkeypatch):
    """(lstmkit study trained every run and then failed on 'No module named scipy'; plot, report and
    the Keras converters said only 'No module named ...')"""
    import importlib.util

    from lstmkit import _optional

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("matplotlib", "scipy") else real(name, *a))
    with pytest.raises(ImportError, match=r"lstmkit study needs matplotlib, scipy: pip install 'lstmkit\[plot,tasks\]'"):
        _optional.require("lstmkit study", "matplotlib", "scipy")
    _optional.require("anything", "torch")  # installed: nothing to say
    from lstmkit.app import study

    with pytest.raises(ImportError, match="lstmkit study needs matplotlib, scipy"):
        study.run(None)  # before reading its arguments, so before any run


def test_the_install_hints_name_the_extras_pyproject_declares():
    import tomllib
    from pathlib import Path

    from lstmkit._optional import EXTRAS

    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert any(req.split(">")[0].split("=")[0].strip() == module for req in extras[extra]), (module, extra)
