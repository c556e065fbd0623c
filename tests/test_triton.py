"""The Triton kernels (``backend="triton"``) against independent references.

Every variant the kernels claim, both ways of running the time loop (persistent and per step,
forced through ``LSTMKIT_TRITON_PATH``), float64 / float32 / bfloat16, lengths, stacked and
bidirectional layers and projection: outputs, final states and every gradient against the
float64 reference loop (autograd through :mod:`lstmkit.cell`) and the float64 NumPy oracle;
record mode; the operator on arguments the modules do not make. Interpreter or GPU, and the
tolerances: triton_checks.py; the GPU alone, at realistic sizes: test_triton_cuda.py.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
import numpy_lstm as oracle
from conftest import assert_rel, zoneout_keep
from kernel_compare import _weighted_sum
from lstmkit.kernels import abi
from lstmkit.kernels.triton_impl import PATH_ENV, PATHS
from lstmkit.spec import resolve
from test_oracle import oracle_variant
from triton_checks import CELLS, DEVICE, HEADS_CELLS, check, data, make, run
from variants import LSTM_VARIANTS

pytest.importorskip("triton")


COMBOS = ["vanilla", "peephole+cifg+layernorm", "fgr+peephole+nog+clip=0.4", "nig+niaf+noaf",
          "nfg+peephole+layernorm", "zoneout=0.3/0.2+peephole+gate_act=hardsigmoid+out_act=relu", "rnn_tanh",
          "deep=4x3+fgr+peephole+zoneout=0.2", "deep=3+layernorm+fgr+peephole"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run the test once per way of running the time loop."""
    monkeypatch.setenv(PATH_ENV, request.param)
    return request.param


# ---------------------------------------------------------------------------- every variant


def _by_turns(cells: list, ids: list[str], offset: int = 0) -> list:
    """Each cell on one of the two paths, the paths by turns: every path meets half the cells.
    The paths share the pointwise step (``_fwd_core`` / ``_bwd_core``) and differ in the loop
    around it, which each variant meets in another test on the other path (float64 here, and
    float32 or bfloat16 in :func:`test_every_variant_low_precision`, whose paths alternate the
    other way round): every variant runs on both paths against the references."""
    return [pytest.param(cell, PATHS[(k + offset) % 2], id=f"{PATHS[(k + offset) % 2]}-{vid}")
            for k, (vid, cell) in enumerate(zip(ids, cells))]


@pytest.mark.parametrize(("cell", "path_name"), _by_turns(list(CELLS.values()), list(CELLS), offset=1))
def test_every_variant_float64(cell, path_name, monkeypatch):
    """Each variant, lengths (one sequence of length 1), to 1e-10; the paths by turns."""
    monkeypatch.setenv(PATH_ENV, path_name)
    check(make(cell, 3, 5), torch.float64, T=6, B=4, lengths=[6, 2, 5, 1])


def _heads_cases() -> list:
    """Each heads variant in float64, and in float32 or bfloat16 by turns (each 16/32-bit dtype
    meets half the variants: the two share every line but the GEMM operands' type)."""
    cases = []
    for k, (vid, cell) in enumerate(HEADS_CELLS.items()):
        cases.append(pytest.param(cell, torch.float64, id=f"{vid}-f64"))
        dtype, name = ((torch.float32, "f32"), (torch.bfloat16, "bf16"))[k % 2]
        cases.append(pytest.param(cell, dtype, id=f"{vid}-{name}"))
    return cases


@pytest.mark.parametrize(("cell", "dtype"), _heads_cases())
def test_heads_every_variant(cell, dtype):
    """Block-diagonal recurrent weights (heads=k: the per-step path, its GEMMs batched over the
    heads): stacked, bidirectional, lengths, and with a projection (H_out/k columns per block)."""
    check(make(cell, 3, 6, L=2, bidirectional=True), dtype, T=4, B=3, lengths=[4, 2, 3])
    check(make(cell, 3, 8, P=4), dtype, T=4, B=2)


