"""The fused kernel rows: the ``lstmkit::recurrence`` operator behind the Kernel interface.

The input side ``x W_ihᵀ (+LN) + b`` for every step is one GEMM in plain torch ops
(:func:`lstmkit.cell.input_projection`), so autograd turns its gradient into the large
GEMMs ``dW_ih = dAᵀ X`` and ``dX = dA W_ih`` after the loop. The recurrence — per step
one GEMM and one fused pointwise pass, forward and hand-written BPTT backward — is the
operator (:mod:`lstmkit.kernels.ops`), run by the device's implementation: the compiled
C++ kernel on the CPU (:class:`FusedCPUKernel`), Triton kernels on the GPU
(:class:`TritonKernel`).
"""

from __future__ import annotations

import importlib.util
import operator
import os
import threading
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lstmkit import cell, variants
from lstmkit.kernels import abi, cpu_ext, ops, selfcheck
from lstmkit.kernels.base import Kernel, KernelOut, Workload, hidden_keys
from lstmkit.kernels.machine import cpu_vendor
from lstmkit.kernels.reference import ReferenceKernel
from lstmkit.spec import CellSpec

__all__ = ["FusedKernel", "FusedCPUKernel", "PreparedStep", "TritonKernel", "KEPT_SIGNATURES", "forward_infer",
           "infer_args", "trace_from_buffers", "triton_available"]

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(x2d: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x2d wᵀ + b`` through oneDNN with the weight reordered (prepacked) for this call."""
    mkldnn = torch.ops.mkldnn
    return mkldnn._linear_pointwise(x2d, mkldnn._reorder_linear_weight(w, x2d.shape[0]), b, "none", [], "")


def _use_onednn(rows: int, w: Tensor) -> bool:
    # Measured here (2 threads): oneDNN 209-223 GFLOP/s vs MKL sgemm 155-169 from
    # I·R >= 256·1024 up; equal at 128·512, slower below. float32 only. Not where OpenMP may
    # give a region fewer threads than torch's count (cpu_ext.full_omp_teams): oneDNN's products
    # are wrong there, MKL's and the kernel's are not.
    # torch.backends.mkldnn.enabled = False (or its flags context) turns it off, as for torch's own ops
    return (_ONEDNN and w.dtype == torch.float32 and rows >= 256 and w.shape[0] * w.shape[1] >= 256 * 1024
            and torch.backends.mkldnn.enabled and cpu_ext.full_omp_teams())


class _Linear(torch.autograd.Function):
    """``Y = X Wᵀ + b`` (T·B, R) for the input projection of all steps: one large GEMM
    through oneDNN; backward ``dX = dY W`` (oneDNN likewise), ``dW = dYᵀ X`` (one GEMM
    over all steps) and ``db = Σ dY``."""

    @staticmethod
    def forward(ctx: Any, x2d: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(*ops.saveable((x2d, w)))
        return _onednn_linear(x2d, w, b)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2d, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            wt = w.t().contiguous()  # (I, R): dX = dY W is a linear layer with weight Wᵀ
            # with create_graph (grad mode on here) the differentiable product: a first-order
            # gradient that is itself differentiated later (a penalty through a read-out) is exact
            onednn = _use_onednn(dy.shape[0], wt) and not torch.is_grad_enabled()
            dx = _onednn_linear(dy.contiguous(), wt, None) if onednn else dy.mm(w)
        if ctx.needs_input_grad[1]:
            dw = dy.t().mm(x2d)
        if ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db


def sixteen_bit_units(amx_tiles: bool, amx_fp16: bool, avx512_bf16: bool,
                      vendor: str | None) -> dict[torch.dtype, bool]:
    """:data:`SIXTEEN_BIT_UNITS` for a CPU with these units (torch's queries) and this vendor."""
    return {torch.bfloat16: amx_tiles or (avx512_bf16 and vendor != "GenuineIntel"), torch.float16: amx_fp16}


#: Whether torch's own GEMM of each 16-bit dtype runs on 16-bit units of this CPU that outpace its
#: float32 GEMM (else the product of the widened operands in float32 is the faster one). Without
#: units torch widens in software: a bfloat16 (6,400 x 256) x (256 x 1,024) product took 407 ms on an
#: AVX2 EPYC where float32's took 52 (7-10x at three shapes). AMX tiles outpace float32. AVX512_BF16's
#: dot products did not on an Intel Xeon without AMX (family 6, model 207): vdpbf16ps issued at half
#: vfmadd231ps's rate there (100 against 206 GFLOP/s on one core), and torch's bfloat16 GEMM took
#: 1.32-1.43x the widened float32 product's time at three input-projection shapes ((3,200 x 512) x
#: (512 x 2,048): 39.5 against 27.6 ms, two threads). On other vendors' CPUs with AVX512_BF16 (AMD's
#: Zen 4 and later) they still count as units: not measured there.
SIXTEEN_BIT_UNITS: dict[torch.dtype, bool] = sixteen_bit_units(
    torch.cpu._is_amx_tile_supported(), torch.cpu._is_amx_fp16_supported(), torch.cpu._is_avx512_bf16_supported(),
    cpu_vendor())


def input_linear(x2d: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x2d wᵀ + b`` for the input projection: oneDNN's GEMM where measured faster, else MKL's.
    A bfloat16 / float16 product (the layer's dtype, or autocast's) on a CPU without units for
    that dtype (:data:`SIXTEEN_BIT_UNITS`) is computed in float32 — the operands widened exactly,
    the result rounded to the dtype once, as the 16-bit GEMM rounds its float32 sums — and so is
    its backward (autograd through the conversions); the widened ``x2d`` and ``w`` are what it
    keeps for backward (T·B·I floats)."""
    low = x2d.dtype  # autocast lowers float32 alone
    if low == torch.float32 and torch.is_autocast_enabled("cpu"):
        low = torch.get_autocast_dtype("cpu")
    if low in SIXTEEN_BIT_UNITS and not SIXTEEN_BIT_UNITS[low]:
        b32 = None if b is None else b.float()
        with torch.autocast("cpu", enabled=False):
            return torch.nn.functional.linear(x2d.float(), w.float(), b32).to(low)
    if ops.plain_eager((x2d, w)) and _use_onednn(x2d.shape[0], w):  # transforms: F.linear, which they know
        return _Linear.apply(x2d.contiguous(), w, b)
    return torch.nn.functional.linear(x2d, w, b)


class FusedKernel(Kernel):
    """A row that runs the recurrence operator: the input projection, the operator, the trace.

    Subclasses say where it runs (``devices``, :meth:`unsupported`) and may pass an explicit
    implementation (:attr:`impl`) instead of dispatching on the device.
    """

    #: Call this implementation directly (None: the operator dispatches on the device).
    impl: ops.Impl | None = None

    #: The variant table's flags (:data:`lstmkit.kernels.abi.FLAGS`) this row's kernels compute
    #: (each subclass says its own; a spec with any other flag is refused, with the reason).
    implements: frozenset[str] = frozenset()

    #: Whether this row's kernels compute deep gates (gate_hidden).
    deep_gates: bool = False
    #: Whether this row's kernels compute block-diagonal recurrent weights (heads > 1).
    heads: bool = False

    def refuses(self, spec: CellSpec) -> str | None:
        """Every part of ``spec`` this row's kernels do not compute, joined (None: it computes all)."""
        missing = [name for name in variants.flag_names(spec) if name not in self.implements]
        if spec.gate_hidden and not self.deep_gates:
            missing.insert(0, "deep gates (gate_hidden)")
        if spec.heads != 1 and not self.heads:
            missing.append(f"heads={spec.heads} (block-diagonal recurrent weights)")
        if not missing:
            return None
        cpu_computes = self.name != "cpu_fused" and FusedCPUKernel().refuses(spec) is None
        return (f"its kernels do not compute {', '.join(missing)}: such layers run on the 'reference' kernel"
                + (" (on the CPU, 'cpu_fused' computes them)" if cpu_computes else ""))
    #: The input projection's GEMM (``linear(x2d, W, b)``); None is ``F.linear``.
    linear: Any = None

    def run(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
            params: dict[str, Tensor], spec: CellSpec, hidden_size: int,
            record: bool = False, keep: tuple[Tensor, Tensor] | None = None) -> KernelOut:
        proj = params["weight_hr"].shape[0] if "weight_hr" in params else 0
        if spec.layernorm:
            # The kernel normalises the raw projection per step (in cache) and adds the bias
            # after the norm: xg is x W_ihᵀ alone, and the summed bias is a parameter.
            T, B = x.shape[0], x.shape[1]
            w = params["weight_ih"]
            linear = self.linear or torch.nn.functional.linear
            xg = linear(x.reshape(T * B, x.shape[-1]), w, None).view(T, B, w.shape[0])  # (T, B, R)
            params = dict(params)
            if "bias_ih" in params:
                params["bias"] = cell.summed_bias(params)  # (R,)
        else:
            xg = cell.input_projection(x, params, spec, hidden_size, linear=self.linear)  # (T, B, R)
        empty = xg.new_empty(0)
        if keep is not None:  # zoneout's training masks, (T, B, H) and (T, B, H_out)
            params = {**params, "keep_c": keep[0], "keep_h": keep[1]}
        plist, mlp = operator_params(params, spec, empty)
        c0_t = c0 if c0 is not None else empty
        lens = lengths if lengths is not None else torch.empty(0, dtype=torch.long)
        w_hh = params["weight_hh"]
        # Keep buffers only when a gradient can flow or the trace is asked for.
        save = record or (torch.is_grad_enabled() and any(t.requires_grad for t in (xg, w_hh, h0, c0_t, *plist)))
        y, h_n, c_n, buffers = ops.recurrence(xg, w_hh, h0, c0_t, lens, plist, abi.flags(spec), mlp,
                                              abi.scalars(spec), hidden_size, proj, save, impl=self.impl)
        trace = None
        if record:
            trace = trace_from_buffers(buffers, y, h0, c0_t, lens, params, spec, hidden_size)
        return KernelOut(y, h_n, c_n if spec.is_lstm else None, trace)


def operator_params(params: dict[str, Tensor], spec: CellSpec, empty: Tensor, flat_mlp: bool = True
                    ) -> tuple[list[Tensor], list[int]]:
    """The operator's ``params`` list (:data:`~lstmkit.kernels.abi.PARAMS` order, ``empty`` where
    absent) and ``mlp_layout``: the deep gates' further layers go in flat (autograd hands each
    its part of the gradient), unless ``flat_mlp`` is False (their slot stays empty)."""
    bias = "bias_ih" in params
    mlp = abi.mlp_layout(spec, bias)
    if mlp and flat_mlp:
        params = {**params, "mlp": torch.cat([params[n].reshape(-1) for n in abi.mlp_names(spec, bias)])}
    return [params.get(name, empty) for name in abi.PARAMS], mlp


def trace_from_buffers(buffers: list[Tensor], y: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor,
                       params: dict[str, Tensor], spec: CellSpec, hidden_size: int) -> dict[str, Tensor]:
    """Per-step activations (T, B, ·) from what the forward kept (``save=True``): views of
    its buffers, no second pass — except layernorm without fgr or deep gates, which keeps the normalised
    pre-activations instead of the gates: its gates are recomputed by :func:`lstmkit.cell.step`
    on all steps at once. Absent gates are absent; cifg's f is 1 − i."""
    b = dict(zip(abi.BUFFERS, (t.detach() for t in buffers)))
    H = hidden_size
    out: dict[str, Tensor] = {"h": y.detach()}
    if not spec.is_lstm:
        out["g"] = out["h"]  # the RNN's activation is its output
        return out
    # (a buffer not kept is an empty (0,) tensor; a kept one is (T, B, ·), empty too where B = 0)
    G = b["G"] if b["G"].dim() == 3 else _layernorm_gates(b, y.detach(), h0, c0, lengths, params, spec, H)
    slots = abi.SLSTM_KEPT if spec.slstm else spec.computed_gates  # G's row, H-wide slots
    for k in spec.computed_gates:  # the sLSTM's i, f: its stabilised i', f'
        n = slots.index(k)
        out[k] = G[:, :, n * H:(n + 1) * H]
    if spec.coupled:
        out["f"] = 1.0 - out["i"]
    out.update(zip(variants.cell_states(spec), b["C"].split(H, dim=-1)))  # c (the sLSTM: c, n, m)
    col = 0
    for key, width in zip(hidden_keys(spec), (w for _, ws in spec.gate_hidden for w in ws)):  # deep gates
        out[key] = b["MLP"][:, :, col:col + width]
        col += width
    return out


def _layernorm_gates(b: dict[str, Tensor], y: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor,
                     params: dict[str, Tensor], spec: CellSpec, H: int) -> Tensor:
    """The gate activations (T, B, R) of a layernorm run, by ``cell.step`` on every step at once:
    its input side is the kept â·γ_ih (+ bias), its previous states y_{t-1} and C_{t-1}."""
    AH, C = b["AH"], b["C"]
    T, B, R = AH.shape
    dt = AH.dtype  # float32 for low-precision layers: the kernel's compute dtype
    p = {k: v.detach().to(dt) for k, v in params.items()}
    a = AH * p["ln_ih_weight"] + p["bias"] if "bias" in p else AH * p["ln_ih_weight"]  # (T, B, R)
    h_prev = torch.cat([h0.detach().to(dt).unsqueeze(0), y[:-1].to(dt)])  # (T, B, H_out)
    c_prev = torch.cat([c0.detach().to(dt).unsqueeze(0), C[:-1]])  # (T, B, H)
    out = cell.step(a.reshape(T * B, R), h_prev.reshape(T * B, h_prev.shape[-1]), c_prev.reshape(T * B, H), None,
                    p, spec, H)
    G = torch.cat([getattr(out, k) for k in spec.computed_gates], -1).view(T, B, R)
    if lengths.numel():
        valid = torch.arange(T).unsqueeze(1) < lengths.clamp(max=T).unsqueeze(0)  # (T, B)
        G = G * valid.to(G.device).unsqueeze(-1).to(G.dtype)
    return G


class FusedCPUKernel(FusedKernel):
    """The compiled recurrence on the CPU: float32, float64, bfloat16 and float16 (the last
    two compute in float32), every variant, deep gates and heads included."""

    name = "cpu_fused"
    devices = ("cpu",)
    deep_gates = True
    heads = True
    # every row: csrc/cell_step.h has each one's step and BPTT (its claim, IMPLEMENTED_FLAGS, is
    # compared with this by test_ops.py)
    implements = frozenset(abi.FLAGS)
    linear = staticmethod(input_linear)

    def run(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
            params: dict[str, Tensor], spec: CellSpec, hidden_size: int,
            record: bool = False, keep: tuple[Tensor, Tensor] | None = None) -> KernelOut:
        """The fused run. Inference (nothing needs a gradient) where :func:`in_loop_projection`
        says so — every single step (LSTMCell, layer.step) — is one call of the compiled kernel
        with the input projection inside the loop (``forward_infer``): no (T, B, R) xg."""
        # plain eager first: under compile or export, sizes are symbolic and must not be branched on
        if keep is None and not record and ops.callable_directly((x, h0, *params.values())) \
                and _no_gradient(x, h0, c0, params) and in_loop_projection(x, params["weight_ih"]):
            y, h_n, c_n = forward_infer(infer_args(params, spec), x, h0, c0, lengths, hidden_size)
            return KernelOut(y, h_n, c_n if spec.is_lstm else None, None)
        return super().run(x, lengths, h0, c0, params, spec, hidden_size, record, keep)

    def unsupported(self, spec: CellSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        why = self.refuses_or_dtype(spec, dtype)
        if why:
            return why
        if not cpu_ext.available():
            return "the C++ extension could not be built (see the warning above)"
        return None


_NO_LENGTHS = torch.empty(0, dtype=torch.long)  # every sequence runs all T steps


def infer_args(params: dict[str, Tensor], spec: CellSpec, flat_mlp: bool = True) -> tuple[Any, ...]:
    """A layer's arguments of the compiled ``forward_infer`` that do not change from call to call
    while its parameters stay the same tensors: ``(W_ih, b_ih, b_hh, W_hh, the operator's params
    list, flags, mlp_layout, scalars, proj_size)`` (``scalars``: :func:`~lstmkit.kernels.abi.scalars`,
    a list; empty tensors for absent biases; with
    ``flat_mlp`` False the deep gates' slot of the params list stays empty)."""
    empty = params["weight_ih"].new_empty(0)
    plist, mlp = operator_params(params, spec, empty, flat_mlp)
    proj = params["weight_hr"].shape[0] if "weight_hr" in params else 0
    return (params["weight_ih"], params.get("bias_ih", empty), params.get("bias_hh", empty), params["weight_hh"],
            plist, abi.flags(spec), mlp, list(abi.scalars(spec)), proj)


def forward_infer(args: tuple[Any, ...], x: Tensor, h0: Tensor, c0: Tensor | None, lengths: Tensor | None,
                  hidden_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """One no-gradient run of the compiled kernel with the input projection in the loop: ``x``
    (T, B, I), ``h0`` (B, H_out), ``c0`` (B, S·H) or None, ``args`` from :func:`infer_args`;
    returns ``y`` (T, B, H_out), ``h_n``, ``c_n``."""
    w_ih, b_ih, b_hh, w_hh, plist, flags, mlp, scalars, proj = args
    return cpu_ext.load().forward_infer(x, w_ih, b_ih, b_hh, w_hh, h0, b_ih.new_empty(0) if c0 is None else c0,
                                        _NO_LENGTHS if lengths is None else lengths, plist, flags, mlp, scalars,
                                        hidden_size, proj)


class _Kept(NamedTuple):
    """A call signature's prepared layers, with the module's parameters they were made for: its
    ``names`` and ``values`` (a parameter moved under another name — torch's prune re-registers
    ``weight`` as ``weight_orig`` and computes ``weight`` in a hook — leaves the values alike)."""

    names: tuple[str, ...]
    values: tuple[Tensor, ...]
    layers: list[Any]

    def holds(self, parameters: dict[str, Tensor]) -> bool:
        """Whether ``parameters`` (the module's, now) are the very ones, under the same names."""
        return len(parameters) == len(self.values) and all(map(operator.is_, parameters.values(), self.values)) \
            and tuple(parameters) == self.names


class PreparedStep:
    """One step on the compiled CPU kernel — of a cell or of a whole stack of layers — or a whole
    sequence (``LSTM.forward``), for a call signature whose checks the general path has passed:
    what that path derives on every call (the kernel's choice, each layer's operator parameter
    list, flags and scalars) kept per signature; a one-step-per-call decoder, policy or
    truncated-BPTT loop, or a short sequence, otherwise spends more in Python than in the kernel.
    Without gradients a step is ``forward_infer``; with them, one autograd node built in C++
    (``forward_step``: the projection and the recurrence, the same gradient as the operator's). A
    whole sequence with gradients projects its input apart from the loop, op for op as the general
    path does, so that it computes what that path computes, bit for bit.

    In training mode it draws what the general path draws, in the same order from torch's
    generator (per layer: dropout on its input but the first's, then zoneout's masks), so a seed
    gives the same masks on either path.

    :meth:`run` returns None wherever the general path must decide: a new signature (input and
    state shapes, dtypes, devices, tensor types; train or eval mode; the kernel registry's
    version), compile / export / functorch / autocast, parameters replaced or converted since, a
    NaN or inf to report. The caller then takes the general path, which checks and raises as
    always, and calls :meth:`remember` when it ran this kernel (a run with zoneout in training is
    not kept: its masks cover the whole sequence).
    """

    def __init__(self, spec: CellSpec, hidden_size: int, proj_size: int = 0) -> None:
        self.spec, self.hidden_size, self.H_out = spec, hidden_size, proj_size or hidden_size
        self._states = len(variants.cell_states(spec))  # S: the cell states side by side
        # signature -> (the module's parameters, per layer the compiled extension's PreparedLayer:
        # forward_step's arguments but x and the states), for the last few signatures (a loop's first
        # step with hx=None, then its others): a dict replaced whole on every change, so a call never
        # sees a half-made entry
        self._kept: dict[tuple, _Kept] = {}
        # when each kept signature was last run (a tick of _tick; updated in place by run(), replaced
        # whole by remember()): a full store gives up the least recently run one, so a loop's
        # every-call signature outlives a few passing ones
        self._used: dict[tuple, int] = {}
        self._tick = 0
        # bumped by clear(): a call captures it at its start (in its signature's version), and a
        # remember() of a call that began before a clear (another thread set the module's backend
        # meanwhile) keeps nothing; the lock orders clear()'s bump against remember()'s store
        self.generation = 0
        self._lock = threading.Lock()
        self._ext: Any = None  # the compiled extension, once a call has run it
        # lstmkit.freeze: each kept layer packs W_hh and W_ih once for inference (again after an
        # in-place change that torch's version counter records; a write through .data is not seen)
        self.frozen = False

    @staticmethod
    def signature(x: Tensor, hx: Any, training: bool, version: tuple[int, int], grad: bool | None = None) -> tuple:
        """What a call's checks and choices depend on besides values: types, shapes, dtypes,
        devices, the module's mode, ``version``: the kernel registry's version and this step's
        :attr:`generation` when the call began, ``(registry, generation)``; for a whole run (``grad`` given)
        also whether grad mode is on: the general path projects a run with gradients apart from its
        loop, and one without inside it."""
        states = None if hx is None else (type(hx), *[(type(t), t.shape, t.dtype, t.device, t.layout) for t in hx])
        key = (type(x), x.shape, x.dtype, x.device, x.layout, states, training, version)
        return key if grad is None else (*key, grad)

    def remember(self, key: tuple, layers: list[dict[str, Tensor]], parameters: dict[str, Tensor],
                 grad_run: bool = False) -> None:
        """After the general path ran this kernel for signature ``key``: ``layers`` each layer's
        parameters, ``parameters`` the module's own (whose identity later calls compare);
        ``grad_run``: a whole run in grad mode, prepared only where its compiled node projects the
        input as the general path did (float32 / float64 through ``F.linear``, not oneDNN's GEMM)
        and some parameter wants a gradient."""
        kind, shape, dtype, device, layout, _states, training, (_registry, generation), *_ = key  # (signature's order)
        if generation != self.generation:
            return  # cleared since the call began: what it ran may no longer be the module's choice
        held = self._kept.get(key)
        if held is not None and held.holds(parameters):
            return  # kept already (a call that took the general path under autocast or vmap): as it is
        if kind is not Tensor or layout != torch.strided or len(shape) not in (2, 3) or device.type != "cpu" \
                or not self.spec.is_lstm:
            return
        if len(shape) == 3 and training and self.spec.has_zoneout:
            return  # a run's zoneout in training: the whole sequence's masks, drawn by the general path
        if grad_run:
            rows = shape[0] * shape[1]  # T·N
            if dtype not in (torch.float32, torch.float64) or not any(p.requires_grad for p in parameters.values()) \
                    or any(_use_onednn(rows, p["weight_ih"]) for p in layers):
                return
        own = {id(p) for p in parameters.values()}
        if any(id(t) not in own for params in layers for t in params.values() if t is not None):
            return  # a tensor made for the call (a hook's, as the hook-based weight_norm's): new every call
        # only signatures of these very parameters stay: one kept for others (replaced since, or
        # torch.func.functional_call's for one call) is never run again, and would hold its tensors
        # (a signature kept for other parameters is made anew: it replaces its own entry, not another's)
        kept = {k: v for k, v in self._kept.items() if v.holds(parameters) and k != key}
        used = self._used
        while len(kept) >= KEPT_SIGNATURES:
            del kept[min(kept, key=lambda k: used.get(k, -1))]
        sibling = next(iter(kept.values()), None)  # a frozen layer packs its weights once for every signature
        # weights in shared memory (share_memory(), or received from another process) are not packed:
        # another process's in-place writes never reach this process's version counters, so packed
        # panels would keep the old W_ih, W_hh beside the new biases (share_memory() itself clears
        # the kept steps, through Module._apply, so a layer shared after its calls is seen here too)
        frozen = self.frozen and not any(t.is_shared() for params in layers for t in params.values() if t is not None)
        ext = cpu_ext.load()
        prepared = []
        for params in layers:
            with torch.inference_mode(False):  # its placeholders outlive the call: later ones may save them
                w_ih, b_ih, b_hh, w_hh, plist, flags, mlp, scalars, proj = infer_args(params, self.spec,
                                                                                       flat_mlp=False)
            prepared.append(ext.PreparedLayer(w_ih, b_ih, b_hh, w_hh, plist, _mlp_tensors(params, self.spec), flags,
                                              mlp, scalars, self.hidden_size, proj, frozen,
                                              not SIXTEEN_BIT_UNITS.get(w_ih.dtype, True),
                                              _mlp_names(params, self.spec)))
            if sibling is not None and frozen:
                prepared[-1].share_panels(sibling.layers[len(prepared) - 1])
        with self._lock:
            if generation != self.generation:
                return
            self._ext = ext
            self._tick += 1
            self._used = {**{k: used[k] for k in kept if k in used}, key: self._tick}
            self._kept = {**kept, key: _Kept(tuple(parameters), tuple(parameters.values()), prepared)}

    def clear(self) -> None:
        """Forget every kept signature (the next call of each takes the general path), and every
        call under way: none of them keeps what it ran (see :attr:`generation`)."""
        with self._lock:
            self.generation += 1
            self._kept, self._used = {}, {}

    def __getstate__(self) -> dict[str, Any]:
        """A cache: a copy or a pickle starts empty (its module's parameters are other tensors,
        and the loaded extension is no picklable value); each signature is prepared again."""
        state = {**self.__dict__, "_kept": {}, "_used": {}, "_ext": None}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("generation", 0)  # (pickled before there was one)
        self.__dict__.setdefault("_used", {})
        self.__dict__.setdefault("_tick", 0)
        self._lock = threading.Lock()

    def run(self, x: Tensor, hx: Any, parameters: dict[str, Tensor], training: bool, version: tuple[int, int],
            check_finite: bool, stacked: bool, dropout: float = 0.0, grad: bool | None = None
            ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]] | None:
        """The step for input ``x`` (N, I) and ``hx`` — a cell's ``(h, c)`` (the sLSTM's ``(h, c, n, m)``)
        each (N, H), or with ``stacked`` a stack's, each (L, N, ·) — or None (see above); ``dropout``
        on each layer's input but the first's in training. Returns the output (N, H_out), ``h'`` and
        the S cell states: a cell's (N, H_out) and (N, H) each, a stack's (L, N, H_out) and (L, N, H)
        each. With ``stacked``, ``x`` may also be a whole time-major run (T, N, I), kept by
        :meth:`LSTM.forward <lstmkit.LSTM.forward>` (``grad``: whether grad mode is on); the output is
        then (T, N, H_out)."""
        if not self._kept or torch.autograd.forward_ad._current_level >= 0:
            return None  # (a forward_ad dual level: the general path picks a row that carries it)
        try:
            key = self.signature(x, hx, training, version, grad)
            kept = self._kept.get(key)
        except (AttributeError, TypeError, RuntimeError):
            return None  # arguments that are not tensors (or nested ones, without sizes): the general path names them
        if kept is None:
            return None
        self._tick += 1  # (threads may share a tick or lose one: an order of use, not a count)
        self._used[key] = self._tick
        layers = kept.layers
        if torch.compiler.is_compiling():  # compile and export (the tensors' types are in the signature)
            return None
        if not kept.holds(parameters):
            return None
        current = kept.values
        if grad and not any(p.requires_grad for p in current):
            return None  # the general path runs it without gradients (inside its loop, where it pays)
        if current[0].dtype != x.dtype or current[0].device != x.device:
            return None  # converted in place since (module.double()): the general path names the mismatch
        # functorch, autocast, the TorchScript-based ONNX export's trace; a NaN or inf (one call)
        if not self._ext.step_ready([x] if hx is None else [x, *hx], check_finite):
            return None
        zoneout = training and self.spec.has_zoneout  # (a step's: a run's is never kept)
        if not stacked:  # a cell: (N, H_out) and the S states (N, H) each, in and out
            h, *cells = self._zeros(x, x.shape[0]) if hx is None else hx
            y, h_n, *c_n = layers[0](x, h, cells, *(self._masks(x) if zoneout else ()))
            return y, h_n, tuple(c_n)
        N = x.shape[-2]  # x: a step's (N, I) or a run's (T, N, I)
        if len(layers) == 1 and self._states == 1:  # one layer: its (1, N, ·) state in and out as it is
            h, c = (x.new_zeros(1, N, self.H_out), x.new_zeros(1, N, self.hidden_size)) if hx is None else hx
            y, h_n, c_n = layers[0](x, h, [c], *(self._masks(x) if zoneout else ()))
            return y, h_n, (c_n,)
        hs, cs = [], []
        for layer, prepared in enumerate(layers):
            if layer > 0 and dropout > 0.0 and training:
                x = torch.nn.functional.dropout(x, p=dropout, training=True)
            h, *cells = self._zeros(x, N) if hx is None else [t[layer] for t in hx]  # (N, H_out), (N, H) each
            x, h_n, *c_n = prepared(x, h, cells, *(self._masks(x) if zoneout else ()))  # x (.., N, I) -> (.., N, H_out)
            hs.append(h_n)
            cs.append(c_n)
        return x, torch.stack(hs), tuple(torch.stack(c) for c in zip(*cs))

    def _zeros(self, x: Tensor, N: int) -> list[Tensor]:
        """A state of zeros: h (N, H_out), then the S cell states (N, H) each."""
        return [x.new_zeros(N, self.H_out), *(x.new_zeros(N, self.hidden_size) for _ in range(self._states))]

    def _masks(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """This step's zoneout masks (1, N, H) and (1, N, H_out), for training, drawn as the general
        path draws them (x: the layer's input, (N, I))."""
        N = x.shape[-2]
        return cell.zoneout_masks(self.spec, (1, N, self.hidden_size), (1, N, self.H_out), x)


def _mlp_names(params: dict[str, Tensor], spec: CellSpec) -> list[str]:
    """The deep gates' tensors' names in the flat ``mlp`` param's order; [] without."""
    return abi.mlp_names(spec, "bias_ih" in params)


def _mlp_tensors(params: dict[str, Tensor], spec: CellSpec) -> list[Tensor]:
    """The deep gates' tensors in the flat ``mlp`` param's order (the compiled step reads them in
    place — their current values, no flat copy — and hands each its gradient); [] without."""
    return [params[name] for name in _mlp_names(params, spec)]


#: How many call signatures a PreparedStep keeps (one more replaces the one run least recently).
KEPT_SIGNATURES = 8


def in_loop_projection(x: Tensor, w_ih: Tensor) -> bool:
    """Whether inference computes the input projection step by step inside the compiled loop
    (``x_t W_ihᵀ`` per step, W_ih packed once and read from cache every step) rather than as
    one (T·B, I) × (I, R) GEMM whose (T, B, R) result is written out and read back.

    Always for one step (the GEMM is the same; one call instead of three). For a sequence,
    where W_ih stays in cache and a step has rows enough for the register tile, or with fewer
    rows where W_ih stays in L1 (read again every step, it then costs less than the separate
    GEMM's own call):
    """
    T, B = x.shape[0], x.shape[1]
    if T == 1:
        return True
    weight = w_ih.numel() * w_ih.element_size()
    return weight <= (IN_LOOP_MAX_WEIGHT_BYTES if B >= IN_LOOP_MIN_ROWS else IN_LOOP_L1_WEIGHT_BYTES)


#: :func:`in_loop_projection` for sequences: a step fills the 8-row register tile, W_ih fits in L2
#: (benchmarks/bench_in_loop.py times both paths against nn.LSTM per shape).
IN_LOOP_MIN_ROWS = 8
IN_LOOP_MAX_WEIGHT_BYTES = 1 << 20
#: With fewer rows (B < 8), W_ih up to this size. Measured (one thread, T = 100, time ÷ nn.LSTM's,
#: projection before the loop -> in it): W_ih of 4-16 KiB (I = H = 16, 32; B = 1, 2, 4) 1.00-1.33 ->
#: 0.80-1.04; of 36 and 64 KiB (I = H = 48, 64; B = 1) 0.95-1.02 -> 1.12-1.20.
IN_LOOP_L1_WEIGHT_BYTES = 16 << 10


def _no_gradient(x: Tensor, h0: Tensor, c0: Tensor | None, params: dict[str, Tensor]) -> bool:
    """True when no result of this run can need a gradient."""
    if not torch.is_grad_enabled():
        return True
    return not (x.requires_grad or h0.requires_grad or (c0 is not None and c0.requires_grad)
                or any(p.requires_grad for p in params.values()))


_TRITON_MISSING_WARNED = False
_TRITON_AT_IMPORT = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True if Triton can be imported (without importing it). Never raises: without it, the
    first CUDA layer that asks gets one warning and the 'reference' kernel."""
    global _TRITON_MISSING_WARNED
    if torch.compiler.is_compiling():  # dynamo cannot trace find_spec: the answer at import time
        return _TRITON_AT_IMPORT
    if importlib.util.find_spec("triton") is not None:
        return True
    if not _TRITON_MISSING_WARNED:
        _TRITON_MISSING_WARNED = True
        warnings.warn("lstmkit: Triton is not installed; CUDA layers run the 'reference' kernel "
                      "(pip install 'lstmkit[gpu]' for the fused GPU kernels)", RuntimeWarning, stacklevel=3)
    return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonKernel(FusedKernel):
    """The recurrence as Triton kernels (:mod:`lstmkit.kernels.triton_impl`) on CUDA tensors:
    float32, float64, bfloat16 and float16 (the last two compute in float32), every variant,
    with heads and deep gates. With
    ``TRITON_INTERPRET=1`` it also runs CPU tensors, through Triton's interpreter (slow; for
    tests without a GPU), when ``backend="triton"`` asks for it: then it calls its
    implementation directly, since the dispatcher sends CPU tensors to the C++ kernel."""

    name = "triton"
    heads = True  # per step: the recurrent GEMM batched over the heads (triton_gemm.recurrent)
    deep_gates = True  # per step: the gate MLPs' layers as cuBLAS GEMMs (triton_deep.DeepGates)
    # every row: triton_cell.py has each one's step and BPTT (its claim, triton_cell.IMPLEMENTED, is
    # compared with this by test_triton_row.py; this module does not import triton)
    implements = frozenset(abi.FLAGS)

    @property
    def devices(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cuda", "cpu") if _interpreting() else ("cuda",)

    @property
    def impl(self) -> ops.Impl | None:  # type: ignore[override]
        return _triton_impl() if _interpreting() else None

    def automatic(self, device: torch.device, workload: Workload | None = None) -> bool:
        return device.type == "cuda"  # the interpreter runs CPU tensors only when asked for by name

    def unsupported(self, spec: CellSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        why = self.refuses_or_dtype(spec, dtype)
        if why:
            return why
        if not triton_available():
            return "Triton is not installed (pip install 'lstmkit[gpu]')"
        return None

    def run(self, x: Tensor, lengths: Tensor | None, h0: Tensor, c0: Tensor | None,
            params: dict[str, Tensor], spec: CellSpec, hidden_size: int,
            record: bool = False, keep: tuple[Tensor, Tensor] | None = None) -> KernelOut:
        """The fused run, on a build that passed its self-check (:mod:`lstmkit.kernels.selfcheck`;
        checked the first time it is used in eager mode); a failed build's layers run on the
        reference kernel instead."""
        if selfcheck.enabled() and not torch.compiler.is_compiling() \
                and selfcheck.verdict(super().run, spec, x, h0, c0, params, hidden_size) is not None:
            return _REFERENCE.run(x, lengths, h0, c0, params, spec, hidden_size, record, keep)
        return super().run(x, lengths, h0, c0, params, spec, hidden_size, record, keep)


_REFERENCE = ReferenceKernel()
_TRITON_IMPL: Any = None


def _triton_impl() -> ops.Impl:
    """The Triton implementation (one instance; importing its module does not import triton)."""
    global _TRITON_IMPL
    if _TRITON_IMPL is None:
        from lstmkit.kernels.triton_impl import TritonImpl

        _TRITON_IMPL = TritonImpl()
    return _TRITON_IMPL


if importlib.util.find_spec("triton") is not None:  # the operators' CUDA kernels
    ops.register_device("CUDA", _triton_impl())
