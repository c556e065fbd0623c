"""lstmkit.trace() and lstmkit.gradient_flow: the numbers.

* trace: the fused kernel's record mode equals the reference kernel's, for every variant
  the fused kernel runs, and both equal the float64 NumPy oracle's per-step activations
  (tests/numpy_lstm.py), the reverse direction in natural time order, padded steps NaN;
* gradient_flow: ∂L/∂h_t and ∂L/∂c_t equal autograd on a hand-written loop with
  perturbation variables added to the state (L(c_t + δ), derivative at δ = 0), the NumPy
  oracle's hand-written BPTT, and a split of the sequence at t for every variant.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
import numpy_lstm as oracle
from lstmkit import kernels
from lstmkit.kernels.base import hidden_keys
from lstmkit.tracing import GradientFlow, Trace, gradient_flow, trace
from test_oracle import oracle_variant
from variants import LSTM_VARIANTS, RNN_VARIANTS

T, B, I, H = 6, 3, 3, 4
LENGTHS = [6, 2, 4]
ALL = {**LSTM_VARIANTS, **{k: ("rnn", v) for k, v in RNN_VARIANTS.items()}}
TOL = dict(rtol=1e-10, atol=1e-10)


def build(cell, **kw) -> torch.nn.Module:
    """A float64 layer with weights moved away from torch's tiny init (every path matters)."""
    torch.manual_seed(0)
    if isinstance(cell, tuple):
        layer = lstmkit.RNN(I, H, nonlinearity=cell[1], **kw)
    else:
        layer = lstmkit.LSTM(I, H, cell=cell, **kw)
    layer = layer.double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("ln_"):
                p.uniform_(-0.6, 0.6)
    return layer


def fused_supports(layer) -> bool:
    return kernels.REGISTRY["cpu_fused"].unsupported(layer.spec, torch.device("cpu"), torch.float64) is None


