"""The fused recurrence as PyTorch operators: ``lstmkit::recurrence`` and its backward.

One layer-direction's time loop, forward and hand-written BPTT, as two ``torch.library``
operators, so that everything PyTorch does with an operator works on it: ``torch.compile``
(no graph break), ``torch.export``, ``torch.func`` (``grad``, ``vmap``), autocast, FakeTensor
and meta shapes. Shapes (T steps, B batch, R = Σ n_k rows of the computed gates' first layers
(G·H for G computed gates without deep gates), H cells, H_out = proj_size or H; ``(0,)`` is an
empty tensor meaning "none")::

    lstmkit::recurrence(xg (T, B, R), w_hh (R, H_out/k), h0 (B, H_out), c0 (B, S·H) | (0,),
                        lengths (B,) int64 | (0,), params: Tensor[len(abi.PARAMS)],
                        flags: int, mlp_layout: int[]?, scalars: float[len(abi.SCALARS)],
                        hidden_size: int, proj_size: int, save: bool)
        -> y (T, B, H_out), h_n (B, H_out), c_n (B, S·H) | (0,), buffers: Tensor[len(abi.BUFFERS)]

    lstmkit::recurrence_backward(dy (T, B, H_out) | (0,), dh_n | (0,), dc_n | (0,), y, h0, c0,
                                 w_hh, lengths, params, buffers, flags, mlp_layout, scalars,
                                 hidden_size, proj_size)
        -> dxg (T, B, R), dw_hh, dh0, dc0 | (0,), dparams: Tensor[len(abi.PARAMS)]

(each tensor list and the scalars are separate named arguments of the schema, in the ABI's order;
``mlp_layout`` is :func:`lstmkit.kernels.abi.mlp_layout`, ``[]`` without deep gates; None is read as ``[]``)

``c0``/``c_n`` hold the cell's S states side by side (:func:`lstmkit.kernels.abi.cell_state_count`:
the LSTM's c, the sLSTM's c, n, m). ``w_hh`` is the stored recurrent weight: with k heads
(block-diagonal, ``heads=k``) its H_out/k columns are each row's block, and the kernels read k
from that width. ``xg`` is the input side of every step, ``x W_ihᵀ + b_ih + b_hh`` (layernorm: the raw
``x W_ihᵀ``; the kernel then normalises it and adds ``params["bias"]`` itself). ``params``
and ``dparams`` follow :data:`lstmkit.kernels.abi.PARAMS`, ``buffers`` (kept for backward
and for the trace when ``save``) :data:`~lstmkit.kernels.abi.BUFFERS`. Empty ``dy``, ``dh_n``,
``dc_n`` mean zero. Steps ``t ≥ lengths[b]`` keep the state and output zeros.

Registered here: the schemas, the fake (meta) implementation of every output shape, the
gradient (:func:`torch.library.register_autograd`, a functorch-compatible setup_context),
autocast (CPU and CUDA: the floating inputs are cast to the autocast dtype) and vmap rules.
Device implementations register themselves per dispatch key with :func:`register_device`:
the compiled CPU kernel (:mod:`lstmkit.kernels.cpu_ext`) and the Triton GPU kernels.

bfloat16 and float16: parameters, inputs and outputs keep their dtype; the kernels compute
in float32 (GEMM accumulation, gates, cell state) and keep their buffers in float32.

Eager calls take a shorter road to the same implementation (:func:`recurrence`): the
operator's Python autograd wrapper costs tens of microseconds per call, more than a whole
small layer. Plain tensors outside any transform go through :class:`_EagerRecurrence`, an
``autograd.Function`` with the same gradient (:func:`_grads`); everything else — compile,
export, functorch transforms, autocast, FakeTensors, tensor subclasses — calls the operator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from lstmkit.kernels import abi, flops

__all__ = ["NO_DOUBLE_BACKWARD", "NO_BATCHED_BACKWARD", "Impl", "register_device", "recurrence", "plain_eager",
           "eager_mode", "callable_directly", "recurrence_op", "recurrence_backward_op"]

NP, NB, NS = len(abi.PARAMS), len(abi.BUFFERS), len(abi.SCALARS)

def _schemas() -> tuple[str, str]:
    """Both schemas, from :mod:`~lstmkit.kernels.abi`'s lists: one named tensor argument per
    parameter and buffer (a ``Tensor[]`` argument would keep the operator's autograd out of
    functorch transforms in this torch version)."""
    params = ", ".join(f"Tensor {n}" for n in abi.PARAMS)
    buffers = ", ".join(f"Tensor {n}" for n in abi.BUFFERS)
    grads = ", ".join(f"Tensor d_{n}" for n in abi.PARAMS)
    scalars = ", ".join(f"float {n}" for n in abi.SCALARS)
    forward = (f"recurrence(Tensor xg, Tensor w_hh, Tensor h0, Tensor c0, Tensor lengths, {params}, int flags, "
               f"int[]? mlp_layout, {scalars}, int hidden_size, int proj_size, bool save) "
               f"-> (Tensor y, Tensor h_n, Tensor c_n, {buffers})")
    backward = (f"recurrence_backward(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor y, Tensor h0, Tensor c0, "
                f"Tensor w_hh, Tensor lengths, {params}, {buffers}, int flags, int[]? mlp_layout, {scalars}, "
                f"int hidden_size, "
                f"int proj_size) -> (Tensor dxg, Tensor dw_hh, Tensor dh0, Tensor dc0, {grads})")
    return forward, backward


_lib = torch.library.Library("lstmkit", "DEF")
for _schema in _schemas():
    _lib.define(_schema)

#: The operators (OpOverloads), for users and translation tables.
recurrence_op = torch.ops.lstmkit.recurrence.default
recurrence_backward_op = torch.ops.lstmkit.recurrence_backward.default


class Impl(Protocol):
    """A device implementation of the two operators: the same positional arguments, flat
    (``*params`` in :data:`~lstmkit.kernels.abi.PARAMS` order, ``*buffers`` in
    :data:`~lstmkit.kernels.abi.BUFFERS` order), the same flat results."""

    def forward(self, xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor,
                *params_and_meta: Any) -> tuple[Tensor, ...]: ...

    def backward(self, dy: Tensor, dh_n: Tensor, dc_n: Tensor, y: Tensor, h0: Tensor, c0: Tensor,
                 w_hh: Tensor, lengths: Tensor, *params_buffers_and_meta: Any) -> tuple[Tensor, ...]: ...


#: dispatch key -> implementation registered for it.
_DEVICES: dict[str, Impl] = {}


#: Where ``mlp_layout`` stands among each operator's positional arguments (read from its schema).
_LAYOUT_AT = {name: [a.name for a in getattr(torch.ops.lstmkit, name).default._schema.arguments].index("mlp_layout")
              for name in ("recurrence", "recurrence_backward")}


def _layout_as_list(name: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` with an ``mlp_layout`` of None read as ``[]``. The schema takes ``int[]?``, not
    ``int[]``: AOTInductor's runner (torch 2.13) passes an empty int list as None, which an
    ``int[]`` argument refuses before any kernel runs — every variant without deep gates."""
    at = _LAYOUT_AT[name]

    def call(*args: Any) -> Any:
        if len(args) > at and args[at] is None:
            args = (*args[:at], [], *args[at + 1:])
        return kernel(*args)
    return call


