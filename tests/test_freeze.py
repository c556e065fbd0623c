"""lstmkit.freeze: a copy for inference whose layers pack W_hh and W_ih once.

Every variant a step can run, one step per call and whole sequences, against the reference
kernel row (cell.py's equations in a Python loop) with the same weights; that the packed path
ran; the snapshot's semantics (the original untouched, in-place changes of the copy packed
again); gradients with respect to the input through a frozen copy.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import lstmkit
from conftest import assert_close
from lstmkit import variants
from lstmkit.spec import resolve
from variants import LSTM_VARIANTS

B, I, H = 3, 4, 8
STEP_CELLS = {k: v for k, v in LSTM_VARIANTS.items() if not resolve(v).fgr}  # fgr: a step cannot carry s


def _states(cell: object, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(h, c[, n, m]) for a cell that has run before: n >= 1 for the sLSTM's normaliser."""
    k = len(variants.cell_states(resolve(cell)))
    states = [torch.randn(n, H, dtype=dtype) * 0.5 for _ in range(1 + k)]
    if k > 1:
        states[2] = states[2].abs() + 1.0
    return tuple(states)


def _packed(module: torch.nn.Module) -> list[bool]:
    """Per kept layer of every lstmkit layer in ``module``: whether its weights are packed."""
    out = []
    for sub in module.modules():
        prepared = getattr(sub, "_prepared", None)
        if prepared is not None:
            for layers in (k.layers for k in prepared._kept.values()):
                out += [layer.packed for layer in layers]
    return out


@pytest.mark.parametrize("cell", list(STEP_CELLS.values()), ids=list(STEP_CELLS))
def test_lstmcell_every_variant_matches_reference(cell):
    """Three calls of a frozen LSTMCell (float64) = the reference row's, and the packed path ran."""
    torch.manual_seed(0)
    ref = lstmkit.LSTMCell(I, H, cell=cell, backend="reference").double().eval()
    frozen = lstmkit.freeze(lstmkit.LSTMCell(I, H, cell=cell).double())
    frozen.load_state_dict(ref.state_dict())
    states = _states(cell, B, torch.float64)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(B, I, dtype=torch.float64)
            expected, got = ref(x, states), frozen(x, states)
            for e, g in zip(expected, got):
                assert_close(g, e, torch.float64, f"{cell}")
            states = got
    assert _packed(frozen) == [True]


#: (rtol, atol): bfloat16 results compared with the unfrozen fused kernel's (same products in
#: float32, summed in another order, then rounded to bfloat16: one unit in the last place).
BF16 = (1.6e-2, 1e-2)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if dtype == torch.bfloat16:
        torch.testing.assert_close(actual, expected, rtol=BF16[0], atol=BF16[1], msg=lambda m: f"{what}: {m}")
    else:
        assert_close(actual, expected, dtype, what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("cell", ["vanilla", "heads=2+layernorm", "slstm+heads=2", "peephole+cifg"])
def test_lstm_sequence_and_step_match_reference(cell, dtype):
    """A frozen stacked LSTM with a projection: whole sequences (a batch of 8, the projection in
    the loop: the kept, packed path) and layer.step against the reference row (bfloat16: against
    the unfrozen fused kernel); bidirectional with lengths, which the general path runs, too."""
    torch.manual_seed(1)
    proj = 4 if "slstm" not in cell else 0
    backend = "reference" if dtype != torch.bfloat16 else None
    ref = lstmkit.LSTM(I, H, num_layers=2, proj_size=proj, cell=cell, backend=backend).to(dtype).eval()
    frozen = lstmkit.freeze(lstmkit.LSTM(I, H, num_layers=2, proj_size=proj, cell=cell).to(dtype))
    frozen.load_state_dict(ref.state_dict())
    x = torch.randn(6, 8, I).to(dtype)
    with torch.no_grad():
        for _ in range(2):  # the second call of a signature takes the kept, packed path
            expected, got = ref(x), frozen(x)
            _close(got[0], expected[0], dtype, f"{cell} y")
            for e, g in zip(expected[1], got[1]):
                _close(g, e, dtype, f"{cell} state")
        assert _packed(frozen) == [True, True]
        state = None
        for t in range(3):
            y, state = frozen.step(x[t], state)
        _close(y, ref(x[:3])[0][-1], dtype, f"{cell} step")
        bidir = dict(num_layers=2, bidirectional=True, proj_size=proj, cell=cell)
        ref2 = lstmkit.LSTM(I, H, backend=backend, **bidir).to(dtype).eval()
        frozen2 = lstmkit.freeze(lstmkit.LSTM(I, H, **bidir).to(dtype))
        frozen2.load_state_dict(ref2.state_dict())
        lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6])
        expected, got = ref2(x, lengths=lengths), frozen2(x, lengths=lengths)
        _close(got[0], expected[0], dtype, f"{cell} bidirectional y")


