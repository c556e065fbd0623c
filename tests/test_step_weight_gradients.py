"""A loop of prepared steps sums its weight gradients in place, one pair per backward pass.

The first step node of a backward pass to run returns a fresh (dW_ih, dW_hh) pair; the later ones
add into it and return no gradient for the weights. Each test builds a graph where that could go
wrong — other uses of the weights, hooks that keep a node's gradients, a second or nested backward,
two call signatures, ``autograd.grad``, threads — and compares every gradient with the reference
loop (float64).
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import lstmkit

I, N = 3, 6  # inputs, hidden units (heads=2 splits them)
CELLS = ["vanilla", "layernorm", "heads=2", "zoneout=0.3/0.2", "deep=4"]


def _pair(cell: str) -> tuple[lstmkit.LSTMCell, lstmkit.LSTMCell]:
    torch.manual_seed(0)
    fast = lstmkit.LSTMCell(I, N, cell=cell).double()
    ref = lstmkit.LSTMCell(I, N, cell=cell, backend="reference").double()
    ref.load_state_dict(fast.state_dict())
    x, h, c = (t[0] if t.dim() == 3 else t for t in _inputs())
    fast(x, (h, c))  # a signature's first call takes the general path and prepares the step
    return fast, ref


def _inputs(batch: int = 2, steps: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(steps, batch, I, dtype=torch.float64, generator=g),
            torch.randn(batch, N, dtype=torch.float64, generator=g),
            torch.randn(batch, N, dtype=torch.float64, generator=g))


def _loss(m: lstmkit.LSTMCell, xs: torch.Tensor, h: torch.Tensor, c: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """Steps over xs (zoneout's masks drawn from one seed for both models), a loss of every h."""
    torch.manual_seed(seed)
    total = 0.0
    for t in range(xs.shape[0]):
        h, c = m(xs[t], (h, c))
        total = total + (t + 1) * h.sum() + c.pow(2).sum()
    return total


def _grads(m: lstmkit.LSTMCell) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in m.named_parameters()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("cell", CELLS)
def test_a_loop_of_steps_sums_into_one_pair(cell):
    """Five steps, one backward: the reference's gradients, and dW_ih, dW_hh the one pair the
    first node to run returned (a single allocation: the later nodes added into it); the deep
    gates' tensors' gradients likewise (one allocation of their own)."""
    fast, ref = _pair(cell)
    xs, h, c = _inputs()
    _loss(fast, xs, h, c).backward()
    _loss(ref, xs, h, c).backward()
    _assert_same(_grads(fast), _grads(ref))
    assert fast.weight_ih.grad.untyped_storage().data_ptr() == fast.weight_hh.grad.untyped_storage().data_ptr()
    deep = {p.grad.untyped_storage().data_ptr() for n, p in fast.named_parameters() if n.startswith("mlp_")}
    assert len(deep) == (1 if cell.startswith("deep") else 0)
    # a second pass starts a pair of its own and autograd adds it to .grad
    _loss(fast, xs, h, c, seed=3).backward()
    _loss(ref, xs, h, c, seed=3).backward()
    _assert_same(_grads(fast), _grads(ref))


@pytest.mark.parametrize("cell", ["vanilla", "heads=2"])
def test_other_uses_of_the_weights_in_the_same_pass(cell):
    """The weights also used outside the steps (a penalty read before, between and after them):
    autograd adds those gradients to the pair or the pair to them, whichever way, and the steps
    after such an addition still count."""
    fast, ref = _pair(cell)
    xs, h, c = _inputs()

    def loss(m: lstmkit.LSTMCell) -> torch.Tensor:
        torch.manual_seed(2)
        total = m.weight_hh.pow(2).sum()
        for t in range(xs.shape[0]):
            h_t, _ = m(xs[t], (h, c))
            total = total + h_t.sum() * (t + 1) + (m.weight_ih * t).sum()
        return total + m.weight_hh.sum()
    loss(fast).backward()
    loss(ref).backward()
    _assert_same(_grads(fast), _grads(ref))


def test_a_node_hook_keeps_what_it_was_given():
    """A post hook on a step node that keeps the gradients the node returned, then another use of
    both weights whose gradients autograd adds next (it cannot add into the kept pair: it adds the
    pair into theirs): what the hook kept is not changed by the steps after it, and every gradient
    is the reference's."""
    fast, ref = _pair("vanilla")
    xs, h, c = _inputs()
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(grad_inputs, grad_outputs):
        dwih, dwhh = grad_inputs[1], grad_inputs[4]
        if dwih is not None:
            kept.append((dwih, dwhh))
            copies.append((dwih.clone(), dwhh.clone()))

    def loss(m: lstmkit.LSTMCell, hook: bool) -> torch.Tensor:
        torch.manual_seed(2)
        total, s = 0.0, (h, c)
        for t in range(xs.shape[0]):
            if t == xs.shape[0] - 1:  # its nodes run after the last step's, before the others
                total = total + (m.weight_ih * 3).sum() + (m.weight_hh * 5).sum()
            s = m(xs[t], s)
            if hook and t == xs.shape[0] - 1:  # the first step node to run in backward
                s[0].grad_fn.register_hook(keep)
            total = total + (t + 1) * s[0].sum() + s[1].pow(2).sum()
        return total
    loss(fast, True).backward()
    loss(ref, False).backward()
    _assert_same(_grads(fast), _grads(ref))
    assert kept, "the hook saw no weight gradient"
    for (a, b), (a0, b0) in zip(kept, copies):
        assert torch.equal(a, a0) and torch.equal(b, b0)


def test_retained_graph_twice_and_autograd_grad():
    """Backward twice through one retained graph (two passes: twice the reference's gradients),
    then autograd.grad through it: the same gradients returned, .grad untouched."""
    fast, ref = _pair("vanilla")
    xs, h, c = _inputs()
    lf, lr = _loss(fast, xs, h, c), _loss(ref, xs, h, c)
    lf.backward(retain_graph=True)
    lf.backward(retain_graph=True)
    lr.backward(retain_graph=True)
    lr.backward(retain_graph=True)
    _assert_same(_grads(fast), _grads(ref))
    before = _grads(fast)
    got = torch.autograd.grad(lf, [fast.weight_ih, fast.weight_hh])
    want = torch.autograd.grad(lr, [ref.weight_ih, ref.weight_hh])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    _assert_same(_grads(fast), before)


@pytest.mark.parametrize("reentrant", [True, False])
def test_two_graphs_two_signatures_and_a_checkpoint(reentrant):
    """Two loops at two batch sizes (two prepared signatures) in one loss, and a checkpointed
    stretch of steps (re-entrant: a nested backward pass inside the outer one; else the saved
    tensors recomputed during the outer pass)."""
    fast, ref = _pair("layernorm")
    xs, h, c = _inputs(batch=2)
    xs1, h1, c1 = _inputs(batch=1, steps=3)

    def loss(m: lstmkit.LSTMCell) -> torch.Tensor:
        torch.manual_seed(2)
        a = _loss(m, xs, h, c)
        b = _loss(m, xs1, h1, c1)
        s = (h, c)
        for t in range(2):
            s = m(xs[t], s)

        def middle(h_, c_):
            for t in range(2, 4):
                h_, c_ = m(xs[t], (h_, c_))
            return h_, c_
        s = checkpoint(middle, *s, use_reentrant=reentrant)
        s = m(xs[4], s)
        return a + 2 * b + s[0].sum()
    loss(fast).backward()
    loss(ref).backward()
    _assert_same(_grads(fast), _grads(ref))


def test_passes_on_two_threads():
    """Backward passes of one model on two threads at once (autograd.grad: no shared .grad)."""
    fast, ref = _pair("vanilla")
    inputs = [_inputs(steps=6) for _ in range(2)]
    want = []
    for xs, h, c in inputs:
        want.append(torch.autograd.grad(_loss(ref, xs, h, c), [ref.weight_ih, ref.weight_hh]))
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            xs, h, c = inputs[k]
            for _ in range(20):
                got = torch.autograd.grad(_loss(fast, xs, h, c), [fast.weight_ih, fast.weight_hh])
                for a, b in zip(got, want[k]):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


def test_a_stack_of_layers_stepped():
    """``LSTM.step`` of a two-layer stack (a prepared layer each, a pair each): the reference's
    gradients, each layer's dW_ih and dW_hh one pair."""
    torch.manual_seed(0)
    fast = lstmkit.LSTM(I, N, num_layers=2, cell="peephole").double()
    ref = lstmkit.LSTM(I, N, num_layers=2, cell="peephole", backend="reference").double()
    ref.load_state_dict(fast.state_dict())
    xs, h, c = _inputs()
    state = (h.expand(2, -1, -1).contiguous(), c.expand(2, -1, -1).contiguous())
    fast.step(xs[0], state)  # prepares the step

    def loss(m: lstmkit.LSTM) -> torch.Tensor:
        total, s = 0.0, state
        for t in range(xs.shape[0]):
            y, s = m.step(xs[t], s)
            total = total + (t + 1) * y.sum() + s[1].pow(2).sum()
        return total
    loss(fast).backward()
    loss(ref).backward()
    _assert_same({k: p.grad for k, p in fast.named_parameters()}, {k: p.grad for k, p in ref.named_parameters()})
    for layer in range(2):
        w_ih, w_hh = getattr(fast, f"weight_ih_l{layer}"), getattr(fast, f"weight_hh_l{layer}")
        assert w_ih.grad.untyped_storage().data_ptr() == w_hh.grad.untyped_storage().data_ptr()


@pytest.mark.parametrize("frozen", ["mlp_o_bias1", "mlp_i_weight1"])
def test_a_frozen_deep_gate_tensor_leaves_the_others_summed(frozen):
    """One deep-gate tensor without a gradient: the pass's pair of W_ih, W_hh is carried, the
    deep gates' gradients are not (each node returns its own) — the kernel took the carried
    pair's 'add' for them too and summed into fresh, uninitialised memory (0.4 off, or 1e98).
    Steps of a cell, of a layer, and two whole runs of a layer in one graph."""
    fast, ref = _pair("deep=4")
    for m in (fast, ref):
        getattr(m, frozen).requires_grad_(False)
    xs, h, c = _inputs()
    _loss(fast, xs, h, c).backward()
    _loss(ref, xs, h, c).backward()
    _assert_same(_grads_wanted(fast), _grads_wanted(ref))
    torch.manual_seed(0)
    layers = [lstmkit.LSTM(I, N, cell="deep=4", backend=b).double() for b in (None, "reference")]
    layers[1].load_state_dict(layers[0].state_dict())
    for m in layers:
        getattr(m, f"{frozen}_l0").requires_grad_(False)
        m(xs), m(xs)  # the run's signature prepared
        state = None
        total = m(xs)[0].sum() + m(xs * 0.5)[0].square().sum()
        for t in range(xs.shape[0]):
            y, state = m.step(xs[t], state)
            total = total + y.sum() * (t + 1)
        total.backward()
    _assert_same(_grads_wanted(layers[0]), _grads_wanted(layers[1]))


def _grads_wanted(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}
