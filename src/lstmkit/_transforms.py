"""Which torch transforms are active around a call: functions the cell's equations and the
kernels both ask (the lowest layer, so that both can)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["forward_mode_active", "vmapped"]


def forward_mode_active() -> bool:
    """Whether a forward-mode derivative is being taken: a ``torch.autograd.forward_ad`` dual level
    is open, or a ``torch.func`` jvp transform (``jvp``, ``jacfwd``, ``hessian``) is on the stack.
    False while compile or export traces (which take no forward-mode derivative of the operator)."""
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    functorch = torch._C._functorch
    if functorch.peek_interpreter_stack() is None:
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == functorch.TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def vmapped(t: Tensor) -> bool:
    """True if ``t`` is batched by ``torch.func.vmap`` at any level of functorch wrapping (a batched
    tensor has no single truth value: no Python ``if`` on its data)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False
