"""Checks of what a user passes to lstmkit's modules: constructor arguments (device, dtype,
backend, sizes that must fit in memory) and call inputs (finite values, hand-built packed
sequences). Each raises one ValueError or TypeError that names the argument and the fix."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.utils.rnn import PackedSequence

from lstmkit import kernels
from lstmkit.kernels import cpu_ext
from lstmkit.kernels.base import FLOAT_DTYPES, vmapped
from lstmkit.kernels.onnx_export import exporting
from lstmkit.kernels.ops import saveable
from lstmkit.spec import CellSpec, layer_param_shapes

__all__ = ["check_finite", "check_finite_all", "check_device", "check_backend", "check_dtype", "check_memory",
           "check_packed_sequence", "check_parameters", "check_init_values", "check_clip", "check_dense",
           "check_lengths", "check_input_size", "check_module_input", "input_dtype_ok", "vmapped", "NONFINITE_INPUT"]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_finite(t: Tensor, message: str) -> None:
    """Raise ValueError(message) if ``t`` holds a NaN or inf.

    Eager: one reduction (a NaN or inf makes the sum NaN or inf; only then, or on overflow
    of finite values, is every element checked). Under ``torch.compile`` and
    ``torch.export`` a Python ``if`` on tensor data cannot be traced, so the check becomes
    an assertion node in the graph (``torch._assert_async``: the compiled or exported
    program raises a RuntimeError with this message), as it does while a CUDA graph is
    captured (a host read would end the capture). Under ``vmap`` the check is skipped
    (a batched tensor has no single truth value), as it is during ONNX export (the ONNX
    graph has no assertions), and on the meta device and under ``FakeTensorMode`` (no values:
    shapes only).
    """
    if t.device.type == "meta" or (not torch.compiler.is_compiling() and _faking(t)):
        return  # (compile's tracer runs fake tensors too: its graph asserts, below)
    if type(t) in _PLAIN and not torch.compiler.is_compiling() and not _functorch.is_functorch_wrapped_tensor(t):
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            torch._assert_async(torch.isfinite(t).all(), message)  # a CUDA graph cannot read a value back
            return
        # plain eager data (the common case, first): one reduction and one read of its value
        if not (math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())):
            raise ValueError(message)
        return
    if exporting():
        return
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(t).all(), message)
        return
    if vmapped(t):
        return
    if not (bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())):
        raise ValueError(message)


def check_finite_all(checks: list[tuple[Tensor, str]]) -> None:
    """:func:`check_finite` on each ``(tensor, message)``: plain eager CPU tensors in one call
    of the compiled kernel once it is loaded (a step's input and state: one call, not three
    reductions and reads)."""
    tensors = [t for t, _ in checks]
    if not torch.compiler.is_compiling() and all(
            type(t) in _PLAIN and t.device.type == "cpu" and not _functorch.is_functorch_wrapped_tensor(t)
            for t in tensors):
        bad = cpu_ext.first_nonfinite(tensors)
        if bad is not None:
            if bad >= 0:
                raise ValueError(checks[bad][1])
            return
    for t, message in checks:
        check_finite(t, message)


_PLAIN = (Tensor, nn.Parameter)
_functorch = torch._C._functorch


def _faking(t: Tensor) -> bool:
    """Whether ``t`` is a FakeTensor or a FakeTensorMode is active (shapes, no values)."""
    return isinstance(t, FakeTensor) or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def check_device(device: Any) -> Any:
    """The ``device`` argument, refused with its name if it cannot hold the parameters."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device: {device!r} is not a device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r} asks for CUDA, but this torch sees no CUDA device "
                         f"(torch.cuda.is_available() is False); use device='cpu'")
    return device


def check_backend(backend: Any, spec: CellSpec) -> str | None:
    """The ``backend`` argument: None or a registered kernel that can run ``spec``."""
    if backend is not None:
        why = kernels.kernel_named(backend).refuses(spec)
        if why:
            raise kernels.refusal(backend, why)
    return backend


NONFINITE_INPUT = ("input: contains NaN or inf; lstmkit checks this so that bad data fails here and not as "
                    "NaN weights later (pass check_finite=False to skip the check)")

