"""The fused recurrence as a PyTorch operator: every fused variant through the machinery
users put an ``nn.LSTM`` through — ``torch.compile(fullgraph=True)``, ``torch.export`` with
dynamic T and B, ``torch.func`` (grad, vmap), autocast and bf16/fp16, and the default
``torch.onnx.export`` of a whole model run by onnxruntime — each equal to eager. Plus the
operator's own contract: fake shapes equal real ones, the ABI compiled into the C++ kernel
equals ``kernels/abi.py``, and nn.LSTM's surface (``_flat_weights``, ``repr``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import lstmkit
from lstmkit import CellSpec, cell, kernels, variants
from lstmkit.kernels import abi, cpu_ext, fused, ops
from lstmkit.kernels.machine import cpu_vendor
from lstmkit.layout import GATES
from lstmkit.spec import resolve

#: The fused kernel's variants, one of each kind of operator input (id -> layer factory arguments).
FUSED = {
    "vanilla": dict(cell="vanilla"),
    "peephole": dict(cell="peephole"),
    "cifg": dict(cell="cifg"),
    "nig": dict(cell="nig"),
    "nfg": dict(cell="nfg"),
    "nog": dict(cell="nog"),
    "niaf": dict(cell="niaf"),
    "noaf": dict(cell="noaf"),
    "fgr": dict(cell="fgr"),
    "layernorm": dict(cell="layernorm"),
    "clip": dict(cell="clip=0.5"),
    "projection": dict(cell="vanilla", proj_size=3),
    "heads": dict(cell="peephole+cifg", heads=2, H=6),
    "slstm": dict(cell="slstm+forget_act=exp", heads=2, H=6),
    "rnn": dict(rnn=True),
}


def make(variant: str, I: int = 4, H: int = 5, **extra) -> torch.nn.Module:
    kw = dict(FUSED[variant])
    H = kw.pop("H", H)  # a size the variant's heads divide
    if kw.pop("rnn", False):
        return lstmkit.RNN(I, H, **extra)
    return lstmkit.LSTM(I, H, **kw, **extra)


class Model(torch.nn.Module):
    """A user's whole model: embedding -> lstmkit stack (two layers unless told) -> linear read-out."""

    def __init__(self, variant: str, bidirectional: bool = False, num_layers: int = 2) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 4)
        self.rnn = make(variant, num_layers=num_layers, bidirectional=bidirectional)
        self.out = torch.nn.Linear(self.rnn.num_directions * self.rnn.output_size, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.emb(tokens))  # (T, B, D·H_out)
        return self.out(y)


def test_the_fused_kernel_is_what_runs():
    for variant in FUSED:
        layer = make(variant)
        assert kernels.select(layer.spec, torch.device("cpu"), torch.float32).name == "cpu_fused", variant


# ---------------------------------------------------------------------------- the operator


def test_compiled_abi_equals_abi_module():
    compiled = cpu_ext.load().abi()
    assert tuple(compiled["flags"]) == abi.FLAGS
    assert tuple(compiled["flag_bits"]) == tuple(abi.flag(n) for n in abi.FLAGS)
    assert tuple(compiled["params"]) == abi.PARAMS
    assert tuple(compiled["buffers"]) == abi.BUFFERS
    assert tuple(compiled["scalars"]) == abi.SCALARS
    assert tuple(compiled["gates"]) == GATES
    # the rows the C++ cell step claims are those the CPU kernel row says it implements
    assert set(compiled["implemented"]) == kernels.REGISTRY["cpu_fused"].implements
    assert tuple(compiled["slstm_kept"]) == abi.SLSTM_KEPT
    assert tuple(compiled["slstm_states"]) == abi.SLSTM_STATES == variants.cell_states(resolve("slstm"))
    assert {n for n, off in zip(abi.PARAMS, compiled["param_no_grad"]) if off} == abi.NO_GRAD
    assert compiled["ln_eps"] == cell.LN_EPS
    assert tuple(compiled["gate_removed"]) == tuple(abi.GATE_REMOVED[g] for g in GATES)
    assert compiled["slopes"] == dict(variants.HARD_SIGMOID_SLOPES)
    assert compiled["phis"] == {name: code for code, name in enumerate(abi.PHIS)}
    summed = dict(abi.ACCUMULATED)
    assert [(h, r) for n, h, r in zip(abi.PARAMS, compiled["acc_h"], compiled["acc_r"]) if n in summed] == \
        [abi.acc_offset(n) for n in abi.PARAMS if n in summed]
    assert all(h == r == -1 for n, h, r in zip(abi.PARAMS, compiled["acc_h"], compiled["acc_r"]) if n not in summed)
    assert tuple(compiled["acc_size"]) == abi.acc_offset("size")


