"""The fused recurrence as a PyTorch operator, its own contract: the fused kernel is what
runs, the ABI compiled into the C++ kernel equals ``kernels/abi.py``, the kernel reads
exactly the shapes the layout gives, fake shapes equal real ones, a dispatch mode sees the
recurrence, and nn.LSTM's surface (``_flat_weights``, ``repr``). The machinery users put an
``nn.LSTM`` through: test_ops_transforms.py; autocast and 16-bit layers: test_ops_low_precision.py."""

from __future__ import annotations

import pytest
import torch

import lstmkit
from lstmkit import cell, kernels, variants
from lstmkit.kernels import abi, cpu_ext, fused, ops
from lstmkit.layout import GATES
from lstmkit.spec import resolve
from ops_variants import FUSED, make


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