def check_dtype(dtype: Any) -> None:
    """Raise TypeError unless ``dtype`` is None or one a layer computes in (:data:`FLOAT_DTYPES`)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES):
        raise TypeError(f"dtype: expected one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype!r}")


def check_init_values(spec: CellSpec, dtype: torch.dtype | None) -> None:
    """Raise ValueError naming an initial gate bias (``fb=``, ``ib=``, ``ob=``) that the layer's
    dtype cannot hold (``fb=1e5`` in float16 would be inf), a chrono ``T_max`` beyond the
    float32 (float64 layer: float64) range its draw takes place in, or a cell clip that rounds to
    0 in the layer's dtype (``clip=1e-10`` in float16: every cell state and output 0)."""
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    check_clip(spec, dtype)
    limit = torch.finfo(dtype).max
    for gate, value in spec.init_biases.items():
        if not abs(value) <= limit:
            raise ValueError(f"cell: the initial bias of gate {gate} ({value:g}) does not fit in {dtype} "
                             f"(largest {limit:g})")
    draw = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
    if spec.chrono is not None and not spec.chrono <= draw:
        raise ValueError(f"cell: chrono's T_max ({spec.chrono:g}) is beyond the range its draw takes place in "
                         f"(largest {draw:g})")


def check_clip(spec: CellSpec, dtype: torch.dtype) -> None:
    """ValueError where the cell clip rounds to 0 in ``dtype`` (``clip=1e-10`` in float16: every cell
    state and output 0): at construction, and by every call of a layer converted since."""
    if spec.cell_clip is not None and spec.cell_clip <= _smallest_positive(dtype) / 2:  # (ties round to even: 0)
        raise ValueError(f"cell: clip={spec.cell_clip:g} rounds to 0 in {dtype}, which would clip every cell "
                         f"state to 0 (its smallest positive value is {_smallest_positive(dtype):g})")