def register_device(dispatch_key: str, impl: Impl) -> None:
    """Register ``impl`` as both operators' kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    _lib.impl("recurrence", _layout_as_list("recurrence", impl.forward), dispatch_key)
    _lib.impl("recurrence_backward", _layout_as_list("recurrence_backward", impl.backward), dispatch_key)
    _DEVICES[dispatch_key] = impl


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# ---------------------------------------------------------------------------- fake shapes


@torch.library.register_fake("lstmkit::recurrence")
def _recurrence_fake(xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor, *rest: Any
                     ) -> tuple[Tensor, ...]:
    flags, mlp_layout, *_scalars, hidden_size, proj_size, save = rest[NP:]
    T, B, R = xg.shape
    h_out = proj_size if proj_size > 0 else hidden_size
    lstm = not flags & abi.flag("rnn")
    buffers = [xg.new_empty(s, dtype=_compute_dtype(xg.dtype))
               for s in abi.buffer_shapes(flags, T, B, R, hidden_size, save, mlp_layout or [])]
    c_n = xg.new_empty((B, abi.cell_state_count(flags) * hidden_size)) if lstm else xg.new_empty((0,))
    return (xg.new_empty((T, B, h_out)), xg.new_empty((B, h_out)), c_n, *buffers)


@torch.library.register_fake("lstmkit::recurrence_backward")
def _recurrence_backward_fake(dy: Tensor, dh_n: Tensor, dc_n: Tensor, y: Tensor, h0: Tensor, c0: Tensor,
                              w_hh: Tensor, lengths: Tensor, *rest: Any) -> tuple[Tensor, ...]:
    params, (flags, _mlp, *_scalars, hidden_size, _proj_size) = rest[:NP], rest[NP + NB:]
    T, B = y.shape[0], y.shape[1]
    # every gradient row-major, whatever its input's strides (a transposed weight_hh, a strided h0):
    # the kernels write them so, and compile's inductor asserts the strides declared here
    if flags & abi.flag("rnn"):
        dc0 = y.new_empty((0,))
    else:
        dc0 = c0.new_empty(c0.shape) if c0.numel() else y.new_empty((B, abi.cell_state_count(flags) * hidden_size))
    dparams = [p.new_empty(p.shape) if p.numel() else y.new_empty((0,)) for p in params]
    return (y.new_empty((T, B, w_hh.shape[0])), w_hh.new_empty(w_hh.shape), h0.new_empty(h0.shape), dc0, *dparams)


# ---------------------------------------------------------------------------- gradient


def _grads(ctx: Any, dy: Tensor | None, dh_n: Tensor | None, dc_n: Tensor | None,
           backward: Callable[..., tuple[Tensor, ...]]) -> tuple[Tensor | None, ...]:
    """The gradient of one call, ``(dxg, dw_hh, dh0, dc0, *dparams)``, from what it saved
    (``y, h0, c0, w_hh, lengths, *params, *buffers``) and ``ctx.meta = (flags, mlp_layout,
    *scalars, hidden_size, proj_size)``; absent parameters (and the RNN's c0) get None, and so do
    zoneout's masks (no gradient)."""
    if not torch.compiler.is_compiling() and any(
            g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in (dy, dh_n, dc_n)):
        raise RuntimeError(NO_BATCHED_BACKWARD)
    saved = ctx.saved_tensors
    y, h0, c0, w_hh, lengths, *rest = saved
    # create_graph=True (also every torch.func.grad): the hand-written backward has no graph of
    # its own, so its results carry an error node that raises if a second-order gradient is
    # ever taken through them (like torch's once_differentiable, but also when the incoming
    # gradients are constants and only the saved tensors require grad).
    upstream = [t for t in (dy, dh_n, dc_n, *saved) if t is not None and t.requires_grad]
    higher = torch.is_grad_enabled() and bool(upstream)
    if higher and _functorch_active() and _differentiation_levels() > 1:  # nested torch.func.grad
        raise RuntimeError(NO_DOUBLE_BACKWARD)
    empty = y.new_empty((0,))
    # (a backward run inside an autocast region: autocast must not recast the backward's own products)
    with torch.no_grad(), torch.autocast(y.device.type, enabled=False):
        dxg, dw_hh, dh0, dc0, *dparams = backward(
            empty if dy is None else dy, empty if dh_n is None else dh_n, empty if dc_n is None else dc_n,
            y, h0, c0, w_hh, lengths, *rest, *ctx.meta)
    grads = (dxg, dw_hh, dh0, dc0 if c0.dim() == 2 else None,  # (absent: (0,); B = 0: (0, S·H))
             *(d if p.numel() and name not in abi.NO_GRAD else None
               for d, p, name in zip(dparams, rest[:NP], abi.PARAMS)))
    if not higher:
        return grads
    # The error node's extra input, an empty tensor computed from every saved tensor that
    # requires grad, connects it to the graph a second-order gradient would traverse.
    anchor = torch.cat([t.reshape(-1)[:0] for t in upstream])
    present = [g for g in grads if g is not None]
    if _vmapping():  # (torch.func.jacrev, vmap over a vjp): torch's DelayedError reads .data, which vmap forbids
        delayed = iter(_NotTwiceDifferentiable.apply(anchor, *present))
    else:
        delayed = iter(torch._C._functions.DelayedError(NO_DOUBLE_BACKWARD, len(present) + 1)(*present, anchor))
    return tuple(None if g is None else next(delayed) for g in grads)


class _NotTwiceDifferentiable(torch.autograd.Function):
    """The error node of :func:`_grads` under vmap: its outputs are its inputs but the first
    (the anchor), and its backward raises :data:`NO_DOUBLE_BACKWARD`; functorch batches it by
    running it per batch entry (``generate_vmap_rule``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(anchor: Tensor, *grads: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:  # type: ignore[override]
        raise RuntimeError(NO_DOUBLE_BACKWARD)


#: What a backward of legacy batched gradients raises (``torch.autograd.grad(is_grads_batched=True)``,
#: ``torch.autograd.functional.jacobian(vectorize=True)``; the compiled step's node also under
#: torch.func.vmap): the kernels read plain memory, and only functorch's vmap has a rule for them.
NO_BATCHED_BACKWARD = (
    "lstmkit: the fused kernels' backward takes no batched gradients (autograd.grad(is_grads_batched=True), "
    "autograd.functional.jacobian/hessian(vectorize=True), vmap over autograd.grad); use torch.func.jacrev / "
    "torch.func.vjp under torch.func.vmap, vectorize=False, or backend='reference'")

#: What a second-order gradient through a fused kernel raises (the compiled step's node too).
NO_DOUBLE_BACKWARD = (
    "lstmkit: the fused kernels' hand-written backward is not differentiable (double backward, "
    "create_graph=True, nested torch.func.grad); build the layer with backend='reference' for "
    "higher-order gradients")


def saveable(tensors: Any) -> list[Any]:
    """Tensors to save for a backward: one made under ``torch.inference_mode()`` (a state, lengths or
    a frozen weight of a call whose other parameters train), which autograd refuses to save, as a
    copy of its values (it has no version counter to check); the others as they are. (Under compile
    and export, which trace no such tensor and cannot trace the question: as they are.)"""
    if torch.compiler.is_compiling():
        return list(tensors)
    return [t.clone() if isinstance(t, Tensor) and t.is_inference() else t for t in tensors]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    xg, w_hh, h0, c0, lengths, *rest = inputs
    params, meta = rest[:NP], rest[NP:]
    y, _h_n, _c_n, *buffers = output
    ctx.save_for_backward(y, *saveable((h0, c0, w_hh, lengths, *params)), *buffers)  # (outputs: never inference)
    ctx.meta = tuple(meta[:-1])  # (flags, mlp_layout, *scalars, hidden_size, proj_size): all but save
    ctx.kept = bool(meta[-1])  # save: whether the forward kept what its backward reads


def _backward(ctx: Any, dy: Tensor | None, dh_n: Tensor | None, dc_n: Tensor | None,
              *_dbuffers: Any) -> tuple[Any, ...]:
    if not ctx.kept:
        raise RuntimeError("lstmkit::recurrence: this call ran with save=False and kept nothing for its backward; "
                           "call it with save=True to differentiate it")
    dxg, dw_hh, dh0, dc0, *dparams = _grads(ctx, dy, dh_n, dc_n, recurrence_backward_op)
    return (dxg, dw_hh, dh0, dc0, None, *dparams, *[None] * (NS + 5))  # lengths; flags, mlp, scalars, sizes, save


torch.library.register_autograd("lstmkit::recurrence", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- autocast


def _autocast(device_type: str) -> Callable[..., Any]:
    """Autocast kernel: cast the floating inputs (float64 ones excepted, as torch's autocast leaves
    them) to the autocast dtype of ``device_type``, run."""
    key = torch._C.DispatchKey.AutocastCPU if device_type == "cpu" else torch._C.DispatchKey.AutocastCUDA

    def kernel(*args: Any) -> Any:
        dtype = torch.get_autocast_dtype(device_type)

        def cast(a: Any) -> Any:  # as torch's autocast casts: floating tensors but float64 ones
            return a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64 \
                and a.numel() else a
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return recurrence_op(*(cast(a) for a in args))
    return kernel


_lib.impl("recurrence", _autocast("cpu"), "AutocastCPU")
_lib.impl("recurrence", _autocast("cuda"), "AutocastCUDA")


# ---------------------------------------------------------------------------- vmap


def _loop(op: Callable[..., Any], batch_size: int, in_dims: Sequence[Any], args: Sequence[Any]) -> tuple[Any, Any]:
    """vmap by a loop over the batch: call ``op`` on each slice and stack the results (an
    empty result stays unbatched)."""
    def pick(arg: Any, dim: int | None, v: int) -> Any:
        return arg.select(dim, v) if isinstance(arg, Tensor) and dim is not None else arg
    results = [op(*(pick(a, d, v) for a, d in zip(args, in_dims))) for v in range(batch_size)]
    outs, dims = [], []
    for values in zip(*results):
        empty = values[0].numel() == 0
        outs.append(values[0] if empty else torch.stack(values))
        dims.append(None if empty else 0)
    return tuple(outs), tuple(dims)


@torch.library.register_vmap("lstmkit::recurrence")
def _recurrence_vmap(info: Any, in_dims: Sequence[Any], xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor,
                     lengths: Tensor, *rest: Any) -> tuple[Any, Any]:
    """Batched inputs with shared weights fold the vmap dimension into the batch: one call of
    V·B sequences. Batched weights or lengths (e.g. an ensemble of stacked parameters) loop."""
    xg_d, w_d, h_d, c_d, len_d, *p_d = in_dims[:5 + NP]
    V = info.batch_size
    if w_d is not None or len_d is not None or any(d is not None for d in p_d):
        return _loop(recurrence_op, V, in_dims, (xg, w_hh, h0, c0, lengths, *rest))

    def fold(t: Tensor, dim: int | None, at: int) -> Tensor:  # (…, V, B, …) -> (…, V·B, …) at `at`
        if t.numel() == 0:
            return t
        t = t.unsqueeze(at).expand(*t.shape[:at], V, *t.shape[at:]) if dim is None else t.movedim(dim, at)
        return t.reshape(*t.shape[:at], V * t.shape[at + 1], *t.shape[at + 2:])
    xg = fold(xg, xg_d, 1)                                              # (T, V·B, R)
    T, B = xg.shape[0], xg.shape[1] // V
    reps = lengths.repeat(V) if lengths.numel() else lengths
    y, h_n, c_n, *buffers = recurrence_op(xg, w_hh, fold(h0, h_d, 0), fold(c0, c_d, 0), reps, *rest)
    outs = [y.view(T, V, B, -1), h_n.view(V, B, -1), c_n.view(V, B, -1) if c_n.numel() else c_n]
    outs += [b.view(T, V, B, -1) if b.numel() else b for b in buffers]   # (T, V, B, ·)
    dims = [1, 0, 0 if c_n.numel() else None] + [1 if b.numel() else None for b in buffers]
    return tuple(outs), tuple(dims)


@torch.library.register_vmap("lstmkit::recurrence_backward")
def _recurrence_backward_vmap(info: Any, in_dims: Sequence[Any], *args: Any) -> tuple[Any, Any]:
    """Per-sample gradients: a loop (weight gradients must not be summed over the vmap batch)."""
    return _loop(recurrence_backward_op, info.batch_size, in_dims, args)


# ---------------------------------------------------------------------------- eager road


class _Recurrence(torch.autograd.Function):
    """The operator's forward and gradient as an ``autograd.Function`` (see the module
    docstring): for plain eager tensors it calls the device implementation directly, without
    the operator's Python autograd wrapper; under functorch transforms it calls the operator
    (whose vmap rules then apply: ``generate_vmap_rule``) — torch's ``register_autograd``
    wrapper is an autograd.Function without setup_context, which functorch refuses. Same
    gradient as the operator's: :func:`_grads`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(impl: Impl | None, meta: tuple[Any, ...], lengths: Tensor, xg: Tensor,
                w_hh: Tensor, h0: Tensor, c0: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
        if impl is None:
            return tuple(recurrence_op(xg, w_hh, h0, c0, lengths, *params, *meta))
        return tuple(impl.forward(xg, w_hh, h0, c0, lengths, *params, *meta))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        impl, meta, lengths, _xg, w_hh, h0, c0, *params = inputs
        ctx.set_materialize_grads(False)
        if meta[-1]:  # save
            ctx.save_for_backward(output[0], *saveable((h0, c0, w_hh, lengths, *params)), *output[3:])
            ctx.meta = meta[:-1]  # (flags, mlp_layout, *scalars, hidden_size, proj_size)
            ctx.backward_fn = recurrence_backward_op if impl is None else impl.backward
        ctx.mark_non_differentiable(*output[3:])

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None, dh_n: Tensor | None, dc_n: Tensor | None,
                 *_dbuffers: Any) -> tuple[Any, ...]:
        return (None, None, None, *_grads(ctx, dy, dh_n, dc_n, ctx.backward_fn))


