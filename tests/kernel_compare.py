"""The comparison of a kernel row with the reference kernel, shared by test_kernels.py,
test_fused_kernel.py, test_heads.py and test_triton.py: the rows that run layers on CPU
tensors, awkward shapes, the variants each row claims, and ``compare`` — outputs, final
states and the gradients of the input, the initial states and every parameter (rel. 1e-5
float32, 1e-10 float64); and ``_weighted_sum``, a loss that weighs every element differently."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from conftest import assert_rel
from lstmkit import kernels
from lstmkit.kernels.fused import FusedKernel
from lstmkit.spec import resolve
from variants import LSTM_VARIANTS, RNN_VARIANTS

# Rows that run layers on CPU tensors (onnx_export only writes ONNX during torch.onnx.export:
# tests/test_ops_transforms.py; triton runs CPU tensors only through Triton's interpreter: test_triton.py):
# the fused rows (hand-written BPTT, record mode) and torch's own operators (the cells torch has).
FUSED = [name for name, k in kernels.REGISTRY.items() if isinstance(k, FusedKernel) and name != "triton"]
FAST = FUSED + ["torch"]
DTYPES = [torch.float32, torch.float64]

# (T, B, I, H, proj, layers, bidirectional, lengths)
SHAPES = {
    "T1_B1_H1": (1, 1, 1, 1, 0, 1, False, None),
    "odd": (7, 3, 5, 11, 0, 1, False, None),
    "B1_long": (23, 1, 2, 3, 0, 1, False, None),
    "lengths": (6, 4, 3, 5, 0, 1, False, [6, 2, 5, 1]),
    "stacked_bidir": (5, 3, 4, 6, 0, 2, True, [5, 3, 1]),
    "projection": (5, 2, 3, 6, 4, 2, False, None),
    "big": (4, 9, 33, 70, 0, 1, True, None),
    "one_step": (1, 5, 3, 7, 4, 2, True, None),  # T = 1: the weights are read in place (BLAS), not packed
    "onednn_projection": (3, 90, 256, 256, 0, 1, True, None),  # T·B >= 256, I·R >= 256·1024
}


def _variants(kernel_name, rnn=False):
    kernel = kernels.REGISTRY[kernel_name]
    table = RNN_VARIANTS if rnn else LSTM_VARIANTS
    out = []
    for vid, cell in table.items():
        spec = lstmkit.CellSpec(kind="rnn", nonlinearity=cell) if rnn else resolve(cell)
        if kernel.unsupported(spec, torch.device("cpu"), torch.float64) is None:
            out.append(pytest.param(cell, id=vid))
    return out


def _kernel_variants(kernel_names):
    """(kernel row, cell) for every variant each row claims, as parameters whose ids name both
    (``-k peephole`` selects a variant's cases)."""
    return [pytest.param(name, p.values[0], id=f"{name}-{p.id}") for name in kernel_names for p in _variants(name)]


def _run(layer, x, h0, c0, lengths):
    inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, st = layer(inp, (h0, c0) if c0 is not None else h0)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    h_n, c_n = st if c0 is not None else (st, None)
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + (h_n * 0.7).sum()
    if c_n is not None:
        loss = loss + (c_n * torch.randn(c_n.shape, generator=g, dtype=out.dtype)).sum()
    wrt = [x, h0] + ([c0] if c0 is not None else []) + list(layer.parameters())
    return [out, h_n] + ([c_n] if c_n is not None else []), torch.autograd.grad(loss, wrt)


def _results(kernel_name, make_layer, state, shape, dtype, lstm):
    T, B, I, H, P, L, bidir, lengths = shape
    layer = make_layer(I, H, L, bidir, P).to(dtype)
    layer.load_state_dict(state)
    layer.backend = kernel_name
    D = 2 if bidir else 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    h0 = torch.randn(L * D, B, P or H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    c0 = None
    if lstm:
        c0 = torch.randn(L * D, B, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    values, grads = _run(layer, x, h0, c0, lengths)
    names = ["output", "h_n"] + (["c_n"] if lstm else []) + ["grad of input", "grad of h_0"]
    names += (["grad of c_0"] if lstm else []) + [f"grad of {n}" for n, _ in layer.named_parameters()]
    return dict(zip(names, [*values, *grads]))


def compare(kernel_name, make_layer, shape, dtype, lstm=True):
    """float64: kernel vs reference to 1e-10 (norm-wise relative). float32: the kernel is as
    accurate as the float32 reference, both measured against the float64 reference:
    error <= max(1e-5, 2 x the reference's own float32 error)."""
    T, B, I, H, P, L, bidir, lengths = shape
    torch.manual_seed(0)
    base = make_layer(I, H, L, bidir, P).double()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if not name.startswith("ln_"):
                p.uniform_(-0.5, 0.5)
    state = base.state_dict()
    truth = _results("reference", make_layer, state, shape, torch.float64, lstm)
    if dtype == torch.float64:
        fast = _results(kernel_name, make_layer, state, shape, torch.float64, lstm)
        for name in truth:
            assert_rel(fast[name], truth[name], dtype, name)
        return
    fast = _results(kernel_name, make_layer, state, shape, torch.float32, lstm)
    ref32 = _results("reference", make_layer, state, shape, torch.float32, lstm)
    for name, t in truth.items():
        scale = max(t.abs().max().item(), 1e-3) if t.numel() else 1.0
        err_fast = (fast[name].double() - t).abs().max().item() / scale if t.numel() else 0.0
        err_ref = (ref32[name].double() - t).abs().max().item() / scale if t.numel() else 0.0
        assert err_fast <= max(1e-5, 2 * err_ref), (
            f"{name}: float32 kernel error {err_fast:.2e} vs the float32 reference's {err_ref:.2e}")


def _weighted_sum(outs) -> torch.Tensor:
    """A loss that weighs every element of ``outs`` differently (linspace(-1, 1) over each)."""
    return sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum() for o in outs)
