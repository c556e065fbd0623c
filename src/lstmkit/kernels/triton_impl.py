"""The Triton implementation of ``lstmkit::recurrence`` and its backward (the GPU's Impl).

What it computes is the CPU kernel's forward and BPTT (``csrc/recurrence.cpp``), with the
same buffers (:data:`lstmkit.kernels.abi.BUFFERS`, shapes :func:`~lstmkit.kernels.abi.buffer_shapes`)
and the same meaning, so :func:`lstmkit.kernels.fused.trace_from_buffers` reads either.
The kernels are in :mod:`lstmkit.kernels.triton_kernels`; this module decodes the variant,
chooses how to run the time loop (:func:`choose_path`), allocates, launches, and does the
after-loop reductions as large GEMMs in torch (cuBLAS):

    dW_hh = Σ_t dzᵀ_t h_{t-1}   (layernorm: dr_t, the gradient of the raw r_t)
    dW_hr = Σ_t dHPᵀ_t h̃_t      dW_gg = Σ_t du_S,tᵀ s_{t-1}

Dtypes: float32 and float64 compute in their own precision; bfloat16 and float16 layers
round the GEMM operands (weights, h, s, h̃, and in backward dz) to their dtype, accumulate
in float32, and keep gates, cell state, buffers and gradients in float32 — parameters,
inputs and outputs keep their dtype (the operator's contract).

Under ``TRITON_INTERPRET=1`` the same code runs on CPU tensors (Triton's interpreter, for
tests); ``torch.mm`` then stands in for cuBLAS.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lstmkit import cell
from lstmkit.kernels import abi, cuda_graphs
from lstmkit.kernels.triton_deep import DeepGates
from lstmkit.kernels.triton_gemm import Recurrent, mm, recurrent_grad_w

__all__ = ["Variant", "TritonImpl", "choose_path", "projection_sizes", "persistent_tiles", "step_tiles", "PATHS",
           "PATH_ENV"]

NP, NB = len(abi.PARAMS), len(abi.BUFFERS)
_P = {name: k for k, name in enumerate(abi.PARAMS)}
_B = {name: k for k, name in enumerate(abi.BUFFERS)}

#: The two ways to run the time loop (see :func:`choose_path`).
PATHS = ("persistent", "per_step")
#: Environment variable that forces one path (benchmarks and tests; unset: the rule decides).
PATH_ENV = "LSTMKIT_TRITON_PATH"

#: Persistent kernels keep every recurrent weight of a layer-direction on one SM: at most
#: this many bytes of them (GEMM operand dtype, each gate block padded to powers of two;
#: layernorm: half, its backward holds more state per cell). Chosen from the AOT builds
#: (benchmarks/results/gpu_kernels_aot.md): within it, the builds for sm_80 and sm_90 do
#: not spill beyond a few bytes and fit both GPUs' shared memory. To be tuned on a GPU.
PERSISTENT_MAX_WEIGHT_BYTES = 32 * 1024
#: The budget on GPUs with at least :data:`LARGE_SHARED_MEMORY` bytes of shared memory per
#: block (H100, H200: 227 KiB), where float32 vanilla at H = 64 (184 KiB of shared memory)
#: fits. Measured on an H200 (benchmarks/results/gpu_session_h200_2/paths_bench_gpu.md): at
#: H = 64, float32, T = 100 the persistent path took 0.64-0.69 ms per inference call and
#: 1.66-1.93 ms per training step against 5.9-6.1 ms and 14.0-14.7 ms per step-by-step (B = 64
#: and 256), so every layer that fits runs persistent.
PERSISTENT_MAX_WEIGHT_BYTES_LARGE_SMEM = 64 * 1024
#: Shared memory per block (opt-in) from which the larger budget applies (A100: 163 KiB).
LARGE_SHARED_MEMORY = 200 * 1024
#: A forced persistent path (LSTMKIT_TRITON_PATH) is honoured up to this size: beyond it the
#: tiles do not fit one SM at all.
PERSISTENT_FORCE_LIMIT_BYTES = 64 * 1024


def _kernel_buffers(bufs: list[Tensor]) -> dict[str, Tensor]:
    """The buffers by kernel argument name (:data:`lstmkit.kernels.abi.BUFFERS`' names)."""
    return {name: b for name, b in zip(abi.BUFFERS, bufs) if name != "MLP"}  # deep gates: DeepGates fills it


def _zoneout_bit(v: Variant) -> int:
    """The variant word of the projection's small kernels: its zoneout bit, the only one they
    read (so one build of each serves every variant)."""
    return v.flags & abi.flag("zoneout")


def kernels_module() -> Any:
    """The kernel module (importing it imports triton: only when a Triton row runs)."""
    from lstmkit.kernels import triton_kernels

    return triton_kernels


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


@dataclass(frozen=True)
class Variant:
    """The variant flag word and, for the launch plan and the after-loop reductions, what it
    says decoded (the kernels decode ``flags`` themselves while they are built): gate slots in
    R (``gi, gf, gg, go``; -1 absent) in :data:`lstmkit.layout.GATES` order, fgr's slots in
    the sigmoid-gate state s (``si, sf, so``), and the switches these read."""

    flags: int
    rnn: bool
    peep: bool
    fgr: bool
    ln: bool
    zoneout: bool
    slstm: bool
    gi: int
    gf: int
    gg: int
    go: int
    si: int
    sf: int
    so: int

    @classmethod
    def from_flags(cls, flags: int) -> Variant:
        on = {name: bool(flags & abi.flag(name)) for name in abi.FLAGS}
        slot, sslot = abi.gate_slots(flags)
        if not on["fgr"]:
            sslot = dict.fromkeys(sslot, -1)
        return cls(flags=flags, rnn=on["rnn"], peep=on["peephole"], fgr=on["fgr"], ln=on["layernorm"],
                   zoneout=on["zoneout"], slstm=on["slstm"], gi=slot["i"], gf=slot["f"], gg=slot["g"], go=slot["o"],
                   si=sslot["i"], sf=sslot["f"], so=sslot["o"])

    @property
    def n_gates(self) -> int:
        return sum(s >= 0 for s in (self.gi, self.gf, self.gg, self.go))

    @property
    def n_sigmoid(self) -> int:
        return sum(s >= 0 for s in (self.si, self.sf, self.so))


# ---------------------------------------------------------------------------- the rule


def persistent_tiles(v: Variant, H: int, H_out: int, projection: bool) -> tuple[int, int, int, int]:
    """``(BB, BH, BO, num_warps)`` of the persistent kernels: 16 batch rows (tl.dot's least
    M), the whole state of a row (BH ≥ H, at least 16: tl.dot's least K and N), and the
    same block for H_out ≤ H (BO = BH: other layouts for the projection spilled registers);
    8 warps, the whole register file of an SM for one program."""
    BH = _pow2(H, 16)
    return 16, BH, BH, 8


def _on_chip_weights(v: Variant, BH: int, BO: int, projection: bool) -> int:
    """Elements of the persistent kernels' weight tiles: W_hh's gate blocks (BO, BH), W_gg's
    blocks (BH, BH), W_hr (BH, BO)."""
    return v.n_gates * BO * BH + v.n_sigmoid ** 2 * BH * BH + (BH * BO if projection else 0)


def _weight_budget(device: torch.device | None) -> int:
    """Bytes of recurrent weights the persistent path takes on ``device`` (None: the
    smallest GPU budget, the one the AOT builds were sized for)."""
    if device is None or device.type != "cuda":
        return PERSISTENT_MAX_WEIGHT_BYTES
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    return PERSISTENT_MAX_WEIGHT_BYTES_LARGE_SMEM if smem >= LARGE_SHARED_MEMORY else PERSISTENT_MAX_WEIGHT_BYTES


#: The kernels' argument for each of the operators' scalars (:data:`~lstmkit.kernels.abi.SCALARS`).
_SCALAR_ARGS = {"clip": "clip", "zoneout_c": "zc", "zoneout_h": "zh"}


def _named_scalars(values: list[float]) -> dict[str, float]:
    """The operators' scalars (:data:`~lstmkit.kernels.abi.SCALARS` order) by the kernels' argument
    names (the cell clip's bound ``clip``, zoneout's ``zc``, ``zh``), as floats."""
    return {_SCALAR_ARGS[name]: float(v) for name, v in zip(abi.SCALARS, values, strict=True)}


def _claimed(flags: int) -> Variant:
    """The variant word decoded, if the kernels compute every one of its flags (triton_cell's
    IMPLEMENTED), else a ValueError naming the others."""
    from lstmkit.kernels import triton_cell

    return _decoded(flags, triton_cell.IMPLEMENTED)


@functools.cache
def _decoded(flags: int, implemented: frozenset[str]) -> Variant:
    """:func:`_claimed`'s work, once per variant word (every call of the operators asks)."""
    missing = [name for name in abi.FLAGS if flags & abi.flag(name) and name not in implemented]
    if missing:
        raise ValueError(f"lstmkit::recurrence (Triton): the kernels do not compute {missing} "
                         f"(triton_cell.IMPLEMENTED)")
    return Variant.from_flags(flags)


def projection_sizes(v: Variant, H: int, P: int) -> tuple[int, int]:
    """The operator's projection size P as the cell takes it and the output width H_out: the RNN
    has no projection (as the C++ kernel's Cfg), so P counts as 0 there; H_out = P if P > 0 else H."""
    P = 0 if v.rnn else P
    return P, (P if P > 0 else H)


def _plain(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The operator's arguments as the kernels read them, memory: a negative view (torch's lazy
    negation bit, e.g. ``x.conj().imag``: its memory negated) resolved, a ZeroTensor (no memory: the
    gradient ``sgn()``'s backward passes) as zeros of its own."""
    return tuple(_plain_one(a) if isinstance(a, Tensor) else a for a in args)


def _plain_one(t: Tensor) -> Tensor:
    if t._is_zerotensor():
        return torch.zeros(t.shape, dtype=t.dtype, device=t.device)
    return t.resolve_neg() if t.is_neg() else t


def _check_rows(T: int, B: int) -> None:
    """The kernels index a step's rows as ``t·B + b`` in 32-bit arithmetic (widened after; in 64
    bits the persistent kernels took up to 25 more registers and spilled): refuse T·B ≥ 2**31."""
    if T * B >= 2**31:
        raise ValueError(f"the Triton kernels take T·B < 2**31 rows, got T = {T}, B = {B}; split the "
                         f"sequence (a state carries across calls) or the batch")


def choose_path(v: Variant, B: int, H: int, H_out: int, dtype: torch.dtype, projection: bool,
                device: torch.device | None = None, heads: int = 1, deep: bool = False) -> str:
    """How to run the time loop of one layer-direction: ``"persistent"`` or ``"per_step"``.

    The rule: persistent (one launch for all T steps, the weights on chip, no per-step
    launch overhead — FlashRNN's fused approach) when the recurrent weights fit
    :data:`PERSISTENT_MAX_WEIGHT_BYTES` (float32: H ≤ 32; bfloat16: H ≤ 64 for vanilla), or
    :data:`PERSISTENT_MAX_WEIGHT_BYTES_LARGE_SMEM` on a ``device`` with that much shared
    memory (float32 vanilla: H ≤ 64); otherwise per step (one cuBLAS GEMM plus one fused
    pointwise kernel per step — haste's approach, its calls replayed from CUDA graphs),
    whose GEMMs spread over the whole GPU. The batch size does not enter: on an H200 the
    persistent path was 8-9x faster than per step at every batch measured (1-256) where it
    fits. ``LSTMKIT_TRITON_PATH=persistent|per_step`` forces a path where the variant has both
    (a persistent one only up to :data:`PERSISTENT_FORCE_LIMIT_BYTES`). Block-diagonal recurrent weights
    (``heads`` > 1) run per step: the persistent kernels hold dense ones; so do ``deep`` gates,
    whose MLP layers are per-step cuBLAS GEMMs between the recurrent GEMM and the cell's kernel,
    and the sLSTM (its cell is in the per-step kernels only), and a projection wider than the
    cells (the operator takes one; the modules refuse it).
    """
    if heads > 1 or deep or v.slstm or H_out > H:  # (the persistent tiles hold H_out <= H columns)
        return "per_step"
    size = torch.empty((), dtype=dtype).element_size()
    BH = _pow2(H, 16)
    weights = _on_chip_weights(v, BH, BH, projection) * size
    forced = os.environ.get(PATH_ENV)
    if forced:
        if forced not in PATHS:
            raise ValueError(f"{PATH_ENV}: expected one of {PATHS}, got {forced!r}")
        return forced if forced == "per_step" or weights <= PERSISTENT_FORCE_LIMIT_BYTES else "per_step"
    budget = _weight_budget(device) // (2 if v.ln else 1)
    return "persistent" if weights <= budget else "per_step"


def step_tiles(v: Variant, B: int, H: int) -> tuple[int, int, int]:
    """``(BB, BH, num_warps)`` of the per-step kernels: about 512 elements per program (four
    per thread of each tile: a step keeps some twenty tiles live) in cell blocks of up to 64;
    layernorm needs the whole row in one program (its statistics are per row), so BH ≥ H
    and more warps for wide rows."""
    if v.ln:
        BH = _pow2(H)
        return max(1, min(_pow2(B), 512 // BH)), BH, min(16, max(4, BH // 128))
    BH = min(_pow2(H), 64)
    return max(1, min(_pow2(B), 512 // BH)), BH, 4


# ---------------------------------------------------------------------------- launching

#: Set by the AOT tooling (lstmkit.kernels.triton_aot): called instead of launching.
RECORDER: Callable[[Any, tuple[int, ...], dict[str, Any], dict[str, Any], int], None] | None = None


def _launch(kernel: Any, grid: tuple[int, ...], args: dict[str, Any], consts: dict[str, Any], num_warps: int) -> None:
    if RECORDER is not None:
        RECORDER(kernel, grid, args, consts, num_warps)
        return
    kernel[grid](**args, **consts, num_warps=num_warps)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tl_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads(w_hh: Tensor, HO: int) -> int:
    """k of a block-diagonal recurrent weight (``heads=k``): ``w_hh`` (R, HO/k) stores each row's block."""
    return HO // w_hh.shape[1] if w_hh.shape[1] else 1


def _slots(v: Variant, H: int, which: tuple[int, ...]) -> list[slice]:
    return [slice(s * H, (s + 1) * H) for s in which if s >= 0]


class TritonImpl:
    """``lstmkit::recurrence`` / ``recurrence_backward`` with Triton kernels (see the module
    docstring); register with ``ops.register_device("CUDA", TritonImpl())``."""

    # ------------------------------------------------------------------ forward

    def forward(self, xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor,
                *rest: Any) -> tuple[Tensor, ...]:
        flags, mlp, *_scalars, H, P, _save = rest[NP:]
        if self._graphed(xg, w_hh, flags, xg.shape[1], H, P, bool(mlp)):
            return cuda_graphs.call("triton forward", self._forward, xg, w_hh, h0, c0, lengths, *rest)
        return self._forward(xg, w_hh, h0, c0, lengths, *rest)

    @staticmethod
    def _graphed(t: Tensor, w_hh: Tensor, flags: int, B: int, H: int, P: int, deep: bool) -> bool:
        """Whether a call runs through :mod:`~lstmkit.kernels.cuda_graphs`: the per-step path on a
        GPU (its Python loop and launches are what a graph removes; the persistent path is one
        launch), not while the AOT tooling records launches."""
        if not t.is_cuda or RECORDER is not None or B == 0:
            return False
        v = Variant.from_flags(flags)
        P, HO = projection_sizes(v, H, P)
        return choose_path(v, B, H, HO, t.dtype, P > 0, t.device, _heads(w_hh, HO), deep) == "per_step"

    def _forward(self, xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor,
                 *rest: Any) -> tuple[Tensor, ...]:
        xg, w_hh, h0, c0, lengths, *rest = _plain((xg, w_hh, h0, c0, lengths, *rest))
        params, (flags, mlp, *scalars, H, P, save) = list(rest[:NP]), rest[NP:]
        named = _named_scalars(scalars)
        v = _claimed(flags)
        T, B, R = xg.shape
        _check_rows(T, B)
        P, HO = projection_sizes(v, H, P)
        io, ct, dev = xg.dtype, _compute(xg.dtype), xg.device
        y = torch.empty((T, B, HO), dtype=io, device=dev)
        h_n = torch.empty((B, HO), dtype=io, device=dev)
        SH = abi.cell_state_count(flags) * H                                  # the cell states' width
        _check_cell_state(c0, B, SH, v)
        c_n = torch.empty((B, SH) if not v.rnn else (0,), dtype=io, device=dev)
        buffers = [torch.empty(s, dtype=ct, device=dev) for s in abi.buffer_shapes(flags, T, B, R, H, save, mlp)]
        if not v.rnn and c0.numel() == 0:
            c0 = torch.zeros((B, SH), dtype=ct, device=dev)
        if T == 0 or B == 0:
            h_n.copy_(h0)
            if not v.rnn:
                c_n.copy_(c0)
            return (y, h_n, c_n, *buffers)
        a = _Args(xg, w_hh, h0, c0, lengths, params, v, H, HO, io, ct, mlp)
        consts = dict(FLAGS=flags, HAS_BIAS=a.has_bias, HAS_LEN=a.has_len, HAS_KEEP=a.has_keep, CT=_tl_dtype(ct),
                      EPS=cell.LN_EPS, SAVE_G=buffers[_B["G"]].numel() > 0, SAVE_C=buffers[_B["C"]].numel() > 0,
                      SAVE_LN=buffers[_B["AH"]].numel() > 0)
        bufs = [b if b.numel() else a.nothing for b in buffers]
        sizes = dict(T=T, B=B, H=H, HO=HO, R=a.RK, NG=v.n_gates, NSH=a.nsh, **named)
        k = kernels_module()
        if choose_path(v, B, H, HO, io, P > 0, dev, a.heads, a.deep is not None) == "persistent":
            BB, BH, BO, nw = persistent_tiles(v, H, HO, P > 0)
            args = dict(xg=a.xg, w_hh=a.w_hh, h0=a.h0, c0=a.c0, lengths=a.lens, **a.named_params(with_weights=True),
                        y=y, h_n=h_n, c_n=c_n if not v.rnn else a.nothing, **_kernel_buffers(bufs), **sizes)
            _launch(k.persistent_forward, (triton_cdiv(B, BB),), args,
                    dict(consts, PROJ=P > 0, OP=a.op_tl, MMA=a.mma_tl, BB=BB, BH=BH, BO=BO), nw)
            return (y, h_n, c_n, *buffers)
        self._forward_per_step(a, y, bufs, consts, sizes, P > 0, _deep_kept(buffers))
        h_n.copy_(a.h_state)
        if not v.rnn:
            c_n.copy_(a.c_state)
        return (y, h_n, c_n, *buffers)

    def _forward_per_step(self, a: _Args, y: Tensor, bufs: list[Tensor], consts: dict[str, Any],
                          sizes: dict[str, Any], proj: bool, kept: dict[str, Tensor]) -> None:
        """The time loop in Python: per step the GEMMs in torch (deep gates: their MLPs, which
        fill the buffers ``kept`` (T, B, ·) by name), then one pointwise kernel."""
        k, v = kernels_module(), a.v
        T, B, H, HO = sizes["T"], sizes["B"], sizes["H"], sizes["HO"]
        BB, BH, nw = step_tiles(v, B, H)
        grid = (triton_cdiv(B, BB), triton_cdiv(H, BH))
        a.h_state = a.h0.to(a.op).clone()                                     # (B, HO) GEMM operand
        a.c_state = a.c0.to(a.ct).clone() if not v.rnn else a.nothing         # (B, S·H)
        s_state = torch.zeros((B, a.nsh), dtype=a.op, device=a.dev) if v.fgr else a.nothing
        m_state = torch.empty((B, H), dtype=a.op, device=a.dev) if proj else a.nothing
        w_gg_t = a.params[_P["weight_gg"]].t() if v.fgr else None
        w_hr_t = a.params[_P["weight_hr"]].t() if proj else None
        fw = a.nothing
        consts = dict(consts, PROJ=proj, READY=a.ready, BB=BB, BH=BH)
        args = dict(xg=a.nothing if a.ready else a.xg, c_s=a.c_state, s_s=s_state, h_s=a.h_state, m_s=m_state,
                    y=y, lengths=a.lens, **a.named_params(with_weights=False), **_kernel_buffers(bufs), **sizes)
        BO = min(_pow2(HO), 128)
        pgrid = (triton_cdiv(B, 16), triton_cdiv(HO, BO))
        for t in range(T):
            r = a.recurrent.forward(a.h_state)                               # (B, R)
            if a.deep:                                                        # (B, G·H)
                r = a.deep.forward(t, a.xg[t], r, {k: b[t] for k, b in kept.items()}, a.lens if a.has_len else None)
            if v.fgr:
                fw = mm(s_state, w_gg_t, a.ct)                               # (B, NSH)
            _launch(k.step_forward, grid, dict(args, r=r, fw=fw, t=t), consts, nw)
            if proj:
                yp = mm(m_state, w_hr_t, a.ct)                               # (B, P)
                _launch(k.step_project, pgrid, dict(yp=yp, h_s=a.h_state, y=y, lengths=a.lens, keep_h=a.keep_h, t=t,
                                                    T=T, B=B, HO=HO, zh=sizes["zh"]),
                        dict(FLAGS=_zoneout_bit(v), HAS_LEN=a.has_len, HAS_KEEP=a.has_keep, CT=consts["CT"], BB=16,
                             BO=BO), 4)

    # ------------------------------------------------------------------ backward

    def backward(self, dy: Tensor, dh_n: Tensor, dc_n: Tensor, y: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                 lengths: Tensor, *rest: Any) -> tuple[Tensor, ...]:
        flags, mlp, *_scalars, H, P = rest[NP + NB:]
        if self._graphed(y, w_hh, flags, y.shape[1], H, P, bool(mlp)):
            return cuda_graphs.call("triton backward", self._backward, dy, dh_n, dc_n, y, h0, c0, w_hh, lengths,
                                    *rest)
        return self._backward(dy, dh_n, dc_n, y, h0, c0, w_hh, lengths, *rest)

    def _backward(self, dy: Tensor, dh_n: Tensor, dc_n: Tensor, y: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                  lengths: Tensor, *rest: Any) -> tuple[Tensor, ...]:
        dy, dh_n, dc_n, y, h0, c0, w_hh, lengths, *rest = _plain((dy, dh_n, dc_n, y, h0, c0, w_hh, lengths, *rest))
        params, buffers = list(rest[:NP]), list(rest[NP:NP + NB])
        flags, mlp, *scalars, H, P = rest[NP + NB:]
        named = _named_scalars(scalars)
        v = _claimed(flags)
        T, B = y.shape[0], y.shape[1]
        _check_rows(T, B)
        R = w_hh.shape[0]
        P, HO = projection_sizes(v, H, P)
        io, ct, dev = y.dtype, _compute(y.dtype), y.device
        SH = abi.cell_state_count(flags) * H                                  # the cell states' width
        _check_cell_state(c0, B, SH, v)
        if not v.rnn and c0.numel() == 0:
            c0 = torch.zeros((B, SH), dtype=ct, device=dev)
        dh_n = dh_n.to(ct).contiguous() if dh_n.numel() else torch.zeros((B, HO), dtype=ct, device=dev)
        dc_n = dc_n.to(ct).contiguous() if dc_n.numel() or v.rnn else torch.zeros((B, SH), dtype=ct, device=dev)
        a = _Args(torch.empty((0,), dtype=io, device=dev), w_hh, h0, c0, lengths, params, v, H, HO, io, ct, mlp)
        RK = a.RK
        dxg = torch.empty((T, B, R), dtype=ct, device=dev)
        du = torch.empty((T, B, RK), dtype=ct, device=dev) if a.deep else dxg  # the cell kernel's gradient of z
        dv = a.deep.new_grads(du) if a.deep else {}
        dZ = torch.empty((T, B, R), dtype=ct, device=dev) if a.ready and v.ln else a.nothing  # layernorm's dz
        dR = torch.empty((T, B, R), dtype=ct, device=dev) if v.ln else a.nothing
        dZS = torch.empty((T, B, a.nsh), dtype=ct, device=dev) if v.ln and v.fgr else a.nothing
        dHP = torch.empty((T, B, HO), dtype=ct, device=dev) if P > 0 else a.nothing
        MO = torch.empty((T, B, H), dtype=ct, device=dev) if P > 0 else a.nothing
        dh0 = torch.empty((B, HO), dtype=ct, device=dev)
        dc0 = torch.empty((B, SH), dtype=ct, device=dev) if not v.rnn else a.nothing
        n_acc = abi.acc_size(H, RK)
        persistent = T > 0 and B > 0 and choose_path(v, B, H, HO, io, P > 0, dev, a.heads, a.deep is not None) \
            == "persistent"
        BB = persistent_tiles(v, H, HO, P > 0)[0] if persistent else step_tiles(v, B, H)[0]
        acc = torch.zeros((triton_cdiv(B, BB), n_acc) if (v.peep or v.ln) else (0,), dtype=ct, device=dev)
        if T == 0 or B == 0:
            dh0.copy_(dh_n)
            if not v.rnn:
                dc0.copy_(dc_n)
        else:
            has_dy = dy.numel() > 0
            dy_t = dy if has_dy else a.nothing
            strides = dict(dy_s0=dy.stride(0), dy_s1=dy.stride(1), dy_s2=dy.stride(2)) if has_dy else \
                dict(dy_s0=0, dy_s1=0, dy_s2=0)
            consts = dict(FLAGS=flags, PROJ=P > 0, HAS_BIAS=a.has_bias, HAS_LEN=a.has_len, HAS_DY=has_dy,
                          HAS_KEEP=a.has_keep, CT=_tl_dtype(ct), EPS=cell.LN_EPS)
            bufs = _kernel_buffers([b.contiguous() if b.numel() else a.nothing for b in buffers])
            sizes = dict(T=T, B=B, H=H, HO=HO, R=RK, NG=v.n_gates, NSH=a.nsh, NACC=n_acc, **named)
            common = dict(dy=dy_t, **strides, dh_n=dh_n, y=y.contiguous(), c0=a.c0, lengths=a.lens,
                          **a.named_params(with_weights=False), **bufs, dxg=du, dr=dR, dzs=dZS, mo=MO, acc=acc,
                          **sizes)
            if persistent:
                BB, BH, BO, nw = persistent_tiles(v, H, HO, P > 0)
                args = dict(common, dc_n=dc_n if not v.rnn else a.nothing, w_hh=a.w_hh,
                            w_gg=a.params[_P["weight_gg"]] if v.fgr else a.nothing,
                            w_hr=a.params[_P["weight_hr"]] if P > 0 else a.nothing, dhp=dHP, dh0=dh0, dc0=dc0)
                _launch(kernels_module().persistent_backward, (triton_cdiv(B, BB),), args,
                        dict(consts, OP=a.op_tl, MMA=a.mma_tl, BB=BB, BH=BH, BO=BO), nw)
            else:
                self._backward_per_step(a, common, consts, dHP, dh0, dc0, dc_n, P > 0, dxg, dR, dZ,
                                        _deep_kept(buffers), dv)
        out = self._reductions(a, v, T, B, H, HO, R, P, y, h0, c0, params, buffers, dxg, du, dR, dZS, dHP, MO, dh0,
                               dc0, acc, w_hh)
        if a.deep:
            out[4 + _P["mlp"]] = a.deep.weight_grads(dv, buffers[_B["MLP"]]).to(params[_P["mlp"]].dtype)
        if a.ready and v.ln:  # layernorm's gains and bias (deep gates), from the dz, â, r̂ of every step
            grads = a.deep.layer_norm_grads(dZ, buffers[_B["AH"]], buffers[_B["RH"]]) if T and B else \
                [torch.zeros((R,), dtype=ct, device=dev)] * 3
            for name, g in zip(("ln_ih_weight", "ln_hh_weight", "bias"), grads):
                if params[_P[name]].numel():
                    out[4 + _P[name]] = g.to(params[_P[name]].dtype)
        return tuple(out)

    def _backward_per_step(self, a: _Args, common: dict[str, Any], consts: dict[str, Any], dHP: Tensor,
                           dh0: Tensor, dc0: Tensor, dc_n: Tensor, proj: bool, dxg: Tensor, dR: Tensor, dZ: Tensor,
                           kept: dict[str, Tensor], dv: dict[str, list[Tensor]]) -> None:
        """BPTT's time loop in Python: per step one pointwise kernel, then the GEMMs in torch
        (deep gates first their MLPs backwards — and layernorm's norms —, from the kernel's du to
        ``dxg`` (and ``dR``, ``dZ``) (T, B, R), with the forward's buffers ``kept`` (T, B, ·);
        dL/d(each layer's output) into ``dv``)."""
        k, v = kernels_module(), a.v
        T, B, H, HO, R = (common[n] for n in ("T", "B", "H", "HO", "R"))
        BB, BH, nw = step_tiles(v, B, H)
        grid = (triton_cdiv(B, BB), triton_cdiv(H, BH))
        sep = a.op != a.ct  # 16-bit: the next GEMM's operands are rounded copies
        dc_s = dc_n.clone() if not v.rnn else a.nothing                       # (B, S·H), in place
        dop = torch.empty((B, R), dtype=a.op, device=a.dev) if sep else a.nothing
        dus = torch.empty((B, a.nsh), dtype=a.op, device=a.dev) if v.fgr else a.nothing
        dhp_op = torch.empty((B, HO), dtype=a.op, device=a.dev) if sep and proj else a.nothing
        dhz = torch.zeros((B, HO), dtype=a.ct, device=a.dev) if v.zoneout else a.nothing  # d_h·dh_t, in place
        w_gg = a.params[_P["weight_gg"]] if v.fgr else None
        w_hr = a.params[_P["weight_hr"]] if proj else None
        BO = min(_pow2(HO), 128)
        pgrid = (triton_cdiv(B, 16), triton_cdiv(HO, BO))
        dh_g, ds_g, dm = a.nothing, a.nothing, a.nothing
        for t in reversed(range(T)):
            has_next = t + 1 < T
            if proj:
                _launch(k.step_dh, pgrid, dict(dy=common["dy"], dy_s0=common["dy_s0"], dy_s1=common["dy_s1"],
                                               dy_s2=common["dy_s2"], dh_g=dh_g, dh_n=common["dh_n"], dhz=dhz, out=dHP,
                                               out_op=dhp_op, lengths=a.lens, keep_h=a.keep_h, t=t, T=T, B=B, HO=HO,
                                               zh=common["zh"]),
                        dict(FLAGS=_zoneout_bit(v), HAS_LEN=a.has_len, HAS_DY=consts["HAS_DY"], HAS_NEXT=has_next,
                             SEP_OP=sep, HAS_KEEP=a.has_keep, CT=consts["CT"], BB=16, BO=BO), 4)
                dm = mm(dhp_op if sep else dHP[t], w_hr, a.ct)               # (B, H)
            _launch(k.step_backward, grid,
                    dict(common, dh_g=dh_g, dhz=dhz, dm=dm, dc_s=dc_s, ds_g=ds_g, dop=dop, dus=dus, t=t),
                    dict(consts, HAS_NEXT=has_next, SEP_OP=sep and not a.ready, READY=a.ready, BB=BB, BH=BH), nw)
            if a.deep:  # the kernel's du (B, G·H) through the MLPs (and norms) to dxg[t] (and dR[t]) (B, R)
                a.deep.backward(common["dxg"][t], {k: b[t] for k, b in kept.items()}, dxg[t],
                                dR[t] if v.ln else a.nothing, dZ[t] if v.ln else a.nothing, dv, t)
                src = dR[t] if v.ln else dxg[t]
                src = src.to(a.op) if sep else src
            else:
                src = dop if sep else (common["dr"][t] if v.ln else common["dxg"][t])
            dh_g = a.recurrent.grad_h(src)                                   # (B, HO): dz_t W_hh
            if v.fgr and t > 0:
                ds_g = mm(dus, w_gg, a.ct)                                   # (B, NSH): du_S,t W_gg
        dh_g = dh_g + dhz if v.zoneout else dh_g                              # (B, HO): all of dL/dh_0
        dh0.copy_(torch.where(a.lens_valid0[:, None], dh_g, common["dh_n"]))
        if not v.rnn:
            dc0.copy_(dc_s)

    def _reductions(self, a: _Args, v: Variant, T: int, B: int, H: int, HO: int, R: int, P: int, y: Tensor,
                    h0: Tensor, c0: Tensor, params: list[Tensor], buffers: list[Tensor], dxg: Tensor, du: Tensor,
                    dR: Tensor, dZS: Tensor, dHP: Tensor, MO: Tensor, dh0: Tensor, dc0: Tensor, acc: Tensor,
                    w_hh: Tensor) -> list[Tensor]:
        """The weight gradients after the loop (large GEMMs) and the dtypes of the results
        (``du``: the gates' dL/du in slots of H, (T, B, G·H); ``dxg`` itself without deep gates)."""
        ct, io = a.ct, a.io
        d = (dR if v.ln else dxg).reshape(T * B, R)                          # (T·B, R)
        dw_hh = torch.zeros((R, HO // a.heads), dtype=ct, device=a.dev)
        if T > 0 and a.heads > 1:  # h_{t-1}: h0, then the outputs (0 on padded steps, where dz is 0 too)
            h_prev = torch.cat([h0.to(ct), y[:-1].reshape(-1, HO).to(ct)])     # (T·B, HO)
            dw_hh = recurrent_grad_w(d, h_prev, a.heads, a.widths)
        elif T > 0:
            dw_hh = torch.mm(d[:B].t(), h0.to(ct))
            if T > 1:
                dw_hh.addmm_(d[B:].t(), y[:-1].reshape(-1, HO).to(ct))
        dparams = [torch.empty((0,), dtype=p.dtype, device=a.dev) for p in params]
        if not v.rnn:
            tot = acc.sum(0) if v.peep or v.ln else acc  # (B = 0: no tiles, zero sums)
            summed = [name for name, slot in (("peephole_i", v.gi), ("peephole_f", v.gf), ("peephole_o", v.go))
                      if v.peep and slot >= 0]
            if v.ln:
                summed += ["ln_c_weight", "ln_c_bias"]
            if v.ln and not a.ready:  # (with deep gates: DeepGates.layer_norm_grads)
                summed += ["ln_hh_weight", "ln_ih_weight"] + (["bias"] if params[_P["bias"]].numel() else [])
            for name in summed:
                dparams[_P[name]] = tot[abi.acc_slice(name, H, R)].clone()
            if P > 0:
                dparams[_P["weight_hr"]] = torch.mm(dHP.reshape(-1, HO).t(), MO.reshape(-1, H))
            if v.fgr:
                nsh = a.nsh
                if T > 1:
                    sig = _slots(v, H, (v.gi, v.gf, v.go))
                    if v.ln and not a.ready:
                        dus = dZS[1:].reshape(-1, nsh)                        # ((T-1)·B, NSH)
                    else:
                        dus = torch.cat([du[1:, :, s] for s in sig], -1).reshape(-1, nsh)
                    G = buffers[_B["G"]]
                    s_prev = torch.cat([G[:-1, :, s] for s in sig], -1).reshape(-1, nsh)
                    dparams[_P["weight_gg"]] = torch.mm(dus.t(), s_prev)
                else:
                    dparams[_P["weight_gg"]] = torch.zeros((nsh, nsh), dtype=ct, device=a.dev)
        dparams = [dp.to(p.dtype) if dp.numel() else dp for dp, p in zip(dparams, params)]
        dc0_out = dc0.to(c0.dtype if c0.numel() else io) if not v.rnn else torch.empty((0,), dtype=io, device=a.dev)
        return [dxg.to(io), dw_hh.to(w_hh.dtype), dh0.to(h0.dtype), dc0_out, *dparams]


def _deep_kept(buffers: list[Tensor]) -> dict[str, Tensor]:
    """The buffers :class:`~lstmkit.kernels.triton_deep.DeepGates` fills and reads, by name
    (those the forward keeps)."""
    return {n: buffers[_B[n]] for n in ("MLP", "AH", "RH", "AS", "RS") if buffers[_B[n]].numel()}


def _check_cell_state(c0: Tensor, B: int, SH: int, v: Variant) -> None:
    """The kernels index c0 as (B, S·H): any other shape is refused before a launch (as the C++
    kernel refuses it), never read or written out of bounds."""
    if not v.rnn and c0.numel() and tuple(c0.shape) != (B, SH):
        raise RuntimeError(f"lstmkit::recurrence: c0 must be (B, S·H) = ({B}, {SH}): the cell's "
                           f"{abi.cell_state_count(v.flags)} states side by side; got {tuple(c0.shape)}")


def triton_cdiv(n: int, d: int) -> int:
    return (n + d - 1) // d


class _Args:
    """One call's inputs, made contiguous, in the dtypes the kernels read (parameters
    keep theirs: the kernels convert on load), and the dtypes of the call."""

    def __init__(self, xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor, params: list[Tensor],
                 v: Variant, H: int, HO: int, io: torch.dtype, ct: torch.dtype, mlp: list[int]) -> None:
        self.v, self.io, self.ct, self.dev = v, io, ct, w_hh.device
        self.op = io if io in (torch.bfloat16, torch.float16) else ct         # GEMM operand dtype
        self.op_tl = _tl_dtype(self.op)
        self.mma_tl = _tl_dtype(torch.float32 if self.op != ct and _interpreting() else self.op)
        self.nothing = torch.empty((0,), dtype=ct, device=self.dev)
        self.xg = xg.contiguous()
        self.w_hh = w_hh.to(self.op).contiguous()                             # (R, HO)
        self.h0 = h0.contiguous()
        self.c0 = c0.contiguous() if c0.numel() else self.nothing
        self.params = [p.to(self.op).contiguous() if p.numel() and n in ("weight_gg", "weight_hr") else p.contiguous()
                       for n, p in zip(abi.PARAMS, params)]
        self.has_len = lengths.numel() > 0
        self.lens = (lengths.to(device=self.dev, dtype=torch.int32).contiguous() if self.has_len
                     else torch.empty((0,), dtype=torch.int32, device=self.dev))
        self.has_bias = v.ln and params[_P["bias"]].numel() > 0
        self.has_keep = v.zoneout and params[_P["keep_c"]].numel() > 0       # zoneout in training: masks
        self.keep_h = self.params[_P["keep_h"]] if self.has_keep else self.nothing  # (T, B, HO)
        self.nsh = v.n_sigmoid * H
        self.h_state = self.c_state = self.nothing
        self.heads = _heads(w_hh, HO)                                         # block-diagonal W_hh: k
        self.deep = DeepGates(mlp, v.flags, H, dict(zip(abi.PARAMS, params)), self.op, ct, _launch,
                              (self.op_tl, self.mma_tl, _tl_dtype(ct))) if mlp else None
        self.widths = self.deep.widths if self.deep else (H,) * v.n_gates     # each gate's rows of W_hh
        self.recurrent = Recurrent(self.w_hh, self.heads, self.widths, ct)    # the per-step h W_hhᵀ, dz W_hh
        #: deep gates: the per-step kernels read every gate's whole pre-activation from r, normalised
        #: with layernorm (READY), not xg
        self.ready = self.deep is not None
        #: the row width of what the cell's kernels read and write (xg, r, G, dxg): R, or G·H with deep gates
        self.RK = self.deep.RZ if self.deep else w_hh.shape[0]

    @property
    def lens_valid0(self) -> Tensor:
        """(B,) bool: rows with at least one valid step."""
        if self.has_len:
            return self.lens > 0
        return torch.ones(self.h0.shape[0], dtype=torch.bool, device=self.dev)

    def named_params(self, with_weights: bool) -> dict[str, Tensor]:
        """The parameter pointers by kernel argument name (absent: an empty tensor; the deep
        gates' ``mlp``: :class:`DeepGates`)."""
        names = [n for n in abi.PARAMS if (with_weights or n not in ("weight_gg", "weight_hr")) and n != "mlp"]
        rename = {"peephole_i": "p_i", "peephole_f": "p_f", "peephole_o": "p_o", "ln_hh_weight": "g_hh",
                  "ln_c_weight": "c_w", "ln_c_bias": "c_b", "ln_ih_weight": "g_ih", "weight_gg": "w_gg",
                  "weight_hr": "w_hr", "bias": "bias", "keep_c": "keep_c", "keep_h": "keep_h"}
        return {rename[n]: (p if p.numel() else self.nothing) for n, p in zip(abi.PARAMS, self.params) if n in names}