def _smallest_positive(dtype: torch.dtype) -> float:
    """The smallest positive value of ``dtype`` (its smallest subnormal: the smallest normal times eps)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(spec: CellSpec, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool,
                  proj_size: int, bias: bool, device: Any, dtype: Any) -> None:
    """Refuse, naming the sizes, parameters that would not fit in this machine's memory
    (before allocating them: a typo such as ``deep=2147483648`` must not reach the allocator)."""
    dev = torch.device(device) if device is not None else torch.empty(0).device
    if dev.type != "cpu":
        return
    memory = _physical_memory()
    if memory is None:
        return
    out = proj_size or hidden_size
    dirs = 2 if bidirectional else 1
    per = [sum(math.prod(s) for s in layer_param_shapes(spec, n_in, hidden_size, proj_size, bias).values())
           for n_in in (input_size, out * dirs)]
    values = dirs * (per[0] + (num_layers - 1) * per[1])
    size = values * (torch.finfo(dtype).bits // 8 if dtype is not None else torch.get_default_dtype().itemsize)
    if size > memory:
        raise ValueError(
            f"input_size, hidden_size, num_layers, cell: the parameters would take {size / 2**30:,.1f} GiB "
            f"({values:,} values), more than this machine's {memory / 2**30:,.1f} GiB of memory "
            f"(input_size={input_size}, hidden_size={hidden_size}, num_layers={num_layers}, cell={spec.name!r})")


def check_packed_sequence(packed: PackedSequence, what: str = "input") -> None:
    """Raise ValueError naming what is inconsistent in a (hand-built) PackedSequence:
    ``batch_sizes`` must be a positive, non-increasing 1-D int64 CPU tensor adding up to
    the rows of ``data``; the index tensors permutations of the batch, inverse to each other."""
    data, bs = packed.data, packed.batch_sizes
    if not isinstance(data, Tensor) or data.dim() != 2:
        raise ValueError(f"{what}: PackedSequence.data must be a 2-D (sum of lengths, input_size) tensor, got "
                         f"{type(data).__name__ if not isinstance(data, Tensor) else f'shape {_shape(data)}'}")
    if not isinstance(bs, Tensor) or bs.dim() != 1 or bs.numel() == 0 or bs.dtype != torch.int64 \
            or bs.device.type != "cpu":
        raise ValueError(f"{what}: PackedSequence.batch_sizes must be a non-empty 1-D int64 CPU tensor, got "
                         f"{bs!r}"[:200])
    if bool((bs < 1).any()) or bool((bs[1:] > bs[:-1]).any()):
        raise ValueError(f"{what}: PackedSequence.batch_sizes must be positive and non-increasing, got "
                         f"{bs.tolist()[:12]}")
    if int(bs.sum()) != data.shape[0]:
        raise ValueError(f"{what}: PackedSequence.data has {data.shape[0]} rows but its batch_sizes add up to "
                         f"{int(bs.sum())}")
    B = int(bs[0])
    ident = torch.arange(B)
    for name, idx in (("sorted_indices", packed.sorted_indices), ("unsorted_indices", packed.unsorted_indices)):
        if idx is None:
            continue
        if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.numel() != B or idx.dtype != torch.int64 \
                or not torch.equal(idx.cpu().sort().values, ident):
            raise ValueError(f"{what}: PackedSequence.{name} must be a permutation of 0..{B - 1} (int64), got "
                             f"{idx!r}"[:200])
    s, u = packed.sorted_indices, packed.unsorted_indices
    if (s is None) != (u is None) or (s is not None and not torch.equal(s.cpu()[u.cpu()], ident)):
        raise ValueError(f"{what}: PackedSequence.unsorted_indices must be the inverse of sorted_indices")


def check_lengths(lengths: Any, input: Any, batch_first: bool) -> Tensor:
    """``lengths=`` of a layer's call as a (N,) int64 CPU tensor (from a tensor, a NumPy integer
    array or a sequence of ints), checked against the padded ``input`` (T, N, I), or (N, T, I)
    with ``batch_first``: one length per sequence, each in [1, T] (under compile and export an
    assertion in the graph)."""
    if isinstance(input, PackedSequence):
        raise ValueError("lengths: a PackedSequence carries its own lengths; pass a padded tensor with lengths=")
    if not isinstance(input, Tensor) or input.dim() != 3:
        raise ValueError("lengths: needs a batched 3-D padded input (a 2-D input is one unbatched sequence)")
    T, N = (input.shape[1], input.shape[0]) if batch_first else (input.shape[0], input.shape[1])
    if isinstance(lengths, np.ndarray) and lengths.dtype.kind in "iu":  # (as pack_padded_sequence takes them)
        if lengths.dtype.kind == "u" and lengths.size and int(lengths.max()) >= 2**63:  # (would wrap below 0)
            raise ValueError(f"lengths: each must be in [1, L = {T}], got max {int(lengths.max())}")
        lengths = torch.from_numpy(lengths.astype(np.int64, copy=False))
    if isinstance(lengths, Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool \
                or lengths.dim() != 1:
            raise TypeError(f"lengths: expected a 1-D integer tensor or a sequence of ints, got a "
                            f"{lengths.dim()}-D {lengths.dtype} tensor")
        if lengths.device.type == "meta":
            raise ValueError("lengths: a tensor on the meta device holds no values; give the lengths on the CPU")
        check_dense(lengths, "lengths")
        lens = lengths.to(device="cpu", dtype=torch.int64)
        (lens,) = saveable([lens])  # (made under inference_mode: a call with gradients saves it for its backward)
    elif isinstance(lengths, (list, tuple)) and all(isinstance(n, numbers.Integral) and not isinstance(n, bool)
                                                     for n in lengths):
        if any(not -2**63 <= int(n) < 2**63 for n in lengths):
            raise ValueError(f"lengths: each must be in [1, L = {T}], got {max(lengths, key=abs)}")
        lens = torch.tensor([int(n) for n in lengths], dtype=torch.int64)
    else:
        raise TypeError(f"lengths: expected a 1-D integer tensor or a sequence of ints, got "
                        f"{type(lengths).__name__}")
    if lens.numel() != N:
        raise ValueError(f"lengths: expected one length per sequence ({N}), got {lens.numel()}")
    if torch.compiler.is_compiling():  # values are data: a check in the graph (compile, export), not a branch
        # (the message does not name T's value: formatting a dynamic size into it would specialise the
        # graph to that size, and dynamo reads a SymInt's type as int)
        torch._assert_async(((lens >= 1) & (lens <= T)).all(),
                            "lengths: each must be in [1, L], L the padded input's number of steps")
        return lens
    values = plain_values(lens)  # under vmap over lengths: every member's, checked at once
    if N and not (bool((values >= 1).all()) and bool((values <= T).all())):
        raise ValueError(f"lengths: each must be in [1, L = {T}], got min {int(values.min())}, "
                         f"max {int(values.max())}")
    return lens


def plain_values(t: Tensor) -> Tensor:
    """``t``'s values as a plain tensor: under functorch transforms (``vmap`` batching it, ``grad``)
    the tensor they wrap, level by level (a batched tensor's members all at once), so that a check
    on the values is not data-dependent control flow inside the transform."""
    from torch._C import _functorch

    while _functorch.is_functorch_wrapped_tensor(t) or _functorch.is_batchedtensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def check_dense(t: Tensor, what: str, values: bool = False) -> None:
    """Raise TypeError unless ``t`` is a dense (strided) tensor: a sparse, mkldnn or nested one
    is named here rather than failing inside a kernel. ``values``: a tensor whose values are read
    as they are (weights written into a layer or loaded from a file, which
    ``torch.load(weights_only=True)`` hands over in any form), not on the meta device nor quantized
    either."""
    if values and (t.layout != torch.strided or t.is_nested or t.is_meta or t.is_quantized):
        kind = ("nested" if t.is_nested else "quantized" if t.is_quantized else "meta" if t.is_meta
                else str(t.layout).removeprefix("torch."))
        raise TypeError(f"{what}: expected a dense tensor with values, got a {kind} tensor")
    if t.layout != torch.strided or t.is_nested:
        kind = "nested" if t.is_nested else str(t.layout).replace("torch.", "")
        raise TypeError(f"{what}: expected a dense (strided) tensor, got a {kind} one; convert it first "
                        f"(e.g. .to_dense(), or torch.nested.to_padded_tensor with lengths=)")


def check_parameters(parameters: Mapping[str, Tensor | None], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError (shape) or TypeError (dtype, device) naming the first parameter that is not
    as the module's variant reads it: each of ``shapes`` (name -> shape, from
    :func:`lstmkit.spec.layer_param_shapes`) present with that shape, all of one floating dtype and
    one device. A parameter replaced, loaded with ``load_state_dict(..., assign=True)`` or set
    through ``.data`` since the module was built is refused here, before any work, instead of
    being read past its end by a kernel or cast silently. A sparse, mkldnn or nested one is a
    TypeError (check_dense): the kernels read strided memory."""
    first: tuple[str, Tensor] | None = None
    for name, shape in shapes.items():
        p = parameters.get(name)
        if p is None:
            raise ValueError(f"parameter {name}: missing (None); this layer's cell reads one of shape {shape}")
        check_dense(p, f"parameter {name}")
        if tuple(p.shape) != shape:
            raise ValueError(f"parameter {name}: this layer's cell reads shape {shape}, got {tuple(p.shape)}")
        if first is None:
            if not p.dtype.is_floating_point:
                raise TypeError(f"parameter {name}: expected a floating-point dtype, got {p.dtype}")
            first = (name, p)
        elif p.dtype != first[1].dtype or p.device != first[1].device:
            raise TypeError(f"parameter {name}: {p.dtype} on {p.device}, but {first[0]} is {first[1].dtype} on "
                            f"{first[1].device}; convert the module as a whole, e.g. module.to({first[1].dtype})")


def input_dtype_ok(x: Tensor, weight: Tensor) -> bool:
    """Whether a module with parameters of ``weight``'s dtype takes input ``x``'s dtype: the same,
    or under autocast on ``x``'s device the autocast dtype with float32 parameters (as a
    float32 layer after an autocast ``nn.Linear``; the operator then runs in the autocast dtype)."""
    if x.dtype == weight.dtype:
        return True
    device = x.device.type
    return weight.dtype == torch.float32 and device in ("cpu", "cuda") and torch.is_autocast_enabled(device) \
        and x.dtype == torch.get_autocast_dtype(device)


def check_input_size(x: Tensor, what: str, input_size: int) -> None:
    """Raise ValueError unless ``x``'s last dimension is a module's ``input_size``."""
    if x.shape[-1] != input_size:
        raise ValueError(f"{what}: expected input size (last dimension) {input_size}, got {x.shape[-1]} "
                         f"(shape {_shape(x)})")


def check_module_input(x: Tensor, what: str, dims: tuple[int, ...], shapes: str, weight: Tensor, owner: str,
                       input_size: int) -> None:
    """Raise TypeError / ValueError, naming ``what``, unless ``x`` is an input the module takes: a dense
    tensor of one of ``dims`` dimensions (``shapes`` says which, e.g. "a 1-D (I,) or 2-D (N, I)
    tensor"), floating point, in the dtype of the module's ``weight`` (or autocast's,
    :func:`input_dtype_ok`) and on its device, its last dimension ``input_size``. ``owner`` ("layer",
    "cell") names the module in the messages."""
    check_dense(x, what)
    if x.dim() not in dims:
        raise ValueError(f"{what}: expected {shapes}, got {x.dim()}-D of shape {_shape(x)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{what}: expected a floating-point tensor, got dtype {x.dtype}")
    if not input_dtype_ok(x, weight):
        raise TypeError(f"{what}: dtype {x.dtype} does not match the {owner}'s parameters ({weight.dtype}); "
                        f"convert one of them, e.g. {owner}.to({x.dtype}) or input.to({weight.dtype})")
    if x.device != weight.device:
        raise ValueError(f"{what}: on device {x.device}, but the {owner}'s parameters are on {weight.device}")
    check_input_size(x, what, input_size)
