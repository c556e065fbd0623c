"""The sLSTM (``cell="slstm"``): its four states (h, c, n, m) in and out, the reference and the
fused kernel (hand-written BPTT) against the float64 NumPy oracle — values, states and every
gradient, the initial states' included —, gradcheck, the trace (i', f', n, m), ONNX, refusals."""

from __future__ import annotations

import importlib.util
import io
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
import numpy_lstm as oracle
from lstmkit import kernels
from lstmkit.spec import resolve
from test_oracle import assert_vs_oracle, oracle_variant
from variants import SLSTM_VARIANTS

T, B, I, H = 5, 3, 3, 4
#: The rows that compute the sLSTM; Triton's through its interpreter on these CPU tensors (conftest sets it
#: without a GPU; on a GPU machine tests/test_triton_cuda.py runs the sLSTM on CUDA tensors).
BACKENDS = ["reference", "cpu_fused"] + (["triton"] if importlib.util.find_spec("triton")
                                         and os.environ.get("TRITON_INTERPRET") == "1" else [])


def _states(rng: np.random.Generator, lead: int, H_: int = H) -> list[np.ndarray]:
    """Random (h, c, n, m): n > 0 (a normaliser: a sum of positive weights), m around 0."""
    return [rng.standard_normal((lead, B, H_)) * 0.5, rng.standard_normal((lead, B, H_)),
            rng.uniform(0.2, 1.5, (lead, B, H_)), rng.standard_normal((lead, B, H_))]


