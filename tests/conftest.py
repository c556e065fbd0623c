"""Shared test helpers: tolerances per dtype and gradient comparison."""

from __future__ import annotations

import torch

# Test shapes are tiny: one thread is faster, and immune to OpenMP spin-wait slowdowns when
# the two cores are shared. Tests that exercise threading set the count themselves.
torch.set_num_threads(1)

#: (rtol, atol) per dtype, as the issues state them: 1e-5 float32, 1e-10 float64.
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