@pytest.mark.parametrize(("cell", "H", "P"), [(lstmkit.CellSpec(gate_hidden={"o": (4,)}, heads=2), 2, 0),
                                         (lstmkit.CellSpec(gate_hidden={"g": (2,)}, heads=2), 4, 2)])
def test_heads_with_one_output_column_each_and_a_deep_gate(cell, H, P):
    """Heads with one output column each (H_out / k = 1) beside a deep gate of another width: the
    per-gate-run products' gradient reaching h came back with strided rows, which the backward read
    as row-major — every gradient wrong at B >= 2, silently (the output was right)."""
    check(make(cell, 2, H, P=P), torch.float64, T=3, B=2)


def _low_precision_cases() -> list:
    """Each variant in float32 and in bfloat16, on alternating paths (each dtype meets each
    path on half the variants; the pointwise code is the same on both paths). The float32
    case of variant k runs on the path its float64 case does not (:func:`_by_turns`)."""
    cases = []
    for k, (vid, cell) in enumerate(CELLS.items()):
        for j, (dtype, name) in enumerate(((torch.float32, "f32"), (torch.bfloat16, "bf16"))):
            path = PATHS[(k + j) % 2]
            cases.append(pytest.param(cell, dtype, path, id=f"{vid}-{name}-{path}"))
    return cases


@pytest.mark.parametrize(("cell", "dtype", "path_name"), _low_precision_cases())
def test_every_variant_low_precision(cell, dtype, path_name, monkeypatch):
    """float32 and bfloat16 (float32 compute and cell state) against float64."""
    monkeypatch.setenv(PATH_ENV, path_name)
    check(make(cell, 3, 6), dtype, T=5, B=3, lengths=[5, 1, 4])


@pytest.mark.parametrize("cell", ["vanilla", "peephole+cifg+layernorm"])
def test_float16(cell, path):
    """float16 layers take the bfloat16 road (16-bit GEMM operands, float32 compute)."""
    check(make(cell, 3, 6), torch.float16, T=5, B=3, lengths=[5, 1, 4])


@pytest.mark.parametrize("shape", ["T1_B1_H1", "odd", "B1_long", "wide"])
def test_awkward_shapes(shape, path):
    """H = 1 (tiles of 16 with 15 masked cells), odd sizes, a long single sequence, and
    H = 70: several cell blocks per step (persistent declines a float64 tile that wide)."""
    T, B, I, H = {"T1_B1_H1": (1, 1, 1, 1), "odd": (7, 3, 5, 11), "B1_long": (23, 1, 2, 3),
                  "wide": (3, 5, 4, 70)}[shape]
    check(make("peephole" if shape == "odd" else "vanilla", I, H), torch.float64, T=T, B=B)