def compare(layer, dtype, lengths=None, zero_state=False, seed=0, input_bias=None):
    """``layer`` (any backend) against the oracle: output, the four final states, and the
    gradients of the input, the four initial states and every parameter (``input_bias``: the
    first layer's input-gate bias set to that value)."""
    torch.manual_seed(seed)
    layer = layer.to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.6, 0.6)
        if input_bias is not None:
            layer.bias_ih_l0[:H] = input_bias
    lead = layer.num_layers * layer.num_directions
    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal((T, B, I))
    st_np = None if zero_state else _states(rng, lead)
    layers_np = oracle.unflatten_params({k: v.detach().double().numpy() for k, v in layer.state_dict().items()},
                                        layer.num_layers, layer.bidirectional)
    lengths_np = None if lengths is None else np.array(lengths)
    y_np, hn_np, cn_np, cache = oracle.forward(
        x_np, layers_np, None if zero_state else st_np[0], None if zero_state else np.concatenate(st_np[1:], -1),
        oracle_variant(layer), lengths=lengths_np, bidirectional=layer.bidirectional)
    dy, dhn, dcn = (rng.standard_normal(a.shape) for a in (y_np, hn_np, cn_np))
    dx_np, dlayers_np, dh0_np, dc0_np = oracle.backward(cache, dy, dhn, dcn)
    if lengths is not None:
        y_np = y_np * (np.arange(T)[:, None] < np.array(lengths)[None, :])[..., None]

    def t(a):
        return torch.tensor(a, dtype=dtype)

    x = t(x_np).requires_grad_(True)
    st0 = None if zero_state else tuple(t(a).requires_grad_(True) for a in st_np)
    inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, st = layer(inp, st0)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, total_length=T)
    assert len(st) == 4
    assert_vs_oracle(out, t(y_np), dtype, "output")
    assert_vs_oracle(st[0], t(hn_np), dtype, "h_n")
    for k, name in enumerate(("c_n", "n_n", "m_n")):
        assert_vs_oracle(st[1 + k], t(cn_np[..., k * H:(k + 1) * H]), dtype, name)
    loss = (out * t(dy)).sum() + (st[0] * t(dhn)).sum() + (torch.cat(st[1:], -1) * t(dcn)).sum()
    wrt = [x, *(st0 or ()), *layer.parameters()]
    grads = torch.autograd.grad(loss, wrt)
    expected = {"input": dx_np, **oracle.flatten_params(dlayers_np)}
    names = ["input"] + ([] if zero_state else ["h_0", "c_0", "n_0", "m_0"]) + [n for n, _ in layer.named_parameters()]
    if not zero_state:
        expected["h_0"] = dh0_np
        expected.update({n: dc0_np[..., k * H:(k + 1) * H] for k, n in enumerate(("c_0", "n_0", "m_0"))})
    for name, g in zip(names, grads):
        assert_vs_oracle(g, t(expected[name]), dtype, f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", list(SLSTM_VARIANTS.values()), ids=list(SLSTM_VARIANTS))
def test_oracle_single_layer(cell, dtype, backend):
    compare(lstmkit.LSTM(I, H, cell=cell, backend=backend), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", list(SLSTM_VARIANTS.values()), ids=list(SLSTM_VARIANTS))
def test_oracle_stacked_bidirectional_lengths(cell, backend):
    layer = lstmkit.LSTM(I, H, num_layers=2, bidirectional=True, cell=cell, backend=backend)
    compare(layer, torch.float64, lengths=[2, 5, 3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_oracle_from_the_zero_state(backend):
    """hx=None: every cell starts empty, so the first stabiliser is ĩ (i' = 1, n_1 = 1)."""
    for cell in ("slstm", "slstm+forget_act=exp+heads=2"):
        compare(lstmkit.LSTM(I, H, num_layers=2, cell=cell, backend=backend), torch.float64, lengths=[5, 1, 3],
                zero_state=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_an_empty_cell_keeps_nothing_however_closed_its_input_gate(backend, dtype):
    """From the zero state the first stabiliser is ĩ, and ``exp(log f − ĩ)`` is unbounded: with
    ĩ near −100 it overflowed to inf in float32, and inf times the empty cell's 0 made every
    output NaN. An empty cell keeps nothing (f' = 0): finite, and equal to the oracle."""
    for cell in ("slstm", "slstm+forget_act=exp+n_clamp"):
        compare(lstmkit.LSTM(I, H, cell=cell, backend=backend), dtype, zero_state=True, input_bias=-100.0)


def test_fused_kernel_threads_and_batches():
    """Two threads, a batch split across them, heads: the fused kernel against the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for cell in ("slstm+heads=4", "slstm+forget_act=exp+n_clamp"):
            torch.manual_seed(0)
            ref = lstmkit.LSTM(16, 64, cell=cell, backend="reference").double()
            fast = lstmkit.LSTM(16, 64, cell=cell, backend="cpu_fused").double()
            fast.load_state_dict(ref.state_dict())
            x = torch.randn(30, 40, 16, dtype=torch.float64, requires_grad=True)
            outs = []
            for m in (ref, fast):
                y, st = m(x)
                loss = (y * y).sum() + sum((s * (k + 1)).sum() for k, s in enumerate(st))
                outs.append([y, *st, *torch.autograd.grad(loss, [x, *m.parameters()])])
            for a, b in zip(*outs):
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["reference", "cpu_fused"])  # Triton's BPTT: against the oracle's, above
@pytest.mark.parametrize("cell", ["slstm", "slstm+forget_act=exp+n_clamp+heads=2"])
def test_gradcheck(cell, backend):
    torch.manual_seed(0)
    layer = lstmkit.LSTM(2, 4, num_layers=2, bidirectional=True, cell=cell, backend=backend).double()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    h0, c0, m0 = (torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    n0 = (torch.rand(4, 3, 4, dtype=torch.float64) + 0.2).requires_grad_(True)

    def fn(x, h0, c0, n0, m0, *ps):
        packed = pack_padded_sequence(x, torch.tensor([4, 1, 3]), enforce_sorted=False)
        out, st = torch.func.functional_call(layer, dict(zip(names, ps)), (packed, (h0, c0, n0, m0)))
        return out.data, *st

    # The reference is autograd through cell.py's equations: a random projection of its Jacobian
    # (fast_mode) checks them against finite differences in 1-2 s instead of 26-46 s; the fused
    # kernel's hand-written BPTT is checked entry by entry.
    assert torch.autograd.gradcheck(fn, (x, h0, c0, n0, m0, *params), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=backend == "reference")


# ----------------------------------------------------------------------------- the trace


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_trace_shows_the_stabilised_gates_n_and_m(backend):
    torch.manual_seed(0)
    ref = lstmkit.LSTM(I, 6, num_layers=2, bidirectional=True, cell="slstm+heads=2", backend="reference").double()
    fast = lstmkit.LSTM(I, 6, num_layers=2, bidirectional=True, cell="slstm+heads=2", backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, I, dtype=torch.float64)
    a, b = lstmkit.trace(ref, x, lengths=[6, 2, 4]), lstmkit.trace(fast, x, lengths=[6, 2, 4])
    assert b.kernel == backend
    for layer in range(2):
        for d in range(2):
            assert list(b[layer][d]) == ["i", "f", "g", "o", "c", "n", "m", "h"] == list(a[layer][d])
            for k in a[layer][d]:
                torch.testing.assert_close(b[layer][d][k], a[layer][d][k], equal_nan=True, rtol=1e-10, atol=1e-10)
    tr = b[0][0]
    valid = b.valid.clone()
    # t = 0: every cell is empty (n_0 = 0), so m_1 = ĩ and i' = 1 (f' multiplies zeros there: any value)
    assert torch.equal(tr["i"][0], torch.ones_like(tr["i"][0]))
    valid[0] = False
    i, f, n = tr["i"][valid], tr["f"][valid], tr["n"]
    assert (i <= 1).all() and (f <= 1).all() and (i > 0).all() and (f > 0).all()
    # later the stabiliser is the larger log-weight: one of i', f' is exactly 1
    assert torch.equal(torch.maximum(tr["i"], tr["f"])[valid], torch.ones_like(i))
    assert (n[b.valid] >= 1 - 1e-12).all()  # from the empty state, n_t ≥ 1 by construction
    # h = o ⊙ c / n, as the trace reports them
    torch.testing.assert_close(tr["h"], tr["o"] * tr["c"] / tr["n"], equal_nan=True)
    assert lstmkit.trace(lstmkit.LSTM(I, H), x.float()).absent["n"] == "absent: only a cell with 'slstm' has a normaliser (n)"


# ----------------------------------------------------------------------------- the state API


def test_the_four_states_in_and_out():
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H, num_layers=2, cell="slstm")
    x = torch.randn(T, B, I)
    y, (h, c, n, m) = layer(x)
    assert all(s.shape == (2, B, H) for s in (h, c, n, m))
    # the state carries over exactly: two halves equal the whole
    y1, st = layer(x[:2])
    y2, st2 = layer(x[2:], st)
    torch.testing.assert_close(torch.cat([y1, y2]), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st2[3], m, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match=r"expected a tuple \(h_0, c_0, n_0, m_0\) of 4 tensors, got tuple of length 2"):
        layer(x, (h, c))
    with pytest.raises(ValueError, match=r"hx: n_0 for batched input must have shape"):
        layer(x, (h, c, n[:, :1], m))
    # unbatched input, as torch: states without the batch dimension
    yu, stu = layer(x[:, 0], tuple(s[:, 0] for s in (h, c, n, m)))
    assert yu.shape == (T, H) and all(s.shape == (2, H) for s in stu)


def test_returned_states_may_be_changed_in_place_on_every_call():
    """Each returned state is a tensor of its own, on a signature's first call (the general path:
    its split's parts were views that autograd forbids changing in place) as on later ones (the
    prepared steps), and a change of one leaves the others."""
    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(I, H, cell="slstm")
    layer = lstmkit.LSTM(I, H, cell="slstm")
    x = torch.randn(B, I)
    state = None
    for _ in range(3):
        state = cell(x, state)
        before = [s.detach().clone() for s in state]
        state[1].clamp_(-0.1, 0.1)
        assert torch.equal(state[2], before[2]) and torch.equal(state[3], before[3])
        assert state[1].abs().max() <= 0.1
        loss = sum(s.sum() for s in state)
        loss.backward()
        state = tuple(s.detach() for s in state)
    for _ in range(2):
        _, (h, c, n, m) = layer(x[None])
        for s in (c, n, m):
            s.mul_(0.5)  # no error
        layer.step(x, (h, c, n, m))[1][1].zero_()


def test_lstmcell_is_one_step_of_the_layer():
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H, cell="slstm+forget_act=exp").double()
    step = lstmkit.LSTMCell(I, H, cell="slstm+forget_act=exp").double()
    step.load_state_dict({k[: -len("_l0")]: v for k, v in layer.state_dict().items()})
    x = torch.randn(1, B, I, dtype=torch.float64)
    st = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64),
          torch.rand(B, H, dtype=torch.float64) + 0.5, torch.randn(B, H, dtype=torch.float64))
    _, full = layer(x, tuple(s[None] for s in st))
    one = step(x[0], st)
    for a, b in zip(one, full):
        torch.testing.assert_close(a, b[0], rtol=1e-12, atol=1e-12)


def test_prepared_steps_take_states_of_any_layout():
    """A prepared sLSTM step joins its three cell states for the kernel (contiguous ones copied
    straight in, other layouts through cat) and hands them back as views of one block: strided
    states and contiguous ones give the layer's one step, call after call."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H, cell="slstm").double()
    step = lstmkit.LSTMCell(I, H, cell="slstm").double()
    step.load_state_dict({k[: -len("_l0")]: v for k, v in layer.state_dict().items()})
    x = torch.randn(1, B, I, dtype=torch.float64)
    wide = torch.rand(4, B, 2 * H, dtype=torch.float64) + 0.5
    strided = tuple(wide[k, :, :H] for k in range(4))  # (B, H) each, rows 2H apart
    assert not any(s.is_contiguous() for s in strided)
    plain = tuple(s.contiguous() for s in strided)
    _, full = layer(x, tuple(s[None] for s in plain))
    with torch.no_grad():
        for _ in range(3):  # the first call prepares the step, the later ones take it
            for states in (strided, plain):
                one = step(x[0], states)
                for a, b in zip(one, full):
                    torch.testing.assert_close(a, b[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(wide[:, :, :H], torch.stack(strided))  # the caller's states untouched


@pytest.mark.parametrize("cell", list(SLSTM_VARIANTS.values()))
def test_lstmcell_steps_train_like_the_sequence(cell, forward_infer_calls):
    """A loop of LSTMCell steps with gradients (every call after the first: the prepared step,
    which takes the four states as they come and gives them back split) = the reference layer
    over the sequence: outputs, final states, and the gradients of the parameters and of all
    four initial states."""
    torch.manual_seed(0)
    H_ = 4
    layer = lstmkit.LSTM(I, H_, cell=cell, backend="reference").double()
    step = lstmkit.LSTMCell(I, H_, cell=cell).double()
    step.load_state_dict({k[: -len("_l0")]: v for k, v in layer.state_dict().items()})
    x = torch.randn(T, B, I, dtype=torch.float64)
    st0 = [torch.randn(B, H_, dtype=torch.float64), torch.randn(B, H_, dtype=torch.float64),
           torch.rand(B, H_, dtype=torch.float64) + 0.5, torch.randn(B, H_, dtype=torch.float64)]
    st0 = [s.requires_grad_() for s in st0]
    y_seq, end_seq = layer(x, tuple(s[None] for s in st0))
    state, ys = tuple(st0), []
    for t in range(T):
        state = step(x[t], state)
        ys.append(state[0])
    assert forward_infer_calls.count(torch.Size([B, I])) == T - 1  # all but the first: prepared
    torch.testing.assert_close(torch.stack(ys), y_seq, rtol=1e-12, atol=1e-12)
    for a, b in zip(state, end_seq):
        torch.testing.assert_close(a, b[0], rtol=1e-12, atol=1e-12)
    weight = torch.linspace(-1, 1, B * H_, dtype=torch.float64).view(B, H_)
    loss_step = sum((s * weight * (k + 1)).sum() for k, s in enumerate(state)) + torch.stack(ys).square().sum()
    loss_seq = sum((s[0] * weight * (k + 1)).sum() for k, s in enumerate(end_seq)) + y_seq.square().sum()
    g_step = torch.autograd.grad(loss_step, [*st0, *step.parameters()])
    g_seq = torch.autograd.grad(loss_seq, [*st0, *layer.parameters()])
    for k, (a, b) in enumerate(zip(g_step, g_seq)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient {k}")


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("word,reason", [
    ("peephole", "does not take peephole"), ("cifg", "does not take coupled"), ("layernorm", "group norm"),
    ("nfg", "does not take forget_gate"), ("deep=4", "deep gates"), ("clip=1", "cell_clip"),
    ("zoneout=0.1", "zoneout"), ("chrono=10", "chrono"), ("gate_act=hardsigmoid", "gate_activation")])
def test_what_the_slstm_cannot_take_is_refused_with_the_reason(word, reason):
    with pytest.raises(ValueError, match=reason):
        resolve(f"slstm+{word}")


def test_options_and_sizes_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"n_clamp is an option of the sLSTM.*use 'slstm\+n_clamp'"):
        resolve("n_clamp")
    with pytest.raises(ValueError, match=r"forget_act=exp is an option of the sLSTM"):
        resolve("forget_act=exp")
    with pytest.raises(ValueError, match=r"proj_size: the sLSTM has no projection"):
        lstmkit.LSTM(3, 4, proj_size=2, cell="slstm")
    spec = resolve("slstm+fb=1+heads=2")
    assert spec.forget_bias == 1.0 and spec.name == "slstm+heads=2+fb=1"
    assert kernels.REGISTRY["triton"].refuses(spec) is None
    assert "slstm" in kernels.REGISTRY["torch"].refuses(spec)
    from lstmkit.convert import to_torch

    with pytest.raises(ValueError, match="vanilla"):
        to_torch(lstmkit.LSTM(3, 4, cell="slstm"))


def test_describe_and_gates():
    layer = lstmkit.LSTM(3, 4, cell="slstm+heads=2")
    text = lstmkit.describe(layer, file=io.StringIO())
    assert "cell='slstm+heads=2'" in text and f"parameters: {sum(p.numel() for p in layer.parameters()):,}" in text
    assert set(layer.gates()) == {"input", "forget", "candidate", "output"}


# ----------------------------------------------------------------------------- ONNX


def test_onnx_scan_with_the_four_states_and_back():
    from lstmkit.convert import from_onnx, to_onnx

    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, cell="slstm+heads=2+forget_act=exp").eval()
    proto = to_onnx(layer, sequence_lens=True, initial_states=True)
    assert [o.name for o in proto.graph.output] == ["Y", "Y_h", "Y_c", "Y_n", "Y_m"]
    assert [i.name for i in proto.graph.input][-4:] == ["initial_h", "initial_c", "initial_n", "initial_m"]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 2, 3)
    st = (torch.randn(4, 2, 4), torch.randn(4, 2, 4), torch.rand(4, 2, 4) + 0.5, torch.randn(4, 2, 4))
    lengths = torch.tensor([5, 3])
    got = sess.run(None, {"X": x.numpy(), "sequence_lens": lengths.int().numpy(),
                          **{f"initial_{k}": s.numpy() for k, s in zip("hcnm", st)}})
    y, want = layer(pack_padded_sequence(x, lengths), st)
    y = pad_packed_sequence(y, total_length=5)[0]
    for a, b in zip(got, (y, *want)):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-5, atol=1e-5)
    back = from_onnx(proto)
    assert back.spec == layer.spec
    assert all(torch.equal(back.state_dict()[k], v) for k, v in layer.state_dict().items())


# ----------------------------------------------------------------------------- inference and steps


@pytest.mark.parametrize("B_", [10, 1])
def test_inference_in_the_loop_and_one_step_per_call(B_, forward_infer_calls):
    """Without gradients the fused kernel runs the input projection inside its loop
    (forward_infer: B >= 8, and every single step): the sLSTM there equals the reference, and
    layer.step / LSTMCell step the four states."""

    calls = forward_infer_calls
    torch.manual_seed(0)
    ref = lstmkit.LSTM(I, 6, 2, cell="slstm+heads=3", backend="reference").double().eval()
    fast = lstmkit.LSTM(I, 6, 2, cell="slstm+heads=3", backend="cpu_fused").double().eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B_, I, dtype=torch.float64)
    st = (torch.randn(2, B_, 6, dtype=torch.float64), torch.randn(2, B_, 6, dtype=torch.float64),
          torch.rand(2, B_, 6, dtype=torch.float64) + 0.5, torch.randn(2, B_, 6, dtype=torch.float64))
    with torch.no_grad():
        want = ref(x, st)
        if B_ >= 8:
            got = fast(x, st)
            assert calls, "the in-loop inference path did not run"
            torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
            for a, b in zip(got[1], want[1]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        state, ys = st, []
        for t in range(T):  # one step per call, the whole stack
            y, state = fast.step(x[t], state)
            ys.append(y)
        torch.testing.assert_close(torch.stack(ys), want[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(state, want[1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if B_ == 1:
        assert calls, "a single step runs forward_infer"


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton's interpreter (a GPU machine: the CUDA tests)")
@pytest.mark.parametrize("cell", ["slstm+heads=2", "slstm+forget_act=exp+n_clamp"])
def test_triton_bfloat16_as_accurate_as_the_bfloat16_reference(cell):
    """The Triton sLSTM in bfloat16 (the GEMM operands rounded, float32 state): outputs, the four
    final states and every gradient within 2.5x the bfloat16 reference kernel's own error against
    float64 on the same rounded inputs (at least 2^-5 of the scale), the Triton tests' 16-bit rule
    (an H100's bfloat16 sLSTM build once failed a fixed self-check tolerance, and ran the reference loop)."""
    import copy

    torch.manual_seed(0)
    base = lstmkit.LSTM(I, H, cell=cell, bidirectional=True).double()
    with torch.no_grad():
        for p in base.parameters():
            p.uniform_(-0.6, 0.6)
            p.copy_(p.to(torch.bfloat16).double())                            # exact in bfloat16
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((T, B, I))).to(torch.bfloat16).double()
    states = [torch.tensor(a).to(torch.bfloat16).double() for a in _states(rng, 2)]

    def run(backend: str, dtype: torch.dtype) -> list[torch.Tensor]:
        layer = copy.deepcopy(base).to(dtype)
        layer.backend = backend
        xi = x.to(dtype).requires_grad_(True)
        si = [s.to(dtype).requires_grad_(True) for s in states]
        out, st = layer(xi, tuple(si))
        weight = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        loss = (out.double() * weight).sum() + sum((s.double() * (k + 1)).sum() for k, s in enumerate(st))
        grads = torch.autograd.grad(loss, [xi, *si, *layer.parameters()])
        return [t.detach().double() for t in (out, *st, *grads)]

    truth, fast, loop = run("reference", torch.float64), run("triton", torch.bfloat16), run("reference", torch.bfloat16)
    names = ["output", "h_n", "c_n", "n_n", "m_n", "grad of input", "grad of h_0", "grad of c_0", "grad of n_0",
             "grad of m_0"] + [f"grad of {n}" for n, _ in base.named_parameters()]
    for name, want, got, ref in zip(names, truth, fast, loop):
        scale = max(want.abs().max().item(), 1e-3)
        e_fast, e_ref = (got - want).abs().max().item() / scale, (ref - want).abs().max().item() / scale
        assert e_fast <= max(2 ** -5, 2.5 * e_ref), f"{name}: Triton {e_fast:.2e}, bfloat16 loop {e_ref:.2e}"
