"""The peephole timing tasks of Gers, Schraudolph & Schmidhuber 2002: ``spike_delays``
(MSD), ``timed_spikes`` (GTS) and ``periodic`` (PFG). Generators against the protocol,
criteria against hand-made outputs either side of 0.49 (0.3), baselines by simulation."""

from __future__ import annotations

import math

import pytest
import torch

from lstmkit.app.tasks.base import Batch
from lstmkit.app.tasks.registry import TASKS, get_task
from lstmkit.app.tasks.synthetic import PeriodicTask, SpikeDelaysTask, TimedSpikesTask


def draw(task, n: int, seed: int = 0) -> Batch:
    return next(task.train_batches(n, torch.Generator().manual_seed(seed)))


def test_registered_and_options_checked():
    assert (TASKS["spike_delays"], TASKS["timed_spikes"], TASKS["periodic"]) == \
        (SpikeDelaysTask, TimedSpikesTask, PeriodicTask)
    for name, bad in (("spike_delays", {"interval": 0}), ("spike_delays", {"jitter": 0}),
                      ("timed_spikes", {"spikes": 0}), ("periodic", {"shape": "sine"}),
                      ("periodic", {"period": 1}), ("periodic", {"eval_periods": 0})):
        with pytest.raises(ValueError):
            get_task(name, **bad)


# ------------------------------------------------------------------------------- MSD


def test_spike_delays_follow_the_protocol():
    f, j, n = 7, 3, 6
    task = get_task("spike_delays", interval=f, jitter=j, spikes=n)
    b = draw(task, 500)
    delays = []
    for i in range(500):
        length = int(b.lengths[i])
        times = (b.x[:length, i, 0] == 1).nonzero().flatten().tolist()
        assert len(times) == n + 1 and times[0] < f and times[-1] == length - 1
        assert bool((b.x[length:, i] == 0).all())
        gaps = [t1 - t0 - f for t0, t1 in zip(times, times[1:])]
        assert all(0 <= g <= j for g in gaps)
        read = (b.y[:length, i, 1] == 1).nonzero().flatten().tolist()
        assert read == times[1:]  # read at every spike but the first
        assert b.y[read, i, 0].tolist() == gaps
        delays += gaps
    counts = torch.bincount(torch.tensor(delays), minlength=j + 1).float()
    assert bool(((counts / counts.sum() - 1 / (j + 1)).abs() < 0.03).all())


def test_spike_delays_criterion_and_constant_baseline():
    task = get_task("spike_delays", interval=5, jitter=1, spikes=4, eval_size=300)
    (b,) = list(task.eval_batches("test", 1000))
    right = b.y[..., :1].clone()
    right[b.y[..., 1] == 0] = 123.0  # outputs between spikes are free
    assert task.metrics(right + 0.48, b)["accuracy"] == (300.0, 300.0)
    assert task.metrics(right - 0.5, b)["accuracy"][0] == 0
    zero = torch.zeros_like(right)  # always answers 0: right on the delays that are 0
    m = task.metrics(zero, b)
    read = b.y[..., 1] == 1
    assert m["spike_accuracy"][0] == float((b.y[..., 0][read] == 0).sum())
    assert m["accuracy"][0] / 300 == pytest.approx(task.baselines["constant"], abs=0.05)
    assert task.baselines["constant"] == pytest.approx(0.5 ** 4)
    signal, _ = task.memory_signal(b.x)
    t0 = int((b.x[:, 0, 0] == 1).nonzero()[0])
    assert bool(signal[:t0, 0].isnan().all()) and signal[t0, 0] == 0 and signal[t0 + 3, 0] == 3


# ------------------------------------------------------------------------------- GTS


def test_timed_spikes_follow_the_cue():
    task = get_task("timed_spikes", interval=9, spikes=3)
    b = draw(task, 200)
    for i in range(200):
        length = int(b.lengths[i])
        cue = int(b.x[0, i].argmax())
        assert float(b.x[0, i].sum()) == 1 and bool((b.x[1:, i] == 0).all())
        period = 9 + cue
        assert length == 3 * period + 1
        assert (b.y[:length, i] == 1).nonzero().flatten().tolist() == [period, 2 * period, 3 * period]
    assert 60 < int(b.x[0, :, 1].sum()) < 140