def x_data(seed: int = 1, t: int = T, b: int = B) -> torch.Tensor:
    return torch.randn(t, b, I, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- trace


@pytest.mark.parametrize("cell", list(ALL.values()), ids=list(ALL))
def test_trace_fused_equals_reference(cell):
    ref = build(cell, num_layers=2, bidirectional=True, backend="reference")
    x = x_data()
    a = trace(ref, x, lengths=LENGTHS)
    assert a.kernel == "reference"
    if not fused_supports(ref):  # a row the fused kernel does not claim: reference only, and it still works
        with pytest.raises(ValueError, match="cannot run this layer: .*'reference' kernel"):
            build(cell, backend="cpu_fused")(x)
        assert all(torch.isfinite(a[0][0][k][:, 0]).all() for k in a[0][0])
        return
    fast = build(cell, num_layers=2, bidirectional=True, backend="cpu_fused")
    fast.load_state_dict(ref.state_dict())
    b = trace(fast, x, lengths=LENGTHS)
    assert b.kernel == "cpu_fused"
    for layer in range(2):
        for d in range(2):
            ta, tb = a[layer][d], b[layer][d]
            assert list(ta) == list(tb) and ta.absent == tb.absent
            for k in ta:
                torch.testing.assert_close(tb[k], ta[k], equal_nan=True, msg=k, **TOL)
    torch.testing.assert_close(b.output, a.output, **TOL)


@pytest.mark.parametrize("cell", list(ALL.values()), ids=list(ALL))
def test_trace_equals_numpy_oracle(cell):
    """Every recorded activation equals the float64 oracle's, for both directions of both
    layers (the reverse direction put back in natural time order); padding is NaN."""
    layer = build(cell, num_layers=2, bidirectional=True)  # the fastest kernel that runs it
    x = x_data()
    tr = trace(layer, x, lengths=LENGTHS)
    variant = oracle_variant(layer)
    params = oracle.unflatten_params({k: v.detach().numpy() for k, v in layer.state_dict().items()}, 2, True)
    lens = np.array(LENGTHS)
    y, _, _, cache = oracle.forward(x.numpy(), params, None, None, variant, lengths=lens, bidirectional=True)
    rev = oracle._reverse_index(lens, T, B)
    valid = torch.tensor(np.arange(T)[:, None] < lens[None, :])
    assert torch.equal(tr.valid, valid)
    lstm = layer.spec.is_lstm
    for l in range(2):
        for d in range(2):
            steps = cache["caches"][l][d]["steps"]  # in the order the direction ran
            want = {}
            for key in ("i", "f", "g", "o", "c", "h"):
                if not lstm:
                    if key in ("g", "h"):
                        want[key] = np.stack([s["h"] for s in steps])
                    continue
                if key in ("c", "h"):  # the states the step hands on (after projection and zoneout)
                    want[key] = np.stack([s[f"{key}_state"] for s in steps])
                else:
                    want[key] = np.stack([s[key] for s in steps])
            for g, widths in layer.spec.gate_hidden:  # deep gates: their MLPs' hidden activations
                for j in range(1, len(widths) + 1):
                    want[f"{g}.{j}"] = np.stack([s["mlp"][g][j - 1] for s in steps])
            got = tr[l][d]
            gates = set(layer.spec.computed_gates) | ({"f"} if layer.spec.coupled else set())
            expected_keys = (gates | {"c", "h"} | set(hidden_keys(layer.spec))) if lstm else {"g", "h"}
            assert set(got) == expected_keys, (set(got), expected_keys)
            for key in ("i", "f", "o"):
                if lstm and key not in got:  # absent, not ones; the oracle's ones agree
                    assert "absent" in got.absent[key]
                    np.testing.assert_array_equal(want[key], 1.0)
                    with pytest.raises(KeyError, match="absent"):
                        got[key]
            for key, v in got.items():
                w = torch.tensor(want[key])
                if d == 1:
                    w = torch.tensor(oracle._permute_time(want[key], rev))
                m = valid.unsqueeze(-1).expand_as(v)
                torch.testing.assert_close(v[m], w[m], msg=f"layer {l} dir {d} {key}", **TOL)
                assert torch.isnan(v[~m]).all(), f"{key}: padded steps must be NaN"


def test_trace_conventions():
    layer = build("cifg", num_layers=2, bidirectional=True)
    x = x_data()
    full = trace(layer, x)
    assert isinstance(full, Trace) and full.valid.all() and full.num_steps == T
    assert full.gates == ("i", "f", "g", "o") and full.names["f"] == "forget"
    assert full[0][1]["f"].shape == (T, B, H)
    torch.testing.assert_close(full[0][0]["f"], 1 - full[0][0]["i"])  # cifg: computed, not absent
    assert not any(v.requires_grad for v in full[0][0].values())  # no_grad
    # batch_first gives the same, time-major trace
    bf = build("cifg", num_layers=2, bidirectional=True, batch_first=True)
    tb = trace(bf, x.transpose(0, 1))
    for k in full[1][1]:
        torch.testing.assert_close(tb[1][1][k], full[1][1][k], **TOL)
    torch.testing.assert_close(tb.output, full.output, **TOL)
    # unbatched: (T, H), equal to the batch entry
    tu = trace(layer, x[:, 1])
    assert not tu.batched and tu[0][1]["c"].shape == (T, H) and tu.valid.shape == (T,)
    torch.testing.assert_close(tu[0][1]["c"], full[0][1]["c"][:, 1], **TOL)
    # a PackedSequence is the same as lengths=
    tl = trace(layer, x, lengths=LENGTHS)
    tp = trace(layer, pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False))
    for k in tl[1][1]:
        torch.testing.assert_close(tp[1][1][k], tl[1][1][k], equal_nan=True, **TOL)
    # every sequence shorter than T: the trace still spans T steps, NaN past each length (it
    # raised: the records of the packed run end at the longest sequence)
    short = trace(layer, x, lengths=[4, 2, 3])
    assert short[1][1]["c"].shape == (T, B, H) and short.output.shape == tl.output.shape
    for k in short[1][1]:
        assert short[1][1][k][4:].isnan().all()
        torch.testing.assert_close(short[1][1][k][:4], trace(layer, x[:4], lengths=[4, 2, 3])[1][1][k],
                                   equal_nan=True, **TOL)
    # each sequence alone equals its row of the padded batch
    alone = trace(layer, x[:2, 1:2])
    for k in alone[1][1]:
        torch.testing.assert_close(tl[1][1][k][:2, 1], alone[1][1][k][:, 0], **TOL)
    # the module's mode is restored; a SequenceModel is traced through its .rnn
    layer.train()
    trace(layer, x)
    assert layer.training