class _EagerRecurrence(torch.autograd.Function):
    """:class:`_Recurrence` for plain eager tensors, with the old-style ``forward(ctx, …)``:
    ``autograd.Function.apply`` binds a setup_context-style Function's arguments through
    ``inspect.signature`` on every call (measured: ~150 µs of a 0.3 ms call at the tiny
    shape); this one saves the same context in its forward and shares the backward."""

    @staticmethod
    def forward(ctx: Any, impl: Impl, meta: tuple[Any, ...], lengths: Tensor, xg: Tensor,
                w_hh: Tensor, h0: Tensor, c0: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
        out = tuple(impl.forward(xg, w_hh, h0, c0, lengths, *params, *meta))
        _Recurrence.setup_context(ctx, (impl, meta, lengths, xg, w_hh, h0, c0, *params), out)
        return out

    backward = staticmethod(_Recurrence.backward)


_PLAIN = (Tensor, torch.nn.Parameter)


def plain_eager(tensors: Sequence[Tensor]) -> bool:
    """True for plain tensors in eager mode: no compile/export tracing, functorch transform,
    autocast, FakeTensor or tensor subclass."""
    return eager_mode(tensors[0].device.type) and all(type(t) in _PLAIN for t in tensors)


def callable_directly(tensors: Sequence[Tensor]) -> bool:
    """:func:`plain_eager`, and no Python dispatch mode active (a ``TorchDispatchMode`` — a logging
    or FLOP-counting mode — or ``FakeTensorMode``): the compiled kernel may be called without the
    dispatcher. Under a mode it is called as the operator, so that the mode sees it."""
    return plain_eager(tensors) and torch._C._len_torch_dispatch_stack() == 0


def eager_mode(device_type: str) -> bool:
    """:func:`plain_eager` without the tensors: no compile/export tracing, functorch transform or
    autocast on ``device_type`` (for a caller that has checked its tensors' types already)."""
    return not (torch.compiler.is_compiling() or _functorch_active()
                or (device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)))


