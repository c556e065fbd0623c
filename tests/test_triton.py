"""The Triton kernels (``backend="triton"``) against independent references.

Without a GPU these run Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1`` when no CUDA device is present); on a GPU machine the same tests
run the compiled kernels on CUDA tensors. Every variant the kernels claim, both ways of
running the time loop (persistent and per step, forced through ``LSTMKIT_TRITON_PATH``),
float64 / float32 / bfloat16, lengths, stacked and bidirectional layers and projection:
outputs, final states and every gradient against the float64 reference loop (autograd
through :mod:`lstmkit.cell`) and the float64 NumPy oracle. Tolerances:

* float64: 1e-10 relative to each tensor's scale (conftest's ``assert_rel``);
* float32: at most ``max(1e-5, 2 ×)`` the error of the float32 reference loop, both
  measured against float64 (the rule of test_kernels.py);
* bfloat16 (and float16): at most ``max(2**-5, 2.5 ×)`` the error of the reference loop in
  that dtype (torch's own 16-bit arithmetic on the same equations), both against float64
  run on the same rounded parameters and inputs. Measured in the interpreter (2 layers,
  bidirectional, lengths): 0.6-1.5e-2 for every variant without layernorm or clip,
  2.7-9.7e-2 with them (the bfloat16 reference loop: 1.1-86e-2; the CPU kernel, which
  does not round GEMM operands: 0.5-8.7e-2) — the outputs of every layer are rounded to
  bfloat16, and rounding moves c across the clip boundary and through the layer norms.

AOT: every kernel of the launch plan compiles for sm_80 and sm_90 (a clean subprocess:
Triton's own library is interpreted once TRITON_INTERPRET=1 is set in this one).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
import numpy_lstm as oracle
from conftest import assert_rel, zoneout_keep
from kernel_compare import _weighted_sum
from lstmkit import kernels, variants
from lstmkit.kernels import abi
from lstmkit.kernels.triton_impl import PATH_ENV, PATHS
from lstmkit.spec import resolve
from test_oracle import oracle_variant
from variants import HEADS_VARIANTS, LSTM_VARIANTS, RNN_VARIANTS

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
#: CPU tensors run Triton's interpreter (conftest); a GPU machine runs the compiled kernels.
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the interpreter runs the CPU tests)")

#: Every variant the Triton row claims (the sLSTM's own tests: tests/test_slstm.py), and the RNN.
CELLS = {vid: cell for vid, cell in LSTM_VARIANTS.items()
         if kernels.REGISTRY["triton"].unsupported(resolve(cell), DEVICE, torch.float32) is None}
CELLS.update({vid: f"rnn_{nl}" for vid, nl in RNN_VARIANTS.items()})
COMBOS = ["vanilla", "peephole+cifg+layernorm", "fgr+peephole+nog+clip=0.4", "nig+niaf+noaf",
          "nfg+peephole+layernorm", "zoneout=0.3/0.2+peephole+gate_act=hardsigmoid+out_act=relu", "rnn_tanh",
          "deep=4x3+fgr+peephole+zoneout=0.2", "deep=3+layernorm+fgr+peephole"]
BF16_FLOOR = 2 ** -5


@pytest.mark.parametrize(("cell", "P"), [("peephole+cifg", 0), ("fgr+peephole+nog", 3), ("layernorm+peephole", 0),
                                         ("zoneout=0.3/0.2", 3), ("deep=f:3+layernorm", 0), ("slstm+heads=2", 0)])
@pytest.mark.parametrize("masks", [False, True])
def test_ahead_of_time_builds_take_the_parameters_a_layer_gives(cell, P, masks):
    """The ahead-of-time builds (triton_aot) make the operator's parameters from a flag word
    alone; their shapes are those of a real layer's (the operator's params list: peepholes,
    W_gg, the layer norms, W_hr, the summed bias, zoneout's training masks, the flat MLP)."""
    from lstmkit.kernels import fused, triton_aot, triton_impl

    spec, (T, B, H) = resolve(cell), (5, 2, 6)
    layer = lstmkit.LSTM(4, H, cell=spec, proj_size=P, heads=spec.heads)
    params = layer.layer_params(0, 0)
    real, _ = fused.operator_params(params, spec, torch.empty(0))
    R, HO = params["weight_hh"].shape[0], layer.output_size
    shapes = {n: tuple(t.shape) for n, t in zip(abi.PARAMS, real)}
    if spec.layernorm:
        shapes["bias"] = (R,)
    if masks and spec.zoneout != (0.0, 0.0):
        shapes.update(keep_c=(T, B, H), keep_h=(T, B, HO))
    mlp = abi.decode_mlp(list(abi.mlp_layout(spec, True)), H) if spec.gate_hidden else None
    built = triton_aot._spec_params(triton_impl.Variant.from_flags(abi.flags(spec)), T, B, H, P, R, HO,
                                    torch.float32, torch.device("meta"), masks, mlp.wtot if mlp else 0)
    assert {n: tuple(t.shape) for n, t in zip(abi.PARAMS, built)} == shapes