def test_vanilla_matches_torch_lstmcell():
    """A frozen vanilla LSTMCell against torch.nn.LSTMCell with the same weights (float32)."""
    torch.manual_seed(2)
    ref = torch.nn.LSTMCell(I, H)
    frozen = lstmkit.freeze(lstmkit.LSTMCell(I, H))
    frozen.load_state_dict(ref.state_dict())
    x, hx = torch.randn(B, I), (torch.randn(B, H), torch.randn(B, H))
    with torch.no_grad():
        for _ in range(2):
            for e, g in zip(ref(x, hx), frozen(x, hx)):
                assert_close(g, e, torch.float32, "vanilla")


def test_snapshot_and_in_place_changes():
    """The original keeps its mode, gradients and weights; changing it does not reach the copy;
    an in-place change of the copy's weights (load_state_dict, copy_ under no_grad) is packed
    again on its next call."""
    torch.manual_seed(3)
    model = lstmkit.LSTMCell(I, H).train()
    frozen = lstmkit.freeze(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    x, hx = torch.randn(B, I), (torch.randn(B, H), torch.randn(B, H))
    with torch.no_grad():
        first = [frozen(x, hx)[0] for _ in range(2)][-1]
        model.weight_hh.mul_(2.0)  # the original changes: the snapshot does not
        assert torch.equal(frozen(x, hx)[0], first)
        other = lstmkit.LSTMCell(I, H)
        frozen.load_state_dict(other.state_dict())  # the copy's own weights change in place
        expected = other.eval()(x, hx)[0]
        assert_close(frozen(x, hx)[0], expected, torch.float32, "after load_state_dict")
        frozen.weight_ih.copy_(torch.zeros_like(frozen.weight_ih))
        other.weight_ih.zero_()
        assert_close(frozen(x, hx)[0], other(x, hx)[0], torch.float32, "after copy_")
        frozen.half().float()  # new tensors set through .data: rounded to float16 and back
        other.load_state_dict(frozen.state_dict())
        for _ in range(2):
            got = frozen(x, hx)[0]
        assert_close(got, other(x, hx)[0], torch.float32, "after half() and float()")


@pytest.mark.parametrize("write", ["W", "b", "W_x in place", "peephole in place"])
def test_writes_through_gate_views_are_packed_again(write):
    """The gate views (``layer.gates()``) edit the layer's parameters: a frozen copy's next call
    computes with what they wrote (their views were of ``.data``, which bumps no version, so the
    packed weights went stale: 0.2-0.6 off)."""
    torch.manual_seed(5)
    layer = lstmkit.LSTM(I, H, num_layers=2, cell="peephole").eval()
    frozen = lstmkit.freeze(layer)
    xs = torch.randn(5, B, I)
    with torch.no_grad():
        for _ in range(2):
            frozen(xs)  # the second call packs the weights
        for module in (frozen, layer):
            view = module.gates(1)["forget"]
            if write == "W":
                view.W = torch.linspace(-1, 1, H * 2 * H).reshape(H, 2 * H)
            elif write == "b":
                view.b = torch.full((H,), 2.0)
            elif write == "W_x in place":
                view.W_x.mul_(-3.0)
            else:
                view.peephole.fill_(1.5)
        assert_close(frozen(xs)[0], layer(xs)[0], torch.float32, write)


def test_gradient_through_a_frozen_copy():
    """An input that requires a gradient: the frozen copy's gradient = the original's (eval)."""
    torch.manual_seed(4)
    model = lstmkit.LSTM(I, H, num_layers=2).double().eval()
    frozen = lstmkit.freeze(model)
    x = torch.randn(5, B, I, dtype=torch.float64)
    grads = []
    for m in (model, frozen):
        xi = x.clone().requires_grad_()
        m(xi)[0].square().sum().backward()
        grads.append(xi.grad)
    assert_close(grads[1], grads[0], torch.float64, "dx")
    assert all(p.grad is None for p in frozen.parameters())


class _Model(torch.nn.Module):
    """An lstmkit layer inside another module (module level: a pickle names its class)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = lstmkit.LSTM(I, H, cell="slstm")
        self.head = torch.nn.Linear(H, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def test_nested_copied_pickled():
    """Layers inside another module are frozen; a copy or a pickle of a frozen model stays frozen."""
    torch.manual_seed(5)
    model = _Model()
    x = torch.randn(4, 8, I)
    with torch.no_grad():
        expected = model.eval()(x)
        for frozen in (lstmkit.freeze(model), copy.deepcopy(lstmkit.freeze(model))):
            for _ in range(2):
                assert_close(frozen(x), expected, torch.float32, "nested")
            assert _packed(frozen) == [True]
        buffer = io.BytesIO()
        torch.save(lstmkit.freeze(model), buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert loaded.rnn._prepared.frozen
        for _ in range(2):
            assert_close(loaded(x), expected, torch.float32, "loaded")


def test_inference_mode():
    """Frozen under torch.inference_mode(): the copy's weights are normal tensors (packed); a
    layer whose weights are inference tensors (no version counter) runs unpacked, correctly."""
    torch.manual_seed(6)
    model = lstmkit.LSTMCell(I, H)
    x, hx = torch.randn(B, I), (torch.randn(B, H), torch.randn(B, H))
    with torch.inference_mode():
        frozen = lstmkit.freeze(model)
        expected = model.eval()(x, hx)
        for _ in range(2):
            got = frozen(x, hx)
        for e, g in zip(expected, got):
            assert_close(g, e, torch.float32, "inference mode")
        assert _packed(frozen) == [True]
        made_inside = lstmkit.freeze(model)
        for name, p in list(made_inside.named_parameters()):  # replaced by inference tensors
            setattr(made_inside, name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
        assert made_inside.weight_hh.is_inference()
        for _ in range(2):
            got = made_inside(x, hx)
        for e, g in zip(expected, got):
            assert_close(g, e, torch.float32, "inference tensors")
        assert _packed(made_inside) == [False]


def test_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match=r"module: expected a torch.nn.Module, got Tensor"):
        lstmkit.freeze(torch.zeros(3))


def test_a_frozen_layer_packs_its_weights_once_for_every_signature():
    """The steps kept for each call signature (batch sizes here) share one packing per layer: a
    server with varying batch sizes held one packed copy of the weights per size (8 sizes of a
    1024-wide layer: +226 MiB), and the sizes after the first find theirs packed already."""
    module = lstmkit.LSTM(6, 5, num_layers=2)
    frozen = lstmkit.freeze(module)
    with torch.no_grad():
        for _ in range(2):
            frozen.step(torch.randn(1, 6))
        x = torch.randn(3, 6)
        got = frozen.step(x)  # a new signature: its first call takes the general path and keeps it
        kept = frozen._prepared._kept
        assert len(kept) == 2
        assert all(layer.packed for k in kept.values() for layer in k.layers)
        got2 = frozen.step(x)  # (run on the shared packing)
        want = module.step(x)
    for a, b, c in zip(got, got2, want):
        assert_close(a, c, torch.float32, "first call")
        assert_close(b, c, torch.float32, "kept step")


@pytest.mark.parametrize("kind", ["step", "run", "cell"])
def test_a_frozen_layer_in_shared_memory_reads_its_weights_on_every_call(kind):
    """A frozen model in shared memory (``share_memory()``, or received by another process) served
    the weights it packed first: another process's ``load_state_dict`` into the shared tensors is
    never counted by this process's version counters, so a worker mixed the old W_ih, W_hh with
    the new biases (0.35 off; found by a sweep of multi-process serving). Shared weights are not
    packed. Here a write through ``.data`` stands for the other process's write (uncounted too)."""
    torch.manual_seed(0)
    make = (lambda: lstmkit.LSTMCell(6, 5)) if kind == "cell" else (lambda: lstmkit.LSTM(6, 5, num_layers=2))
    frozen, new = lstmkit.freeze(make()), make()
    frozen.share_memory()
    x = torch.randn(4, 3, 6) if kind == "run" else torch.randn(3, 6)
    call = {"step": lambda m: m.step(x), "run": lambda m: m(x), "cell": lambda m: m(x)}[kind]
    with torch.no_grad():
        for _ in range(3):
            call(frozen)
        kept = frozen._prepared._kept
        assert kept and not any(layer.packed for k in kept.values() for layer in k.layers)
        for p, q in zip(frozen.parameters(), new.parameters()):
            p.data.copy_(q)  # as another process writes the shared tensors
        got, want = call(frozen), call(new)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert_close(a, b, torch.float32, kind)
