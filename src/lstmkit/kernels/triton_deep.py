"""Deep gates on the Triton rows' per-step path: each deep gate's MLP between the recurrent GEMM
and the cell's pointwise kernel, forwards and backwards, in torch (cuBLAS GEMMs on a GPU).

A deep gate k is an MLP over ``[x, h]`` (:func:`lstmkit.cell.step`): its first layer is its n_1
rows of ``W_ih`` / ``W_hh`` (so ``z_k = xg_t + h W_hhᵀ`` on its columns, or with layernorm
``LN(a) g_ih + LN(r) g_hh + b`` on them), then ``a_1 = φ(z_k)``, ``u = a_j W_jᵀ + b_j`` layer by
layer with ``a_{j+1} = φ(u)`` between them; its last output (H wide) is the gate's
pre-activation. :class:`DeepGates` computes the (B, G·H) pre-activations of every gate — a deep
gate's MLP output, a shallow gate's ``z`` — which the variant's own pointwise kernel reads in
place of ``xg + r`` (its ``READY``: with layernorm, already normalised), keeps what backward
needs in the operator's buffers (``MLP``: every a_j; layernorm: ``AH``, ``RH``, ``AS``, ``RS`` per
gate's columns, as the CPU kernel keeps them), and takes the kernel's dL/du back to the first
layers' dL/dz (the input side's gradient, and through the recurrent GEMM to ``h_{t-1}``) and to
the parameters.

The common shapes — every deep gate with one hidden layer, all of one width n_1 ≤
:data:`FUSED_MAX_WIDTH`, no layer norm: every computed gate (``deep=32``) or some of them
(``gate_hidden={"f": (32,)}``) — run as one Triton launch per step each way
(:mod:`lstmkit.kernels.triton_deep_kernels`) instead of some five torch operations per deep
gate and step (an H100 at (B, T, I, H) = (64, 100, 256, 256): 12 elementwise launches per
step, 1.8 of a call's 4.3 ms of kernel time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lstmkit import cell
from lstmkit.kernels import abi
from lstmkit.kernels.triton_gemm import mm
from lstmkit.layout import GATES

__all__ = ["DeepGates", "FUSED_MAX_WIDTH"]

#: The widest first layer n_1 the fused kernels take (their (rows, n_1) tiles live in registers).
FUSED_MAX_WIDTH = 128

#: A launcher: (kernel, grid, arguments, constexpr arguments, num_warps) -> None.
Launch = Callable[[Any, tuple[int, ...], dict[str, Any], dict[str, Any], int], None]


def _phi_grad(phi: str, d: Tensor, a: Tensor) -> Tensor:
    """dL/du of a deep gate's hidden activation a = φ(u) from d = dL/da and a itself."""
    if phi == "tanh":
        return d * (1.0 - a * a)
    if phi == "sigmoid":
        return d * a * (1.0 - a)
    if phi == "relu":
        return torch.where(a > 0, d, 0.0)
    return d


def _layer_norm(x: Tensor) -> tuple[Tensor, Tensor]:
    """Layer norm without gain over the last dim (torch's, as :func:`lstmkit.cell.chunk_layernorm`):
    (x̂, 1/std (…, 1)), the two that backward reads."""
    xhat, _, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, cell.LN_EPS)
    return xhat, rstd


def _layer_norm_grad(dxhat: Tensor, xhat: Tensor, rstd: Tensor) -> Tensor:
    """dL/dx of :func:`_layer_norm` from dL/dx̂."""
    return rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))


def _tiles(B: int, H: int, N1P: int, backward: bool = False, shallow: bool = False) -> tuple[int, int, int]:
    """``(BB, BH, num_warps)`` of the fused kernels. Their (BB, n_1) and (n_1, BH) tiles and the
    float32 products (3xTF32) take registers: wide first layers (n_1 > 32) get at most 32 rows,
    32-cell chunks backwards and 8 warps, the backward kernel (which loops over the cells) at
    most 32 rows always; wider tiles spilled when built for sm_90 (n_1 = 128, 64 rows: 255
    registers and 264-528 bytes of stack). With shallow gates beside the deep ones (``shallow``)
    the backward also takes 32-cell chunks: its 64-cell float32 build, at 255 registers without
    them, spilled 8-16 bytes with the shallow gates' branch (B = 64, H = 64)."""
    wide = N1P > 32
    BB = max(16, min(1 << (B - 1).bit_length(), 32 if wide or backward else 64))
    BH = max(16, min(1 << (H - 1).bit_length(), 32 if (wide or shallow) and backward else 64))
    return BB, BH, 8 if wide else 4