def test_the_kernels_claim_every_row_the_triton_row_implements(monkeypatch):
    """triton_cell.IMPLEMENTED, the rows whose step the kernels compute, is what the Triton kernel
    row says it implements; a flag not claimed is refused, not run as the cell without it."""
    from lstmkit.kernels import triton_cell

    assert triton_cell.IMPLEMENTED == kernels.REGISTRY["triton"].implements
    monkeypatch.setattr(triton_cell, "IMPLEMENTED", triton_cell.IMPLEMENTED - {"clip"})
    layer = lstmkit.LSTM(3, 4, cell="clip=0.5", backend="triton").to(DEVICE)
    with pytest.raises(ValueError, match=r"the kernels do not compute \['clip'\]"):
        layer(torch.randn(2, 1, 3, device=DEVICE))


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run the test once per way of running the time loop."""
    monkeypatch.setenv(PATH_ENV, request.param)
    return request.param


def make(cell: str, I: int, H: int, L: int = 1, bidirectional: bool = False, P: int = 0, seed: int = 0):
    """A float64 layer with weights away from torch's tiny init (every path matters)."""
    torch.manual_seed(seed)
    if isinstance(cell, str) and cell.startswith("rnn_"):
        layer = lstmkit.RNN(I, H, L, bidirectional=bidirectional, nonlinearity=cell[4:])
    else:
        layer = lstmkit.LSTM(I, H, L, bidirectional=bidirectional, proj_size=P, cell=cell)
    layer = layer.double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.empty_like(p).uniform_(-0.3, 0.3))
            else:
                p.uniform_(-0.5, 0.5)
    return layer


def data(layer, T: int, B: int, seed: int = 1) -> dict[str, torch.Tensor | None]:
    """Inputs and incoming gradients, float64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    lead, lstm = layer.num_layers * layer.num_directions, layer.spec.is_lstm

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    return {"x": r(T, B, layer.input_size), "h0": r(lead, B, layer.output_size) * 0.5,
            "c0": r(lead, B, layer.hidden_size) * 0.5 if lstm else None,
            "dy": r(T, B, layer.num_directions * layer.output_size), "dhn": r(lead, B, layer.output_size),
            "dcn": r(lead, B, layer.hidden_size) if lstm else None}


def run(base, backend: str, dtype: torch.dtype, d: dict, lengths=None, device=DEVICE) -> dict[str, torch.Tensor]:
    """Outputs, final states and the gradients of input, initial states and every
    parameter, as float64 CPU tensors, of ``base`` converted to ``dtype`` on ``device``."""
    layer = copy.deepcopy(base).to(device=device, dtype=dtype)
    layer.backend = backend
    lstm = layer.spec.is_lstm
    x, h0 = (d[k].to(device, dtype).clone().requires_grad_(True) for k in ("x", "h0"))
    c0 = d["c0"].to(device, dtype).clone().requires_grad_(True) if lstm else None
    inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, st = layer(inp, (h0, c0) if lstm else h0)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    h_n, c_n = st if lstm else (st, None)
    loss = (out.double() * d["dy"].to(device)).sum() + (h_n.double() * d["dhn"].to(device)).sum()
    if lstm:
        loss = loss + (c_n.double() * d["dcn"].to(device)).sum()
    names = ["output", "h_n"] + (["c_n"] if lstm else []) + ["grad of input", "grad of h_0"]
    names += (["grad of c_0"] if lstm else []) + [f"grad of {n}" for n, _ in layer.named_parameters()]
    wrt = [x, h0] + ([c0] if lstm else []) + list(layer.parameters())
    values = [out, h_n] + ([c_n] if lstm else []) + list(torch.autograd.grad(loss, wrt))
    return {n: v.detach().double().cpu() for n, v in zip(names, values)}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| relative to b's scale (at least 1e-3)."""
    if not b.numel():
        return 0.0
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-3)


