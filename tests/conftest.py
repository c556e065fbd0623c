"""Shared test helpers: tolerances per dtype and gradient comparison."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton's interpreter runs the GPU kernels on CPU tensors (tests/test_triton.py);
# it must be set before triton decorates them. On a GPU machine the compiled kernels run.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Test shapes are tiny: one thread is faster, and immune to OpenMP spin-wait slowdowns when
# the two cores are shared. Tests that exercise threading set the count themselves.
torch.set_num_threads(1)

#: (rtol, atol) per dtype, as the issues state them: 1e-5 float32, 1e-10 float64.
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Norm-wise relative agreement: max|a − b| <= rtol · max|b| (rtol 1e-5 f32, 1e-10 f64).

    Two correct float32 implementations that sum in different orders differ element-wise
    by more than 1e-5 where values cancel (layer-norm gradients); relative to the
    tensor's scale they agree to 1e-5.
    """
    rtol = TOL[dtype][0]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-3), f"{what}: max abs error {err:.3g} > {rtol:g} × scale {scale:.3g}"