@pytest.mark.parametrize("cell", ["peephole", "layernorm"])
def test_an_empty_batch_gives_zero_gradients(cell, path):
    """B = 0: the backward's per-tile sums of the peephole and layer-norm gradients have no tiles;
    they were handed out unsummed, (0, n) where (H,) was due, and autograd refused them."""
    layer = make(cell, 3, 4)
    layer.backend = "triton"
    y, (h, c) = layer(torch.randn(5, 0, 3, dtype=torch.float64, requires_grad=True))
    (y.sum() + h.sum() + c.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any(), name


def test_the_operator_reads_strided_int32_lengths_by_their_values():
    """``lengths`` as a strided int32 view reached the kernel as it was (the int32 cast is a no-op
    there) and was read as contiguous: other sequences' lengths, wrong outputs."""
    from lstmkit.kernels import ops
    from lstmkit.kernels.triton_impl import TritonImpl

    spec, H, B, T = resolve("vanilla"), 4, 3, 3
    g = torch.Generator().manual_seed(0)
    xg = torch.randn(T, B, 4 * H, generator=g, dtype=torch.float64)
    w = torch.randn(4 * H, H, generator=g, dtype=torch.float64)
    h0, c0 = torch.zeros(B, H, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
    params = [torch.empty(0, dtype=torch.float64)] * len(abi.PARAMS)
    ys = [ops.recurrence(xg, w, h0, c0, n, params, abi.flags(spec), [], abi.scalars(spec), H, 0, False,
                         impl=TritonImpl())[0]
          for n in (torch.tensor([3, 1, 2]), torch.tensor([3, 9, 1, 9, 2, 9], dtype=torch.int32)[::2])]
    torch.testing.assert_close(ys[1], ys[0], rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["vanilla", "deep=3+peephole", "slstm"])
def test_negative_views_read_as_their_values(cell):
    """Tensors with torch's lazy negation bit (``x.conj().imag``, ``_neg_view()``) reach the kernels
    as their values, not their memory: the input, the states, lengths and a parameter, forward and
    gradients, against the reference (the operator resolves the bit: TritonImpl reads memory)."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, cell=cell, backend="triton").double().to(DEVICE)
    ref = lstmkit.LSTM(3, 4, cell=cell, backend="reference").double().to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    S = 3 if resolve(cell).slstm else 1
    x = torch.randn(4, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    states = [torch.randn(1, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True) for _ in range(1 + S)]
    lengths = torch.tensor([-4, -1, -3])._neg_view()

    def run(module):
        params = {**dict(module.named_parameters()), "weight_hh_l0": (-module.weight_hh_l0.detach())._neg_view()}
        out = torch.func.functional_call(module, params, (x._neg_view(), tuple(s._neg_view() for s in states)),
                                         {"lengths": lengths})
        return out[0], *out[1]

    got, want = run(layer), run(ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    wrt = [x, *states]
    for a, b in zip(torch.autograd.grad(_weighted_sum(got), wrt), torch.autograd.grad(_weighted_sum(want), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_zero_tensor_gradient_is_read_as_zeros():
    """torch's ZeroTensor (no memory: the gradient sgn()'s backward hands on) reached the kernels as
    a pointer ("Attempted to access the data pointer on an invalid python storage")."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(3, 4, backend="triton").double().to(DEVICE)
    ref = lstmkit.LSTM(3, 4, backend="reference").double().to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    grads = []
    for m in (layer, ref):
        y, (h, _) = m(x)
        grads.append(torch.autograd.grad(y.sgn().sum() + h.square().sum(), [x, m.weight_hh_l0]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("cell", "path_name"), _by_turns(COMBOS, COMBOS))
def test_stacked_bidirectional_projection_vs_numpy_oracle(cell, path_name, monkeypatch):
    """Two bidirectional layers with a projection (not for the RNN) and lengths, float64,
    against the independent NumPy LSTM with hand-written BPTT. The combinations by turns on
    the two paths: each path stacks layer norm, fgr, peepholes and deep gates in some of them."""
    monkeypatch.setenv(PATH_ENV, path_name)
    T, B, I, H = 5, 3, 3, 4
    lengths = [2, 5, 3]
    base = make(cell, I, H, L=2, bidirectional=True, P=0 if cell.startswith("rnn") else 2)
    d = data(base, T, B)
    got = run(base, "triton", torch.float64, d, lengths)
    variant = oracle_variant(base)
    layers = oracle.unflatten_params({k: v.detach().numpy() for k, v in base.state_dict().items()},
                                     base.num_layers, base.bidirectional)
    npa = {k: None if v is None else v.numpy() for k, v in d.items()}
    y, hn, cn, cache = oracle.forward(npa["x"], layers, npa["h0"], npa["c0"], variant, lengths=np.array(lengths),
                                      bidirectional=True, keep=zoneout_keep(base, T, B))
    valid = (np.arange(T)[:, None] < np.array(lengths)[None, :])[..., None]
    dy = npa["dy"] * valid  # the padded steps of y are not outputs
    dx, dlayers, dh0, dc0 = oracle.backward(cache, dy, npa["dhn"], npa["dcn"])
    want = {"output": y * valid, "h_n": hn, "grad of input": dx, "grad of h_0": dh0}
    if cn is not None:
        want.update({"c_n": cn, "grad of c_0": dc0})
    want.update({f"grad of {k}": v for k, v in oracle.flatten_params(dlayers).items()})
    assert set(want) == set(got)
    for name, w in want.items():
        assert_rel(got[name], torch.from_numpy(np.asarray(w)), torch.float64, name)


# ---------------------------------------------------------------------------- new rows


@pytest.mark.parametrize(("mode", "dtype"), [("train", torch.float64), ("eval", torch.float64),
                                             ("eval", torch.bfloat16)], ids=["train-f64", "eval-f64", "eval-bf16"])
def test_zoneout_with_projection_and_lengths(mode, dtype, path):
    """Zoneout with a projection (h_t mixes in h_{t-1} after W_hr: the projection's own kernels
    on the per-step path) and lengths: the training masks, and at evaluation (no masks) the
    scalars z_c, z_h."""
    base = make("zoneout=0.3/0.2+peephole", 3, 5, P=3)
    check(base if mode == "train" else base.eval(), dtype, T=6, B=4, lengths=[6, 2, 5, 1])


@pytest.mark.parametrize("cell", ["gate_act=hard_sigmoid", "gate_act=hardsigmoid+cifg+peephole"])
def test_hard_sigmoid_gates_on_both_flat_parts(cell, path):
    """Input weights scaled ×4 put every gate on the ramp and on both flat parts (derivative 0)
    at some steps (checked on the reference's trace), float64 against the reference."""
    base = make(cell, 3, 5)
    with torch.no_grad():
        base.weight_ih_l0.mul_(4.0)
    ref = copy.deepcopy(base)
    ref.backend = "reference"
    trace = ref._run(data(base, 6, 4)["x"], None, record=True)[3].traces[0][0]
    for k in ("i", "f", "o"):
        a = trace[k]
        assert (a == 0).any() and (a == 1).any() and ((a > 0) & (a < 1)).any(), k
    check(base, torch.float64, T=6, B=4, lengths=[6, 2, 5, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", ["out_act=relu", "vanilla", "rnn_tanh"])
def test_tanh_of_tiny_values_keeps_their_digits(cell, dtype, path):
    """Pre-activations of 1e-40 .. 1e-2 (zero weights, the values as biases): the candidate's, the
    cell output's and the RNN's tanh are as torch's to the dtype's rounding — the closed form
    (1 - e^{-2|x|}) / (1 + e^{-2|x|}) gave 0 below 3e-8 in float32, and a cell 0 where it is
    7.3e-9 turned relu's gradient off (0.73 for 1.27)."""
    tiny = torch.logspace(-40 if dtype == torch.float64 else -30, -2, 12, dtype=torch.float64)
    tiny = torch.cat([tiny, -tiny])
    H = tiny.numel()
    base = make(cell, 1, H)
    lstm = not cell.startswith("rnn")
    with torch.no_grad():
        for p in base.parameters():
            p.zero_()
        if lstm:  # i, f, o at sigmoid(1); the candidate u_g tiny
            base.bias_ih_l0.copy_(torch.cat([torch.ones(H), torch.ones(H), tiny, torch.ones(H)]))
        else:
            base.bias_ih_l0.copy_(tiny)
    zeros, ones = (functools.partial(f, dtype=torch.float64) for f in (torch.zeros, torch.ones))
    d = {"x": zeros(1, 1, 1), "h0": zeros(1, 1, H), "c0": zeros(1, 1, H), "dy": ones(1, 1, H), "dhn": zeros(1, 1, H),
         "dcn": ones(1, 1, H)}
    got, want = run(base, "triton", dtype, d), run(base, "reference", dtype, d)
    for k, w in want.items():
        g = got[k]
        assert torch.equal(g == 0, w == 0), k  # no tiny value rounded to 0
        rel = ((g - w).abs() / w.abs().clamp_min(torch.finfo(torch.float64).tiny)).max().item()
        assert rel <= (4e-7 if dtype == torch.float32 else 1e-14), (k, rel)


class _CountingKernel:
    """A Triton kernel whose launches (``kernel[grid](...)``) are counted."""

    def __init__(self, kernel, counts: dict, name: str) -> None:
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


@pytest.mark.parametrize(("phi", "cell", "bias", "deep"),
                         [("tanh", "vanilla", True, None), ("relu", "cifg+peephole", True, None),
                          ("sigmoid", "fgr", False, None), ("identity", "nog", True, None),
                          ("tanh", "heads=2", True, None), ("tanh", "vanilla", True, "f"),
                          ("relu", "peephole", False, "io"), ("sigmoid", "cifg+fgr", True, "o"),
                          ("tanh", "heads=2", True, "ig")])
def test_deep_gates_of_the_common_shape_run_the_fused_kernels(phi, cell, bias, deep, monkeypatch):
    """Deep gates of one hidden layer each, all of one width — every computed gate (``deep=n``) or
    some (the others shallow, their columns H wide among the deep gates' n_1): one fused launch
    per step each way (triton_deep_kernels), float64 against the reference, with lengths, both
    directions, each hidden activation, with and without biases, with heads (the recurrent weights
    expanded); a width that is no power of two (the kernels pad it to 16). Other deep shapes stay
    in torch (no fused launch)."""
    from lstmkit.kernels import triton_deep_kernels

    counts: dict[str, int] = {}
    for name in ("deep_forward", "deep_backward"):
        monkeypatch.setattr(triton_deep_kernels, name, _CountingKernel(getattr(triton_deep_kernels, name), counts, name))
    spec = resolve(f"{cell}+deep=6").replace(gate_hidden_activation=phi)
    if deep is not None:  # these gates deep, the others shallow
        spec = spec.replace(gate_hidden={g: (6,) for g in deep})
    torch.manual_seed(0)
    base = lstmkit.LSTM(3, 6, bidirectional=True, bias=bias, cell=spec).double()
    with torch.no_grad():
        for p in base.parameters():
            p.uniform_(-0.5, 0.5)
    T = 6
    check(base, torch.float64, T=T, B=4, lengths=[6, 2, 5, 1])
    # both directions, on the reference run and the Triton run's forward (training keeps a) and backward
    assert counts == {"deep_forward": 2 * T, "deep_backward": 2 * T}
    counts.clear()
    check(make("layernorm+deep=4", 3, 5), torch.float64, T=3, B=2)
    check(make(LSTM_VARIANTS["deep_f"], 3, 5), torch.float64, T=3, B=2)
    assert counts == {}


# ---------------------------------------------------------------------------- record mode


RECORDED = ["vanilla", "cifg", "nig+nog", "layernorm", "fgr+peephole", "zoneout=0.3/0.2+gate_act=hard_sigmoid",
            "rnn_tanh", lstmkit.CellSpec(gate_hidden={"f": (4, 2), "g": (3,)}, peephole=True),
            lstmkit.CellSpec(gate_hidden={"f": (4, 2)}, layernorm=True)]


@pytest.mark.parametrize(("cell", "path_name"),
                         _by_turns(RECORDED, [c if isinstance(c, str) else c.name for c in RECORDED])
                         + _by_turns(RECORDED[-2:], [c.name for c in RECORDED[-2:]]))  # the other path each
def test_record_mode_matches_reference(cell, path_name, monkeypatch):
    """The trace is what the kernel computed (its buffers), equal to the reference's on
    every valid step — deep gates' hidden activations too; absent gates are absent;
    recording changes no output. The cells by turns on the two paths, the deep gates (whose
    hidden activations each path writes on its own) on both."""
    monkeypatch.setenv(PATH_ENV, path_name)
    base = make(cell, 3, 4, bidirectional=True)
    ref, fast = copy.deepcopy(base), copy.deepcopy(base).to(DEVICE)
    ref.backend, fast.backend = "reference", "triton"
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4])
    _, _, _, a = ref._run(pack_padded_sequence(x, lengths, enforce_sorted=False), None, record=True)
    _, _, _, b = fast._run(pack_padded_sequence(x.to(DEVICE), lengths, enforce_sorted=False), None, record=True)
    valid = (torch.arange(6)[:, None] < lengths[None, :]).unsqueeze(-1)  # (T, B, 1)
    for direction in range(2):
        ta, tb = a.traces[0][direction], b.traces[0][direction]
        assert set(ta) == set(tb), (set(ta), set(tb))
        for k in ta:
            torch.testing.assert_close(tb[k].cpu() * valid, ta[k] * valid, rtol=1e-10, atol=1e-10, msg=k)
    if cell == "nig+nog":
        assert "i" not in tb and "o" not in tb
    if not isinstance(cell, str):
        assert {"f.1", "f.2"} <= set(tb)
    out_rec = fast._run(x.to(DEVICE), None, record=True)[0]
    torch.testing.assert_close(out_rec, fast(x.to(DEVICE))[0], rtol=0, atol=0)


def test_the_operator_with_a_projection_the_modules_do_not_make(path):
    """The operator takes what the modules refuse, and the Triton row computes it as the CPU
    kernel does (found by a review of the kernels): a projection wider than the cells (the
    persistent tiles held H columns: y off by 3.3, h_n and c_n garbage) and an RNN given a
    projection size (which it has not: the persistent kernel read an empty W_hr)."""
    from lstmkit.kernels import abi, ops
    from lstmkit.kernels.triton_impl import TritonImpl

    def run(impl, T, B, H, P, flags, device):
        g = torch.Generator().manual_seed(0)
        rnn = bool(flags & abi.flag("rnn"))
        R, HO = (H if rnn else 4 * H), (P if P and not rnn else H)
        xg = torch.randn(T, B, R, generator=g, dtype=torch.float64)
        whh = torch.randn(R, HO, generator=g, dtype=torch.float64) * 0.3
        h0 = torch.randn(B, HO, generator=g, dtype=torch.float64)
        c0 = torch.empty(0, dtype=torch.float64) if rnn else torch.randn(B, H, generator=g, dtype=torch.float64)
        params = [torch.empty(0, dtype=torch.float64) for _ in abi.PARAMS]
        if P and not rnn:
            params[abi.PARAMS.index("weight_hr")] = torch.randn(P, H, generator=g, dtype=torch.float64) * 0.3
        args = (xg.to(device), whh.to(device), h0.to(device), c0.to(device), torch.empty(0, dtype=torch.long),
                [p.to(device) for p in params], flags, [], (0.0,) * len(abi.SCALARS), H, P, False)
        return [t.cpu() for t in ops.recurrence(*args, impl=impl)[:3]]

    for T, B, H, P, flags in ((2, 3, 16, 20, 0), (2, 3, 5, 3, abi.flag("rnn"))):
        want = run(None, T, B, H, P, flags, torch.device("cpu"))  # the CPU kernel
        got = run(TritonImpl(), T, B, H, P, flags, DEVICE)
        for a, b in zip(got, want):
            assert_rel(a, b, torch.float64, f"T={T} B={B} H={H} P={P} flags={flags}")


def test_rows_past_32_bits_are_refused():
    """The kernels index a step's rows t·B + b in 32 bits (found by a review of the kernels: past
    2**31 rows they would wrap); such a call is refused before anything is read (meta tensors)."""
    from lstmkit.kernels import abi, ops
    from lstmkit.kernels.triton_impl import TritonImpl

    meta, T, B = torch.device("meta"), 2**16, 2**15
    args = (torch.empty(T, B, 4, device=meta), torch.empty(4, 1, device=meta), torch.empty(B, 1, device=meta),
            torch.empty(B, 1, device=meta), torch.empty(0, dtype=torch.long),
            [torch.empty(0, device=meta) for _ in abi.PARAMS], 0, [], (0.0,) * len(abi.SCALARS), 1, 0, False)
    with pytest.raises(ValueError, match=r"the Triton kernels take T·B < 2\*\*31 rows, got T = 65536, B = 32768"):
        ops.recurrence(*args, impl=TritonImpl())