def check(base, dtype: torch.dtype, T: int, B: int, lengths=None, device=DEVICE, factor16: float = 2.5,
          floor32: float = 1e-5) -> None:
    """The Triton layer in ``dtype`` against the float64 reference (rules: module docstring;
    ``factor16``: the 16-bit bound, in multiples of the 16-bit reference loop's error; ``floor32``:
    the float32 bound's floor)."""
    d = data(base, T, B)
    if dtype == torch.float64:
        truth = run(base, "reference", torch.float64, d, lengths, device)
        fast = run(base, "triton", torch.float64, d, lengths, device)
        for name, t in truth.items():
            assert_rel(fast[name], t, torch.float64, name)
        return
    if dtype in (torch.bfloat16, torch.float16):  # the truth runs on the rounded parameters and inputs
        base = copy.deepcopy(base).to(dtype).double()
        d = {k: None if v is None else v.to(dtype).double() for k, v in d.items()}
    truth = run(base, "reference", torch.float64, d, lengths, device)
    fast = run(base, "triton", dtype, d, lengths, device)
    ref = run(base, "reference", dtype, d, lengths, device)
    for name, t in truth.items():
        e_fast, e_ref = _err(fast[name], t), _err(ref[name], t)
        # 16-bit: as accurate as the 16-bit reference loop within 2.5x (measured on an H200: cells
        # with kinks (clip, relu, hard sigmoids) came out at 1.01-1.80x of the loop's error per step,
        # 2.15-2.24x in the persistent path's reverse-direction input gradients with relu or clip)
        bound = max(floor32, 2 * e_ref) if dtype == torch.float32 else max(BF16_FLOOR, factor16 * e_ref)
        assert e_fast <= bound, f"{name}: {dtype} Triton error {e_fast:.2e} > {bound:.2e} (reference loop: {e_ref:.2e})"


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


HEADS_CELLS = {vid: cell for vid, cell in HEADS_VARIANTS.items()
               if kernels.REGISTRY["triton"].unsupported(resolve(cell), DEVICE, torch.float32) is None}


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


def test_variant_word_decoders_match_the_abi():
    """The kernels' compile-time decoders of the flag word (triton_cell.has, slot, fgr_slot,
    hard_slope) say what lstmkit.kernels.abi says, for every combination of the bits that
    remove gates, with and without fgr, and a hard sigmoid."""
    from lstmkit.kernels import triton_cell

    removal = [b for b in (1 << k for k in range(len(abi.FLAGS))) if any(b & m for m in abi.GATE_REMOVED.values())]
    for n in range(1 << len(removal)):
        word = sum(b for j, b in enumerate(removal) if n >> j & 1)
        for extra in (0, abi.flag("fgr"), abi.flag("fgr") | abi.flag("gate_act_hardsigmoid")):
            flags = word | extra
            slots, sslots = abi.gate_slots(flags)
            assert {g: triton_cell.slot(flags, g) for g in slots} == slots
            fgr = bool(flags & abi.flag("fgr"))
            assert {g: triton_cell.fgr_slot(flags, g) for g in sslots} == (sslots if fgr else dict.fromkeys(sslots, -1))
            assert [triton_cell.has(flags, name) for name in abi.FLAGS] == [bool(flags & abi.flag(f)) for f in abi.FLAGS]
    for name, slope in variants.HARD_SIGMOID_SLOPES.items():
        assert triton_cell.hard_slope(abi.flags(resolve(f"gate_act={name}"))) == slope
    assert triton_cell.hard_slope(abi.flags(resolve("vanilla"))) == 0.0


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


# ---------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("cell", ["vanilla", "layernorm", "clip=1", "nig+niaf+noaf"])
def test_nan_stays_in_its_sequence(cell):
    layer = lstmkit.LSTM(3, 40, cell=cell, backend="triton", check_finite=False).to(DEVICE)
    x = torch.randn(4, 2, 3, device=DEVICE)
    x[1, 0, 0] = float("nan")
    out, (h, c) = layer(x)
    assert torch.isnan(out[1:, 0]).all() and torch.isnan(c[:, 0]).all()  # NaN spreads through batch 0
    assert torch.isfinite(out[:, 1]).all()                                # batch 1 is untouched


