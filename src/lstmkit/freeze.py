"""A copy of a model for inference whose recurrent layers pack their weights once.

A GEMM reads its weight matrix in panels laid out for the vector unit; BLAS (and the fused
kernel for a sequence) packs them on every call. Over a long sequence that is nothing, but a
decoder, a policy or a stream calls one step at a time, and at B = 32, H = 256 packing the
2 MiB of W_ih and W_hh is about an eighth of a step. :func:`freeze` packs them once.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lstmkit._prepared import PreparedModule

__all__ = ["freeze"]


def freeze(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for inference, its lstmkit layers' weights packed once.

    The copy is in eval mode and none of its parameters requires a gradient; ``module`` itself
    is left as it was (its mode, its parameters, its gradients). Every lstmkit layer in the copy
    (:class:`~lstmkit.LSTM`, :class:`~lstmkit.LSTMCell`, at any depth) that runs the fused CPU
    kernel for inference — one step per call, ``LSTM.step``, or whole sequences — packs W_hh and
    W_ih into the kernel's GEMM panels on its first call of an input signature and reads them
    from there afterwards, instead of packing them (or BLAS packing them) on every call. Results
    are those of the unfrozen module up to rounding (the products are summed in another order).

    The copy's weights are a snapshot: later changes to ``module`` do not reach it; freeze again
    to take them. The copy's own weights are packed again on the next call after an in-place
    change that torch's version counter records (``load_state_dict``, ``copy_`` or an optimizer
    step under ``torch.no_grad()``) or a new tensor set in their place (``.half()`` then
    ``.float()``); an in-place write through ``.data`` (``p.data.copy_(...)``), which the
    counter does not see, is not — freeze again after one. Weights made under ``torch.inference_mode()`` (which keeps no
    version counter) are not packed, nor weights in shared memory (``share_memory()``, or a copy
    received from another process), which another process may write without this process's
    counter knowing: such a layer runs as an unfrozen one.

    Args:
        module: any ``torch.nn.Module``; the lstmkit layers in it are frozen, anything else is
            copied as it is.

    Returns:
        the frozen copy.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    # a copy of a PreparedStep starts with no kept signature; made outside inference mode, the
    # copy's weights are normal tensors, whose version counter tells in-place changes
    with torch.inference_mode(False):
        frozen = copy.deepcopy(module)
    frozen.eval().requires_grad_(False)
    for sub in frozen.modules():
        if isinstance(sub, PreparedModule):
            sub.freeze_prepared()
    return frozen