def test_a_flag_the_cell_step_does_not_claim_is_refused():
    """A variant word with a bit the C++ cell step does not compute (here one past every row) is
    refused, where it used to run as the cell without it."""
    layer = make("vanilla")
    p = layer.layer_params(0, 0)
    plist, mlp = fused.operator_params(p, layer.spec, torch.empty(0))
    args = (torch.randn(3, 2, p["weight_hh"].shape[0]), p["weight_hh"].detach(), torch.zeros(2, 5), torch.zeros(2, 5),
            torch.empty(0, dtype=torch.long), *[t.detach() for t in plist])
    with pytest.raises(RuntimeError, match="has flags this kernel does not compute"):
        ops.recurrence_op(*args, 1 << len(abi.FLAGS), mlp, *abi.scalars(layer.spec), 5, 0, False)


def test_a_batch_beyond_an_int_of_rows_is_refused():
    """A step's products take its rows as an int (BLAS's and the micro-kernel's M): a batch of 2^31
    rows is refused by name, forward and backward, before anything is allocated, where the row count
    wrapped to a negative one (expanded tensors: nothing of that size exists here)."""
    layer = make("vanilla")
    p = layer.layer_params(0, 0)
    plist, mlp = fused.operator_params(p, layer.spec, torch.empty(0))
    plist = [t.detach() for t in plist]
    B, R, w_hh = 2**31, p["weight_hh"].shape[0], p["weight_hh"].detach()
    state = torch.zeros(1, 5).expand(B, 5)
    meta = (abi.flags(layer.spec), mlp, *abi.scalars(layer.spec), 5, 0)
    lengths = torch.empty(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="a batch of 2147483648 rows"):
        ops.recurrence_op(torch.zeros(1, 1, R).expand(1, B, R), w_hh, state, state, lengths, *plist, *meta, False)
    y = torch.zeros(1, 1, 5).expand(1, B, 5)
    with pytest.raises(RuntimeError, match="a batch of 2147483648 rows"):
        ops.recurrence_backward_op(y, torch.empty(0), torch.empty(0), y, state, state, w_hh, lengths, *plist,
                                   *[torch.empty(0)] * len(abi.BUFFERS), *meta)


@pytest.mark.parametrize("gate_hidden", [(3,), {"f": (4, 2)}, {"i": (2,), "o": (5, 3, 2)}])
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_mlp_decoder_equals_abi_module(gate_hidden, bias):
    """Where the deep gates' weights, biases and hidden activations sit: C++'s MlpLayout and
    abi.decode_mlp read the same layout list alike."""
    spec = lstmkit.CellSpec(gate_hidden=gate_hidden, gate_hidden_activation="relu")
    layout, H = abi.mlp_layout(spec, bias), 7
    phi, has_bias, atot, wtot, gates = cpu_ext.load()._mlp_layout_test(layout, H)
    py = abi.decode_mlp(layout, H)
    assert (abi.PHIS[phi], has_bias, atot, wtot) == (py.phi, py.bias, py.atot, py.wtot)
    assert [(GATES[g], tuple(w), tuple(wo), tuple(bo), tuple(ao)) for g, w, wo, bo, ao in gates] == \
        [(g.gate, g.widths, g.woff, g.boff, g.aoff) for g in py.gates]
    params = {n: p for n, p in lstmkit.LSTM(3, H, cell=spec, bias=bias).named_parameters()}
    assert py.wtot == sum(params[f"{n}_l0"].numel() for n in abi.mlp_names(spec, bias))