def test_selection_cuda_layers_choose_triton_cpu_layers_keep_the_cpu_kernel():
    names = list(kernels.REGISTRY)
    assert names.index("cpu_fused") < names.index("triton") < names.index("reference")
    cuda = torch.device("cuda")
    assert kernels.select(resolve("peephole+layernorm"), cuda, torch.bfloat16).name == "triton"
    assert kernels.select(lstmkit.CellSpec(gate_hidden=(3,), layernorm=True), cuda, torch.float32).name == "triton"
    assert kernels.select(resolve("vanilla"), cuda, torch.complex64).name == "reference"
    assert kernels.select(resolve("vanilla"), torch.device("cpu"), torch.float32).name == "cpu_fused"
    # CPU tensors reach the interpreter only when asked for by name, never as a fallback
    cpu_rows = [k.name for k in kernels.REGISTRY.values() if k.automatic(torch.device("cpu"))]
    assert "triton" not in cpu_rows and "cpu_fused" in cpu_rows
    with pytest.raises(ValueError, match="slstm"):
        kernels.select(resolve("slstm"), cuda, torch.float32, backend="torch")


def test_without_triton_cuda_layers_fall_back_to_reference_with_one_warning(monkeypatch):
    import importlib.util

    from lstmkit.kernels import fused

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    monkeypatch.setattr(fused, "_TRITON_MISSING_WARNED", False)
    cuda = torch.device("cuda")
    # cells torch computes itself run its operator on CUDA, Triton or not (the 'torch' row)
    assert kernels.select(resolve("vanilla"), cuda, torch.float32).name == "torch"
    with pytest.warns(RuntimeWarning, match="Triton is not installed") as rec:
        assert kernels.select(resolve("peephole"), cuda, torch.float32).name == "reference"
        assert kernels.select(resolve("zoneout=0.1"), cuda, torch.float32).name == "reference"
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    with pytest.raises(ValueError, match="Triton is not installed"):
        kernels.select(resolve("vanilla"), cuda, torch.float32, backend="triton")


