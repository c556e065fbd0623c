"""Kernels: one interface, a registry table, and the choice of kernel per layer.

``REGISTRY`` lists the kernels in order of preference; :func:`select` returns the first
that supports a layer's spec, device and dtype, or the one ``backend=`` names.
``reference`` (the autograd loop over :mod:`lstmkit.cell`) is always a row.
"""

from __future__ import annotations

from typing import Any

import torch

from lstmkit._suggest import did_you_mean
from lstmkit.kernels.base import TRACE_KEYS, Kernel, KernelOut, Workload, forward_mode_active
from lstmkit.kernels.fused import FusedCPUKernel, TritonKernel
from lstmkit.kernels.onnx_export import OnnxExportKernel, exporting
from lstmkit.kernels.reference import ReferenceKernel
from lstmkit.kernels.torch_native import TorchKernel
from lstmkit.spec import CellSpec

__all__ = ["Kernel", "KernelOut", "Workload", "TRACE_KEYS", "REGISTRY", "select", "register", "registry_version",
           "forget_choices", "kernel_named", "refusal", "why_not"]

#: name -> kernel, fastest first.
REGISTRY: dict[str, Kernel] = {}
_version = 0


def registry_version() -> int:
    """A number that changes with every :func:`register`: a choice kept from before is stale."""
    return _version


def register(kernel: Kernel, first: bool = False) -> None:
    """Add a kernel row (``first=True`` puts it before the others)."""
    global REGISTRY, _version
    _version += 1
    if first:
        REGISTRY = {kernel.name: kernel, **{k: v for k, v in REGISTRY.items() if k != kernel.name}}
    else:
        REGISTRY[kernel.name] = kernel


register(ReferenceKernel())
register(TritonKernel(), first=True)  # CUDA (and CPU tensors under TRITON_INTERPRET=1, for tests)
register(FusedCPUKernel(), first=True)  # before triton: CPU layers keep the C++ kernel
register(TorchKernel(), first=True)  # cuDNN on CUDA for the cells it computes; oneDNN on the CPU where measured faster
register(OnnxExportKernel(), first=True)  # chosen during torch.onnx.export only (see select)


def select(spec: CellSpec, device: torch.device, dtype: torch.dtype,
           backend: str | Kernel | None = None, record: bool = False, workload: Workload | None = None) -> Kernel:
    """The kernel to run ``spec`` on ``device`` in ``dtype``: the first registered row that
    supports it and may be chosen automatically there for ``workload`` (:meth:`Kernel.automatic`;
    None: a call not described); with ``record`` (a trace), the first such row that can record,
    and while a forward-mode derivative is taken (:func:`~lstmkit.kernels.base.forward_mode_active`)
    the first that can carry it — a forced ``backend`` that cannot gives way to it.

    Args:
        backend: a registry name to force, a Kernel instance (used as it is, unregistered:
            instrumented kernels such as gradient_flow's probe), or None for the fastest
            registered kernel that supports it.
    During ``torch.onnx.export`` every layer is written as ONNX operators
    (:class:`~lstmkit.kernels.onnx_export.OnnxExportKernel`), whatever ``backend`` says.

    Raises:
        ValueError: ``backend`` is unknown or cannot run this spec/device/dtype.
    """
    if exporting() and not isinstance(backend, Kernel):
        return REGISTRY[OnnxExportKernel.name]
    if backend is not None and isinstance(backend, Kernel):  # (an ABC's isinstance is slow: not for None)
        why = why_not(backend, spec, device, dtype)
        if why:
            raise refusal(backend.name, why)
        return backend
    forward = forward_mode_active()
    if backend is not None:
        kernel = kernel_named(backend)
        why = why_not(kernel, spec, device, dtype)
        if why:
            raise refusal(backend, why)
        if (kernel.records or not record) and (kernel.forward_ad or not forward):
            return kernel
    if workload is None or forward:
        return _first_automatic(spec, device, dtype, record, None, forward)
    # a plain eager call (every call of a training loop): the row found before for the same call.
    # The rows' answers depend on the call, the registry, oneDNN's switch and torch's thread count
    # (against OpenMP's thread limit: cpu_ext.full_omp_teams), all in the key (the rows' other
    # facts — the CPU, whether an extension built — do not change in a process)
    key = (spec, device, dtype, record, workload, _version, torch._C._get_mkldnn_enabled(), torch.get_num_threads())
    kernel = _chosen.get(key)
    if kernel is None:
        if len(_chosen) >= 1024:  # e.g. every sequence length once: start over
            _chosen.clear()
        kernel = _chosen[key] = _first_automatic(spec, device, dtype, record, workload)
    return kernel


_chosen: dict[tuple[object, ...], Kernel] = {}


def forget_choices() -> None:
    """Forget the rows :func:`select` found for plain eager calls (for a test that fakes a fact a
    row reads, such as the CPU's units or a failed build: in a process they do not change)."""
    _chosen.clear()


def _first_automatic(spec: CellSpec, device: torch.device, dtype: torch.dtype, record: bool,
                     workload: Workload | None, forward: bool = False) -> Kernel:
    for kernel in REGISTRY.values():
        if kernel.automatic(device, workload) and (kernel.records or not record) \
                and (kernel.forward_ad or not forward) and why_not(kernel, spec, device, dtype) is None:
            return kernel
    raise RuntimeError("no kernel supports this layer, not even 'reference'")  # unreachable


def kernel_named(name: Any) -> Kernel:
    """The registered kernel ``name``.

    Raises:
        ValueError: no kernel has that name (the message names the registered ones).
    """
    if not isinstance(name, str) or name not in REGISTRY:
        hint = did_you_mean(name, REGISTRY) if isinstance(name, str) else ""
        raise ValueError(f"backend: unknown kernel {name!r}{hint}; expected one of {list(REGISTRY)}")
    return REGISTRY[name]


def refusal(name: str, why: str) -> ValueError:
    """The error of a kernel forced by ``backend=`` that cannot run a layer, ``why`` (from
    :func:`why_not` or :meth:`Kernel.refuses`) its reason."""
    return ValueError(f"backend: kernel {name!r} cannot run this layer: {why}")


def why_not(kernel: Kernel, spec: CellSpec, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``kernel`` cannot run a layer of ``spec`` on ``device`` in ``dtype``; None if it can."""
    if device.type not in kernel.devices:
        return f"it runs on {list(kernel.devices)}, not on {device.type!r}"
    return kernel.unsupported(spec, device, dtype)