def test_schema_names_every_parameter_and_buffer_in_abi_order():
    fwd = ops.recurrence_op._schema
    names = [a.name for a in fwd.arguments]
    assert names[5:5 + len(abi.PARAMS)] == list(abi.PARAMS)
    assert [r.name for r in fwd.returns][3:] == list(abi.BUFFERS)
    bwd = ops.recurrence_backward_op._schema
    assert [r.name for r in bwd.returns][4:] == [f"d_{n}" for n in abi.PARAMS]


@pytest.mark.parametrize("variant", [*FUSED, "zoneout"])
def test_the_kernel_reads_exactly_the_shapes_the_layout_gives(variant):
    """Python's layout and the C++ kernel agree on every parameter's shape: the operator takes
    the parameters a layer of each variant has (and zoneout's training masks), and refuses each
    of them one row short — forward and backward — naming it, instead of reading past its end."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(4, 5, cell="zoneout=0.2/0.1+peephole") if variant == "zoneout" else make(variant)
    T, B = 6, 3
    p = layer.layer_params(0, 0)
    spec, H = layer.spec, layer.hidden_size
    plist = [p.get(n, torch.empty(0)).detach() for n in abi.PARAMS]
    if spec.layernorm:
        plist[abi.PARAMS.index("bias")] = (p["bias_ih"] + p["bias_hh"]).detach()
    if spec.zoneout != (0.0, 0.0):
        for name in ("keep_c", "keep_h"):
            plist[abi.PARAMS.index(name)] = (torch.rand(T, B, H) < 0.2).float()
    R = p["weight_hh"].shape[0]
    w_hh = p["weight_hh"].detach()
    head = (torch.randn(T, B, R), w_hh, torch.randn(B, layer.output_size),
            torch.rand(B, abi.cell_state_count(abi.flags(spec)) * H) if spec.is_lstm else torch.empty(0),
            torch.tensor([6, 2, 4]))
    meta = (abi.flags(spec), abi.mlp_layout(spec, layer.bias), *abi.scalars(spec), H, layer.proj_size)
    y, _, _, *buffers = ops.recurrence_op(*head, *plist, *meta, True)
    bhead = (torch.randn_like(y), torch.empty(0), torch.empty(0), y, *head[2:4], w_hh, head[4])
    ops.recurrence_backward_op(*bhead, *plist, *buffers, *meta)
    for k in [k for k, t in enumerate(plist) if t.numel()]:
        short = list(plist)
        short[k] = plist[k][:-1]
        with pytest.raises(RuntimeError, match=f"the param {abi.PARAMS[k]} must be"):
            ops.recurrence_op(*head, *short, *meta, True)
        with pytest.raises(RuntimeError, match=f"the param {abi.PARAMS[k]} must be"):
            ops.recurrence_backward_op(*bhead, *short, *buffers, *meta)
    with pytest.raises(RuntimeError, match="w_hh must be"):
        ops.recurrence_op(head[0], w_hh[:-1], *head[2:], *plist, *meta, True)
    # the operator's other tensors (found by a review of the kernels: read out of bounds, or a
    # segfault for the buffers of a call without save)
    B_out = layer.output_size
    with pytest.raises(RuntimeError, match=rf"h0 must be \(B = {B}, H_out = {B_out}\)"):
        ops.recurrence_op(*head[:2], head[2].reshape(1, B * B_out), *head[3:], *plist, *meta, True)
    bad = {0: torch.randn(T, B, 1), 1: torch.randn(1, B_out)}  # dy, dh_n
    for k, t in bad.items():
        with pytest.raises(RuntimeError, match=["dy must be", "dh_n must be"][k]):
            ops.recurrence_backward_op(*bhead[:k], t, *bhead[k + 1:], *plist, *buffers, *meta)
    if spec.is_lstm:  # (the RNN keeps nothing)
        _, _, _, *none_kept = ops.recurrence_op(*head, *plist, *meta, False)
        with pytest.raises(RuntimeError, match=r"buffer \w+ must be \(T, B, \d+\) = what the forward keeps"):
            ops.recurrence_backward_op(*bhead, *plist, *none_kept, *meta)
        xg = head[0].clone().requires_grad_()
        y, *_ = ops.recurrence_op(xg, *head[1:], *plist, *meta, False)
        with pytest.raises(RuntimeError, match="ran with save=False and kept nothing for its backward"):
            y.sum().backward()


#: Variants whose kept buffers follow rules of their own (zoneout's CN, the deep gates' MLP, G kept
#: beside layernorm's statistics), for the fake-shape test below (FUSED's other tests do not need them).
KEPT_RULES = {
    "zoneout": dict(cell="zoneout=0.2/0.1"),
    "deep": dict(cell="deep=3"),
    "layernorm+fgr": dict(cell="layernorm+fgr"),
    "layernorm+deep": dict(cell="layernorm+deep=f:3"),
}


@pytest.mark.parametrize("variant", [*FUSED, *KEPT_RULES])
@pytest.mark.parametrize("save", [False, True])
def test_fake_shapes_equal_real_ones(variant, save):
    """The fake (meta) implementation predicts every output of both operators."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    layer = make(variant) if variant in FUSED else lstmkit.LSTM(4, 5, **KEPT_RULES[variant])
    T, B = 6, 3
    p = layer.layer_params(0, 0)
    spec, H = layer.spec, layer.hidden_size
    plist, _ = fused.operator_params(p, spec, torch.empty(0))  # (the deep gates' layers: flat)
    if spec.layernorm:
        plist[abi.PARAMS.index("bias")] = (p["bias_ih"] + p["bias_hh"]).detach()
    plist = [t.detach() for t in plist]
    R = p["weight_hh"].shape[0]
    args = (torch.randn(T, B, R), p["weight_hh"].detach(), torch.randn(B, layer.output_size),
            torch.rand(B, abi.cell_state_count(abi.flags(spec)) * H) if spec.is_lstm else torch.empty(0),
            torch.tensor([6, 2, 4]), *plist,
            abi.flags(spec), abi.mlp_layout(spec, layer.bias), *abi.scalars(spec), H, layer.proj_size, save)
    real = ops.recurrence_op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = ops.recurrence_op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
    assert [t.dtype for t in fake] == [t.dtype for t in real]
    if not save:
        return
    y, _, _, *buffers = real
    w_hh, h0, c0, lengths = args[1:5]
    meta = (abi.flags(spec), abi.mlp_layout(spec, layer.bias), *abi.scalars(spec), H, layer.proj_size)
    bargs = (torch.randn_like(y), torch.empty(0), torch.empty(0), y, h0, c0, w_hh, lengths, *plist, *buffers, *meta)
    real_b = ops.recurrence_backward_op(*bargs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_b = ops.recurrence_backward_op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                              for a in bargs))
    assert [tuple(t.shape) for t in fake_b] == [tuple(t.shape) for t in real_b]


