"""Zoneout with torch's own generator (the rest of the suite replaces the masks by fixed
ones, tests/conftest.py): a seed reproduces a layer's masks on every kernel, evaluation is
the expectation, a training run is reproducible and a killed-and-resumed run is
bit-identical to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lstmkit
from lstmkit.app.train import TrainConfig, Trainer, train


@pytest.fixture(autouse=True)
def _real_masks(monkeypatch):
    monkeypatch.undo()  # conftest's fixed masks off: lstmkit.cell.zoneout_masks draws from torch's generator


def _layer(backend: str, **kw) -> lstmkit.LSTM:
    torch.manual_seed(0)
    return lstmkit.LSTM(3, 5, cell="zoneout=0.3/0.2+peephole", backend=backend, **kw).double()


def _run(layer, x, seed):
    torch.manual_seed(seed)
    xx = x.clone().requires_grad_()
    y, (h, c) = layer(xx)
    (y.sum() + h.sum() + c.sum()).backward()
    return [y.detach(), h.detach(), c.detach(), xx.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bidirectional": True, "proj_size": 2}])
def test_a_seed_reproduces_the_masks_on_every_kernel(kw):
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    ref, fast = _layer("reference", **kw), _layer("cpu_fused", **kw)
    a, b = _run(ref, x, seed=5), _run(fast, x, seed=5)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    ref.zero_grad()
    c = _run(ref, x, seed=6)
    assert not torch.equal(a[0], c[0])  # another seed, other masks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_masks_keep_each_unit_with_its_probability(dtype):
    """d_c and d_h are 0/1 masks of the layer's dtype, 1 with probability z_c and z_h (400,000
    draws each: within 5 standard deviations), and a seed draws the same ones."""
    spec = lstmkit.resolve("zoneout=0.3/0.05")
    like = torch.empty(0, dtype=dtype)
    torch.manual_seed(1)
    d_c, d_h = lstmkit.cell.zoneout_masks(spec, (100, 40, 100), (100, 40, 100), like)
    assert d_c.dtype == d_h.dtype == dtype
    for d, z in ((d_c, 0.3), (d_h, 0.05)):
        assert set(d.unique().tolist()) == {0.0, 1.0}
        assert abs(d.double().mean().item() - z) < 5 * (z * (1 - z) / d.numel()) ** 0.5
    torch.manual_seed(1)
    again = lstmkit.cell.zoneout_masks(spec, (100, 40, 100), (100, 40, 100), like)
    assert torch.equal(again[0], d_c) and torch.equal(again[1], d_h)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masks_at_the_ends_of_the_range(dtype):
    """z = 0 keeps nothing; z just below 1 keeps (nearly) everything and draws only 0 and 1.
    (Without the draw's cap on z a value 2 would come from one uniform in 2^24, too rarely for
    a sample to show: the cap is argued in zoneout_masks, not tested here.)"""
    spec = lstmkit.CellSpec(zoneout=(0.0, 1.0 - 1e-9))
    torch.manual_seed(2)
    d_c, d_h = lstmkit.cell.zoneout_masks(spec, (1000, 100), (1000, 100), torch.empty(0, dtype=dtype))
    assert not d_c.any()
    assert set(d_h.unique().tolist()) <= {0.0, 1.0} and d_h.mean().item() > 0.9999


@pytest.mark.parametrize("backend", ["reference", "cpu_fused"])
def test_vmap_draws_a_mask_per_sample_as_for_dropout(backend):
    """torch.vmap over a training layer: randomness="different" gives each sample its own masks
    (two equal samples, different outputs), "same" one mask for all (equal outputs) — as for
    nn.Dropout; functorch refused the masks' draw in place into a fresh tensor with its own
    error before. Without vmap the draw is the same: a seed gives the masks it gave."""
    layer = _layer(backend)
    x = torch.randn(7, 4, 3, dtype=torch.float64).expand(2, 7, 4, 3)
    for randomness, equal in (("different", False), ("same", True)):
        torch.manual_seed(3)
        y = torch.vmap(lambda xx: layer(xx)[0], randomness=randomness)(x)
        assert torch.allclose(y[0], y[1], rtol=1e-12, atol=1e-12) is equal, randomness  # (batched rounding)
    spec = lstmkit.resolve("zoneout=0.3")
    like = torch.empty(0, dtype=torch.float64)
    torch.manual_seed(4)
    plain = lstmkit.cell.zoneout_masks(spec, (50, 20), (50, 20), like)
    torch.manual_seed(4)
    mapped = torch.vmap(lambda _: torch.stack(lstmkit.cell.zoneout_masks(spec, (50, 20), (50, 20), like)),
                        randomness="same")(torch.zeros(1))[0]
    assert torch.equal(mapped[0], plain[0]) and torch.equal(mapped[1], plain[1])


def test_evaluation_is_the_expectation_and_deterministic():
    layer = _layer("cpu_fused").eval()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        y1, y2 = layer(x)[0], layer(x)[0]
    assert torch.equal(y1, y2)
    ref = _layer("reference").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(x)[0], y1, rtol=1e-10, atol=1e-10)
    # by hand: the expectation d = z in the step's mix (docs/cell.md)
    p = {k.removesuffix("_l0"): v for k, v in ref.state_dict().items()}
    h = c = torch.zeros(2, 5, dtype=torch.float64)
    a = lstmkit.cell.input_projection(x, p, ref.spec, 5)
    for t in range(6):
        out = lstmkit.cell.step(a[t], h, c, None, p, ref.spec.replace(zoneout=(0.0, 0.0)), 5)
        c = out.c + 0.3 * (c - out.c)
        h = out.h + 0.2 * (h - out.h)
    torch.testing.assert_close(h, y1[-1], rtol=1e-12, atol=1e-12)


def _cfg(**kw) -> TrainConfig:
    base = dict(task="adding", task_options={"length": 24}, hidden_size=6, batch_size=8, steps=12, eval_every=6,
                threads=1, stop_at_target=False, eval_batch_size=64, cell="zoneout=0.2/0.1")
    base.update(kw)
    return TrainConfig(**base)


def test_a_training_run_is_reproducible_and_resumes_bit_identically(tmp_path):
    full = train(_cfg(), tmp_path / "full", progress=False)
    again = train(_cfg(), tmp_path / "again", progress=False)
    assert full["value"] == again["value"]
    Trainer(_cfg(steps=6), tmp_path / "part", progress=False).run()  # stopped after its checkpoint at step 6
    rest = train(_cfg(), tmp_path / "part", resume=True, progress=False)
    assert rest["value"] == full["value"]
    want = load_file(str(tmp_path / "full" / "model.safetensors"))
    got = load_file(str(tmp_path / "part" / "model.safetensors"))
    for k, v in want.items():
        assert torch.equal(v, got[k]), k