def test_trace_absent_gates_and_rnn():
    nfg = trace(build("nfg"), x_data())
    assert nfg.gates == ("i", "g", "o") and "nfg" in nfg.absent["f"]
    with pytest.raises(KeyError, match="nfg"):
        nfg[0][0]["f"]
    rnn = trace(build(("rnn", "tanh")), x_data())
    assert rnn.gates == ("g",) and set(rnn.absent) == {"i", "f", "o", "c", "n", "m"} and rnn.c_n is None
    torch.testing.assert_close(rnn[0][0]["g"], rnn[0][0]["h"])


def test_trace_sequence_model():
    from lstmkit.app.model import SequenceModel
    from lstmkit.app.train import TrainConfig

    torch.manual_seed(0)
    model = SequenceModel(TrainConfig(task="adding", hidden_size=H, cell="peephole"), 2, 1)
    x = torch.randn(T, B, 2)
    tr = trace(model, x)
    direct = trace(model.rnn, x)
    for k in tr[0][0]:
        torch.testing.assert_close(tr[0][0][k], direct[0][0][k], rtol=0, atol=0)


def test_trace_errors():
    layer = build("vanilla")
    with pytest.raises(ValueError, match=r"x: expected input size \(last dimension\) 3, got 5"):
        trace(layer, torch.randn(T, B, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x: expected a 2-D .* got 4-D"):
        trace(layer, torch.randn(1, T, B, I, dtype=torch.float64))
    with pytest.raises(TypeError, match="x: expected a Tensor"):
        trace(layer, [[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="model: expected an lstmkit LSTM or RNN.*got Linear"):
        trace(torch.nn.Linear(3, 3), x_data())
    with pytest.raises(ValueError, match=r"lengths: each must be in \[1, L = 6\], got min 2, max 9"):
        trace(layer, x_data(), lengths=[9, 2, 3])
    with pytest.raises(ValueError, match=r"lengths: expected one length per sequence \(3\), got 2"):
        trace(layer, x_data(), lengths=[2, 3])
    packed = pack_padded_sequence(x_data(), torch.tensor(LENGTHS), enforce_sorted=False)
    with pytest.raises(ValueError, match="lengths: a PackedSequence carries its own lengths"):
        trace(layer, packed, lengths=LENGTHS)
    with pytest.raises(ValueError, match=r"hx: h_0 .* must have shape \(1, 3, 4\)"):
        trace(layer, x_data(), hx=(torch.zeros(1, 2, H, dtype=torch.float64), torch.zeros(1, 3, H, dtype=torch.float64)))


# ----------------------------------------------------------------------------- gradient flow


def manual_flow(layer, x, loss_fn):
    """∂L/∂h_t, ∂L/∂c_t by autograd on a hand-written loop (vanilla, nfg, plain RNN, the
    sLSTM from the zero state): perturbation variables δ added to each step's state; the
    gradient at δ = 0."""
    p = layer.layer_params(0, 0)
    Tn, Bn = x.shape[0], x.shape[1]
    lstm = layer.spec.is_lstm
    dh = [torch.zeros(Bn, H, dtype=x.dtype, requires_grad=True) for _ in range(Tn)]
    dc = [torch.zeros(Bn, H, dtype=x.dtype, requires_grad=True) for _ in range(Tn)]
    h = torch.zeros(Bn, H, dtype=x.dtype)
    c = torch.zeros(Bn, H, dtype=x.dtype)
    n = torch.zeros(Bn, H, dtype=x.dtype)
    m = torch.zeros(Bn, H, dtype=x.dtype)
    ys = []
    for t in range(Tn):
        z = x[t] @ p["weight_ih"].T + p["bias_ih"] + h @ p["weight_hh"].T + p["bias_hh"]
        if layer.spec.slstm:  # m_t = max(log σ(f̃) + m, ĩ) (ĩ from the empty cell), i' = e^{ĩ − m_t}, f' = …
            ui, uf, uz, uo = z.split(H, dim=1)
            kept = torch.nn.functional.logsigmoid(uf) + m
            m_new = ui if t == 0 else torch.maximum(kept, ui)
            f = torch.zeros_like(c) if t == 0 else torch.exp(kept - m_new)
            i = torch.exp(ui - m_new)
            c = f * c + i * torch.tanh(uz) + dc[t]
            n, m = f * n + i, m_new
            h = torch.sigmoid(uo) * c / n + dh[t]
        elif not lstm:
            h = torch.tanh(z) + dh[t]
        else:
            if layer.spec.forget_gate:
                i, f, g, o = z.split(H, dim=1)
                f = torch.sigmoid(f)
            else:  # nfg: i, g, o; f ≡ 1
                i, g, o = z.split(H, dim=1)
                f = 1.0
            c = f * c + torch.sigmoid(i) * torch.tanh(g) + dc[t]
            h = torch.sigmoid(o) * torch.tanh(c) + dh[t]
        ys.append(h)
    loss = loss_fn(torch.stack(ys))
    grads = torch.autograd.grad(loss, dh + (dc if lstm else []))
    gh = torch.stack(grads[:Tn])
    gc = torch.stack(grads[Tn:]) if lstm else None
    return gh, gc


def _loss(y: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    return (w * y).sum() + (y[-1] ** 2).sum() + 0.5 * (y[0] ** 3).sum()


@pytest.mark.parametrize("cell", ["vanilla", "nfg", ("rnn", "tanh"), "slstm"], ids=["vanilla", "nfg", "rnn", "slstm"])
@pytest.mark.parametrize("backend", ["cpu_fused", "reference"])
def test_gradient_flow_equals_perturbation_autograd(cell, backend):
    """(The sLSTM's ∂L/∂c_t lacked the path through h_t = o c_t / n_t: the probe's state node
    was not upstream of h.)"""
    layer = build(cell, backend=backend)
    x = x_data(t=9)
    flow = gradient_flow(layer, x, _loss)
    gh, gc = manual_flow(layer, x, _loss)
    rec = flow[0][0]
    torch.testing.assert_close(rec.grad_h, gh, **TOL)
    torch.testing.assert_close(rec.dh_norm, gh.flatten(1).norm(dim=1), **TOL)
    assert flow.loss == pytest.approx(float(_loss(layer(x)[0]).detach()), rel=1e-12)
    if gc is None:
        assert rec.grad_c is None and rec.dc_norm is None and rec.f_mean is None
        torch.testing.assert_close(rec.norm(), rec.dh_norm)
    else:
        torch.testing.assert_close(rec.grad_c, gc, **TOL)
        torch.testing.assert_close(rec.dc_norm, gc.flatten(1).norm(dim=1), **TOL)
        f = trace(layer, x)[0][0].get("f")
        if f is None:  # nfg: ∂c_t/∂c_{t-1} = 1
            torch.testing.assert_close(rec.f_mean, torch.ones(9, dtype=torch.float64))
        else:
            torch.testing.assert_close(rec.f_mean, f.mean(dim=(1, 2)), **TOL)
    assert backend == layer.backend and "_gradient_probe" not in kernels.REGISTRY  # restored
    assert all(p.grad is None for p in layer.parameters())  # nothing accumulated


def test_gradient_flow_equals_numpy_oracle_bptt():
    """∂L/∂h_t and ∂L/∂c_t from the oracle's hand-written BPTT: the suffix t+1..T run from
    the state (h_t, c_t) gives the derivative through the later steps; the output of step
    t and the local ∂h_t/∂c_t = o_t (1 − tanh² c_t) complete it."""
    layer = build("vanilla")
    Tn = 8
    x = x_data(t=Tn)
    rng = np.random.default_rng(0)
    W = rng.standard_normal((Tn, B, H))  # L = Σ W ⊙ y, so dL/dy = W
    variant = oracle_variant(layer)
    p = {k: v.detach().numpy() for k, v in layer.layer_params(0, 0).items()}
    y, _, _, cache = oracle.layer_forward(x.numpy(), p, None, None, variant)
    want_h, want_c = np.zeros((Tn, B, H)), np.zeros((Tn, B, H))
    for t in range(Tn):
        st = cache["steps"][t]
        dh_later, dc_later = np.zeros((B, H)), np.zeros((B, H))
        if t + 1 < Tn:
            _, _, _, sc = oracle.layer_forward(x.numpy()[t + 1:], p, y[t], st["c"], variant)
            _, _, dh_later, dc_later = oracle.layer_backward(sc, W[t + 1:], None, None)
        want_h[t] = W[t] + dh_later
        want_c[t] = dc_later + want_h[t] * st["o"] * (1 - np.tanh(st["c"]) ** 2)
    flow = gradient_flow(layer, x, lambda out: (out * torch.tensor(W)).sum())
    torch.testing.assert_close(flow[0][0].grad_h, torch.tensor(want_h), **TOL)
    torch.testing.assert_close(flow[0][0].grad_c, torch.tensor(want_c), **TOL)


@pytest.mark.parametrize("cell", [c for k, c in ALL.items() if "fgr" not in k],
                         ids=[k for k in ALL if "fgr" not in k])
def test_gradient_flow_dh_equals_split_sequence(cell):
    """For every variant: ∂L/∂h_t is the derivative of L with respect to a δ added to h_t
    where it is used: as the output of step t and as the initial state of the rest of the
    sequence (the model's own forward, run in two parts). fgr is left out: its gate state
    restarts at zero on every call, so a split run is a different computation. Eval mode, as
    gradient_flow measures (zoneout: the expectation)."""
    layer = build(cell).eval()
    Tn = 6
    x = x_data(t=Tn)
    flow = gradient_flow(layer, x, _loss)
    lstm = layer.spec.is_lstm
    for t in (0, 2, Tn - 2):
        y1, st = layer(x[: t + 1])
        h_t = st[0] if lstm else st
        delta = torch.zeros_like(h_t[0], requires_grad=True)
        y2, _ = layer(x[t + 1:], ((h_t + delta), st[1]) if lstm else h_t + delta)
        y = torch.cat([y1[:-1], (y1[-1] + delta).unsqueeze(0), y2])
        (g,) = torch.autograd.grad(_loss(y), delta)
        torch.testing.assert_close(flow[0][0].grad_h[t], g, msg=f"step {t}", **TOL)


def test_gradient_flow_reverse_direction_in_natural_order():
    bi = build("vanilla", bidirectional=True)
    x = x_data(t=7)
    W = torch.randn(7, B, 2 * H, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    flow = gradient_flow(bi, x, lambda y: (W * y).sum())
    uni = build("vanilla")  # the reverse direction alone, on the reversed input
    uni.load_state_dict({k.replace("_reverse", ""): v for k, v in bi.state_dict().items() if "_reverse" in k})
    ref = gradient_flow(uni, x.flip(0), lambda y: (W[..., H:].flip(0) * y).sum())
    torch.testing.assert_close(flow[0][1].grad_c, ref[0][0].grad_c.flip(0), **TOL)
    torch.testing.assert_close(flow[0][1].grad_h, ref[0][0].grad_h.flip(0), **TOL)
    torch.testing.assert_close(flow[0][1].f_mean, ref[0][0].f_mean.flip(0), **TOL)


def test_gradient_flow_lengths_each_sequence_alone():
    """Padded steps have zero gradient; a padded batch's rows equal each sequence alone
    (the loss is a sum over sequences), in both directions and both layers."""
    layer = build("peephole", num_layers=2, bidirectional=True)
    x = x_data()

    def loss(y):  # y (T, B, 2H), zero past each length
        return (y ** 2).sum() + y.sum()

    flow = gradient_flow(layer, x, loss, lengths=LENGTHS)
    packed = gradient_flow(layer, pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False),
                           lambda out: loss(torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0]))
    for b, n in enumerate(LENGTHS):
        alone = gradient_flow(layer, x[:n, b:b + 1], loss)
        for l in range(2):
            for d in range(2):
                torch.testing.assert_close(flow[l][d].grad_c[:n, b], alone[l][d].grad_c[:, 0], **TOL)
                torch.testing.assert_close(flow[l][d].grad_h[:n, b], alone[l][d].grad_h[:, 0], **TOL)
                torch.testing.assert_close(packed[l][d].grad_c[:, b], flow[l][d].grad_c[:, b], **TOL)
                assert (flow[l][d].grad_c[n:, b] == 0).all() and (flow[l][d].grad_h[n:, b] == 0).all()


def test_gradient_flow_keeps_every_step_when_every_length_is_short():
    """Every length below T: the flow has T steps as its trace does (it stopped at the longest
    length, where its valid mask and trace(..., lengths=) have T), the steps past the longest
    of zero gradient and NaN forget mean; the steps before equal a batch cut to the longest."""
    layer = build("vanilla", num_layers=2, bidirectional=True)
    x, lengths = x_data(), [3, 2]
    x = x[:, :2]
    flow = gradient_flow(layer, x, lambda y: (y ** 2).sum(), lengths=lengths)
    cut = gradient_flow(layer, x[:3], lambda y: (y ** 2).sum(), lengths=lengths)
    assert flow.valid.shape == (T, 2) and flow.summary()["T"] == T
    for l in range(2):
        for d in range(2):
            f, c = flow[l][d], cut[l][d]
            assert f.grad_h.shape[0] == f.grad_c.shape[0] == f.f_mean.shape[0] == T
            torch.testing.assert_close(f.grad_h[:3], c.grad_h, **TOL)
            torch.testing.assert_close(f.grad_c[:3], c.grad_c, **TOL)
            torch.testing.assert_close(f.f_mean[:3], c.f_mean, **TOL)
            assert (f.grad_h[3:] == 0).all() and (f.grad_c[3:] == 0).all() and f.f_mean[3:].isnan().all()


def test_gradient_flow_sequence_model_and_task_loss():
    from lstmkit.app.model import SequenceModel
    from lstmkit.app.tasks.registry import get_task
    from lstmkit.app.train import TrainConfig

    task = get_task("adding", length=30, form="le", eval_size=8)
    batch = next(iter(task.eval_batches("test", 8)))
    for model_kind, cell in (("rnn", "vanilla"), ("lstm", "vanilla"), ("lstm", "nfg")):
        torch.manual_seed(0)
        model = SequenceModel(TrainConfig(task="adding", model=model_kind, cell=cell, hidden_size=8), 2, 1)
        model.train()
        flow = gradient_flow(model, batch.x, lambda out: task.loss(out, batch))
        assert isinstance(flow, GradientFlow) and model.training  # mode restored
        assert flow.loss == pytest.approx(float(task.loss(model(batch.x)[0], batch).detach()), rel=1e-6)
        s = flow.summary()
        assert s["T"] == 30 and s["quantity"] == ("h" if model_kind == "rnn" else "c")
        assert s["ratio_first_last"] == pytest.approx(s["t1"] / s["t_last"])
        if cell == "nfg":
            assert s["f_mean"] == 1.0
        elif model_kind == "lstm":
            assert 0 < s["f_mean"] < 1
        assert all(p.grad is None for p in model.parameters())


def test_gradient_flow_errors_restore_state():
    layer = build("vanilla", backend="cpu_fused")
    with pytest.raises(ValueError, match=r"loss_fn: expected a scalar \(0-dim\) tensor, got a tensor of shape \(6, 3, 4\)"):
        gradient_flow(layer, x_data(), lambda y: y)
    with pytest.raises(RuntimeError, match="boom"):
        gradient_flow(layer, x_data(), lambda y: (_ for _ in ()).throw(RuntimeError("boom")))
    assert layer.backend == "cpu_fused" and "_gradient_probe" not in kernels.REGISTRY
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        gradient_flow(layer, x_data(), 3.0)
    with pytest.raises(ValueError, match="loss_fn: the loss does not depend on the model's output"):
        gradient_flow(layer, x_data(), lambda y: torch.tensor(1.0, requires_grad=True))  # (it gave zeros)
    with pytest.raises(ValueError, match=r"x: expected input size \(last dimension\) 3, got 2"):
        gradient_flow(layer, torch.randn(T, B, 2, dtype=torch.float64), _loss)


def test_gradient_flow_batch_first_and_unbatched():
    layer = build("layernorm", num_layers=2)
    bf = build("layernorm", num_layers=2, batch_first=True)
    x = x_data()
    flow = gradient_flow(layer, x, _loss)
    flow_bf = gradient_flow(bf, x.transpose(0, 1), lambda y: _loss(y.transpose(0, 1)))
    for l in range(2):
        torch.testing.assert_close(flow_bf[l][0].grad_c, flow[l][0].grad_c, **TOL)  # time-major both
    one = gradient_flow(layer, x[:, 0], lambda y: _loss(y.unsqueeze(1)))
    alone = gradient_flow(layer, x[:, :1], _loss)
    assert one[1][0].grad_h.shape == (T, H) and one.valid.shape == (T,)
    torch.testing.assert_close(one[1][0].grad_h, alone[1][0].grad_h[:, 0], **TOL)


def test_a_layer_on_torchs_own_lstm_is_traced_on_a_recording_kernel_which_the_trace_names():
    """torch's LSTM operator (cuDNN on a GPU) keeps no per-step gates: a trace runs the next row
    that records, says so, and its output is the layer's (to the kernels' rounding)."""
    layer = build("vanilla", num_layers=2, bidirectional=True, backend="torch").eval()
    x = x_data()
    tr = trace(layer, x, lengths=LENGTHS)
    assert tr.runs_on == "torch" and tr.kernel == "cpu_fused"
    assert "recorded on the 'cpu_fused' kernel: the layer runs on 'torch'" in tr.note
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
    with torch.no_grad():
        want = torch.nn.utils.rnn.pad_packed_sequence(layer(packed)[0], total_length=T)[0]
    valid = tr.valid.unsqueeze(-1)
    torch.testing.assert_close(tr.output * valid, want * valid, **TOL)
    assert trace(build("vanilla"), x).note == ""


def test_layers_and_directions_out_of_range_are_refused_by_name():
    """tr[3] on a 2-layer trace, tr[0][1] on one direction, flow[3]: a bare IndexError before;
    a missing deep key named the plain keys, not this trace's."""
    layer = build("deep=2", num_layers=2)
    x = x_data()
    tr = trace(layer, x)
    flow = gradient_flow(layer, x, _loss)
    for what in (tr, flow):
        with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 1\], got 3"):
            what[3]
        with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 1\], got -1"):
            what[-1]
        with pytest.raises(ValueError, match=r"direction: expected an int in \[0, 0\], got 1"):
            what[0][1]
        assert what[1][0] is what.layers[1][0]
    with pytest.raises(KeyError, match=r"'f.2': not a key of this trace; expected one of .*'f.1'"):
        tr[0][0]["f.2"]


def test_runs_on_names_the_row_this_input_runs_on():
    """The note that a trace was recorded on another kernel than the layer's: the row was chosen
    without the call, so a layer that runs this input on oneDNN (torch's row) said nothing."""
    from lstmkit import kernels

    layer = lstmkit.LSTM(64, 256)
    x = torch.randn(50, 32, 64)
    with torch.no_grad():
        ran = layer._run(x, None)[3].kernel.name
    tr = trace(layer, x)
    assert tr.runs_on == ran
    assert (tr.note != "") == (ran != tr.kernel)
    assert trace(lstmkit.LSTM(3, 4), torch.randn(5, 2, 3)).runs_on == kernels.select(
        lstmkit.CellSpec(), torch.device("cpu"), torch.float32, None, False,
        kernels.Workload("lstm", 5, 2, 4, torch.float32, False, False, False)).name


def test_a_summary_whose_last_state_gets_no_gradient_has_no_ratio():
    """Zoneout: h_T reads the cell before zoneout and nothing reads c_T, so ‖∂L/∂c_T‖ = 0; the
    first/last ratio is None (it was inf, which the report printed and JSON cannot hold)."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, cell="zoneout=0.2", dtype=torch.float64)
    flow = lstmkit.gradient_flow(layer, torch.randn(6, 2, 3, dtype=torch.float64), lambda y: y[-1].pow(2).sum())
    s = flow.summary()
    assert s["t_last"] == 0.0 and s["t1"] > 0 and s["ratio_first_last"] is None


BAD_LENGTHS = {
    "str": "abc",
    "none_inside": [1, None, 3],
    "too_large_for_int64": [2**70, 1, 1],
    "meta": torch.ones(3, dtype=torch.long, device="meta"),
    "complex": torch.tensor([1 + 7j, 2, 3]),
    "float": torch.tensor([1.0, 2.0, 3.0]),
    "too_few": [2, 3],
    "out_of_range": [9, 2, 3],
    "zero": [0, 2, 3],
    "two_dims": torch.ones(3, 1, dtype=torch.long),
}


@pytest.mark.parametrize("lengths", list(BAD_LENGTHS.values()), ids=list(BAD_LENGTHS))
def test_trace_and_gradient_flow_refuse_lengths_as_the_layer_does(lengths):
    """lengths= was checked by code of the trace's own: raw torch errors (min() of no values,
    "Could not infer dtype of NoneType", an OverflowError, a meta tensor's NotImplementedError)
    and complex lengths taken with their imaginary part dropped. Now: the layer's check, the
    layer's exception and message."""
    layer, x = build("vanilla"), x_data()
    with pytest.raises((TypeError, ValueError)) as want:
        layer(x, lengths=lengths)
    assert str(want.value).startswith("lengths: ")
    for run in (lambda: trace(layer, x, lengths=lengths),
                lambda: gradient_flow(layer, x, lambda y: y.sum(), lengths=lengths)):
        with pytest.raises(type(want.value)) as got:
            run()
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("lengths", [torch.zeros(0, dtype=torch.long), [], np.zeros(0, dtype=np.int64)],
                         ids=["tensor", "list", "numpy"])
def test_a_batch_of_no_sequences_with_lengths_is_traced_as_the_layer_runs_it(lengths):
    """B = 0 with lengths: the layer runs it (empty results); the trace said "min(): Expected
    reduction dim" (an empty tensor) or refused [] as dtype float32."""
    layer, x = build("vanilla"), x_data(b=0)
    y, (h_n, _) = layer(x, lengths=lengths)
    tr = trace(layer, x, lengths=lengths)
    assert tr.output.shape == y.shape == (T, 0, H) and tr.h_n.shape == h_n.shape
    assert tr[0][0]["f"].shape == (T, 0, H) and tr.valid.shape == (T, 0)
    flow = gradient_flow(layer, x, lambda out: out.sum(), lengths=lengths)
    assert flow[0][0].grad_c.shape == (T, 0, H)


def test_numpy_and_int32_lengths_trace_as_a_list():
    layer, x = build("vanilla"), x_data()
    want = trace(layer, x, lengths=LENGTHS)
    for lengths in (np.array(LENGTHS), torch.tensor(LENGTHS, dtype=torch.int32), tuple(LENGTHS)):
        got = trace(layer, x, lengths=lengths)
        torch.testing.assert_close(got.output, want.output, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got.valid, want.valid)


def _pruned(seed: int = 0) -> torch.nn.Module:
    import torch.nn.utils.prune as prune

    torch.manual_seed(seed)
    layer = lstmkit.LSTM(5, 8).eval()
    prune.l1_unstructured(layer, "weight_hh_l0", amount=0.5)
    with torch.no_grad():  # an optimizer step: the next call's pre-hook computes the weight anew
        layer.weight_hh_l0_orig.mul_(3.0)
    return layer


def test_trace_runs_the_forward_pre_hooks_that_compute_pruned_and_normalised_weights():
    """trace called forward_recorded directly: pruning's and the hook-based weight_norm's
    pre-hooks never ran, and a trace after an optimizer step used the previous call's weights
    (0.21 off the layer's output)."""
    import warnings

    layer = _pruned()
    x = torch.randn(6, 3, 5)
    with torch.no_grad():
        tr = trace(layer, x)
        y, (h_n, c_n) = layer(x)
    torch.testing.assert_close(tr.output, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr.c_n, c_n, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    layer = lstmkit.LSTM(5, 8).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based weight_norm's deprecation
        torch.nn.utils.weight_norm(layer, "weight_hh_l0")
    with torch.no_grad():
        layer.weight_hh_l0_g.mul_(2.0)
        tr = trace(layer, x, lengths=[6, 2, 4])
        y = layer(x, lengths=[6, 2, 4])[0]
    torch.testing.assert_close(tr.output.nan_to_num(0.0), y, rtol=1e-5, atol=1e-6)


def test_trace_runs_the_hooks_with_the_calls_arguments_and_forwards_output():
    """Pre-hooks see (x, hx[, lengths]) and may replace them; forward hooks see the output as
    forward returns it (padded, batch_first as the input) and cannot change the trace."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(5, 8, batch_first=True).eval()
    x = torch.randn(3, 6, 5)  # (B, T, I)
    seen: dict[str, object] = {}

    def pre(module, args):
        seen["args"] = args
        return (args[0] * 2, *args[1:])

    def post(module, args, output):
        seen["output"] = output
        return torch.zeros(1)  # not the trace

    layer.register_forward_pre_hook(pre)
    with torch.no_grad():
        y, (h_n, c_n) = layer(x, None, [6, 2, 4])  # the call, its input doubled by the pre-hook
        layer.register_forward_hook(post)
        tr = trace(layer, x, lengths=[6, 2, 4])
    assert len(seen["args"]) == 3 and seen["args"][0] is x and seen["args"][2] == [6, 2, 4]
    out, (h, c) = seen["output"]
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-6)  # padded, (B, T, H)
    torch.testing.assert_close(tr.output.transpose(0, 1).nan_to_num(0.0), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr.h_n, h_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr.c_n, c_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr.output[-1, 0], tr[0][0]["h"][-1, 0])  # the kernel's, not the hook's
