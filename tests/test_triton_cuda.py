"""The Triton kernels on a GPU (skipped without a CUDA device): every variant, heads and the
sLSTM at sizes Triton's interpreter cannot afford (tolerances: triton_checks.py), the operator's
dispatch, torch.compile and autocast on CUDA tensors, and CUDA graphs — the per-step path
replayed from graphs, and a layer inside the caller's own graph.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstmkit import kernels
from triton_checks import BF16_FLOOR, CELLS, CUDA, HEADS_CELLS, _err, check, make

pytest.importorskip("triton")

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the interpreter runs the CPU tests)")


# ---------------------------------------------------------------------------- CUDA only


# nig+niaf+noaf (no input gate, input or output activation) bounds nothing: c and h grow to ~1e8 at
# the realistic sizes below, so every rounding difference is amplified past any fixed bound (H200,
# float64: 2e-9 of the scale against 1e-10); the small shapes of test_triton.py check it.
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
