"""The fused recurrence as a PyTorch operator, every fused variant through the machinery users
put an ``nn.LSTM`` through — ``torch.compile(fullgraph=True)``, ``torch.export`` with dynamic
T and B (and AOTInductor), ``torch.func`` (grad, vmap, jacrev, forward mode), checkpointing,
parametrized weights, and the default ``torch.onnx.export`` of a whole model run by
onnxruntime — each equal to eager; TorchScript's paths refused with the supported ones."""

from __future__ import annotations

import warnings

import pytest
import torch

import lstmkit
from lstmkit import CellSpec, kernels
from ops_variants import FUSED, Model, make

# ---------------------------------------------------------------------------- transforms


def _grads(run, model, x):
    """Output of ``run(x)`` and the gradients it leaves on ``model``'s parameters."""
    model.zero_grad()
    out = run(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", list(FUSED))
def test_compile_fullgraph_training_and_inference(variant):
    """``fullgraph=True`` fails on any graph break; AOTAutograd traces the operator's
    fake implementation and its registered gradient (``aot_eager``: no code generation). One
    layer per variant (the operator's buffers are the variant's), two for vanilla: the loop over
    layers is the same for every variant."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Model(variant, num_layers=2 if variant == "vanilla" else 1)
    tokens = torch.randint(0, 11, (5, 3))
    eager_out, eager_grads = _grads(model, model, tokens)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, grads = _grads(compiled, model, tokens)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), eager_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["vanilla", "layernorm"])
def test_compile_inductor(variant):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Model(variant, bidirectional=True)
    tokens = torch.randint(0, 11, (5, 3))
    eager_out, eager_grads = _grads(model, model, tokens)
    out, grads = _grads(torch.compile(model, fullgraph=True), model, tokens)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", ["weight_hh transposed", "h0 strided"])
def test_compile_with_strided_weights_or_states(layout):
    """A recurrent weight stored transposed (as loaded from a (H, 4H) checkpoint) or a strided h0:
    the backward operator's fake declared its gradients with their inputs' strides, the kernels
    write them row-major, and the compiled backward failed inductor's stride assertion."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, cell="peephole").double()
    if layout == "weight_hh transposed":
        layer.weight_hh_l0.data = layer.weight_hh_l0.data.t().contiguous().t()
    h0 = torch.randn(1, 4, 2, dtype=torch.float64).transpose(1, 2) if layout == "h0 strided" \
        else torch.randn(1, 2, 4, dtype=torch.float64)
    x = torch.randn(3, 2, 3, dtype=torch.float64)

    def loss(x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return layer(x, (h0, torch.zeros(1, 2, 4, dtype=torch.float64)))[0].square().sum()
    want = torch.autograd.grad(loss(x, h0.requires_grad_()), [h0, layer.weight_hh_l0])
    with torch._inductor.config.patch(force_disable_caches=True):  # (a cached graph keeps its old strides)
        got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, h0), [h0, layer.weight_hh_l0])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", ["LSTM", "LSTM layernorm", "LSTMCell", "RNN"])
