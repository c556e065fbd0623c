"""The per-step GEMMs of the Triton rows' time loop, in torch (cuBLAS on a GPU).

The recurrent product ``h W_hhᵀ`` and its two gradients — with heads (block-diagonal recurrent
weights) as GEMMs batched over the heads — and one GEMM in the compute dtype, 16-bit operands
accumulating in float32. Used by :mod:`lstmkit.kernels.triton_impl` (the time loop) and
:mod:`lstmkit.kernels.triton_deep` (the deep gates' MLP layers).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mm", "Recurrent", "recurrent", "recurrent_grad_h", "recurrent_grad_w", "DENSE_HEADS_MAX"]

#: Heads: the most elements ``R·H_out`` of the dense matrix that one call expands the block-diagonal
#: recurrent weights into (then each step is one plain GEMM, k times the products, no copies).
DENSE_HEADS_MAX = 1 << 22

_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=) for 16-bit CUDA GEMMs (torch >= 2.8)


def mm(a: Tensor, b: Tensor, ct: torch.dtype) -> Tensor:
    """``a @ b`` in the compute dtype ``ct``: 16-bit operands accumulate in float32 (cuBLAS
    with a float32 result; on the CPU, the interpreter's stand-in, exact float32 products)."""
    global _MM_OUT_DTYPE
    if a.dtype == ct:
        return torch.mm(a, b)
    if a.is_cuda and _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=ct)
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE = False
    return torch.mm(a.to(ct), b.to(ct))


def _blocks(w_hh: Tensor, k: int, n: int, ct: torch.dtype) -> Tensor:
    """Stored (n_G·n, HO/k) recurrent rows of gates each n rows wide as their blocks
    (n_G, k, n/k, HO/k): gate g, head j."""
    return w_hh.to(ct).view(w_hh.shape[0] // n, k, n // k, w_hh.shape[1])


def _runs(widths: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """The gates' row blocks of ``W_hh`` grouped into runs of equal width: ``(first row, rows,
    width)`` — one run when every gate is H rows wide, more with deep gates (n_1 rows each)."""
    out: list[tuple[int, int, int]] = []
    row = 0
    for w in widths:
        if out and out[-1][2] == w:
            out[-1] = (out[-1][0], out[-1][1] + w, w)
        else:
            out.append((row, w, w))
        row += w
    return out


def recurrent(h: Tensor, w_hh: Tensor, k: int, widths: tuple[int, ...], ct: torch.dtype) -> Tensor:
    """``r = h W_hhᵀ`` (B, R) in ``ct``: with k heads block j of each gate (``widths``: the gates'
    rows) reads head j of ``h`` (B, HO) (a batched GEMM over the heads; the zeros off the
    diagonal are not multiplied)."""
    if k == 1:
        return mm(h, w_hh.t(), ct)
    hk = h.to(ct).view(h.shape[0], k, -1)                                     # (B, k, HO/k)
    return torch.cat([torch.einsum("bje,gjde->bgjd", hk, _blocks(w_hh[r0:r0 + n], k, w, ct)).reshape(h.shape[0], -1)
                      for r0, n, w in _runs(widths)], -1)


def recurrent_grad_h(dz: Tensor, w_hh: Tensor, k: int, widths: tuple[int, ...], ct: torch.dtype) -> Tensor:
    """``dz W_hh`` (B, HO) in ``ct`` for ``dz`` (B, R): the gradient that reaches ``h_{t-1}``."""
    if k == 1:
        return mm(dz, w_hh, ct)
    out = None
    for r0, n, w in _runs(widths):
        blocks = _blocks(w_hh[r0:r0 + n], k, w, ct)
        dzk = dz[:, r0:r0 + n].to(ct).reshape(dz.shape[0], blocks.shape[0], k, w // k)  # (B, n_G, k, w/k)
        part = torch.einsum("bgjd,gjde->bje", dzk, blocks).reshape(dz.shape[0], -1)
        out = part if out is None else out + part
    return out.contiguous()  # (einsum's result need not be row-major: at H_out / k = 1 its rows were strided)


def recurrent_grad_w(dz: Tensor, h_prev: Tensor, k: int, widths: tuple[int, ...]) -> Tensor:
    """``Σ dzᵀ h_{t-1}`` over the rows of ``dz`` (N, R) and ``h_prev`` (N, HO), stored as ``w_hh``
    is: (R, HO) for one head, each row's block (R, HO/k) for k."""
    if k == 1:
        return torch.mm(dz.t(), h_prev)
    N, HO = dz.shape[0], h_prev.shape[1]
    hk = h_prev.view(N, k, HO // k)
    return torch.cat([torch.einsum("ngjd,nje->gjde", dz[:, r0:r0 + n].reshape(N, n // w, k, w // k), hk)
                      .reshape(n, HO // k) for r0, n, w in _runs(widths)])


class Recurrent:
    """One call's per-step recurrent products ``h W_hhᵀ`` (:meth:`forward`) and ``dz W_hh``
    (:meth:`grad_h`), in the compute dtype ``ct``.

    With heads (``k`` > 1) the batched form (:func:`recurrent`) costs, per step, a GEMM batched over
    the heads and two or three copies around it (einsum's permutes of the weights and of the result,
    and ``torch.cat``): an H100 profile of the sLSTM at (B, T, I, H) = (64, 100, 256, 256), 4 heads,
    showed two elementwise launches and one device copy per step, 0.52 of a call's 1.27 ms of kernel
    time, beside a 0.38 ms GEMM. When every gate has the same rows (no deep gate of another width) and
    the dense matrix has at most :data:`DENSE_HEADS_MAX` elements, the blocks are expanded once per
    call into the dense (R, H_out) matrix with zeros off the diagonal, and each step is one plain GEMM:
    k times the products, which at these sizes cost less than the launches they replace.
    """

    def __init__(self, w_hh: Tensor, k: int, widths: tuple[int, ...], ct: torch.dtype) -> None:
        self.w_hh, self.k, self.widths, self.ct = w_hh, k, widths, ct
        R, e = w_hh.shape                                                     # e = H_out / k
        self.expand = k > 1 and len(set(widths)) == 1 and R * e * k <= DENSE_HEADS_MAX
        self._dense: Tensor | None = None                                     # (R, H_out), on first use

    @property
    def dense(self) -> Tensor | None:
        """The dense (R, H_out) recurrent weights, if this call expands them (made on first use)."""
        if self.expand and self._dense is None:
            R, e = self.w_hh.shape
            k, w = self.k, self.widths[0]                                     # every gate's rows
            blocks = _blocks(self.w_hh, k, w, self.w_hh.dtype)                # (G, k, w/k, e): gate g's block j
            dense = blocks.new_zeros((R // w, k, w // k, k, e))               # (G, k, w/k, k, e)
            dense.diagonal(dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))  # block j in head j's columns
            self._dense = dense.view(R, k * e)                                # device work only (graph capture)
        return self._dense

    def forward(self, h: Tensor) -> Tensor:
        """``h W_hhᵀ`` (B, R) for h (B, H_out)."""
        dense = self.dense
        if dense is not None:
            return mm(h, dense.t(), self.ct)
        return recurrent(h, self.w_hh, self.k, self.widths, self.ct)

    def grad_h(self, dz: Tensor) -> Tensor:
        """``dz W_hh`` (B, H_out) for dz (B, R): the gradient that reaches ``h_{t-1}``."""
        dense = self.dense
        if dense is not None:
            return mm(dz, dense, self.ct)
        return recurrent_grad_h(dz, self.w_hh, self.k, self.widths, self.ct)
