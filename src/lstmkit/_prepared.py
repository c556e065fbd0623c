"""What the modules share about their prepared steps (:class:`lstmkit.kernels.fused.PreparedStep`):
the parameters a call reads, whether a call may take the prepared road, and a base class that
forgets the kept steps where they would hold stale or swapped tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from lstmkit import kernels
from lstmkit.checks import check_backend
from lstmkit.kernels.base import Kernel
from lstmkit.kernels.fused import PreparedStep
from lstmkit.spec import CellSpec


class PreparedModule(nn.Module):
    """A module keeping prepared steps (``_prepared``, whose kept signatures hold its parameters):
    forgotten when the parameters are converted or loaded (so that torch may swap them, under
    ``torch.__future__.set_swap_module_params_on_conversion``) and when ``backend`` is set."""

    _prepared: PreparedStep
    spec: CellSpec

    def freeze_prepared(self) -> None:
        """Mark the kept steps frozen (:func:`lstmkit.freeze`): their weights no longer change,
        so the compiled kernel may keep them packed."""
        self._prepared.frozen = True

    def _call_version(self) -> tuple[int, int]:
        """A call's version for its signature (:meth:`PreparedStep.signature`), taken at its start,
        before the kernel is chosen: the kernel registry's version and the kept steps' generation."""
        return kernels.registry_version(), self._prepared.generation

    def _forget_prepared(self) -> None:
        prepared = self.__dict__.get("_prepared")  # (none yet while __init__ runs)
        if prepared is not None:
            prepared.clear()

    @property
    def backend(self) -> str | Kernel | None:
        """The kernel row forced by name (None: chosen per call), checked when set; or a
        :class:`~lstmkit.kernels.base.Kernel` instance, which ``kernels.select`` takes as it is."""
        return self._backend

    @backend.setter
    def backend(self, value: str | Kernel | None) -> None:
        self._backend = value if isinstance(value, Kernel) else check_backend(value, self.spec)
        self._forget_prepared()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._forget_prepared()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._forget_prepared()
        super()._load_from_state_dict(*args, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "backend" in state:  # pickled while backend was a plain attribute
            state["_backend"] = state.pop("backend")
        super().__setstate__(state)


def call_hooked(module: nn.Module, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` as a call of ``module`` (a method other than ``forward``: ``LSTM.step``): its
    forward pre-hooks and torch's global ones see ``args`` first and may replace them — pruning
    and the hook-based weight normalisation compute their weights there — and its forward hooks
    see the output and may replace it, as ``module(...)`` runs them around ``forward``. Hooks
    registered ``with_kwargs`` get no keyword arguments."""
    pre, post = module._forward_pre_hooks, module._forward_hooks
    global_pre, global_post = _torch_module._global_forward_pre_hooks, _torch_module._global_forward_hooks
    if not (pre or post or global_pre or global_post):
        return fn(*args)
    for hook_id, hook in (*global_pre.items(), *pre.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, {})
            if result is not None:
                args = result[0]
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    output = fn(*args)
    with_kwargs = {**module._forward_hooks_with_kwargs, **_torch_module._global_forward_hooks_with_kwargs}
    for hook_id, hook in (*global_post.items(), *post.items()):
        kwargs = hook_id in with_kwargs
        result = hook(module, args, {}, output) if kwargs else hook(module, args, output)
        if result is not None:
            output = result
    return output


def parameters_now(module: nn.Module, names: Any) -> dict[str, Tensor]:
    """A module's parameters by name as a call reads them: ``_parameters`` itself (where
    ``torch.func.functional_call`` swaps tensors too), or where parametrizations are registered
    (``weight_norm``, ``spectral_norm``, ``register_parametrization``) or a name is no parameter
    (the hook-based ``torch.nn.utils.weight_norm`` sets a computed tensor before each call) each
    of ``names`` (name -> shape) as ``getattr`` gives it."""
    own = module._parameters
    if "parametrizations" not in module._modules and names.keys() <= own.keys():
        return own  # type: ignore[return-value]
    return {name: getattr(module, name, None) for name in names}


def prepared_road(module: nn.Module) -> bool:
    """Whether a call may take (and keep) the prepared step: eager, and with no parametrization,
    whose tensors are computed anew on every call (compile and export trace the general path)."""
    return not torch.compiler.is_compiling() and "parametrizations" not in module._modules