def test_importing_lstmkit_builds_no_triton_kernel():
    """The kernel modules load when a Triton row first runs, not at ``import lstmkit``."""
    code = ("import sys, lstmkit, lstmkit.kernels; "
            "assert not {'lstmkit.kernels.triton_kernels', 'lstmkit.kernels.triton_cell'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_path_rule_and_its_override(monkeypatch):
    from lstmkit.kernels.triton_impl import Variant, choose_path

    monkeypatch.delenv(PATH_ENV, raising=False)
    vanilla, ln = (Variant.from_flags(abi.flags(resolve(c))) for c in ("vanilla", "layernorm"))
    f32, bf16 = torch.float32, torch.bfloat16
    assert choose_path(vanilla, 8, 32, 32, f32, False) == "persistent"   # 16 KiB of weights
    assert choose_path(vanilla, 8, 64, 64, f32, False) == "per_step"     # 64 KiB
    assert choose_path(vanilla, 8, 64, 64, bf16, False) == "persistent"  # 32 KiB
    assert choose_path(ln, 8, 64, 64, bf16, False) == "per_step"         # layernorm: half the budget
    assert choose_path(vanilla, 8, 1024, 1024, bf16, False) == "per_step"
    # the larger budget on GPUs with enough shared memory (H100/H200 227 KiB; A100 163 KiB)
    cuda = torch.device("cuda", 0)
    for smem, want in ((227 * 1024, "persistent"), (163 * 1024, "per_step")):
        props = SimpleNamespace(shared_memory_per_block_optin=smem)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        assert choose_path(vanilla, 8, 64, 64, f32, False, cuda) == want
        assert choose_path(ln, 8, 64, 64, f32, False, cuda) == "per_step"     # layernorm: half the budget
        assert choose_path(vanilla, 8, 128, 128, f32, False, cuda) == "per_step"
    assert choose_path(vanilla, 8, 64, 64, f32, False, torch.device("cpu")) == "per_step"  # the interpreter
    monkeypatch.setenv(PATH_ENV, "per_step")
    assert choose_path(vanilla, 8, 32, 32, f32, False) == "per_step"
    monkeypatch.setenv(PATH_ENV, "persistent")
    assert choose_path(vanilla, 8, 64, 64, f32, False) == "persistent"   # forced, up to 64 KiB
    assert choose_path(vanilla, 8, 1024, 1024, f32, False) == "per_step"  # cannot fit one SM
    monkeypatch.setenv(PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="LSTMKIT_TRITON_PATH"):
        choose_path(vanilla, 8, 32, 32, f32, False)


# ---------------------------------------------------------------------------- AOT


#: Sizes of one block's shared memory (opt-in maximum) per compute capability.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def test_every_kernel_compiles_ahead_of_time_for_sm80_and_sm90():
    """Each kernel of the launch plan (persistent and per step, projection, layernorm, fgr)
    builds for A100 and H100 and fits their shared memory. (Every variant × dtype × shape
    class: ``python benchmarks/bench_gpu.py --aot``, results/gpu_kernels_aot.md.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    plan = ["peephole+cifg+layernorm/bfloat16/per-step H=256 P=128",  # every per-step kernel
            "fgr+peephole+nog+clip=0.4/float32/persistent H=32 P=16",  # persistent: fgr, projection
            "peephole+cifg+layernorm/bfloat16/persistent H=32",        # persistent: layernorm
            # the new rows, zoneout's masks and scalars: per step with a projection, and persistent
            "zoneout=0.3/0.2+gate_act=hard_sigmoid+cand_act=relu+out_act=relu/bfloat16/per-step H=256 P=128",
            "zoneout=0.3/0.2+gate_act=hardsigmoid+peephole/float32/persistent H=32 P=16",
            # the sLSTM (per step only): both forget activations, the normaliser's floor, heads
            "slstm+heads=4/bfloat16/per-step H=128", "slstm+forget_act=exp+n_clamp/float32/per-step H=1024",
            # deep gates: their MLPs in torch; with layernorm the kernels take ready pre-activations (READY)
            "deep=32+layernorm+peephole/bfloat16/per-step H=256 P=128"]
    cmd = [sys.executable, "-W", "ignore", "-m", "lstmkit.kernels.triton_aot", "--plan", ";".join(plan),
           "--archs", "80,90"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [f"{r['cell']} {r['dtype']} {r['kernel']} {r['arch']}: {r.get('error')}" for r in rows if not r["ok"]]
    assert proc.returncode == 0 and not failed, "\n".join(failed) or proc.stderr[-3000:]
    kernels_built = {r["kernel"].split()[0] for r in rows}
    assert kernels_built == {"persistent_forward", "persistent_backward", "step_forward", "step_project",
                             "step_dh", "step_backward"}, kernels_built
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], r


def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/bench_gpu.py runs every code path on tiny shapes (here: the interpreter)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    # the variants whose rows the script builds in its own way (a projection, heads, the sLSTM, a
    # spec no cell word names), and vanilla: every other variant's row is the same code with another
    # cell word
    variants = ["vanilla", "projection", "heads=4", "slstm+heads=4", *bench_gpu.ROW_SPECS]
    assert set(variants) <= set(bench_gpu.VARIANTS)
    result = bench_gpu.main(["--dry-run", "--jobs", "1", "--out", str(tmp_path), "--variants", ",".join(variants)])
    rows = {(r["row"], r["mode"]) for r in result["rows"]}
    for v in variants:
        for mode in ("infer", "train"):
            assert (f"triton:{v}", mode) in rows and (f"reference:{v}", mode) in rows
    assert all(r["kernel"] == "triton" for r in result["rows"] if r["row"].startswith("triton:"))
    assert {r["row"] for r in result["paths"]} == {"persistent", "per_step", "cudnn"}
    if importlib.util.find_spec("flashrnn"):  # the sLSTM against FlashRNN's (on a CPU: its PyTorch loop)
        assert {r["row"] for r in result["peers"]} == {"lstmkit triton", "flashrnn vanilla"}
        assert all(math.isfinite(r["seconds"]) for r in result["peers"])
    assert all(math.isfinite(r["seconds"]) for r in result["paths"])
    md = (tmp_path / "bench_gpu_dry_run.md").read_text()
    assert "Dry run" in md and "Persistent vs per step" in md


# ---------------------------------------------------------------------------- CUDA only


# nig+niaf+noaf (no input gate, input or output activation) bounds nothing: c and h grow to ~1e8 at
# the realistic sizes below, so every rounding difference is amplified past any fixed bound (H200,
# float64: 2e-9 of the scale against 1e-10); the small shapes above check it.
REALISTIC_CELLS = {vid: cell for vid, cell in CELLS.items() if vid != "nig+niaf+noaf"}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("cell", list(REALISTIC_CELLS.values()), ids=list(REALISTIC_CELLS))
@pytest.mark.parametrize("size", ["persistent", "per_step"])
def test_cuda_every_variant_realistic_sizes(cell, dtype, size):
    """On the GPU, sizes the interpreter cannot afford: several batch programs of the
    persistent kernel (H = 32, B = 37) and several cell blocks per step (H = 136)."""
    T, B, I, H = (20, 37, 24, 32) if size == "persistent" else (12, 19, 40, 136)
    lengths = [T] + [int(v) for v in torch.randint(1, T + 1, (B - 1,), generator=torch.Generator().manual_seed(0))]
    # a relu output (h = o·relu(c), the relu RNN) bounds nothing: 16-bit rounding differences grow through
    # the steps (H200, persistent path, bfloat16: up to 3.7x the bfloat16 loop's error, 0.17 of the scale)
    unbounded = cell in (CELLS.get("out_relu"), CELLS.get("rnn_relu"))
    # layer norm's backward subtracts means, and a deep gate's first-layer bias gradient sums the result
    # over B and T: float32 (3xTF32 products on the GPU) cancels there (H100, persistent sizes: 1.5e-5 of
    # the scale in that gradient, the float32 loop 2.5e-6)
    cancels = cell == CELLS.get("layernorm+deep_g")
    check(make(cell, I, H, bidirectional=True), dtype, T=T, B=B, lengths=lengths, device=torch.device("cuda"),
          factor16=5.0 if unbounded else 2.5, floor32=4e-5 if cancels else 1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("cell", list(HEADS_CELLS.values()), ids=list(HEADS_CELLS))
def test_cuda_heads_realistic_sizes(cell, dtype):
    """Heads on the GPU at sizes the interpreter cannot afford (4 heads of 32 cells)."""
    cell = cell.replace("heads=2", "heads=4") if isinstance(cell, str) else dataclasses.replace(cell, heads=4)
    check(make(cell, 24, 128, bidirectional=True), dtype, T=12, B=19, device=torch.device("cuda"))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("cell", ["slstm+heads=4", "slstm+forget_act=exp+n_clamp"])
def test_cuda_slstm_realistic_sizes(cell, dtype):
    """The sLSTM on the GPU (several cell blocks per step, lengths, given states c, n > 0, m):
    outputs, the four final states and every gradient against the float64 reference loop
    (bfloat16: on the rounded inputs and weights, within 2.5x the bfloat16 loop's own error)."""
    torch.manual_seed(0)
    T, B, I, H, cuda = 12, 19, 24, 136, torch.device("cuda")
    base = lstmkit.LSTM(I, H, num_layers=2, bidirectional=True, cell=cell).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    states = [torch.randn(4, B, H, generator=g, dtype=torch.float64) * 0.5 for _ in range(4)]
    states[2] = states[2].abs() + 0.2                                       # n > 0
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    sixteen = dtype == torch.bfloat16
    if sixteen:  # what bfloat16 holds exactly, so that the float64 truth sees the same inputs
        base = copy.deepcopy(base).to(dtype).double()
        x, states = x.to(dtype).double(), [s.to(dtype).double() for s in states]
    runs = [("reference", torch.device("cpu"), torch.float64), ("triton", cuda, dtype)]
    got = []
    for backend, dev, dt in runs + ([("reference", cuda, dtype)] if sixteen else []):
        layer = copy.deepcopy(base).to(dev, dt)
        layer.backend = backend
        xs, st = x.to(dev, dt).requires_grad_(True), [s.to(dev, dt).requires_grad_(True) for s in states]
        y, out = layer(pack_padded_sequence(xs, lengths, enforce_sorted=False), tuple(st))
        y = pad_packed_sequence(y, total_length=T)[0]
        loss = sum((t.double() * torch.linspace(-1, 1, t.numel(), dtype=torch.float64, device=dev).view_as(t)).sum()
                   for t in (y, *out))
        got.append([t.detach().double().cpu() for t in (y, *out, *torch.autograd.grad(loss, [xs, *st,
                                                                                               *layer.parameters()]))])
    for k, (a, b, *loop) in enumerate(zip(*got)):
        bound = max(BF16_FLOOR, 2.5 * _err(loop[0], a)) if sixteen else 1e-10 if dtype == torch.float64 else 1e-4
        assert _err(b, a) <= bound, (k, _err(b, a), bound)


@needs_cuda
def test_cuda_operator_dispatch_compile_and_default_selection():
    """CUDA tensors reach the Triton kernels through the operator (no explicit impl):
    the default selection, torch.compile(fullgraph=True) and autocast."""
    layer = lstmkit.LSTM(8, 32, cell="peephole+layernorm").cuda()
    assert kernels.select(layer.spec, torch.device("cuda"), torch.float32).name == "triton"
    x = torch.randn(9, 4, 8, device="cuda")
    ref = lstmkit.LSTM(8, 32, cell="peephole+layernorm", backend="reference").cuda()
    ref.load_state_dict(layer.state_dict())
    want = ref(x)[0]
    torch.testing.assert_close(layer(x)[0], want, rtol=1e-4, atol=1e-4)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x)[0], want, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)[0]
    assert out.dtype == torch.bfloat16 and _err(out.double().cpu(), want.double().cpu()) < BF16_FLOOR


