"""What users do to a module after it has run — convert it, load into it, wrap a weight in a
hook-based norm, give a parameter another dtype, force another kernel — against a fresh module
or ``torch.nn.LSTM``: a module that ran keeps prepared steps (``PreparedStep``), which must
neither hold what torch swaps nor run on what the user changed."""

from __future__ import annotations

import warnings

import pytest
import torch

import lstmkit

I, H = 5, 6


def _warm(m: torch.nn.Module, x: torch.Tensor) -> None:
    """Calls that keep prepared steps: with and without gradients, a run and a step."""
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for _ in range(2):
                if isinstance(m, lstmkit.LSTMCell):
                    m(x[0])
                else:
                    m(x)
                    m.step(x[0])


@pytest.fixture
def swap_on_conversion():
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
@pytest.mark.usefixtures("swap_on_conversion")
def test_a_module_that_ran_converts_and_loads_with_swapped_parameters(kind):
    """Under ``set_swap_module_params_on_conversion(True)`` torch swaps each parameter's tensor,
    which fails while anything else holds it (the kept steps did: ``.double()`` and
    ``load_state_dict`` raised on a module that had run)."""
    torch.manual_seed(0)
    make = getattr(lstmkit, kind)
    m = make(I, H, cell="peephole")
    x = torch.randn(4, 3, I)
    _warm(m, x)
    state = {k: v.clone() * 0.5 for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    fresh = make(I, H, cell="peephole")
    fresh.load_state_dict(state)
    inp = x if kind == "LSTM" else x[0]
    torch.testing.assert_close(m(inp)[0], fresh(inp)[0], rtol=0, atol=0)
    m.double()
    fresh.double()
    _warm(m, x.double())
    torch.testing.assert_close(m(inp.double())[0], fresh(inp.double())[0], rtol=0, atol=0)
    assert all(p.dtype == torch.float64 for p in m.parameters())


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_hook_based_weight_norms_as_nn_lstm(norm):
    """``torch.nn.utils.weight_norm`` / ``spectral_norm`` (the forms that set a computed weight
    from a forward pre-hook) on a layer and on a cell: as on ``nn.LSTM`` / ``nn.LSTMCell``, call
    after call while an optimizer changes the norm's parameters (a kept step must not run on the
    weight of its first call), values and gradients. They were refused as 'missing'."""
    wrap = getattr(torch.nn.utils, norm)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    for ours, theirs, inp in ((lstmkit.LSTM(I, H, dtype=torch.float64), torch.nn.LSTM(I, H, dtype=torch.float64), x),
                              (lstmkit.LSTMCell(I, H, dtype=torch.float64),
                               torch.nn.LSTMCell(I, H, dtype=torch.float64), x[0])):
        theirs.load_state_dict(ours.state_dict())
        name = "weight_hh_l0" if isinstance(ours, lstmkit.LSTM) else "weight_hh"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm's deprecation
            for m in (ours, theirs):
                torch.manual_seed(1)  # spectral_norm's starting vector
                wrap(m, name)
        opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ours, theirs)]
        for _ in range(3):
            outs = []
            for m, opt in zip((ours, theirs), opts):
                opt.zero_grad()
                y = m(inp)[0]
                y.square().sum().backward()
                outs.append((y.detach(), [p.grad.clone() for p in m.parameters()]))
                opt.step()
            torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-12)
            for a, b in zip(outs[0][1], outs[1][1]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("name", ["weight_hh", "bias_ih", "peephole_i", "weight_ih"])
def test_a_parameter_given_another_dtype_through_data_is_refused_after_calls_too(layers, name):
    """A fresh module refuses a parameter of another dtype (TypeError naming it); after calls it
    ran it in silence or failed inside torch ('self and mat2 must have the same dtype'), as the
    kept steps compare the module's tensors by identity, which ``.data =`` keeps."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(I, H, num_layers=layers, cell="peephole", dtype=torch.float64)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    _warm(m, x)
    p = getattr(m, f"{name}_l{layers - 1}")
    p.data = p.data.float()
    named = r"parameter \w+: torch.float(32|64).*convert the module as a whole"  # it, or the first against it
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            with pytest.raises(TypeError, match=named):
                m(x)
            with pytest.raises(TypeError, match=named):
                m.step(x[0])


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("name", ["weight_hh", "bias_ih", "peephole_i", "weight_ih", "mlp_f_weight1"])
def test_a_parameter_given_another_shape_through_data_is_refused_after_calls_too(layers, name):
    """As the dtype above: a fresh module refuses a parameter of another shape (ValueError naming
    it and both shapes); after calls the kernel failed with an internal RuntimeError."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(I, H, num_layers=layers, cell="peephole+deep=f:2", dtype=torch.float64)
    cell = lstmkit.LSTMCell(I, H, cell="peephole+deep=f:2", dtype=torch.float64)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    _warm(m, x)
    _warm(cell, x[0])
    for p in (getattr(m, f"{name}_l{layers - 1}"), getattr(cell, name)):
        p.data = p.data[..., :1].clone()
    named = r"parameter \w+: this layer's cell reads shape \(\d+(, \d+)?,?\), got \(\d+(, 1)?,?\)"
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for call in (lambda: m(x), lambda: m.step(x[0]), lambda: cell(x[0])):
                with pytest.raises(ValueError, match=named):
                    call()


@pytest.mark.parametrize("cell", ["vanilla", "peephole+deep=f:2"])
def test_first_calls_under_inference_mode_then_training(cell):
    """A validation pass under torch.inference_mode() before training: the steps kept by its calls
    held placeholders made in inference mode, which a training call then saved for backward
    ("Inference tensors cannot be saved for backward"). Gradients against the reference row."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    for make in (lambda **kw: lstmkit.LSTMCell(I, H, cell=cell, dtype=torch.float64, **kw),
                 lambda **kw: lstmkit.LSTM(I, H, num_layers=2, cell=cell, dtype=torch.float64, **kw)):
        m, ref = make(), make(backend="reference")
        ref.load_state_dict(m.state_dict())
        calls = [lambda mod: mod(x[0])] if isinstance(m, lstmkit.LSTMCell) else \
            [lambda mod: mod.step(x[0]), lambda mod: mod(x)]
        for call in calls:
            with torch.inference_mode():
                for _ in range(2):
                    call(m)
            for mod in (m, ref):
                mod.zero_grad()
                out = call(mod)
                (out[0].square().sum() + out[1][0].sum()).backward()
            for a, b in zip(m.parameters(), ref.parameters()):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_setting_backend_after_calls_takes_effect():
    """``layer.backend = "reference"`` after calls on the fused kernel: the next calls run the
    reference (twice differentiable, which the fused kernel refuses), not a kept fused step; a
    name no kernel has is refused where it is set."""
    torch.manual_seed(0)
    for m in (lstmkit.LSTM(I, H, dtype=torch.float64), lstmkit.LSTMCell(I, H, dtype=torch.float64)):
        x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=True)
        inp = x if isinstance(m, lstmkit.LSTM) else x[0]
        _warm(m, x.detach())
        with pytest.raises(RuntimeError, match="not differentiable"):
            g, = torch.autograd.grad(m(inp)[0].sum(), x, create_graph=True)
            g.sum().backward()
        m.backend = "reference"
        g, = torch.autograd.grad(m(inp)[0].square().sum(), x, create_graph=True)
        g.sum().backward()  # second order through the reference loop
        with pytest.raises(ValueError, match="backend"):
            m.backend = "no-such-kernel"


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell", "step"])
def test_backend_set_during_a_call_is_not_undone_by_it(kind, monkeypatch):
    """Another thread sets ``backend`` while a call is running the fused kernel: the call ended by
    keeping its prepared step, which later calls took whatever the backend now said. The setting
    clears the kept steps, and a call that began before it keeps nothing (the module's generation
    of kept steps is in the call's signature). Here the fused kernel's run sets it."""
    from lstmkit.kernels.fused import FusedCPUKernel

    real_run = FusedCPUKernel.run
    m = lstmkit.LSTMCell(I, H) if kind == "LSTMCell" else lstmkit.LSTM(I, H)
    x = torch.randn(3, 2, I)
    call = {"LSTM": lambda: m(x), "step": lambda: m.step(x[0]), "LSTMCell": lambda: m(x[0])}[kind]
    switched = []

    def run_then_switch(self, *args, **kwargs):
        out = real_run(self, *args, **kwargs)
        if not switched:
            m.backend = "reference"  # as another thread would, mid-call
            switched.append(True)
        return out

    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(FusedCPUKernel, "run", run_then_switch)
        call()
    assert switched and m.backend == "reference"
    assert not m._prepared._kept
    ran = []
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(FusedCPUKernel, "run", lambda *a, **k: ran.append("fused") or real_run(*a, **k))
        for _ in range(3):
            call()
    assert not ran and not m._prepared._kept  # the reference row, every call


def test_kept_steps_hold_no_tensors_of_a_functional_call():
    """Steps are kept per call signature for the parameters a call ran with: under
    torch.func.functional_call (fast weights, a new batch size per task) they held each call's
    tensors and autograd graph, 8 of 8 (nn.LSTM: 1). Only the current parameters' are kept now,
    and a parameter replaced on the module is let go at the next call."""
    import gc
    import weakref

    from torch.func import functional_call

    for module, shape in ((lstmkit.LSTM(4, 5), (3, 0, 4)), (lstmkit.LSTMCell(4, 5), (0, 4))):
        refs = []
        for i in range(6):
            big = torch.randn(64, 64, requires_grad=True)
            fast = {k: v.detach() - 0.01 * big.mean() for k, v in module.named_parameters()}
            size = tuple(1 + i if n == 0 else n for n in shape)
            out = functional_call(module, fast, (torch.randn(size),))
            (out[0] if isinstance(out, tuple) else out).sum().backward()
            refs.append(weakref.ref(big))
            del fast, big, out
        gc.collect()
        assert sum(r() is not None for r in refs) <= 1, type(module).__name__
        module(torch.randn(tuple(2 if n == 0 else n for n in shape)))  # the module's own parameters again
        gc.collect()
        assert sum(r() is not None for r in refs) == 0, type(module).__name__

    layer = lstmkit.LSTM(4, 5)
    for _ in range(2):
        layer(torch.randn(3, 2, 4))
    old = weakref.ref(layer.weight_hh_l0)
    layer.weight_hh_l0 = torch.nn.Parameter(torch.randn(20, 5))
    layer(torch.randn(3, 2, 4))
    gc.collect()
    assert old() is None


def test_pruning_after_calls_is_applied():
    """torch.nn.utils.prune re-registers the parameter as NAME_orig and computes NAME in a
    forward pre-hook: where NAME was the module's last parameter the kept steps' parameter
    tuple stayed the same objects, so the step kept before pruning ran on the unpruned weight
    (0.02-0.27 off nn.LSTM, the pruned entries still trained; found by a sweep of torch's
    module utilities). Kept steps compare the parameters' names too."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    x = torch.randn(4, 2, 5)
    for make_ref, make, name, call in (
            (lambda: torch.nn.LSTM(5, 7, bias=False), lambda: lstmkit.LSTM(5, 7, bias=False), "weight_hh_l0",
             lambda m: m(x)[0]),
            (lambda: torch.nn.LSTM(5, 7), lambda: lstmkit.LSTM(5, 7), "bias_hh_l0", lambda m: m(x)[0]),
            (lambda: torch.nn.LSTMCell(5, 7, bias=False), lambda: lstmkit.LSTMCell(5, 7, bias=False), "weight_hh",
             lambda m: m(x[0])[0])):
        ref, layer = make_ref(), make()
        layer.load_state_dict(ref.state_dict())
        for _ in range(2):
            call(layer)  # a kept step
        for m in (ref, layer):
            prune.l1_unstructured(m, name, amount=0.5)
        torch.testing.assert_close(call(layer), call(ref), rtol=1e-5, atol=1e-6)
        call(layer).sum().backward()
        orig, mask = getattr(layer, f"{name}_orig"), getattr(layer, f"{name}_mask")
        assert (orig.grad[mask == 0] == 0).all(), name


def test_a_step_runs_the_forward_hooks():
    """layer.step runs the module's forward hooks as a call does: a pruned weight (computed in a
    pre-hook) is the current one after an optimizer step, and two steps backpropagate (before: the
    step read the weight of the last forward, and a backward through two steps failed with
    torch's 'backward through the graph a second time')."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    layer = lstmkit.LSTM(5, 7)
    prune.l1_unstructured(layer, "weight_hh_l0", amount=0.5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(3, 2, 5)
    layer(x)[0].sum().backward()
    opt.step()
    opt.zero_grad()
    h, ys = None, []
    for t in range(3):  # the first calls after the optimizer step
        y, h = layer.step(x[t], h)
        ys.append(y)
    torch.stack(ys).sum().backward()
    assert (layer.weight_hh_l0_orig.grad[layer.weight_hh_l0_mask == 0] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(ys), layer(x)[0], rtol=1e-5, atol=1e-6)
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(("pre", tuple(args[0].shape))))
    layer.register_forward_hook(lambda m, args, out: seen.append(("post", tuple(out[0].shape))))
    layer.step(x[0])
    rnn = lstmkit.RNN(5, 7)
    rnn.register_forward_hook(lambda m, args, out: seen.append(("rnn", tuple(out[0].shape))))
    rnn.step(x[0])
    assert seen == [("pre", (2, 5)), ("post", (2, 7)), ("rnn", (2, 7))]
