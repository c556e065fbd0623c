"""lstmkit.kernels.cuda_graphs on a machine without a GPU: what must run eagerly does, and the
cache key tells apart what a graph cannot share. The graphs themselves (capture, replay,
outputs that never alias, equality with the eager run) are tested on CUDA in test_triton_cuda.py
(test_cuda_graphs_replay_the_per_step_path_exactly, test_cuda_a_layer_inside_the_callers_cuda_graph)."""

from __future__ import annotations

import torch

from lstmkit.kernels import cuda_graphs


def _fn(x: torch.Tensor, scale: float, layout: list[int]) -> tuple[torch.Tensor, ...]:
    return (x * scale, x.sum().reshape(1) + len(layout))


def test_cpu_tensors_run_eagerly_every_time():
    cuda_graphs.clear()
    x = torch.randn(3, 4)
    for _ in range(3):
        out = cuda_graphs.call("f", _fn, x, 2.0, [1, 2])
        torch.testing.assert_close(out[0], x * 2.0)
        torch.testing.assert_close(out[1], x.sum().reshape(1) + 2)
    assert not cuda_graphs._GRAPHS and not cuda_graphs._SEEN


def test_the_switch_and_the_interpreter_turn_graphs_off(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(cuda_graphs.GRAPHS_ENV, raising=False)
    assert cuda_graphs.enabled()
    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, "0")
    assert not cuda_graphs.enabled()
    monkeypatch.delenv(cuda_graphs.GRAPHS_ENV)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not cuda_graphs.enabled()


def test_the_key_holds_shapes_strides_dtypes_and_plain_values():
    assert cuda_graphs._signature("f", [torch.empty(4, 6), 2.0, [1, 2]]) is None  # data off the GPU: eager
    assert cuda_graphs._signature("f", [torch.empty(4, 6, device="meta"), 2.0, [1, 2]]) is None
    key = cuda_graphs._signature("f", [torch.empty(0), 2.0, [1, 2]])  # an empty CPU tensor is no data
    other = [cuda_graphs._signature("f", [torch.empty(0), 3.0, [1, 2]]),
             cuda_graphs._signature("f", [torch.empty(0), 2.0, [1, 3]]),
             cuda_graphs._signature("g", [torch.empty(0), 2.0, [1, 2]]),
             cuda_graphs._signature("f", [torch.empty(0, dtype=torch.float64), 2.0, [1, 2]])]
    assert key is not None and all(o is not None and o != key for o in other)
    hash(key)  # a dict key: lists are turned into tuples