def test_the_two_biases_get_gradients_of_their_own(make):
    """b_ih and b_hh enter the cell as one sum; each gets its own gradient tensor, as nn.LSTM's do.
    Compiled, the two ``.grad`` shared memory, so ``clip_grad_norm_`` scaled them twice and
    gradient accumulation added twice; eager, ``autograd.grad`` returned one tensor for both."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    kind, _, cell = make.partition(" ")
    layer = getattr(lstmkit, kind)(3, 4, **({"cell": cell} if cell else {})).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)[0 if kind == "LSTMCell" else slice(None)]
    biases = [p for n, p in layer.named_parameters() if n.startswith("bias_")]
    g_ih, g_hh = torch.autograd.grad(layer(x)[0].square().sum(), biases)
    assert g_ih is not g_hh and g_ih.data_ptr() != g_hh.data_ptr()
    torch.testing.assert_close(g_ih, g_hh, rtol=0, atol=0)
    compiled = torch.compile(layer, fullgraph=True)
    for _ in range(2):  # accumulated: twice the gradient, not four times
        compiled(x)[0].square().sum().backward()
    assert biases[0].grad.data_ptr() != biases[1].grad.data_ptr()
    for b in biases:
        torch.testing.assert_close(b.grad, 2 * g_ih, rtol=1e-12, atol=1e-12)
    torch.nn.utils.clip_grad_norm_(layer.parameters(), max_norm=1e-3)
    torch.testing.assert_close(biases[0].grad, biases[1].grad, rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(FUSED))
def test_export_with_dynamic_T_and_B(variant):
    from torch.export import Dim

    torch.manual_seed(0)
    model = Model(variant, bidirectional=variant in ("peephole", "layernorm")).eval()
    ep = torch.export.export(model, (torch.randint(0, 11, (5, 3)),),
                             dynamic_shapes=({0: Dim("T", min=2), 1: Dim("B", min=2)},))
    assert any("lstmkit.recurrence" in str(n.target) for n in ep.graph.nodes)
    for T, B in ((9, 4), (2, 7)):
        tokens = torch.randint(0, 11, (T, B))
        torch.testing.assert_close(ep.module()(tokens), model(tokens), rtol=1e-5, atol=1e-6)


def test_aot_inductor_package_runs_the_operator(tmp_path):
    """An AOTInductor package of a model holding lstmkit layers compiles, loads and computes what
    the eager model does: a variant without deep gates (its empty ``mlp_layout`` reaches the kernel
    as None from AOTInductor's runner: refused by an ``int[]`` schema before) and one with them,
    two layers, dynamic T."""
    from torch.export import Dim

    torch.manual_seed(0)
    model = lstmkit.LSTM(4, 6, 2)
    deep = lstmkit.LSTM(4, 6, cell=CellSpec(gate_hidden=(3,)))
    for i, layer in enumerate((model, deep)):
        layer.eval()
        x = torch.randn(5, 3, 4)
        ep = torch.export.export(layer, (x,), dynamic_shapes=({0: Dim("T", min=2)},))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / f"m{i}.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        for T in (5, 8):
            x = torch.randn(T, 3, 4)
            with torch.no_grad():
                want = layer(x)
            torch.testing.assert_close(runner(x)[0], want[0], rtol=1e-5, atol=1e-6)


def test_lengths_under_dynamic_compile_compile_once():
    """``lengths=`` does not fix T in a compiled graph (its check's message named T, which
    specialised the graph: a recompile for every new T, eager after eight); an exported program's
    failed check says what L is, not a symbol."""
    from torch.export import Dim

    torch._dynamo.reset()
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    layer = lstmkit.LSTM(3, 4).eval()
    layer(torch.randn(2, 4, 3))  # (the kernel loaded: a first call's kernel choice is a guard of its own)
    compiled = torch.compile(layer, backend=backend, dynamic=True)
    for T in (5, 6, 7, 9, 11, 12):  # (none equal to B or I: torch would give them one symbol)
        x, lengths = torch.randn(T, 4, 3), torch.tensor([T, 2, 1, T])
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, lengths=lengths)[0], layer(x, lengths=lengths)[0])
    assert len(graphs) == 1

    class WithLengths(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.layer(x, lengths=lengths)[0]

    ep = torch.export.export(WithLengths(), (torch.randn(6, 4, 3), torch.tensor([6, 2, 1, 6])),
                             dynamic_shapes=({0: Dim("T", min=2)}, None), strict=True)
    with pytest.raises(RuntimeError, match=r"lengths: each must be in \[1, L\], L the padded input's number"):
        ep.module()(torch.randn(5, 4, 3), torch.tensor([9, 2, 1, 3]))


def test_exported_program_keeps_the_nan_check():
    model = lstmkit.LSTM(3, 4).eval()
    ep = torch.export.export(model, (torch.randn(5, 2, 3),))
    x = torch.randn(5, 2, 3)
    x[1, 1, 1] = float("nan")
    with pytest.raises(RuntimeError, match="contains NaN or inf"):
        ep.module()(x)


@pytest.mark.parametrize("variant", list(FUSED))
def test_func_grad_and_vmap(variant):
    torch.manual_seed(0)
    layer = make(variant, num_layers=2).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(5, 3, 4, dtype=torch.float64)

    def loss(p, x):
        y, _ = torch.func.functional_call(layer, p, (x,))
        return (y * y.detach().sin()).sum()
    grads = torch.func.grad(loss)(params, x)
    layer.zero_grad()
    loss(dict(layer.named_parameters()), x).backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-10, msg=name)

    # vmap over a batch of inputs: folded into the kernel's batch.
    xs = torch.randn(4, 5, 2, 4, dtype=torch.float64)
    batched = torch.func.vmap(lambda x: layer(x)[0])(xs)
    torch.testing.assert_close(batched, torch.stack([layer(x)[0] for x in xs]), rtol=1e-10, atol=1e-10)
    # vmap over stacked weights (an ensemble): a loop of calls.
    stacked = {k: torch.stack([v, v * 0.9, v * 1.1]) for k, v in params.items()}
    ens = torch.func.vmap(lambda p: torch.func.functional_call(layer, p, (x,))[0])(stacked)
    for i in range(3):
        want = torch.func.functional_call(layer, {k: v[i] for k, v in stacked.items()}, (x,))[0]
        torch.testing.assert_close(ens[i], want, rtol=1e-10, atol=1e-10)
    # per-sample gradients: vmap of grad.
    per = torch.func.vmap(torch.func.grad(lambda p, x: loss(p, x.unsqueeze(1))), in_dims=(None, 1))(params, x)
    one = torch.func.grad(lambda p: loss(p, x[:, 1:2]))(params)
    for name in params:
        torch.testing.assert_close(per[name][1], one[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", ["cpu_fused", "reference"])
def test_vmap_over_lengths(backend):
    """``vmap`` over sets of ``lengths=`` for one batch (and over inputs with them, and the
    gradient of each member): as the calls one by one; a length out of range in any member is
    refused by name. The length checks branched on a batched value ("data-dependent control flow"),
    and so did the reference row's loop (on its own, and under a forward-mode transform, which
    runs a fused layer there)."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, num_layers=2, cell="peephole", backend=backend).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    lens = torch.tensor([[5, 3], [2, 5], [1, 4], [5, 5]])
    got = torch.func.vmap(lambda n: layer(x, lengths=n)[0])(lens)
    torch.testing.assert_close(got, torch.stack([layer(x, lengths=n)[0] for n in lens]), rtol=1e-12, atol=1e-12)
    xs = torch.randn(4, 5, 2, 3, dtype=torch.float64)
    got = torch.func.vmap(lambda x, n: layer(x, lengths=n)[0])(xs, lens)
    torch.testing.assert_close(got, torch.stack([layer(a, lengths=n)[0] for a, n in zip(xs, lens)]),
                               rtol=1e-12, atol=1e-12)
    grads = torch.func.vmap(torch.func.grad(lambda x, n: layer(x, lengths=n)[0].square().sum()))(xs, lens)
    for a, n, g in zip(xs, lens, grads):
        a = a.clone().requires_grad_()
        layer(a, lengths=n)[0].square().sum().backward()
        torch.testing.assert_close(g, a.grad, rtol=1e-10, atol=1e-12)
    jac = torch.func.vmap(lambda a, n: torch.func.jacfwd(lambda z: layer(z, lengths=n)[0])(a))(xs[:2], lens[:2])
    for a, n, j in zip(xs[:2], lens[:2], jac):
        torch.testing.assert_close(j, torch.autograd.functional.jacobian(lambda z, n=n: layer(z, lengths=n)[0], a),
                                   rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"lengths: each must be in \[1, L = 5\], got min 0, max 6"):
        torch.func.vmap(lambda n: layer(x, lengths=n)[0])(torch.tensor([[5, 3], [0, 6]]))


