"""What the Triton tests (test_triton.py, test_triton_row.py, test_triton_cuda.py) share: the
device they run on, the variants the Triton row claims, float64 layers with weights away from
torch's init, and ``check`` — a Triton layer against the float64 reference loop.

Without a GPU these run Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1`` when no CUDA device is present); on a GPU machine the same tests
run the compiled kernels on CUDA tensors. ``check`` compares outputs, final states and every
gradient with the float64 reference loop (autograd through :mod:`lstmkit.cell`). Tolerances:

* float64: 1e-10 relative to each tensor's scale (conftest's ``assert_rel``);
* float32: at most ``max(1e-5, 2 ×)`` the error of the float32 reference loop, both
  measured against float64 (the rule of test_kernels.py: ``kernel_compare.compare``);
* bfloat16 (and float16): at most ``max(2**-5, 2.5 ×)`` the error of the reference loop in
  that dtype (torch's own 16-bit arithmetic on the same equations), both against float64
  run on the same rounded parameters and inputs. Measured in the interpreter (2 layers,
  bidirectional, lengths): 0.6-1.5e-2 for every variant without layernorm or clip,
  2.7-9.7e-2 with them (the bfloat16 reference loop: 1.1-86e-2; the CPU kernel, which
  does not round GEMM operands: 0.5-8.7e-2) — the outputs of every layer are rounded to
  bfloat16, and rounding moves c across the clip boundary and through the layer norms.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from conftest import assert_rel
from lstmkit import kernels
from lstmkit.spec import resolve
from variants import HEADS_VARIANTS, LSTM_VARIANTS, RNN_VARIANTS

pytest.importorskip("triton")


CUDA = torch.cuda.is_available()
#: CPU tensors run Triton's interpreter (conftest); a GPU machine runs the compiled kernels.
DEVICE = torch.device("cuda" if CUDA else "cpu")


#: Every variant the Triton row claims (the sLSTM's own tests: tests/test_slstm.py), and the RNN.
CELLS = {vid: cell for vid, cell in LSTM_VARIANTS.items()
         if kernels.REGISTRY["triton"].unsupported(resolve(cell), DEVICE, torch.float32) is None}
CELLS.update({vid: f"rnn_{nl}" for vid, nl in RNN_VARIANTS.items()})


BF16_FLOOR = 2 ** -5


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


HEADS_CELLS = {vid: cell for vid, cell in HEADS_VARIANTS.items()
               if kernels.REGISTRY["triton"].unsupported(resolve(cell), DEVICE, torch.float32) is None}