def _functorch_active() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def _transforms() -> list[Any]:
    """The kinds (``TransformType``) of the active functorch transforms, outermost first."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return [i.key() for i in retrieve_all_functorch_interpreters()]


def _vmapping() -> bool:
    """Whether a functorch vmap transform is active (also inside torch.func.jacrev)."""
    from torch._C._functorch import TransformType

    return TransformType.Vmap in _transforms()


def _differentiation_levels() -> int:
    """Active functorch grad/jvp transforms (two or more: a higher-order derivative)."""
    from torch._C._functorch import TransformType

    return sum(k in (TransformType.Grad, TransformType.Jvp) for k in _transforms())


def recurrence(xg: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor, params: Sequence[Tensor],
               flags: int, mlp_layout: Sequence[int], scalars: Sequence[float], hidden_size: int, proj_size: int,
               save: bool, impl: Impl | None = None) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Run ``lstmkit::recurrence`` (arguments and shapes as in the module docstring); returns
    ``(y, h_n, c_n, buffers)``.

    Args:
        params: :data:`~lstmkit.kernels.abi.PARAMS` in order (empty tensors where absent).
        mlp_layout: the deep gates (:func:`~lstmkit.kernels.abi.mlp_layout`; ``[]`` without).
        scalars: :data:`~lstmkit.kernels.abi.SCALARS` in order (:func:`~lstmkit.kernels.abi.scalars`).
        impl: call this implementation directly instead of dispatching on the device (the
            Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``, which the dispatcher
            would send to the CPU kernel); eager tensors only.
    """
    meta = (flags, list(mlp_layout), *scalars, hidden_size, proj_size, save)
    if impl is not None or callable_directly((xg, w_hh, h0, c0, *params)):
        impl = impl or _DEVICES["CUDA" if xg.is_cuda else "CPU"]
        if save:
            out = _EagerRecurrence.apply(impl, meta, lengths, xg, w_hh, h0, c0, *params)
        else:  # no gradient wanted: nothing for autograd to record
            out = tuple(impl.forward(xg, w_hh, h0, c0, lengths, *params, *meta))
    elif _functorch_active() and not torch.compiler.is_compiling():
        out = _Recurrence.apply(None, meta, lengths, xg, w_hh, h0, c0, *params)
    else:  # compile, export, autocast, FakeTensors, subclasses, dispatch modes: the operator itself
        out = recurrence_op(xg, w_hh, h0, c0, lengths, *params, *meta)
    return out[0], out[1], out[2], list(out[3:])


flops.register_when_imported()  # FlopCounterMode counts the operators' products (lstmkit.kernels.flops)