@pytest.mark.parametrize("variant", list(FUSED))
def test_func_jacrev(variant):
    """``torch.func.jacrev`` (vmap over a vjp) equals the reference row's Jacobian; it raised
    "accessing `data` under vmap" before (torch's error node under vmap); a Jacobian of a
    Jacobian is refused as every second-order gradient is."""
    torch.manual_seed(0)
    layer = make(variant).double()
    ref = make(variant, backend="reference").double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    want = torch.autograd.functional.jacobian(lambda x: ref(x)[0], x)
    torch.testing.assert_close(torch.func.jacrev(lambda x: layer(x)[0])(x), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.func.jacrev(torch.func.jacrev(lambda x: layer(x)[0].sum()))(x)


@pytest.mark.parametrize("variant", ["vanilla", "peephole", "slstm"])
@pytest.mark.parametrize("trainable", [False, True])
def test_forward_mode_derivatives_run_the_reference_row(variant, trainable):
    """Forward-mode AD (a ``forward_ad`` dual level; ``torch.func.jvp`` / ``jacfwd``) runs on the
    reference row, which carries tangents (the fused kernel dropped them in silence where nothing
    required grad: a tangent of None), also after prepared calls and with ``backend`` forced to
    the fused kernel; the layer, a step and a cell, against the reference's tangents and the
    Jacobian by reverse mode."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    cell = FUSED[variant].get("cell", "vanilla")
    layer = lstmkit.LSTM(4, 6, num_layers=2, cell=cell, backend="cpu_fused").double().requires_grad_(trainable)
    ref = lstmkit.LSTM(4, 6, num_layers=2, cell=cell, backend="reference").double()
    ref.load_state_dict(layer.state_dict())
    step = lstmkit.LSTMCell(4, 6, cell=cell).double().requires_grad_(trainable)
    x, v = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    for _ in range(2):  # the second call of each runs on kept steps where it can
        layer(x), layer.step(x[0]), step(x[0])
    want = torch.autograd.functional.jvp(lambda x: ref(x)[0], x, v)[1]
    with fwAD.dual_level():
        for _ in range(2):
            tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, v))[0]).tangent
            assert tangent is not None
            torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-12)
            step_tangent = fwAD.unpack_dual(layer.step(fwAD.make_dual(x[0], v[0]))[0]).tangent
            torch.testing.assert_close(step_tangent, want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jvp(lambda x: layer(x)[0], (x,), (v,))[1], want, rtol=1e-10, atol=1e-12)
    jac = torch.func.jacfwd(lambda x: step(x)[0])(x[0])
    torch.testing.assert_close(jac, torch.func.jacrev(lambda x: step(x)[0])(x[0]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("warm", [False, True])
def test_legacy_batched_gradients_are_refused_with_the_way_out(warm):
    """``autograd.functional.jacobian(vectorize=True)`` hands the backward legacy batched
    gradients, which neither the operator nor the compiled step node can read: one clear error
    naming what works (it was "Cannot access data pointer" from inside the kernel)."""
    layer = lstmkit.LSTM(4, 5).double()
    cell = lstmkit.LSTMCell(4, 5).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    if warm:  # the prepared step's node (C++) rather than the operator's autograd
        layer(x), layer(x), cell(x[0]), cell(x[0])
    for f, arg in ((lambda x: layer(x)[0], x), (lambda x: cell(x)[0], x[0])):
        with pytest.raises(RuntimeError, match="takes no batched gradients.*torch.func.jacrev"):
            torch.autograd.functional.jacobian(f, arg, vectorize=True)
        torch.autograd.functional.jacobian(f, arg)  # vectorize=False: fine


@pytest.mark.parametrize("what", ["cell", "step"])
def test_compile_fullgraph_of_a_cell_and_a_step(what):
    """A cell's forward and ``layer.step`` trace the general path under compile (the prepared
    step, a compiled extension's object, is eager's), so ``fullgraph=True`` holds, even where
    eager calls have kept a signature already."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = lstmkit.LSTMCell(4, 5, cell="peephole") if what == "cell" else lstmkit.LSTM(4, 5, num_layers=2)
    call = module if what == "cell" else module.step
    x = torch.randn(3, 4)
    eager = call(x)
    eager = call(x)  # the second call takes the prepared step
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    flat = (lambda o: o) if what == "cell" else (lambda o: (o[0], *o[1]))
    for a, b in zip(flat(out), flat(eager)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", ["vanilla", "layernorm", "deep"])
@pytest.mark.parametrize("warm", [False, True])
def test_non_reentrant_checkpointing(variant, warm):
    """``torch.utils.checkpoint(use_reentrant=False)`` requires the recomputation to save what
    the forward saved: a fresh layer's first call (the general path) and its recomputation (which
    found the signature kept) did not. Both take the general path under saved-tensor hooks; the
    gradients equal an unchecked run's, also with other signatures called in between."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    cell = CellSpec(gate_hidden=(3,)) if variant == "deep" else variant
    layer = lstmkit.LSTM(5, 8, cell=cell)
    x = torch.randn(4, 3, 5)
    if warm:
        layer(x)
    xr = x.clone().requires_grad_()
    layer(xr)[0].sum().backward()
    want = [xr.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
    layer.zero_grad()
    xc = x.clone().requires_grad_()
    y = checkpoint(lambda z: layer(z)[0], xc, use_reentrant=False)
    for T in range(2, 12):  # other signatures: a warm layer's kept ones are replaced
        layer(torch.randn(T, 3, 5))
    y.sum().backward()
    for a, b in zip([xc.grad, *(p.grad for p in layer.parameters())], want):
        torch.testing.assert_close(a, b)


def test_parametrized_weights():
    """``weight_norm`` (any parametrization) on a layer's and a cell's weight: the layer reads
    the computed weight, as nn.LSTM does, values and gradients (it raised a KeyError before)."""
    torch.manual_seed(0)
    ref, layer = torch.nn.LSTM(5, 8), lstmkit.LSTM(5, 8)
    layer.load_state_dict(ref.state_dict())
    for m in (ref, layer):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    x = torch.randn(4, 3, 5)
    for _ in range(2):  # a second call: no prepared step keeps a parametrized weight
        torch.testing.assert_close(layer(x)[0], ref(x)[0])
    layer(x)[0].sum().backward()
    ref(x)[0].sum().backward()
    g = "parametrizations.weight_hh_l0.original0"
    torch.testing.assert_close(dict(layer.named_parameters())[g].grad, dict(ref.named_parameters())[g].grad)
    cell = lstmkit.LSTMCell(5, 8)
    torch.nn.utils.parametrizations.spectral_norm(cell, "weight_hh")
    h = torch.randn(3, 8)
    cell(x[0], (h, h))  # training: a power iteration; evaluation reads the weight it gives
    cell.eval()
    want = torch.nn.LSTMCell(5, 8)
    with torch.no_grad():
        want.weight_ih.copy_(cell.weight_ih), want.weight_hh.copy_(cell.weight_hh)
        want.bias_ih.copy_(cell.bias_ih), want.bias_hh.copy_(cell.bias_hh)
        torch.testing.assert_close(cell(x[0], (h, h))[0], want(x[0], (h, h))[0])


# ---------------------------------------------------------------------------- ONNX


def test_exporting_is_marked_constant_as_torch_marks_it_without_importing_dynamo():
    """``exporting()`` must read as a constant under the exporter's dynamo capture; lstmkit marks
    it as ``torch.compiler.assume_constant_result`` does, without importing ``torch._dynamo`` at
    ``import lstmkit`` (most of its import time): the two markings agree, and a fresh interpreter
    imports lstmkit without dynamo."""
    import subprocess
    import sys

    from lstmkit.kernels import onnx_export

    def probe() -> bool:
        return False
    assert vars(torch.compiler.assume_constant_result(probe)) == vars(onnx_export.exporting) != {}
    code = ("import sys, lstmkit; assert 'torch._dynamo' not in sys.modules, 'import lstmkit loaded torch._dynamo'; "
            "assert callable(lstmkit.convert.to_onnx), 'import lstmkit gave no lstmkit.convert'")  # as the README writes it
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


#: The variants exported as whole models: every one the ONNX operator carries (each sets its own
#: attributes), and the Scan variants whose layer differs in what the Scan carries or reads (fgr's
#: third state, layer norm's parameters, a projection, heads, the sLSTM's three cell states, the
#: clip). The Scan's body is the trace of ``masked_step`` for every variant alike, and
#: tests/test_onnx_export.py runs every variant's trace of it in onnxruntime; nfg, nog, niaf and
#: noaf differ from nig only inside that body.
WHOLE_MODEL = [v for v in FUSED if v not in ("nfg", "nog", "niaf", "noaf")]


@pytest.mark.parametrize("variant", WHOLE_MODEL)
def test_default_onnx_export_of_a_whole_model(variant):
    """``torch.onnx.export(model, (x,))`` (dynamo) of embedding -> lstmkit stack -> Linear:
    the ONNX LSTM/RNN operator where the variant fits it, else a Scan; onnxruntime matches
    to 1e-5 at other T and B than the example's."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    torch.manual_seed(0)
    bidirectional = variant in ("peephole", "fgr")
    probe = make(variant)
    fits = kernels.onnx_export.operator_refusal(probe.spec, probe.proj_size) is None
    # Each Scan (a layer and direction) costs the exporter seconds (fgr's: 4-5 s each): two layers
    # where the variant is an operator node, one otherwise (fgr: both directions, the reverse Scan's
    # state a view at an offset symbolic in B; stacked Scans:
    # test_onnx_export_captures_scan_stacks_without_falling_back_to_strict)
    model = Model(variant, bidirectional=bidirectional, num_layers=2 if fits else 1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (torch.randint(0, 11, (5, 3)),),
                                    dynamic_shapes=({0: Dim("T", min=2), 1: Dim("B", min=2)},))
    proto = program.model_proto
    kinds = {n.op_type for n in proto.graph.node}
    assert ({"LSTM", "RNN"} & kinds if fits else "Scan" in kinds), kinds
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for T, B in ((9, 4), (3, 1)):
        tokens = torch.randint(0, 11, (T, B))
        got = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(tokens).detach(), rtol=1e-5, atol=1e-5)


