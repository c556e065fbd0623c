"""A layer's initial parameters: torch's uniform draw, the layer norms' and deep gates' own, and
the spec's initial gate biases (``ib=``, ``fb=``, ``ob=``, ``chrono=``) — for the layers and the
cell alike."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lstmkit.spec import CellSpec, gate_slices

__all__ = ["reset_parameters"]


def reset_parameters(module: nn.Module, layers: list[dict[str, str]], spec: CellSpec, hidden_size: int) -> None:
    """torch's initialisation of ``module``'s parameters, U(−1/√H, 1/√H), but the layer norms' (1
    and 0) and a deep gate's layers from ``mlp_{k}_weight2`` on (U(−1/√fan_in, 1/√fan_in);
    ``mlp_{k}_weight1`` and ``bias1`` take U(−1/√H, 1/√H)), then the spec's initial
    gate biases; ``layers``: per layer-direction, each parameter's name without suffix → its name
    in ``module``."""
    stdv = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for names in layers:
            for base, full in names.items():
                w = getattr(module, full)
                if base.startswith("ln_"):
                    w.fill_(0.0 if base.endswith("bias") else 1.0)
                elif base.startswith("mlp_") and not base.endswith(("weight1", "bias1")):
                    fan_in = getattr(module, names[base.replace("bias", "weight")]).shape[1]
                    bound = 1.0 / math.sqrt(fan_in)
                    w.uniform_(-bound, bound)
                else:
                    w.uniform_(-stdv, stdv)
            _init_gate_biases(module, names, spec, hidden_size)


def _init_gate_biases(module: nn.Module, names: dict[str, str], spec: CellSpec, hidden_size: int) -> None:
    """The spec's initial gate biases (``ib=``, ``fb=``, ``ob=``, ``chrono=``).

    The value goes where it adds directly to the gate's pre-activation ``u_k``:
    ``bias_ih``'s rows of gate k (``bias_hh``'s rows set to 0), or the last bias of a
    deep gate's MLP. Chrono (Tallec & Ollivier 2018) draws ``b_f = log u``,
    ``u ~ U[1, T_max − 1]`` per cell from torch's generator, and sets ``b_i = −b_f``.
    """
    values: dict[str, float | Tensor] = dict(spec.init_biases)
    if spec.chrono is not None:
        w = getattr(module, names["weight_ih"])
        draw = torch.float64 if w.dtype == torch.float64 else torch.float32  # (a 16-bit U[1, T_max - 1] is coarse)
        b_f = torch.empty(hidden_size, dtype=draw, device=w.device)
        b_f = b_f.uniform_(1.0, spec.chrono - 1.0).log_().to(w.dtype)
        values.update(f=b_f, i=-b_f)
    rows = gate_slices(spec, hidden_size)
    for gate, value in values.items():
        deep = spec.hidden_widths(gate)
        if deep:
            getattr(module, names[f"mlp_{gate}_bias{len(deep)}"]).copy_(
                torch.as_tensor(value).expand(hidden_size))
            continue
        getattr(module, names["bias_ih"])[rows[gate]] = value
        getattr(module, names["bias_hh"])[rows[gate]] = 0.0
