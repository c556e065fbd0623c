"""FLOP counts of the recurrence operators, for ``torch.utils.flop_counter.FlopCounterMode``.

torch counts the FLOPs of matrix products (``mm``, ``addmm``, ``bmm``, convolutions, attention:
2·M·N·K each) and nothing else. The recurrence operators hide a layer's per-step products inside
one call, so without a formula a FLOP count of an lstmkit model holds the input projection
(``x W_ihᵀ``, an ``addmm``) and misses every recurrent product. The formulas here count what
the kernels multiply, in the same convention:

- forward, per step and row: ``h W_hhᵀ`` (R × H_out/k: heads multiply their blocks only), the
  projection ``m W_hrᵀ`` (P × H), fgr's ``s W_ggᵀ``, and every deep-gate layer ``a_j W_jᵀ``
  (n_{j+1} × n_j): 2 FLOPs per weight element, so ``2·T·B·(weights read per step)``;
- backward: each of those products twice, once for the input's gradient and once for the
  weight's (``dA = dC W``, ``dW = dCᵀ A``), as torch counts an ``mm``'s backward.

Every step of the (T, B) batch is counted, as for a padded batch: ``lengths`` shorter than T
skip work that the count still holds (a FLOP count is a function of shapes, not values). The
backward's count holds the products for the initial states' gradients, which the fused kernels
compute whether or not they are asked for (a reference loop's count lacks them where ``h0`` needs
no gradient). A forward run outside the counting mode runs its backward straight on the kernel:
a ``FlopCounterMode`` around that backward alone sees none of it.

``torch.utils.flop_counter`` takes 0.3 s to import, more than lstmkit itself; the formulas are
registered when that module is imported or reloaded (:func:`register_when_imported`), or at once
where it has been. A ``FlopCounterMode`` copies the registered formulas when it is made, so one made
before ``import lstmkit`` counts none of them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

from lstmkit.kernels import abi

__all__ = ["step_weight_elements", "recurrence_flops", "recurrence_backward_flops", "register_when_imported"]

_COUNTER = "torch.utils.flop_counter"


def step_weight_elements(w_hh_shape: Sequence[int], params: dict[str, Sequence[int]], mlp_layout: Sequence[int],
                         hidden_size: int) -> int:
    """The weight elements one step multiplies per row: ``w_hh`` (R, H_out/k) and the 2-D
    parameters of :data:`~lstmkit.kernels.abi.PARAMS` (``weight_hr``, ``weight_gg``), and the
    deep gates' layer matrices W_j (n_{j+1} × n_j; the flat ``mlp`` param also holds biases).

    Args:
        w_hh_shape: ``w_hh``'s shape.
        params: name (:data:`~lstmkit.kernels.abi.PARAMS`) -> shape; empty shapes where absent.
        mlp_layout: :func:`~lstmkit.kernels.abi.mlp_layout` (``[]`` without deep gates).
        hidden_size: H.
    """
    elements = w_hh_shape[0] * w_hh_shape[1]
    for name in ("weight_hr", "weight_gg"):
        shape = params.get(name, ())
        if len(shape) == 2:
            elements += shape[0] * shape[1]
    for gate in abi.decode_mlp(list(mlp_layout), hidden_size).gates:
        elements += sum(n_in * n_out for n_in, n_out in zip(gate.widths[:-1], gate.widths[1:]))
    return elements


def _arguments(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by their names in ``op``'s schema (positional or keyword)."""
    names = [a.name for a in op.default._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


def _step_elements(a: dict[str, Any]) -> int:
    return step_weight_elements(a["w_hh"], {n: a[n] for n in abi.PARAMS}, a["mlp_layout"] or [], a["hidden_size"])


def recurrence_flops(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of one ``lstmkit::recurrence`` call (tensors given as their shapes): 2·T·B per
    weight element a step multiplies (:func:`step_weight_elements`)."""
    import torch

    a = _arguments(torch.ops.lstmkit.recurrence, args, kwargs)
    steps, batch = a["xg"][0], a["xg"][1]
    return 2 * steps * batch * _step_elements(a)


def recurrence_backward_flops(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of one ``lstmkit::recurrence_backward`` call: twice the forward's (each product's
    input gradient and weight gradient)."""
    import torch

    a = _arguments(torch.ops.lstmkit.recurrence_backward, args, kwargs)
    steps, batch = a["y"][0], a["y"][1]
    return 2 * 2 * steps * batch * _step_elements(a)


def _register(counter: types.ModuleType) -> None:
    import torch

    formulas = {
        torch.ops.lstmkit.recurrence: recurrence_flops,
        torch.ops.lstmkit.recurrence_backward: recurrence_backward_flops,
    }
    for op, formula in formulas.items():
        if op not in counter.flop_registry:  # once per module object (a reload makes a new registry)
            counter.register_flop_formula(op)(formula)


class _Loader(importlib.abc.Loader):
    """The module's own loader, then ``hook(module)``."""

    def __init__(self, loader: importlib.abc.Loader, hook: Callable[[types.ModuleType], None]) -> None:
        self._loader, self._hook = loader, hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._hook(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, …: the module's own loader's
        if name in ("_loader", "_hook"):  # (not set yet: a copy or an unpickling in progress)
            raise AttributeError(name)
        return getattr(self._loader, name)


class _WhenImported(importlib.abc.MetaPathFinder):
    """Finds module ``name`` through the finders after it and runs ``hook`` on the module each time it
    executes (its import, a reload). It stays in ``sys.meta_path``: a lookup that does not import
    (``importlib.util.find_spec``) must not use it up; for other names it answers None at once."""

    def __init__(self, name: str, hook: Callable[[types.ModuleType], None]) -> None:
        self.name, self.hook = name, hook

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        finders = sys.meta_path
        for finder in finders[finders.index(self) + 1:] if self in finders else ():
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _Loader):
                    spec.loader = _Loader(spec.loader, self.hook)
                return spec
        return None


def register_when_imported() -> None:
    """Register the formulas with ``torch.utils.flop_counter`` now if it is imported, else when it is."""
    counter = sys.modules.get(_COUNTER)
    if counter is not None:
        _register(counter)
    elif not any(isinstance(f, _WhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenImported(_COUNTER, _register))
