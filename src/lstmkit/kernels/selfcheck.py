"""Triton builds checked before first use: a user's first CUDA layer must not be their kernels'
first test.

The first time a Triton build runs in a process — a variant (its flag word), a dtype and a
way of running the time loop (persistent or per step) — the layer's own sizes run two steps
on it and on the reference kernel (float64), forward and every gradient, on inputs and weights
that the build's dtype holds exactly. A build that raises, or disagrees beyond its dtype's
tolerance, is remembered: lstmkit warns once, naming the build and the error, and layers with
that build run on the reference kernel (slower, not wrong). In 16 bits much of the error is the
dtype's own (an H100's bfloat16 sLSTM build failed a fixed 6e-2 by 0.08 of the scale in one
gradient, and passes this rule), so there a build also passes if it errs no more than
``FACTOR16`` times the reference kernel run in the same dtype on the same device.
``LSTMKIT_TRITON_SELFCHECK=0`` turns the check off.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lstmkit import variants
from lstmkit.kernels import abi
from lstmkit.kernels.base import KernelOut
from lstmkit.kernels.reference import ReferenceKernel
from lstmkit.spec import CellSpec

__all__ = ["ENV", "enabled", "verdict", "build_key", "TOLERANCE", "FACTOR16"]

#: The environment variable that turns the check off ("0").
ENV = "LSTMKIT_TRITON_SELFCHECK"
#: Largest error of a build against the float64 reference, relative to each tensor's scale.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 6e-2}
#: 16 bits: a build also passes within this multiple of the reference kernel's own error in its dtype
#: (the tests' bound for the 16-bit Triton rows).
FACTOR16 = 2.5

_VERDICTS: dict[tuple[Any, ...], str | None] = {}  # build -> None (passed) or why it failed
_REFERENCE = ReferenceKernel()

Run = Callable[..., KernelOut]


def enabled() -> bool:
    """Whether builds are checked (``LSTMKIT_TRITON_SELFCHECK`` is not "0")."""
    return os.environ.get(ENV, "1") != "0"


def build_key(spec: CellSpec, dtype: torch.dtype, B: int, H: int, H_out: int, projection: bool,
              device: torch.device | None = None) -> tuple[Any, ...]:
    """A Triton build: the variant's flag word, the dtype and the way the time loop runs."""
    from lstmkit.kernels.triton_impl import Variant, choose_path

    flags = abi.flags(spec)
    return (flags, dtype, choose_path(Variant.from_flags(flags), B, H, H_out, dtype, projection, device, spec.heads,
                                       bool(spec.gate_hidden)))


def _describe(spec: CellSpec, key: tuple[Any, ...]) -> str:
    return f"cell {spec.name!r}, {str(key[1]).removeprefix('torch.')}, {key[2]} path"


def verdict(run: Run, spec: CellSpec, x: Tensor, h0: Tensor, c0: Tensor | None, params: dict[str, Tensor],
            hidden_size: int) -> str | None:
    """None if the build this call uses is good (checked now, the first time); else why not,
    after one warning. ``run`` is the Triton row's own run (without the check)."""
    proj = params["weight_hr"].shape[0] if "weight_hr" in params else 0
    key = build_key(spec, x.dtype, x.shape[1], hidden_size, h0.shape[-1], proj > 0, x.device)
    if key not in _VERDICTS:
        why = _check(run, spec, x, h0, c0, params, hidden_size)
        _VERDICTS[key] = why
        if why is not None:
            warnings.warn(f"lstmkit: the Triton build for {_describe(spec, key)} failed its self-check against the "
                          f"reference kernel ({why}); layers that need it run on the 'reference' kernel (slower, not "
                          f"wrong). {ENV}=0 skips the check", RuntimeWarning, stacklevel=4)
    return _VERDICTS[key]


def _check(run: Run, spec: CellSpec, x: Tensor, h0: Tensor, c0: Tensor | None, params: dict[str, Tensor],
           H: int) -> str | None:
    """Two steps of the layer's sizes on the build and on the float64 reference: outputs,
    states and the gradients of the input, the states and every parameter."""
    g = torch.Generator().manual_seed(0)
    T, B = 2, x.shape[1]

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5

    c0_check = None
    if c0 is not None:  # the cell's S states side by side (the sLSTM: c, n > 0, m)
        c0_check = rand(B, c0.shape[-1])
        if variants.cell_states(spec)[1:2] == ("n",):
            c0_check[:, H:2 * H] = c0_check[:, H:2 * H].abs() + 0.2
    data = {"x": rand(T, B, x.shape[-1]), "h0": rand(B, h0.shape[-1]), "c0": c0_check}
    # what the build's dtype holds exactly, so that the float64 truth sees the build's own inputs
    data = {k: None if v is None else v.to(x.dtype).double() for k, v in data.items()}
    weights = {k: v.detach().double().cpu() for k, v in params.items()}
    # whatever context the first call comes in (no_grad, inference_mode, autocast), the check
    # differentiates in the build's own dtype
    context = contextlib.ExitStack()
    context.enter_context(torch.inference_mode(False))
    context.enter_context(torch.enable_grad())
    for device_type in {x.device.type, "cpu"}:
        context.enter_context(torch.autocast(device_type, enabled=False))
    sixteen_bit = x.dtype in (torch.bfloat16, torch.float16)
    try:
        with context:
            build = _results(run, spec, H, data, weights, x.device, x.dtype)
            truth = _results(_REFERENCE.run, spec, H, data, weights, torch.device("cpu"), torch.float64)
            same_dtype = _results(_REFERENCE.run, spec, H, data, weights, x.device, x.dtype) if sixteen_bit else {}
    except Exception as exc:  # noqa: BLE001 - a build that fails to compile or launch is a verdict too
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    tol = TOLERANCE.get(x.dtype, 1e-4)
    for name, want in truth.items():
        err = _relative_error(build[name], want)
        bound = max(tol, FACTOR16 * _relative_error(same_dtype[name], want)) if sixteen_bit else tol
        if not err <= bound:  # NaN included
            return f"{name} differs by {err:.2g} of its scale (tolerance {bound:.2g})"
    return None


def _relative_error(have: Tensor, want: Tensor) -> float:
    """max|have - want| relative to want's scale (at least 1e-3)."""
    if not want.numel():
        return 0.0
    return (have - want).abs().max().item() / max(want.abs().max().item(), 1e-3)


def _results(kernel_run: Run, spec: CellSpec, H: int, data: dict[str, Tensor | None], weights: dict[str, Tensor],
             device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """One kernel's outputs, states and gradients on ``device`` in ``dtype``, as float64 CPU tensors."""
    # copies (clone): the originals may be inference tensors of the caller's inference_mode
    p = {k: v.to(device, dtype).clone().requires_grad_(True) for k, v in weights.items()}
    ins = {k: None if v is None else v.to(device, dtype).clone().requires_grad_(True) for k, v in data.items()}
    out = kernel_run(ins["x"], None, ins["h0"], ins["c0"], p, spec, H)
    got = {"y": out.y, "h_n": out.h_n} | ({"c_n": out.c_n} if out.c_n is not None else {})
    loss = sum((t.double() * torch.linspace(-1, 1, t.numel(), dtype=torch.float64, device=device)
                .view_as(t)).sum() for t in got.values())
    wrt = {k: v for k, v in ins.items() if v is not None} | {f"d_{k}": v for k, v in p.items()}
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    got |= {f"grad {k}": (gr if gr is not None else torch.zeros_like(v)) for (k, v), gr in zip(wrt.items(), grads)}
    return {k: v.detach().double().cpu() for k, v in got.items()}