class DeepGates:
    """The deep gates of one call (see the module docstring).

    Args:
        layout: the operator's ``mlp_layout`` (:func:`lstmkit.kernels.abi.mlp_layout`).
        flags: the variant word; H: cells.
        params: the operator's params by :data:`~lstmkit.kernels.abi.PARAMS` name (``mlp``, and
            with layernorm ``ln_ih_weight``, ``ln_hh_weight``, ``bias``).
        op, ct: the GEMM operand dtype and the compute dtype.
        launch, tl_dtypes: the caller's Triton launcher and the kernels' OP, MMA and CT (Triton
            dtypes); with them, the common shape runs fused (the module docstring).
    """

    def __init__(self, layout: list[int], flags: int, H: int, params: dict[str, Tensor], op: torch.dtype,
                 ct: torch.dtype, launch: Launch | None = None, tl_dtypes: tuple[Any, Any, Any] | None = None) -> None:
        self.mlp = abi.decode_mlp(layout, H)
        self.H, self.op, self.ct = H, op, ct
        deep = {g.gate: g for g in self.mlp.gates}
        slots = abi.gate_slots(flags)[0]
        #: per computed gate, in slot order: (its MlpGate or None, slot, first column in R, width)
        self.gates: list[tuple[abi.MlpGate | None, int, int, int]] = []
        col = 0
        for gate in GATES:
            if slots[gate] >= 0:
                mg = deep.get(gate)
                width = mg.widths[0] if mg else H
                self.gates.append((mg, slots[gate], col, width))
                col += width
        self.RZ = len(self.gates) * H                                        # columns of the cell's u
        flat = params["mlp"]
        self.layers: dict[str, list[tuple[Tensor, Tensor | None]]] = {}      # per deep gate: (W_j, b_j)
        for mg in self.mlp.gates:
            self.layers[mg.gate] = [
                (flat[mg.woff[j]:mg.woff[j] + mg.widths[j + 1] * mg.widths[j]].view(mg.widths[j + 1], mg.widths[j])
                 .to(op), flat[mg.boff[j]:mg.boff[j] + mg.widths[j + 1]].to(ct) if mg.boff[j] >= 0 else None)
                for j in range(len(mg.widths) - 1)]
        #: layernorm: the gains g_ih, g_hh and the bias (R,) (None without a bias); None without layernorm
        self.ln: tuple[Tensor, Tensor, Tensor | None] | None = None
        if flags & abi.flag("layernorm"):
            bias = params["bias"]
            self.ln = (params["ln_ih_weight"].to(ct), params["ln_hh_weight"].to(ct),
                       bias.to(ct) if bias.numel() else None)
        #: the fused kernels' launcher, constexprs, flat weights and their runtime sizes (R, ATOT,
        #: WSTRIDE: triton_deep_kernels); None: torch runs every gate
        self.fused: tuple[Launch, dict[str, Any], Tensor, dict[str, int]] | None = None
        plan = self._fused_plan()
        if launch is not None and tl_dtypes is not None and plan is not None:
            n1, deep_mask, sizes = plan
            OP, MMA, CT = tl_dtypes
            phi = self.mlp.phi
            consts = dict(N1=n1, N1P=max(16, 1 << (n1 - 1).bit_length()), DEEP=deep_mask,
                          SHALLOW=deep_mask != (1 << len(self.gates)) - 1, SIGMOID=phi == "sigmoid",
                          IDENTITY=phi == "identity", RELU=phi == "relu", OP=OP, MMA=MMA, CT=CT)
            self.fused = (launch, consts, flat.contiguous(), sizes)

    def _fused_plan(self) -> tuple[int, int, dict[str, int]] | None:
        """If this call has the fused kernels' shape — every deep gate with one hidden layer, all
        of one width n_1 ≤ FUSED_MAX_WIDTH, no layer norm, the d-th deep gate's W_d, b_d and hidden
        activations at d times one stride in the flat ``mlp`` param and the MLP buffer, gates in R
        slot by slot — then n_1, the mask of the deep gates' slots and the kernels' sizes R (the
        first layers' columns), ATOT (the MLP buffer's) and WSTRIDE; else None."""
        deep = [mg for mg, *_ in self.gates if mg is not None]
        if self.ln is not None or not deep or any(len(mg.widths) != 2 for mg in deep):
            return None
        n1 = deep[0].widths[0]
        stride = self.H * n1 + (self.H if self.mlp.bias else 0)
        mask, col, d = 0, 0, 0
        for k, (mg, slot, first, width) in enumerate(self.gates):
            if slot != k or first != col:
                return None
            if mg is not None:
                if width != n1 or mg.woff[0] != d * stride or mg.aoff[0] != d * n1:
                    return None
                mask |= 1 << k
                d += 1
            col += width
        if n1 > FUSED_MAX_WIDTH:
            return None
        return n1, mask, dict(R=col, ATOT=d * n1, WSTRIDE=stride)

    @property
    def widths(self) -> tuple[int, ...]:
        """Rows of each computed gate's block of ``W_hh``."""
        return tuple(w for _, _, _, w in self.gates)

    def forward(self, t: int, xg_t: Tensor, r: Tensor, kept: dict[str, Tensor], lengths: Tensor | None) -> Tensor:
        """Step t: from xg_t (B, R) and r = h_{t-1} W_hhᵀ (B, R), the gates' pre-activations
        (B, G·H). ``kept``: this step's rows of the buffers to fill (``MLP`` (B, atot); layernorm
        ``AH``, ``RH`` (B, R), ``AS``, ``RS`` (B, G)), zero on rows whose ``lengths`` (B,) int32
        end before t (None: all valid); empty when nothing is kept."""
        H = self.H
        if self.fused is not None:
            return self._forward_fused(t, xg_t, r, kept, lengths)
        valid = lengths > t if lengths is not None else None

        def keep(name: str, cols: slice, value: Tensor) -> None:
            if name in kept:
                kept[name][:, cols] = value if valid is None else torch.where(valid[:, None], value, 0.0)

        rz = r.new_empty((r.shape[0], self.RZ))
        for mg, slot, col, width in self.gates:
            cols = slice(col, col + width)
            x_k, r_k = xg_t[:, cols].to(self.ct), r[:, cols]                    # (B, n_1) each
            if self.ln is not None:  # z = LN(a) g_ih + LN(r) g_hh (+ b) on the gate's own columns
                g_ih, g_hh, bias = self.ln
                ah, ars = _layer_norm(x_k)
                rh, rrs = _layer_norm(r_k)
                u = ah * g_ih[cols] + rh * g_hh[cols]
                if bias is not None:
                    u = u + bias[cols]
                keep("AH", cols, ah)
                keep("RH", cols, rh)
                keep("AS", slice(slot, slot + 1), ars)
                keep("RS", slice(slot, slot + 1), rrs)
            else:
                u = x_k + r_k
            if mg is not None:
                for j, (w, b) in enumerate(self.layers[mg.gate]):
                    a = cell.activation(self.mlp.phi, u)                     # (B, n_j)
                    keep("MLP", slice(mg.aoff[j], mg.aoff[j] + mg.widths[j]), a)
                    u = mm(a.to(self.op), w.t(), self.ct)                      # (B, n_{j+1})
                    if b is not None:
                        u += b
            rz[:, slot * H:(slot + 1) * H] = u                                # (B, H)
        return rz

    def _forward_fused(self, t: int, xg_t: Tensor, r: Tensor, kept: dict[str, Tensor],
                       lengths: Tensor | None) -> Tensor:
        """:meth:`forward` as one launch (:func:`~lstmkit.kernels.triton_deep_kernels.deep_forward`)."""
        from lstmkit.kernels.triton_deep_kernels import deep_forward

        launch, consts, flat, sizes = self.fused
        B, G, H = r.shape[0], len(self.gates), self.H
        rz = r.new_empty((B, G * H))                                          # (B, G·H)
        BB, BH, warps = _tiles(B, H, consts["N1P"])
        a_kept = kept.get("MLP")
        none = r.new_empty((0,))
        args = dict(xg=xg_t, xg_ld=xg_t.stride(0), r=r.contiguous(), w=flat,
                    a_kept=a_kept if a_kept is not None else none, rz=rz,
                    lengths=lengths if lengths is not None else none, t=t, B=B, H=H, **sizes)
        launch(deep_forward, (-(-B // BB), -(-H // BH), G), args,
               dict(consts, HAS_BIAS=self.mlp.bias, KEEP=a_kept is not None, HAS_LEN=lengths is not None, BB=BB,
                    BH=BH), warps)
        return rz

    def backward(self, du: Tensor, kept: dict[str, Tensor], dxg: Tensor, dr: Tensor, dz: Tensor,
                 dv: dict[str, list[Tensor]], t: int) -> None:
        """Step t backwards, from the cell kernel's dL/du (B, G·H): each gate's columns of dxg
        (B, R) (the input side's gradient) and, with layernorm, of dr (the raw r's, which the
        recurrent GEMM's backward reads) and dz (of the normalised z, for the gains); a deep
        gate's through its MLP, keeping dL/d(layer j's output) in ``dv[gate][j][t]`` (the last
        layer's is ``du``'s: :meth:`new_grads` made it a view). ``kept``: this step's rows of the
        forward's buffers."""
        H = self.H
        if self.fused is not None:
            self._backward_fused(du, kept["MLP"], dxg)
            return
        for mg, slot, col, width in self.gates:
            d = du[:, slot * H:(slot + 1) * H]                                # (B, H)
            if mg is not None:
                for j in reversed(range(len(mg.widths) - 1)):
                    if j < len(mg.widths) - 2:
                        dv[mg.gate][j][t] = d
                    da = mm(d.to(self.op), self.layers[mg.gate][j][0], self.ct)  # (B, n_j)
                    d = _phi_grad(self.mlp.phi, da, kept["MLP"][:, mg.aoff[j]:mg.aoff[j] + mg.widths[j]])
            cols = slice(col, col + width)
            if self.ln is None:
                dxg[:, cols] = d
                continue
            g_ih, g_hh, _ = self.ln
            dz[:, cols] = d
            dxg[:, cols] = _layer_norm_grad(d * g_ih[cols], kept["AH"][:, cols], kept["AS"][:, slot:slot + 1])
            dr[:, cols] = _layer_norm_grad(d * g_hh[cols], kept["RH"][:, cols], kept["RS"][:, slot:slot + 1])

    def _backward_fused(self, du: Tensor, a_kept: Tensor, dxg: Tensor) -> None:
        """:meth:`backward` as one launch (:func:`~lstmkit.kernels.triton_deep_kernels.deep_backward`)."""
        from lstmkit.kernels.triton_deep_kernels import deep_backward

        launch, consts, flat, sizes = self.fused
        B, G, H = du.shape[0], len(self.gates), self.H
        BB, BH, warps = _tiles(B, H, consts["N1P"], backward=True, shallow=consts["SHALLOW"])
        args = dict(du=du, w=flat, a_kept=a_kept, dxg=dxg, B=B, H=H, **sizes)
        launch(deep_backward, (-(-B // BB), G), args, dict(consts, BB=BB, BH=BH), warps)

    def new_grads(self, du: Tensor) -> dict[str, list[Tensor]]:
        """dv: per deep gate and layer j, (T, B, n_{j+1}); the last layer's is a view of the cell
        kernel's gradient ``du`` (T, B, G·H), which the kernel writes."""
        T, B = du.shape[:2]
        slot = {mg.gate: s for mg, s, _, _ in self.gates if mg is not None}
        return {mg.gate: [torch.empty((T, B, n), dtype=self.ct, device=du.device) for n in mg.widths[1:-1]]
                + [du[:, :, slot[mg.gate] * self.H:(slot[mg.gate] + 1) * self.H]] for mg in self.mlp.gates}

    def weight_grads(self, dv: dict[str, list[Tensor]], acts: Tensor) -> Tensor:
        """The flat ``mlp`` param's gradient: dW_j = Σ_t dv_jᵀ a_j, db_j = Σ_t dv_j (large GEMMs
        over all T·B rows; ``acts`` (T, B, atot), the ``MLP`` buffer)."""
        out = torch.zeros((self.mlp.wtot,), dtype=self.ct, device=acts.device)
        if not acts.numel():                                                 # no step or no row
            return out
        a2 = acts.reshape(-1, acts.shape[-1])                                # (T·B, atot)
        for mg in self.mlp.gates:
            for j, n_out in enumerate(mg.widths[1:]):
                d2 = dv[mg.gate][j].reshape(-1, n_out)                       # (T·B, n_{j+1})
                n_in = mg.widths[j]
                out[mg.woff[j]:mg.woff[j] + n_out * n_in] = torch.mm(d2.t(), a2[:, mg.aoff[j]:mg.aoff[j] + n_in]) \
                    .reshape(-1)
                if mg.boff[j] >= 0:
                    out[mg.boff[j]:mg.boff[j] + n_out] = d2.sum(0)
        return out

    @staticmethod
    def layer_norm_grads(dz: Tensor, ah: Tensor, rh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layernorm: the gradients of g_ih, g_hh and the bias (R,) from dz, â, r̂ (T, B, R)."""
        return (dz * ah).sum((0, 1)), (dz * rh).sum((0, 1)), dz.sum((0, 1))
