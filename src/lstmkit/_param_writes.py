"""Writing values into a module's parameters as its calls read them: a plain parameter in place, a
parametrized one (``torch.nn.utils.parametrizations.weight_norm``, ``register_parametrization``)
through its ``right_inverse``, and a weight that a forward pre-hook computes before each call
(``torch.nn.utils.prune``, the hook-based ``weight_norm``) refused, since the next call would
overwrite the write — for the gates' setters (:mod:`lstmkit.gates`) and the converters that load
arrays into a layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lstmkit.checks import check_dense
from lstmkit.kernels.base import FLOAT_DTYPES

__all__ = ["check_value", "require_values", "write_rows"]


def check_value(what: str, value: Any, shape: tuple[int, ...], dtype: torch.dtype, context: str = "") -> None:
    """TypeError / ValueError naming ``what`` (``"W"``, ``"b"``; ``context`` follows the expected
    shape in its message, e.g. " for the forget gate") unless ``value`` can be written
    into a layer of ``dtype``: a dense tensor with values (not a number, a NumPy array, a meta,
    sparse or quantized tensor), of a floating dtype (complex, integer and bool values are not
    cast), of ``shape``, every value finite once in ``dtype`` (1e300 is inf as float32) — as the
    converters refuse non-finite weights: a NaN would make every later call return NaN."""
    if not isinstance(value, Tensor):
        example = f"torch.full({shape}, 1.0)" if len(shape) == 1 else f"torch.zeros{shape}"
        convert = "torch.from_numpy(array)" if type(value).__module__ == "numpy" else example
        raise TypeError(f"{what}: expected a tensor of shape {shape}, got {type(value).__name__}; "
                        f"convert it, e.g. {convert}")
    check_dense(value, what, values=True)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: expected a floating-point tensor ({', '.join(map(str, FLOAT_DTYPES))}), got "
                        f"{value.dtype}; complex, integer and bool values are not cast")
    if tuple(value.shape) != shape:
        raise ValueError(f"{what}: expected shape {shape}{context}, got {tuple(value.shape)}")
    finite = torch.isfinite(value.detach().to(dtype))
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        raise ValueError(f"{what}: contains NaN or inf as {dtype} ({len(bad)} of {value.numel()} values, first at "
                         f"{tuple(int(j) for j in bad[0])}; a value beyond the dtype's range becomes inf)")


def _computed_by(module: nn.Module, name: str) -> tuple[str, str]:
    """What computes ``name`` (not a parameter of ``module``) before each call, and the way out."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod) and getattr(hook, "_tensor_name", None) == name:
            return (f"torch.nn.utils.prune from {name}_orig and {name}_mask",
                    f"make the pruning permanent first (torch.nn.utils.prune.remove(layer, {name!r})), or write "
                    f"into {name}_orig yourself")
        if isinstance(hook, WeightNorm) and hook.name == name:
            return (f"the hook-based torch.nn.utils.weight_norm from {name}_g and {name}_v",
                    f"remove it first (torch.nn.utils.remove_weight_norm(layer, {name!r})), or use "
                    f"torch.nn.utils.parametrizations.weight_norm, which takes writes")
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return (f"the hook-based torch.nn.utils.spectral_norm from {name}_orig",
                    f"remove it first (torch.nn.utils.remove_spectral_norm(layer, {name!r}))")
    return "something other than the module's parameters (e.g. a forward pre-hook)", "write into its source"


def _tolerance(dtype: torch.dtype) -> float:
    """How far a value written through a parametrization may read back: a few roundings."""
    return 8 * torch.finfo(dtype).eps


def require_values(module: nn.Module, what: str = "layer") -> None:
    """ValueError naming ``what`` where ``module``'s parameters are on the meta device (no values to
    read or write): before any work, instead of torch's "Cannot copy out of meta tensor" from deep
    inside, or writes that do nothing."""
    if any(p.is_meta for p in module.parameters()):
        raise ValueError(f"{what}: the layer's parameters are on the meta device and hold no values; give it "
                         f"weights first (layer.to_empty(device='cpu'), then load_state_dict)")


def write_rows(module: nn.Module, writes: list[tuple[str, slice, Tensor]], what: str) -> None:
    """For each ``(name, rows, value)`` of ``writes``, write ``value`` into rows ``rows`` (a slice of
    the first dimension) of ``module``'s parameter ``name`` as a call reads it; every write is
    checked possible first, and a failed one undoes those before it.

    Raises:
        ValueError: naming ``what`` and the parameter, where the value cannot be written: a module
            on the meta device, a weight computed before each call, a parametrization without
            ``right_inverse``, or one that does not read back the value written (``weight_norm``'s
            row of zeros reads back NaN).
    """
    require_values(module, what)
    for name, _, _ in writes:
        if parametrize.is_parametrized(module, name):
            plist = module.parametrizations[name]  # type: ignore[index]
            missing = [type(p).__name__ for p in plist if not hasattr(p, "right_inverse")]
            if missing:
                raise ValueError(f"{what}: parameter {name} is parametrized by {', '.join(missing)}, which has no "
                                 f"right_inverse, so a value cannot be written through it; give it one, or remove "
                                 f"the parametrization (torch.nn.utils.parametrize.remove_parametrizations(layer, "
                                 f"{name!r})) and write then")
        elif not isinstance(module._parameters.get(name), Tensor):
            source, way_out = _computed_by(module, name)
            raise ValueError(f"{what}: {name} is not a parameter but a tensor computed before each call by "
                             f"{source}: a write into it would be lost at the next call; {way_out}")
    undo: list[Callable[[], None]] = []
    with torch.no_grad():
        try:
            for name, sl, rows in writes:
                undo.append(_write_one(module, name, sl, rows, what))
        except BaseException:
            for restore in reversed(undo):
                restore()
            raise


def _write_one(module: nn.Module, name: str, sl: slice, rows: Tensor, what: str) -> Callable[[], None]:
    """One write of :func:`write_rows` (under no_grad); returns what undoes it."""
    if not parametrize.is_parametrized(module, name):
        param = module._parameters[name].detach()  # type: ignore[union-attr]
        old = param[sl].clone()
        param[sl].copy_(rows)
        return lambda: param[sl].copy_(old)
    plist = module.parametrizations[name]  # type: ignore[index]
    saved = {k: v.detach().clone() for k, v in plist.state_dict(keep_vars=True).items()}

    def restore() -> None:
        for k, v in plist.state_dict(keep_vars=True).items():
            v.detach().copy_(saved[k])

    full = getattr(module, name).detach().clone()
    full[sl] = rows.to(full)
    setattr(module, name, full)  # torch passes it to the parametrizations' right_inverse
    back = getattr(module, name).detach()
    tol = _tolerance(full.dtype)
    scale = max(float(full.abs().max()), 1.0) if full.numel() else 1.0
    finite = bool(torch.isfinite(back).all())
    if not (finite and bool(((back - full).abs() <= tol * scale).all())):
        restore()
        off = "NaN or inf" if not finite else f"values up to {float((back - full).abs().max()):.3g} off"
        zeros = "" if finite else " (weight_norm cannot hold a row of zeros: its norm is 0)"
        raise ValueError(f"{what}: parameter {name} is parametrized ({', '.join(type(p).__name__ for p in plist)}); "
                         f"written through its right_inverse it reads back as {off}: the parametrization cannot "
                         f"hold this value{zeros}. The layer is left unchanged; write a value it can hold, or "
                         f"remove the parametrization first (torch.nn.utils.parametrize.remove_parametrizations("
                         f"layer, {name!r}))")
    return restore
