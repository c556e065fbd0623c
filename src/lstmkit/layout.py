"""THE gate order and every framework's permutation (the parameter schema built on it is
:func:`lstmkit.spec.layer_param_shapes`).

Every fact about how gates are laid out in memory lives here and nowhere else.

lstmkit stores gates fused, in the order **i, f, g, o** (input, forget, candidate,
output) — the order of ``torch.nn.LSTM`` and Keras. Other frameworks:

============  =============  ==============================================
framework     gate order     notes
============  =============  ==============================================
torch         i, f, g, o     ``weight_ih (4H, I)``, two biases
keras         i, f, c, o     ``kernel (I, 4H)``: transposed, one bias
onnx          i, o, f, c     ``W [D, 4H, I]``, ``B [D, 8H]``, ``P [D, 3H]`` (i, o, f)
tf1 / haste   i, g, f, o     TF1 ``kernel [I+H, 4H]``; forget bias added at run time
flashrnn      i, f, z, o     ``R [4, NH, D, D]``, ``b [4, NH, D]``; heads after gates
xlstm         i, f, z, o     sLSTM cell: layouts per backend (convert/xlstm.py)
============  =============  ==============================================
"""

from __future__ import annotations

import torch

__all__ = [
    "GATES", "GATE_NAMES", "ORDERS", "permutation", "reorder_gates", "suffix",
]

#: Canonical gate letters, in storage order.
GATES: tuple[str, ...] = ("i", "f", "g", "o")
#: Human names of the gates, aligned with :data:`GATES`.
GATE_NAMES: tuple[str, ...] = ("input", "forget", "candidate", "output")

#: Gate order of each framework, in lstmkit's letters (Keras' ``c`` is our ``g``).
ORDERS: dict[str, tuple[str, ...]] = {
    "lstmkit": GATES,
    "torch": ("i", "f", "g", "o"),
    "keras": ("i", "f", "g", "o"),
    "onnx": ("i", "o", "f", "g"),
    "tf1": ("i", "g", "f", "o"),
    "haste": ("i", "g", "f", "o"),
    "flashrnn": ("i", "f", "g", "o"),
    "xlstm": ("i", "f", "g", "o"),
}

#: ONNX stores the peephole weights in this order.
ONNX_PEEPHOLE_ORDER: tuple[str, ...] = ("i", "o", "f")


def permutation(src: str, dst: str) -> list[int]:
    """Indices ``p`` such that ``dst_gates = src_gates[p]`` (gate blocks, not rows)."""
    for name in (src, dst):
        if name not in ORDERS:
            raise ValueError(f"gate order: unknown framework {name!r}; expected one of {list(ORDERS)}")
    return [ORDERS[src].index(g) for g in ORDERS[dst]]


def reorder_gates(t: torch.Tensor, src: str, dst: str, dim: int = 0) -> torch.Tensor:
    """Permute the four gate blocks of ``t`` along ``dim`` from ``src``'s order to ``dst``'s.

    Args:
        t: a tensor whose size along ``dim`` is ``4 * H`` (e.g. a (4H, I) weight).
    """
    n = t.shape[dim]
    if n % 4:
        raise ValueError(f"reorder_gates: dimension {dim} must be 4*H, got size {n}")
    blocks = t.chunk(4, dim=dim)
    return torch.cat([blocks[i] for i in permutation(src, dst)], dim=dim)


def suffix(layer: int, direction: int) -> str:
    """Parameter-name suffix as torch writes it: ``_l0``, ``_l1_reverse``."""
    return f"_l{layer}" + ("_reverse" if direction == 1 else "")