@needs_cuda
@pytest.mark.parametrize("cell,proj", [("vanilla", 0), ("peephole+layernorm", 0), ("fgr+clip=3", 0), ("cifg", 68),
                                       ("rnn_tanh", 0)])
def test_cuda_graphs_replay_the_per_step_path_exactly(cell, proj, monkeypatch):
    """The per-step path's calls are replayed from CUDA graphs once a shape repeats: every
    call's output, state and gradients equal the eager run's (LSTMKIT_CUDA_GRAPHS=0), and a
    result is not overwritten by later replays."""
    from lstmkit.kernels import cuda_graphs

    T, B, I, H = 7, 5, 12, 136  # H = 136 float32: the per-step path
    torch.manual_seed(0)
    kw = dict(nonlinearity="tanh") if cell == "rnn_tanh" else dict(cell=cell, proj_size=proj)
    layer = (lstmkit.RNN(I, H, backend="triton", **kw) if cell == "rnn_tanh"
             else lstmkit.LSTM(I, H, backend="triton", **kw)).cuda()

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        layer.zero_grad()
        x = x.clone().requires_grad_(True)
        out, state = layer(x)
        h = state[0] if isinstance(state, tuple) else state
        (out.square().sum() + h.sum()).backward()
        return [out.detach(), h.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]

    xs = [torch.randn(T, B, I, device="cuda") for _ in range(4)]
    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, "0")
    cuda_graphs.clear()
    eager = [run(x) for x in xs]
    assert not cuda_graphs._GRAPHS
    monkeypatch.delenv(cuda_graphs.GRAPHS_ENV)
    graphed = []
    for k, x in enumerate(xs):
        graphed.append(run(x))
        if k == 2:  # the first replayed call: unchanged by the replay after it
            first = [t.clone() for t in graphed[2]]
    names = {key[0] for key in cuda_graphs._GRAPHS}
    assert names == {"triton forward", "triton backward"}, names
    for want, got in zip(eager, graphed):
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for a, b in zip(first, graphed[2]):
        assert torch.equal(a, b)
    cuda_graphs.clear()


@needs_cuda
def test_cuda_a_layer_inside_the_callers_cuda_graph():
    """A whole forward captured by the caller's own CUDA graph (torch.compile's
    reduce-overhead mode does the same): the finite check becomes a device assertion, the
    per-step loop is recorded into the caller's graph, and a replay computes the new input's
    result."""
    layer = lstmkit.LSTM(12, 136, cell="peephole").cuda()
    x = torch.randn(6, 3, 12, device="cuda")
    with torch.no_grad():
        for _ in range(2):
            layer(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _ = layer(x)
        new = torch.randn_like(x)
        x.copy_(new)
        graph.replay()
        torch.testing.assert_close(out, layer(new)[0], rtol=1e-6, atol=1e-6)


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
