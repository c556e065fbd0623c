"""FlopCounterMode counts the recurrence operators' products (lstmkit.kernels.flops): a fused layer
counts what the reference loop's matrix products count, every variant, training and inference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lstmkit
from lstmkit.kernels import abi, cpu_ext
from variants import HEADS_VARIANTS, LSTM_VARIANTS, RNN_VARIANTS, SLSTM_VARIANTS

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason="the CPU kernel does not build here")

_ALL = {**LSTM_VARIANTS, **RNN_VARIANTS, **HEADS_VARIANTS, **SLSTM_VARIANTS}
I, H, B, T = 6, 8, 3, 5


def _layer(name: str, backend: str, proj_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in RNN_VARIANTS:
        return lstmkit.RNN(I, H, 2, bidirectional=True, nonlinearity=_ALL[name], backend=backend)
    return lstmkit.LSTM(I, H, 2, bidirectional=True, cell=_ALL[name], proj_size=proj_size, backend=backend)


def _count(layer: torch.nn.Module, name: str, train: bool) -> dict[str, int]:
    """FLOPs by operator of one call (and its backward when ``train``), every initial state
    requiring a gradient (so the reference loop multiplies for step 0's state gradient too)."""
    x = torch.randn(T, B, I)
    out_width = getattr(layer, "proj_size", 0) or H
    h0 = torch.randn(4, B, out_width, requires_grad=train)
    if name in RNN_VARIANTS:
        hx = h0
    else:
        cells = [torch.randn(4, B, H, requires_grad=train) for _ in range(abi.cell_state_count(abi.flags(layer.spec)))]
        hx = (h0, *cells)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
        y = layer(x, hx)[0]
        if train:
            y.sum().backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", list(_ALL))
def test_fused_counts_what_the_reference_loop_multiplies(name, train):
    proj_size = 5 if name in LSTM_VARIANTS else 0
    fused, reference = _layer(name, "cpu_fused", proj_size), _layer(name, "reference", proj_size)
    counts, expected = _count(fused, name, train), _count(reference, name, train)
    assert counts.get("lstmkit.recurrence", 0) > 0
    assert ("lstmkit.recurrence_backward" in counts) == train
    extra = 0
    if train:  # fgr: the fused backward also multiplies step 0's d(s W_ggᵀ) into the zero state s_0,
        # which the reference loop's s_0 (no gradient) skips
        extra = sum(2 * B * p.numel() for n, p in fused.named_parameters() if "weight_gg" in n)
    assert sum(counts.values()) == sum(expected.values()) + extra, (counts, expected)


def test_vanilla_counts_the_textbook_products():
    """One layer, one direction: 2·T·B·4H·(I + H) forward (x W_ihᵀ an addmm, h W_hhᵀ the operator),
    twice that again in the backward."""
    layer = lstmkit.LSTM(I, H, backend="cpu_fused")
    x = torch.randn(T, B, I)
    with FlopCounterMode(display=False) as counter:
        layer(x)[0].sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["lstmkit.recurrence"] == 2 * T * B * 4 * H * H
    assert counts["lstmkit.recurrence_backward"] == 2 * 2 * T * B * 4 * H * H
    assert counter.get_total_flops() == 3 * 2 * T * B * 4 * H * (I + H) - 2 * T * B * 4 * H * I  # no dx asked


def test_keyword_arguments_count_alike():
    from lstmkit.kernels.flops import recurrence_flops

    shapes = dict(xg=(T, B, 4 * H), w_hh=(4 * H, H), **{n: (0,) for n in abi.PARAMS}, mlp_layout=[], hidden_size=H)
    positional = [shapes["xg"], shapes["w_hh"], (B, H), (B, H), (0,), *(shapes[n] for n in abi.PARAMS), 0, []]
    assert recurrence_flops(*positional, 0.0, 0.0, 0.0, H, 0, True) == recurrence_flops(**shapes) == 2 * T * B * 4 * H * H


_IMPORT_ORDER = """
import sys, inspect
{first}
import torch.utils.flop_counter as fc
assert torch.ops.lstmkit.recurrence in fc.flop_registry and torch.ops.lstmkit.recurrence_backward in fc.flop_registry
assert "def register_flop_formula" in inspect.getsource(fc)  # the module's own loader still answers
print("ok")
"""


@pytest.mark.parametrize("first", ["import torch, lstmkit\nassert 'torch.utils.flop_counter' not in sys.modules",
                                   "import torch, torch.utils.flop_counter, lstmkit"],
                         ids=["lstmkit_first", "counter_first"])
def test_formulas_registered_in_either_import_order(first):
    """lstmkit does not import torch.utils.flop_counter (0.3 s); its formulas are registered when
    that module is imported, before or after lstmkit."""
    code = _IMPORT_ORDER.format(first=first)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


_PROBE_RELOAD_COPY = """
import copy, importlib, importlib.util, pickle, sys, torch, lstmkit
assert importlib.util.find_spec("torch.utils.flop_counter") is not None  # a lookup, no import
import torch.utils.flop_counter as fc
assert torch.ops.lstmkit.recurrence in fc.flop_registry  # (the lookup had used the hook up)
fc = importlib.reload(fc)
assert torch.ops.lstmkit.recurrence in fc.flop_registry  # (a reload's new registry had none)
copy.copy(fc.__spec__.loader); copy.deepcopy(fc.__spec__); pickle.loads(pickle.dumps(fc.__spec__.loader))
print("ok")
"""


def test_formulas_survive_a_lookup_a_reload_and_a_copied_loader():
    done = subprocess.run([sys.executable, "-c", _PROBE_RELOAD_COPY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