@pytest.mark.parametrize("kind", ["run", "step", "cell"])
def test_modules_under_fake_tensor_mode_give_nn_lstms_shapes(kind):
    """Inside FakeTensorMode (shape propagation, as torch.compile's and export's tracers run)
    every call raised DataDependentOutputException: the NaN/inf check of the input read a value.
    The check is skipped there, as on the meta device; outputs and gradients have nn.LSTM's
    shapes (found by a sweep of torch's global modes)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    torch.manual_seed(0)
    ours = lstmkit.LSTMCell(4, 6) if kind == "cell" else lstmkit.LSTM(4, 6, num_layers=2)
    theirs = torch.nn.LSTMCell(4, 6) if kind == "cell" else torch.nn.LSTM(4, 6, num_layers=2)
    call = {"run": lambda m, x: m(x), "step": lambda m, x: m.step(x[0]),
            "cell": lambda m, x: m(x[0])}[kind]
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(5, 3, 4)
        for _ in range(2):  # (a second call of a signature may take the prepared step)
            got = torch.utils._pytree.tree_leaves(call(ours, x))
            assert all(isinstance(t, FakeTensor) for t in got)
            if kind == "step":  # nn.LSTM's one-step run without its time axis
                y, hc = theirs(x[:1])
                want = [y[0], *hc]
            else:
                want = torch.utils._pytree.tree_leaves(theirs(x[0] if kind == "cell" else x))
            assert [t.shape for t in got] == [t.shape for t in want]
        got[0].sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in ours.parameters())


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the operators a block dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["run", "run_grad", "step", "cell"])
def test_a_dispatch_mode_sees_the_recurrence(kind):
    """A TorchDispatchMode (an op logger, torch.utils.flop_counter.FlopCounterMode) never saw
    the recurrence: eager calls ran the compiled kernel directly, bypassing the dispatcher, and
    the mode saw only the input projection (nn.LSTM shows its mkldnn_rnn_layer). Under a mode
    the operator is called, on first and repeated calls, forward and backward."""
    torch.manual_seed(0)
    layer = lstmkit.LSTMCell(4, 6) if kind == "cell" else lstmkit.LSTM(4, 6)
    x = torch.randn(5, 3, 4)
    call = {"run": lambda: layer(x), "run_grad": lambda: layer(x), "step": lambda: layer.step(x[0]),
            "cell": lambda: layer(x[0])}[kind]
    grad = kind != "run"
    with torch.set_grad_enabled(grad):
        call()
        call()  # the signature is kept now: the prepared step
        with _OpLog() as log:
            out = call()
            if grad:
                torch.utils._pytree.tree_leaves(out)[0].sum().backward()
    assert "lstmkit.recurrence.default" in log.names, log.names
    if grad:
        assert "lstmkit.recurrence_backward.default" in log.names, log.names


def test_onednn_switched_off_is_not_called():
    """torch.backends.mkldnn.flags(enabled=False) — which users set to step around a oneDNN
    bug — was ignored by the input projection, which called oneDNN's linear from I·4H >= 256·1024
    (nn.LSTM calls no oneDNN op then)."""
    layer = lstmkit.LSTM(1100, 64)
    x = torch.randn(16, 16, 1100)
    assert fused._use_onednn(16 * 16, layer.weight_ih_l0) == (fused._ONEDNN and cpu_ext.full_omp_teams())
    for grad in (False, True):
        with torch.set_grad_enabled(grad), torch.backends.mkldnn.flags(enabled=False):
            assert not fused._use_onednn(16 * 16, layer.weight_ih_l0)
            with _OpLog() as log:
                for _ in range(2):
                    y = layer(x)[0]
                    if grad:
                        y.sum().backward()
        assert not [n for n in log.names if "mkldnn" in n], log.names


def test_double_backward_raises_in_func_grad_too():
    layer = lstmkit.LSTM(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def f(x):
        return layer(x)[0].pow(3).sum()
    torch.func.grad(f)(x)  # first order: fine
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.func.grad(lambda x: torch.func.grad(f)(x).sum())(x)


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


# ---------------------------------------------------------------------------- nn.LSTM's surface


def test_flat_weights_and_repr_as_torch():
    theirs = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    ours = lstmkit.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert [tuple(w.shape) for w in ours._flat_weights] == [tuple(w.shape) for w in theirs._flat_weights]
    assert all(a is b for a, b in zip(ours._flat_weights, ours.parameters()))
    for args, kw in (((4, 6), {}), ((4, 6, 2), dict(batch_first=True, dropout=0.5, bidirectional=True)),
                     ((4, 6), dict(proj_size=2, bias=False))):
        assert repr(lstmkit.LSTM(*args, **kw)) == repr(torch.nn.LSTM(*args, **kw))
    assert repr(torch.nn.RNN(4, 6)) == repr(lstmkit.RNN(4, 6))
    assert repr(lstmkit.LSTM(4, 6, cell="peephole")) == "LSTM(4, 6, cell='peephole')"
    for kw in ({}, {"bias": False}):  # the cell too (it printed LSTMCell())
        assert repr(lstmkit.LSTMCell(4, 6, **kw)) == repr(torch.nn.LSTMCell(4, 6, **kw))
    assert repr(lstmkit.LSTMCell(4, 6, cell="deep=2+deep_act=relu")) == "LSTMCell(4, 6, cell='deep=2+deep_act=relu')"
    assert repr(lstmkit.LSTM(4, 6, cell="vanilla+fb=1")) == "LSTM(4, 6, cell='fb=1')"
    assert resolve("vanilla") == lstmkit.LSTM(4, 6).spec