def test_onnx_export_captures_scan_stacks_without_falling_back_to_strict(monkeypatch):
    """torch.onnx.export first captures the model with torch.export's non-strict mode and, when
    that fails, again in strict mode (about twice the time). A stacked or bidirectional layer's
    initial state is a view into the (L·D, B, H) state at an offset symbolic in B, which the
    non-strict capture could not hand to scan's body: every such Scan export took the slow road.
    Here the capture the exporter tries first, with its exporting flag set, must succeed."""
    from torch.export import Dim
    from torch.onnx._internal.exporter import _flags

    class Model2(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(11, 4)
            self.rnn = lstmkit.LSTM(4, 5, num_layers=2, bidirectional=True, cell="layernorm")

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.rnn(self.emb(tokens))[0]  # (T, B, 2·5)

    monkeypatch.setattr(_flags, "_is_onnx_exporting", True)  # what torch.onnx.export sets
    assert kernels.onnx_export.exporting()
    program = torch.export.export(Model2().eval(), (torch.randint(0, 11, (5, 3)),), strict=False,
                                  dynamic_shapes=({0: Dim("T", min=2), 1: Dim("B", min=2)},))
    scans = [n for n in program.graph.nodes if n.op == "call_function" and "scan" in str(n.target)]
    assert len(scans) == 4, [str(n.target) for n in program.graph.nodes]


@pytest.mark.parametrize("module, x", [(lstmkit.LSTM(3, 4), torch.randn(5, 2, 3)),
                                       (lstmkit.LSTMCell(3, 4), torch.randn(2, 3))], ids=["LSTM", "LSTMCell"])
def test_torchscript_paths_refuse_with_the_supported_ones(module, x):
    """Also a cell whose call signature is prepared (TorchScript's trace would record neither
    road: the compiled step is called around the dispatcher)."""
    with torch.no_grad():
        module(x)
        module(x)
    for attempt in (lambda: torch.jit.trace(module, (x,)), lambda: torch.jit.script(module),
                    lambda: torch.onnx.export(module, (x,), dynamo=False)):
        with pytest.raises(RuntimeError, match=r"not supported.*torch\.export\.export.*torch\.onnx\.export"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                attempt()
