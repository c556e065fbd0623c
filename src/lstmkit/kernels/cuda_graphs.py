"""CUDA graphs of whole calls: a per-step time loop replayed without Python or launch overhead.

The Triton per-step path launches a GEMM and a pointwise kernel per time step from Python.
On an H200 (``benchmarks/results/gpu_session_h200_2/gpu_profile_before_graphs.md``) one vanilla
inference call at (B, T, I, H) = (64, 100, 256, 256) spent 1.0 ms in GPU kernels and
12.4 ms of wall time: the loop is bound by Python and launches, not by the kernels. A CUDA
graph captures all of a call's launches once and replays them with one launch.

:func:`call` wraps a *pure* function of tensors and plain values (the operator's forward or
backward: fresh outputs from its inputs, no host synchronisation, no randomness): the first
time a signature (every tensor's shape, stride, dtype and device, and every other argument)
is seen it runs eagerly; the second time it runs eagerly again and captures a graph on
copies of the inputs; from then on each call copies its inputs into the graph's, replays,
and returns copies of the graph's outputs (a replay overwrites them). So results never
alias between calls, at the price of one copy of the inputs and outputs per call and of
the graph's memory (one call's worth, held while the graph is cached).

Not graphed (run eagerly): while a stream is already capturing (the caller's own graph
records the launches), under Triton's interpreter, with inputs outside the GPU, calls
whose inputs and outputs exceed :data:`MAX_GRAPH_BYTES`, and with
``LSTMKIT_CUDA_GRAPHS=0``. At most :data:`MAX_GRAPHS` graphs are kept (the least recently
used is dropped, and its signature runs eagerly after). A capture that fails is reported
once and its signature runs eagerly after.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["call", "enabled", "clear", "graph_count", "GRAPHS_ENV", "MAX_GRAPHS", "MAX_GRAPH_BYTES"]

#: ``LSTMKIT_CUDA_GRAPHS=0`` turns graphs off (every call eager).
GRAPHS_ENV = "LSTMKIT_CUDA_GRAPHS"
#: Graphs kept per process (each holds one call's memory). A signature whose graph was
#: dropped to make room runs eagerly from then on (no capture after capture when more
#: shapes cycle than this).
MAX_GRAPHS = 32
#: Calls whose tensors (inputs plus outputs) exceed this many bytes run eagerly: their
#: launches are few against their GEMMs, and a graph would double their memory.
MAX_GRAPH_BYTES = 256 * 2 ** 20
#: Signatures remembered (seen once, or run eagerly for good) before the lists start over.
MAX_SIGNATURES = 4096


class _Graph:
    """One captured call: the static inputs it reads, the outputs it writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[Tensor | None], outputs: Sequence[Tensor],
                 device: torch.device) -> None:
        self.graph, self.inputs, self.outputs, self.device = graph, inputs, outputs, device


_GRAPHS: OrderedDict[tuple, _Graph] = OrderedDict()
_SEEN: set[tuple] = set()
_EAGER: set[tuple] = set()  # failed to capture, too large, or dropped


def enabled() -> bool:
    """Whether graphs may be used at all in this process state."""
    return os.environ.get(GRAPHS_ENV, "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"


def graph_count() -> int:
    """How many graphs are kept now (at most :data:`MAX_GRAPHS`)."""
    return len(_GRAPHS)


def clear() -> None:
    """Drop every cached graph (their memory returns to torch's allocator)."""
    _GRAPHS.clear()
    _SEEN.clear()
    _EAGER.clear()


def _signature(name: str, args: Sequence[Any]) -> tuple | None:
    """The cache key of a call, or None when it must run eagerly (an input off the GPU)."""
    key: list[Any] = [name]
    for a in args:
        if isinstance(a, Tensor):
            if a.device.type != "cuda" and a.numel() > 0:
                return None
            key.append((tuple(a.shape), a.stride(), a.dtype, a.device))
        elif isinstance(a, (list, tuple)):
            key.append(("seq", *a))
        else:
            key.append(a)
    return tuple(key)


def _bytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def call(name: str, fn: Callable[..., Sequence[Tensor]], *args: Any) -> tuple[Tensor, ...]:
    """``fn(*args)`` (a tuple of tensors), through a CUDA graph when its signature repeats.

    Args:
        name: what ``fn`` is (part of the cache key: two functions never share a graph).
        fn: a pure function of ``args`` returning fresh tensors.
        args: tensors (any shapes) and hashable plain values.
    """
    if not enabled() or torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return tuple(fn(*args))
    key = _signature(name, args)
    if key is None or key in _EAGER:
        return tuple(fn(*args))
    entry = _GRAPHS.get(key)
    if entry is None:
        out = tuple(fn(*args))
        if key not in _SEEN:  # the first time: only remember it (shapes that never repeat cost nothing)
            if len(_SEEN) >= MAX_SIGNATURES:
                _SEEN.clear()
                _EAGER.clear()
            _SEEN.add(key)
            return out
        tensors = [a for a in args if isinstance(a, Tensor)]
        if _bytes(tensors) + _bytes(out) <= MAX_GRAPH_BYTES:
            _capture(key, fn, args)
        else:
            _EAGER.add(key)
        return out
    _GRAPHS.move_to_end(key)
    for static, a in zip(entry.inputs, args):
        if static is not None:
            static.copy_(a)
    with torch.cuda.device(entry.device):
        entry.graph.replay()
    return tuple(o.clone() for o in entry.outputs)


def _capture(key: tuple, fn: Callable[..., Sequence[Tensor]], args: Sequence[Any]) -> None:
    """Capture ``fn`` on copies of ``args`` (after one warm-up run on the capture's stream)."""
    statics = [a.clone() if isinstance(a, Tensor) else None for a in args]
    call_args = [s if s is not None else a for s, a in zip(statics, args)]
    device = next(s.device for s in statics if s is not None and s.numel() > 0)
    try:
        with torch.cuda.device(device):  # the tensors' GPU, whichever is current
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn(*call_args)  # warm-up: every lazy initialisation (cuBLAS workspaces, builds) outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = tuple(fn(*call_args))
    except Exception as exc:  # noqa: BLE001 - reported once; the call itself already ran eagerly
        _EAGER.add(key)
        torch.cuda.synchronize()
        warnings.warn(f"lstmkit: a CUDA graph of {key[0]} could not be captured ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); calls of this shape run without one", RuntimeWarning, stacklevel=3)
        return
    _GRAPHS[key] = _Graph(graph, statics, outputs, device)
    while len(_GRAPHS) > MAX_GRAPHS:
        _EAGER.add(_GRAPHS.popitem(last=False)[0])
