"""One step per call: ``LSTMCell`` on every kernel row and ``LSTM.step`` / ``RNN.step``.

A loop of single steps is checked against the float64 NumPy oracle run over the whole
sequence (outputs, final states, and every gradient that flows back through the loop of
calls), and ``layer.step`` against the same layer called on the sequence.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import lstmkit
import numpy_lstm as oracle
from conftest import assert_close, fixed_zoneout_masks
from lstmkit import kernels
from lstmkit.spec import resolve
from test_oracle import oracle_variant
from variants import LSTM_VARIANTS

T, B, I, H = 4, 3, 3, 5
STEP_CELLS = {k: v for k, v in LSTM_VARIANTS.items() if not resolve(v).fgr}  # fgr: a step cannot carry s


def _rows_for(cell: object) -> list[str]:
    """The kernel rows that run ``cell`` on float64 CPU tensors (a sequence of length 1)."""
    spec = resolve(cell)
    return [name for name, k in kernels.REGISTRY.items()
            if name not in ("onnx_export", "triton") and "cpu" in k.devices
            and k.unsupported(spec, torch.device("cpu"), torch.float64) is None]


CASES = [pytest.param(row, cell, id=f"{row}-{vid}") for vid, cell in STEP_CELLS.items() for row in _rows_for(cell)]


@pytest.mark.parametrize("row, cell", CASES)
def test_lstmcell_loop_matches_oracle(row, cell):
    """T calls of LSTMCell (training mode: zoneout's masks apply) = the oracle over T steps."""
    torch.manual_seed(0)
    step = lstmkit.LSTMCell(I, H, cell=cell, backend=row).double()
    with torch.no_grad():
        for name, p in step.named_parameters():
            p.uniform_(-0.6, 0.6) if not name.startswith("ln_") else p.add_(torch.empty_like(p).uniform_(-0.3, 0.3))
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((T, B, I))
    h0_np, c0_np = rng.standard_normal((1, B, H)) * 0.5, rng.standard_normal((1, B, H)) * 0.5
    keep = None
    if step.spec.zoneout != (0.0, 0.0):  # every call draws the masks of shape (1, B, H)
        d_c, d_h = fixed_zoneout_masks(step.spec, (1, B, H), (1, B, H), torch.empty(0, dtype=torch.float64))
        keep = [[(np.repeat(d_c.numpy(), T, 0), np.repeat(d_h.numpy(), T, 0))]]
    layer_like = type("L", (), {"spec": step.spec, "hidden_size": H, "bias": step.bias, "proj_size": 0})()
    variant = oracle_variant(layer_like)
    params = oracle.unflatten_params({f"{k}_l0": v.detach().numpy() for k, v in step.state_dict().items()}, 1, False)
    y_np, hn_np, cn_np, cache = oracle.forward(x_np, params, h0_np, c0_np, variant, keep=keep)
    dy, dcn = rng.standard_normal(y_np.shape), rng.standard_normal(cn_np.shape)
    dx_np, dparams_np, dh0_np, dc0_np = oracle.backward(cache, dy, np.zeros_like(hn_np), dcn)

    x = torch.tensor(x_np, requires_grad=True)
    h0, c0 = torch.tensor(h0_np[0], requires_grad=True), torch.tensor(c0_np[0], requires_grad=True)
    h, c, ys = h0, c0, []
    for t in range(T):
        h, c = step(x[t], (h, c))
        ys.append(h)
    y = torch.stack(ys)
    if row == "cpu_fused":  # calls after the first: the prepared step's compiled autograd node
        assert h.grad_fn.name() == "torch::autograd::CppNode<lk::ProjectedRun>"
    assert_close(y, torch.tensor(y_np), torch.float64, "outputs")
    assert_close(c, torch.tensor(cn_np[0]), torch.float64, "c_n")
    loss = (y * torch.tensor(dy)).sum() + (c * torch.tensor(dcn[0])).sum()
    names = [n for n, _ in step.named_parameters()]
    grads = torch.autograd.grad(loss, [x, h0, c0, *step.parameters()])
    expected = [dx_np, dh0_np[0], dc0_np[0]] + [oracle.flatten_params(dparams_np)[f"{n}_l0"] for n in names]
    for name, g, e in zip(["input", "h_0", "c_0", *names], grads, expected):
        assert_close(g, torch.tensor(e), torch.float64, f"grad of {name}")


@pytest.mark.parametrize("cell", ["vanilla", "peephole+layernorm", "zoneout=0.3/0.2", LSTM_VARIANTS["deep_f"],
                                  "gate_act=hardsigmoid+cifg+clip=0.5"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_step_matches_the_sequence(cell, batch_first):
    """layer.step, step by step, = the layer over the sequence: stacked, projection, values and
    gradients (eval mode: zoneout's expectation)."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H, num_layers=2, proj_size=2, batch_first=batch_first, cell=cell).double().eval()
    x = torch.randn(B, T, I, dtype=torch.float64) if batch_first else torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = torch.randn(2, B, 2, dtype=torch.float64), torch.randn(2, B, H, dtype=torch.float64)
    y, (h_n, c_n) = layer(x, (h0, c0))
    loss = y.square().sum() + h_n.sum() + c_n.sum()
    g_seq = torch.autograd.grad(loss, list(layer.parameters()))
    state, ys = (h0, c0), []
    for t in range(T):
        out, state = layer.step(x[:, t] if batch_first else x[t], state)
        ys.append(out)
    y_step = torch.stack(ys, 1 if batch_first else 0)
    torch.testing.assert_close(y_step, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[0], h_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[1], c_n, rtol=1e-12, atol=1e-12)
    g_step = torch.autograd.grad(y_step.square().sum() + state[0].sum() + state[1].sum(), list(layer.parameters()))
    for (name, _), a, b in zip(layer.named_parameters(), g_step, g_seq):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"grad of {name}")


def test_layer_step_unbatched_and_default_state():
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H, num_layers=2).double()
    x = torch.randn(I, dtype=torch.float64)
    out, (h, c) = layer.step(x)
    y, (h_seq, c_seq) = layer(x[None])  # unbatched sequence of one step
    assert out.shape == (H,) and h.shape == (2, H) and c.shape == (2, H)
    torch.testing.assert_close(out, y[0], rtol=0, atol=0)
    torch.testing.assert_close(h, h_seq, rtol=0, atol=0)


def test_rnn_step_matches_the_sequence():
    torch.manual_seed(0)
    layer = lstmkit.RNN(I, H, num_layers=2, nonlinearity="relu").double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    y, h_n = layer(x)
    h, ys = None, []
    for t in range(T):
        out, h = layer.step(x[t], h)
        ys.append(out)
    torch.testing.assert_close(torch.stack(ys), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_n, rtol=1e-12, atol=1e-12)


def test_step_refusals():
    with pytest.raises(ValueError, match="bidirectional"):
        lstmkit.LSTM(I, H, bidirectional=True).step(torch.randn(B, I))
    with pytest.raises(ValueError, match="fgr"):
        lstmkit.LSTM(I, H, cell="fgr").step(torch.randn(B, I))
    with pytest.raises(ValueError, match="one time step"):
        lstmkit.LSTM(I, H).step(torch.randn(T, B, I))
    with pytest.raises(TypeError, match="Tensor"):
        lstmkit.LSTM(I, H).step([1.0, 2.0, 3.0])
    for batch_first in (False, True):  # the shape given, not the one-step sequence made of it
        with pytest.raises(ValueError, match=rf"input size \(last dimension\) {I}, got {I + 1} \(shape \({B}, {I + 1}\)\)"):
            lstmkit.LSTM(I, H, batch_first=batch_first).step(torch.randn(B, I + 1))
        with pytest.raises(ValueError, match=rf"got {I + 1} \(shape \({I + 1},\)\)"):
            lstmkit.LSTM(I, H, batch_first=batch_first).step(torch.randn(I + 1))
    with pytest.raises(ValueError, match="h_0"):
        lstmkit.LSTM(I, H).step(torch.randn(B, I), (torch.zeros(1, B + 1, H), torch.zeros(1, B, H)))
    with pytest.raises(ValueError, match="NaN"):
        lstmkit.LSTM(I, H).step(torch.full((B, I), float("nan")))
    with pytest.raises(ValueError, match="backend: unknown kernel"):
        lstmkit.LSTMCell(I, H, backend="nope")
    with pytest.raises(ValueError, match="cannot run this layer: torch.s LSTM computes the vanilla"):
        lstmkit.LSTMCell(I, H, cell="deep=3", backend="torch")


def test_lstmcell_exports():
    """A non-vanilla LSTMCell (the fused operator) exports with torch.export and runs."""
    torch.manual_seed(0)
    step = lstmkit.LSTMCell(I, H, cell="peephole+cifg").eval()
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    with torch.no_grad():
        step(x, (h, c))  # a signature seen before: export must trace the operator all the same
    ep = torch.export.export(step, (x, (h, c)))
    for a, b in zip(ep.module()(x, (h, c)), step(x, (h, c))):
        torch.testing.assert_close(a, b)


INFER_CASES = [pytest.param(cell, id=vid) for vid, cell in STEP_CELLS.items()]


@pytest.mark.parametrize("cell", INFER_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_inference_step_matches_the_reference(cell, dtype, forward_infer_calls):
    """Without gradients a step is one call of the compiled kernel (projection included): every
    variant, a stacked layer with a projection and a cell, against the reference kernel in float64."""

    calls = forward_infer_calls
    torch.manual_seed(0)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    layer = lstmkit.LSTM(I, H, num_layers=2, proj_size=2, cell=cell).eval()
    ref = lstmkit.LSTM(I, H, num_layers=2, proj_size=2, cell=cell, backend="reference").double().eval()
    ref.load_state_dict(layer.state_dict())
    layer = layer.to(dtype)
    x, h0, c0 = torch.randn(B, I), torch.randn(2, B, 2), torch.randn(2, B, H)
    with torch.no_grad():
        out, (h, c) = layer.step(x.to(dtype), (h0.to(dtype), c0.to(dtype)))
        y_ref, (h_ref, c_ref) = ref(x[None].double(), (h0.double(), c0.double()))
    for a, b, what in ((out, y_ref[0], "output"), (h, h_ref, "h_n"), (c, c_ref, "c_n")):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=what)
    assert len(calls) == 2  # one per layer
    with torch.no_grad():  # the signature seen: the prepared stack, the same results
        again = layer.step(x.to(dtype), (h0.to(dtype), c0.to(dtype)))
    for a, b in zip((again[0], *again[1]), (out, h, c)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(calls) == 4

    step = lstmkit.LSTMCell(I, H, cell=cell).eval()
    step_ref = lstmkit.LSTMCell(I, H, cell=cell, backend="reference").double().eval()
    step_ref.load_state_dict(step.state_dict())
    step = step.to(dtype)
    with torch.no_grad():
        hc = torch.randn(B, H)  # c' from a non-contiguous c
        got = step(x.to(dtype), (hc.to(dtype), c0[0].to(dtype).t().contiguous().t()))
        want = step_ref(x.double(), (hc.double(), c0[0].double()))
    for a, b, what in zip(got, want, ("h'", "c'")):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=what)
    assert len(calls) == 5
    with torch.no_grad():  # the signature seen: the prepared step, the same kernel call and result
        again = step(x.to(dtype), (hc.to(dtype), c0[0].to(dtype).t().contiguous().t()))
    for a, b in zip(again, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(calls) == 6


def test_prepared_step_rechecks_whatever_changed(monkeypatch):
    """The no-gradient step a signature's first call prepares is not taken where the general path
    must decide: new shapes or dtypes (checked and refused as always), a NaN (named), a parameter
    replaced (the new one used), an optimizer's in-place update (seen), gradients enabled
    (autograd works), a kernel registered since (chosen again)."""
    torch.manual_seed(0)
    step, ref = lstmkit.LSTMCell(I, H).eval(), lstmkit.LSTMCell(I, H, backend="reference").eval()
    ref.load_state_dict(step.state_dict())
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    selected = []
    real_select = kernels.select
    monkeypatch.setattr(kernels, "select",  # the fused cell's choices (the reference cell forces its own)
                        lambda *a, **k: (a[3] is None and selected.append(a)) or real_select(*a, **k))

    def check(*args):
        with torch.no_grad():
            for a, b in zip(step(*args), ref(*args)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    check(x, (h, c))
    check(x, (h, c))
    assert len(selected) == 1  # the second call: prepared
    with torch.no_grad(), pytest.raises(ValueError, match="expected input size"):
        step(torch.randn(B, I + 1), (h, c))
    with torch.no_grad(), pytest.raises(ValueError, match="hx: h must have shape"):
        step(x, (torch.randn(B + 1, H), c))
    with torch.no_grad(), pytest.raises(TypeError, match="dtype"):
        step(x.double(), (h, c))
    with torch.no_grad(), pytest.raises(TypeError, match="hx: expected a tuple"):
        step(x, torch.stack([h, c]))  # iterates as two (B, H) tensors: not the tuple's signature
    bad = x.clone()
    bad[1, 2] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="input: contains NaN"):
        step(bad, (h, c))
    with torch.no_grad():
        step.weight_hh.mul_(0.5)
        ref.weight_hh.mul_(0.5)
    check(x, (h, c))
    step.bias_ih = torch.nn.Parameter(torch.randn(4 * H))
    ref.bias_ih = torch.nn.Parameter(step.bias_ih.detach().clone())
    check(x, (h, c))
    check(x, None)
    n = len(selected)
    monkeypatch.setattr(kernels, "REGISTRY", dict(kernels.REGISTRY))  # restored after the test
    kernels.register(kernels.REGISTRY["cpu_fused"], first=True)  # the registry changed: choose again
    check(x, (h, c))
    assert len(selected) == n + 1
    xg = x.clone().requires_grad_()
    step(xg, (h, c))[0].sum().backward()
    assert xg.grad is not None and step.weight_ih.grad is not None


def test_prepared_step_sees_deep_gates_updated_in_place():
    """The deep gates' weights reach the compiled step as the tensors themselves (no flat copy is
    kept): an optimizer's in-place update is seen (with and without gradients), and one made
    between a step and its backward is refused as autograd refuses it for any saved tensor."""
    torch.manual_seed(0)
    step = lstmkit.LSTMCell(I, H, cell="deep=3")
    ref = lstmkit.LSTMCell(I, H, cell="deep=3", backend="reference")
    x = torch.randn(B, I)
    with torch.no_grad():
        step(x)
        step(x)  # prepared
        for name, p in step.named_parameters():
            if name.startswith("mlp_"):
                p.mul_(2.0)
    ref.load_state_dict(step.state_dict())
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for a, b in zip(step(x), ref(x)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    h, c = step(x)
    with torch.no_grad():
        step.mlp_f_weight1.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (h.sum() + c.sum()).backward()


def test_a_full_store_of_prepared_signatures_gives_up_the_least_recently_run(monkeypatch):
    """A loop's every-call signature stays prepared while more than KEPT_SIGNATURES others pass
    (batch sizes 1, 2, ... between its calls): a full store gives up the one run least recently,
    where it used to forget every signature at once, the loop's own with them."""
    from lstmkit.kernels.fused import KEPT_SIGNATURES

    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(I, H).eval()
    selected = []
    real_select = kernels.select
    monkeypatch.setattr(kernels, "select", lambda *a, **k: selected.append(a) or real_select(*a, **k))
    hot = torch.randn(B, I)
    with torch.no_grad():
        cell(hot)
        cell(hot)  # prepared
        for n in range(1, 2 * KEPT_SIGNATURES + 1):
            cell(torch.randn(B + n, I))  # a new signature each: chosen by the general path
            before = len(selected)
            cell(hot)
            assert len(selected) == before, f"the loop's own signature was forgotten after {n} others"
    assert len(cell._prepared._kept) == KEPT_SIGNATURES
    with torch.no_grad():  # the most recent passing ones are kept, the oldest were given up
        before = len(selected)
        cell(torch.randn(B + 2 * KEPT_SIGNATURES, I))
        cell(torch.randn(B + 1, I))
    assert len(selected) == before + 1
    kept = dict(cell._prepared._kept)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a kept signature, the general path
        cell(hot)
    # it neither evicted another entry nor made its own anew (re-packing a frozen layer's weights)
    assert cell._prepared._kept.keys() == kept.keys() and all(cell._prepared._kept[k] is v for k, v in kept.items())


def test_prepared_calls_appear_in_the_profiler():
    """A prepared call (the kernels called directly, not through the dispatcher) was absent from
    torch.profiler's tables: a layer's whole forward charged to nothing. It is lstmkit::prepared_step."""
    from torch.profiler import profile

    x = torch.randn(6, 3, I)
    for module, arg in ((lstmkit.LSTM(I, H), x), (lstmkit.LSTMCell(I, H), x[0])):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                module(arg)
                with profile() as prof:
                    module(arg)  # prepared
            assert "lstmkit::prepared_step" in {e.key for e in prof.key_averages()}, (type(module).__name__, grad)


def test_prepared_modules_copy_and_pickle():
    """A prepared step is a cache: a deep copy or a saved and loaded module (after prepared
    steps) starts without it and steps like the original, on its own parameters."""
    torch.manual_seed(0)
    x = torch.randn(B, I)
    for module, step in ((lstmkit.LSTMCell(I, H), lambda m, s: m(x, s)),
                         (lstmkit.LSTM(I, H), lambda m, s: m.step(x, s)[1])):
        state = step(module, None)
        state = step(module, state)  # prepared
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        for other in (copy.deepcopy(module), torch.load(buffer, weights_only=False)):
            for a, b in zip(step(other, state), step(module, state)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            with torch.no_grad():  # its own parameters: changing the copy's leaves the original's
                next(other.parameters()).add_(1.0)
            assert not torch.equal(step(other, state)[0], step(module, state)[0])


def test_prepared_step_gives_way_to_vmap_and_autocast(forward_infer_calls):
    """A prepared step (a call signature seen before) leaves to the general path what it cannot
    run itself: a vmap's batched tensors (the same signature from Python) and autocast (a bfloat16
    input, float32 states as nn.LSTMCell's; TorchScript's trace: tests/test_ops_transforms.py)."""
    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(I, H).eval()
    x, xs = torch.randn(B, I), torch.randn(2, B, I)
    with torch.no_grad():
        cell(x)
        cell(x)
        assert forward_infer_calls.count(torch.Size([B, I])) == 1  # the second call: prepared
        batched = torch.func.vmap(lambda xi: cell(xi)[0])(xs)
        torch.testing.assert_close(batched, torch.stack([cell(xi)[0] for xi in xs]), rtol=1e-6, atol=1e-6)
        rounded = cell(x.bfloat16().float())[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = cell(x.bfloat16())[0]
        assert h.dtype == torch.float32 and torch.equal(h, rounded)


def test_prepared_training_step_double_backward_raises_clearly():
    """The prepared step's compiled node, like the operator: a first-order gradient with
    create_graph=True works, a second-order one raises the operator's message."""
    step = lstmkit.LSTMCell(2, 3).double()
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    step(x)
    h, _ = step(x)  # prepared: the compiled node
    assert h.grad_fn.name() == "torch::autograd::CppNode<lk::ProjectedRun>"
    (g,) = torch.autograd.grad(h.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"not differentiable .* backend='reference'"):
        torch.autograd.grad(g.sum(), x)


@pytest.mark.parametrize("cell", ["vanilla", "layernorm", "heads=2", "peephole+layernorm"])
def test_prepared_step_weight_gradients_share_one_allocation_safely(cell):
    """The step node writes dW_ih and dW_hh into one buffer (two contiguous views), and hands the
    peepholes and layer norm their gradients as views of the kernel's one accumulator: kept by
    autograd as ``.grad`` (one step, no earlier gradient) or added into existing ones, each
    parameter's gradient is its own — equal to the reference loop's, unchanged by an in-place
    write to another's, and accumulated correctly by a later backward."""
    torch.manual_seed(0)
    n = 6  # hidden units (heads=2 splits them)
    x, h, c = torch.randn(B, I, dtype=torch.float64), torch.randn(B, n, dtype=torch.float64), \
        torch.randn(B, n, dtype=torch.float64)
    fast = lstmkit.LSTMCell(I, n, cell=cell).double()
    ref = lstmkit.LSTMCell(I, n, cell=cell, backend="reference").double()
    ref.load_state_dict(fast.state_dict())
    fast(x, (h, c))  # prepares the step
    fast.zero_grad(set_to_none=True)

    def backward(m, n_steps):
        s = (h, c)
        for _ in range(n_steps):
            s = m(x, s)
        (s[0].sum() + 2 * s[1].sum()).backward()

    def check():
        for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    backward(fast, 1)
    # the case this test is about: autograd kept the node's two views as .grad
    assert fast.weight_hh.grad.untyped_storage().data_ptr() == fast.weight_ih.grad.untyped_storage().data_ptr()
    backward(ref, 1)
    check()
    for m in (fast, ref):  # every other gradient untouched
        m.weight_ih.grad.zero_()
        for name, p in m.named_parameters():
            if name.startswith(("ln_", "peephole")):
                p.grad.mul_(-1.0)
    check()
    backward(fast, 3)  # accumulates: weight_ih's from zero, weight_hh's onto the first
    backward(ref, 3)
    check()


def test_prepared_step_draws_in_training_mode():
    """A step prepared in eval mode is not reused after ``.train()``: zoneout's and dropout's
    masks are drawn there (without gradients too), as on the general path."""
    torch.manual_seed(0)
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    step = lstmkit.LSTMCell(I, H, cell="zoneout=0.5/0.5").eval()
    layer = lstmkit.LSTM(I, H, num_layers=2, dropout=0.5).eval()
    with torch.no_grad():
        cell_eval = [step(x, (h, c)) for _ in range(2)]  # the second: prepared
        layer_eval = [layer.step(x, (h.expand(2, B, H), c.expand(2, B, H))) for _ in range(2)]
        step.train()
        layer.train()
        torch.manual_seed(1)
        cell_train = step(x, (h, c))
        layer_train = layer.step(x, (h.expand(2, B, H), c.expand(2, B, H)))
    torch.testing.assert_close(cell_eval[1], cell_eval[0], rtol=0, atol=0)
    torch.testing.assert_close(layer_eval[1], layer_eval[0], rtol=0, atol=0)
    assert not torch.equal(cell_train[1], cell_eval[0][1])  # some units kept their previous c
    assert not torch.equal(layer_train[0], layer_eval[0][0])  # dropout between the layers


def test_prepared_step_draws_as_the_general_path(monkeypatch):
    """In training mode a prepared step draws zoneout's and dropout's masks as the general path
    does, in the same order from torch's generator: a seed gives the same step on either path."""
    monkeypatch.undo()  # torch's generator, not the tests' fixed masks
    torch.manual_seed(0)
    x, h, c = torch.randn(B, I, requires_grad=True), torch.randn(B, H), torch.randn(B, H)
    cases = [(lambda: lstmkit.LSTMCell(I, H, cell="zoneout=0.5/0.5"), lambda m: m(x, (h, c))),
             (lambda: lstmkit.LSTM(I, H, num_layers=2, dropout=0.5, cell="zoneout=0.3/0.4"),
              lambda m: (lambda out, state: (out, *state))(*m.step(x, (h.expand(2, B, H), c.expand(2, B, H)))))]
    for make, call in cases:
        prepared, general = make(), make()
        general.load_state_dict(prepared.state_dict())
        taken = []
        run = prepared._prepared.run
        prepared._prepared.run = lambda *args, run=run, taken=taken: taken.append(r := run(*args)) or r
        call(prepared)  # the general path, which prepares the step
        for seed in (5, 6):
            torch.manual_seed(seed)
            got = call(prepared)
            torch.manual_seed(seed)
            want = call(general)  # each call of `general` is its first for this seed's masks
            general._prepared.clear()
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert [r is not None for r in taken] == [False, True, True]
        assert not torch.equal(call(prepared)[1], got[1])  # fresh masks every call


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", ["input", "h", "c"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_step_finite_checks(dtype, where, value):
    """A NaN or an infinity anywhere in a step's input or state is refused, named (the compiled
    check, also on a non-contiguous tensor and past the vector width)."""
    step = lstmkit.LSTMCell(I, 37).to(dtype)
    x, h, c = torch.randn(B, I, dtype=dtype), torch.zeros(37, B, dtype=dtype).t(), torch.zeros(B, 37, dtype=dtype)
    with torch.no_grad():  # the signature seen once: the check still runs on the prepared step
        step(x, (h, c))
    target = {"input": x, "h": h, "c": c}[where]
    target[-1, -1] = value
    with pytest.raises(ValueError, match=f"{'input:' if where == 'input' else 'hx: ' + where} contains NaN or inf"):
        with torch.no_grad():
            step(x, (h, c))
    layer = lstmkit.LSTM(I, 37).to(dtype)
    with pytest.raises(ValueError, match=f"{'input:' if where == 'input' else 'hx: ' + where + '_0'} contains NaN"):
        layer.step(x, (h[None], c[None]))


@pytest.mark.parametrize("cell", [pytest.param(LSTM_VARIANTS[k], id=k) for k in
                                  ("vanilla", "peephole", "layernorm", "deep_all", "zoneout")]
                         + [pytest.param("slstm", id="slstm")])
@pytest.mark.parametrize("batch_first", [False, True])
def test_inference_sequence_prepared_like_a_step(cell, batch_first, forward_infer_calls):
    """Whole-sequence inference on the fused kernel is prepared per call signature too (the
    projection in the loop, as the general path runs it): the second call of a signature gives
    bit-identical results without the general path, for a stacked layer with a projection, with
    and without a state, batch_first or not, in eval and in training mode (dropout between layers,
    the same masks from the same seed); the reference kernel agrees in float64."""
    calls = forward_infer_calls
    proj = 0 if resolve(cell).slstm else 2  # (the sLSTM has no projection)
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H, num_layers=2, proj_size=proj, cell=cell, batch_first=batch_first,
                         dropout=0.5).double()
    ref = lstmkit.LSTM(I, H, num_layers=2, proj_size=proj, cell=cell, batch_first=batch_first,
                       backend="reference").double().eval()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(B, T, I, dtype=torch.float64) if batch_first else torch.randn(T, B, I, dtype=torch.float64)
    states = lstmkit.LSTM(I, H, num_layers=2, proj_size=proj, cell=cell, batch_first=batch_first)(x.float())[1]
    hx = tuple(torch.randn_like(s, dtype=torch.float64) for s in states)
    general = []
    real_run = type(layer)._run
    layer._run = lambda *a, **k: general.append(1) or real_run(layer, *a, **k)  # type: ignore[method-assign]
    for state in (None, hx):
        layer.eval()
        with torch.no_grad():
            first = layer(x, state)
            second = layer(x, state)
            want = ref(x, state)
        assert len(general) == 1, "the second call of a signature takes the prepared path"
        general.clear()
        for a, b, w in zip((first[0], *first[1]), (second[0], *second[1]), (want[0], *want[1])):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10)
        layer.train()
        with torch.no_grad():
            torch.manual_seed(1)
            first = layer(x, state)
            torch.manual_seed(1)
            second = layer(x, state)
        zoneout = resolve(cell).zoneout != (0.0, 0.0)  # a sequence's zoneout masks: the general path
        assert len(general) == (2 if zoneout else 1)
        general.clear()
        for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert calls, "the fused kernel's forward_infer ran"


@pytest.mark.parametrize("cell", [pytest.param(v, id=k) for k, v in LSTM_VARIANTS.items()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_training_sequence_prepared_bit_for_bit(cell, dtype):
    """A whole sequence with gradients is prepared per call signature too (the compiled node,
    its input projection apart from the loop as the general path computes it): for every variant,
    a two-layer stack with dropout between the layers, a state that wants gradients and
    batch_first, the calls after the first give bit-identical outputs, states and gradients
    (input, state, every parameter) without the general path — but zoneout in training, whose
    masks the general path draws for the whole sequence."""
    spec = resolve(cell)
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H, num_layers=2, cell=cell, batch_first=True, dropout=0.5).to(dtype).train()
    x = torch.randn(B, T, I, dtype=dtype, requires_grad=True)
    states = layer(x.detach())[1]
    hx = tuple(torch.randn_like(t).requires_grad_() for t in states)
    general = []
    real_run = type(layer)._run
    layer._run = lambda *a, **k: general.append(1) or real_run(layer, *a, **k)  # type: ignore[method-assign]
    results = []
    for _ in range(3):
        torch.manual_seed(1)  # the same dropout (and zoneout) masks
        layer.zero_grad()
        x.grad = None
        for t in hx:
            t.grad = None
        y, out_states = layer(x, hx)
        (y.square().sum() + sum((t * t).sum() for t in out_states)).backward()
        results.append([y, *out_states, x.grad, *(t.grad for t in hx), *(p.grad for p in layer.parameters())])
    zoneout = spec.zoneout != (0.0, 0.0)
    assert len(general) == (3 if zoneout else 1), "the calls after the first take the prepared path"
    for first, later in zip(results[0], results[2]):
        assert first is not None and later is not None
        torch.testing.assert_close(later, first, rtol=0, atol=0)


def test_training_sequence_prepared_only_where_it_projects_alike(monkeypatch):
    """Grad mode with nothing wanting a gradient, 16-bit layers and oneDNN's projection GEMM stay
    on the general path (the prepared node could not compute what it computes), and a prepared
    signature without gradients is not taken with them (nor the other way round)."""
    from lstmkit.kernels import fused

    torch.manual_seed(0)
    x = torch.randn(T, B, I)
    layer = lstmkit.LSTM(I, H)
    general = []
    real_run = type(layer)._run
    layer._run = lambda *a, **k: general.append(1) or real_run(layer, *a, **k)  # type: ignore[method-assign]
    layer.requires_grad_(False)
    for _ in range(2):
        layer(x)
    assert len(general) == 2
    layer.requires_grad_(True)
    with torch.no_grad():
        layer(x)  # an inference signature
    general.clear()
    layer(x)[0].sum().backward()  # with gradients: a signature of its own, the general path first
    layer(x)[0].sum().backward()
    assert len(general) == 1
    general.clear()
    with torch.no_grad():
        layer(x)
    assert not general, "the inference signature kept apart from the training one"
    monkeypatch.setattr(fused, "_use_onednn", lambda rows, w: True)
    other = lstmkit.LSTM(I, H)
    called = []
    real_other = type(other)._run
    other._run = lambda *a, **k: called.append(1) or real_other(other, *a, **k)  # type: ignore[method-assign]
    for _ in range(2):
        other(x)[0].sum().backward()
    assert len(called) == 2, "oneDNN's projection: the general path every time"
    monkeypatch.undo()
    low = lstmkit.LSTM(I, H).bfloat16()
    low_calls = []
    real_low = type(low)._run
    low._run = lambda *a, **k: low_calls.append(1) or real_low(low, *a, **k)  # type: ignore[method-assign]
    for _ in range(2):
        low(x.bfloat16())[0].float().sum().backward()
    assert len(low_calls) == 2, "a 16-bit layer: the general path every time"


def test_prepared_sequence_rechecks_what_changed():
    """A prepared sequence signature gives way to the general path where it must decide: gradients
    wanted, a NaN (named), a module converted in place to another dtype (the mismatch named), a
    new length."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(I, H).eval()
    x = torch.randn(T, B, I)
    with torch.no_grad():
        layer(x)
        layer(x)
    assert layer._prepared._kept
    y, _ = layer(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None and layer.weight_hh_l0.grad is not None
    bad = x.detach().clone()
    bad[2, 1, 0] = float("inf")
    with torch.no_grad(), pytest.raises(ValueError, match="input: contains NaN or inf"):
        layer(bad)
    layer.double()  # the same Parameter objects, float64 data
    with torch.no_grad(), pytest.raises(TypeError, match="does not match the layer's parameters"):
        layer(x.detach())
    with torch.no_grad():
        y1, _ = layer(torch.randn(T + 2, B, I, dtype=torch.float64))
    assert y1.shape == (T + 2, B, H)


@pytest.mark.parametrize("units", [True, False])
def test_sixteen_bit_step_training_with_and_without_units(monkeypatch, units):
    """A bfloat16 cell's prepared training steps (the C++ node) compute dX and dW_ih in float32
    where the CPU has no bfloat16 units (``fused.SIXTEEN_BIT_UNITS``), with torch's bfloat16 GEMM
    elsewhere: either way the gradients come back in bfloat16 and match the float64 reference
    within bfloat16's rounding (the last two of four steps run the prepared node)."""
    from lstmkit.kernels import fused
    monkeypatch.setitem(fused.SIXTEEN_BIT_UNITS, torch.bfloat16, units)
    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(I, H).bfloat16()
    ref = lstmkit.LSTMCell(I, H, backend="reference").double()
    ref.load_state_dict(cell.state_dict())
    xs = torch.randn(4, B, I).bfloat16()
    grads = []
    for m, dtype in ((cell, torch.bfloat16), (ref, torch.float64)):
        x = xs.to(dtype).detach().requires_grad_()
        hc, loss = None, 0.0
        for t in range(4):
            hc = m(x[t], hc)
            loss = loss + (hc[0].double() * torch.linspace(-1, 1, H, dtype=torch.float64)).sum()
        loss.backward()
        grads.append([x.grad, m.weight_ih.grad, m.weight_hh.grad, m.bias_ih.grad])
    for got, want, what in zip(*grads, ("x", "weight_ih", "weight_hh", "bias_ih")):
        assert got.dtype == torch.bfloat16, what
        assert (got.double() - want).abs().max() <= 3e-2 * want.abs().max(), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cell", ["vanilla", "slstm", "slstm+heads=2", "layernorm+peephole", "zoneout=0.2"])
def test_inference_leaves_the_callers_states_untouched(cell, dtype):
    """Inference updates the cell state in place inside the kernel — in a buffer of its own (the sLSTM's
    three states joined, a 16-bit state widened, zeros) or a copy of the caller's: the states a caller
    gives (cell and layer, first and prepared calls, one step and a run) keep their values, and the
    step's new states are what the float32 reference computes from them."""
    torch.manual_seed(0)
    cellm = lstmkit.LSTMCell(6, 8, cell=cell, dtype=dtype).eval()
    layer = lstmkit.LSTM(6, 8, cell=cell, dtype=dtype).eval()
    ref = lstmkit.LSTMCell(6, 8, cell=cell, backend="reference").eval()
    ref.load_state_dict({k: v.float() for k, v in cellm.state_dict().items()})
    x = torch.randn(3, 6, dtype=dtype)
    with torch.no_grad():
        states = tuple(t.to(dtype) for t in ref(torch.randn(3, 6)))  # a state the cell can reach
        before = tuple(t.clone() for t in states)
        expected = ref(x.float(), tuple(t.float() for t in before))
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        for _ in range(3):  # the first call takes the general path, the later ones the prepared step
            got = cellm(x, states)
            layer(x[None], tuple(t[None] for t in states))
            layer.step(x, tuple(t[None] for t in states))
            for a, b in zip(states, before):
                assert torch.equal(a, b), "a caller's state changed"
            for a, e in zip(got, expected):
                torch.testing.assert_close(a.float(), e, **tol)