def test_timed_spikes_criterion_and_baselines():
    task = get_task("timed_spikes", interval=6, spikes=4, eval_size=200)
    (b,) = list(task.eval_batches("test", 500))
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    good = torch.where(b.y > 0.5, logit(0.52), logit(0.48))[..., None]
    bad = torch.where(b.y > 0.5, logit(0.50), logit(0.48))[..., None]
    assert task.metrics(good, b)["accuracy"] == (200.0, 200.0)
    assert task.metrics(bad, b)["accuracy"][0] == 0
    steps = torch.arange(b.x.shape[0])[:, None]
    one_period = torch.where((steps % 6 == 0) & (steps > 0), 5.0, -5.0).expand(-1, 200)[..., None]
    m = task.metrics(one_period, b)
    assert m["accuracy"][0] == float((b.x[0].argmax(-1) == 0).sum())  # right exactly on cue 0
    assert m["accuracy"][0] / 200 == pytest.approx(task.baselines["one_period"], abs=0.1)
    assert task.metrics(torch.full_like(good, -5.0), b)["accuracy"][0] == task.baselines["silent"]


# ------------------------------------------------------------------------------- PFG


@pytest.mark.parametrize("period", [10, 25])
def test_periodic_targets(period):
    from lstmkit.app.tasks._synth_timing import periodic_target

    t = torch.arange(3 * period)
    cos = periodic_target("cos", period, 3 * period)
    assert cos[0] == 0 and float(cos.max()) <= 1 and torch.allclose(cos[:period], cos[period:2 * period])
    assert float(cos[period // 2]) == pytest.approx(0.5 * (1 - math.cos(2 * math.pi * (period // 2) / period)))
    tri = periodic_target("triangle", period, 3 * period)
    assert torch.allclose(tri[:period], 1 - (2 * (t[:period] / period) - 1).abs())
    rect = periodic_target("rectangle", period, period)
    assert set(rect.tolist()) == {0.0, 1.0} and abs(int(rect.sum()) - period / 2) <= 1
    assert rect[0] == 0 and rect[period // 2] == 1


@pytest.mark.parametrize(("shape", "period", "best"), [("cos", 10, 0.5), ("triangle", 10, 0.5), ("rectangle", 25, 0.5),
                                                     ("cos", 25, 0.49803), ("triangle", 25, 0.48)])
def test_the_best_constant_is_the_middle_of_the_targets_range(shape, period, best):
    """The baseline is the largest error of the best constant output, measured: at an odd F the
    cos and triangle never reach 1, so it is below 0.5 (it was 0.5 at every F)."""
    task = get_task("periodic", shape=shape, period=period, periods=3, eval_periods=5)
    (b,) = list(task.eval_batches("test", 1))
    grid = torch.linspace(0.3, 0.7, 4001)
    errors = [task.metrics(torch.full_like(b.y[..., None], float(c)), b)["max_error"][0] for c in grid]
    assert min(errors) == pytest.approx(task.baselines["best_constant"], abs=1e-4)
    assert task.baselines["best_constant"] == pytest.approx(best, abs=1e-4)


def test_periodic_splits_criterion_and_baseline():
    task = get_task("periodic", shape="triangle", period=10, periods=3, eval_periods=5)
    tr, va, te = (list(task.eval_batches(s, 7)) for s in ("train", "valid", "test"))
    assert [len(s) for s in (tr, va, te)] == [1, 1, 1]
    assert (tr[0].x.shape[0], va[0].x.shape[0], te[0].x.shape[0]) == (30, 50, 100)
    assert float(te[0].x.abs().sum()) == 0  # no input
    b = te[0]
    assert task.metrics(b.y[..., None] + 0.29, b)["max_error"][0] == pytest.approx(0.29)
    assert task.target.met(task.metrics(b.y[..., None] + 0.29, b)["max_error"][0])
    assert not task.target.met(task.metrics(b.y[..., None] - 0.31, b)["max_error"][0])
    half = task.metrics(torch.full_like(b.y[..., None], 0.5), b)["max_error"][0]
    assert half == pytest.approx(task.baselines["best_constant"])
    batches = draw(task, 4)
    assert batches.x.shape == (30, 4, 1) and torch.equal(batches.y[:, 0], batches.y[:, 3])
