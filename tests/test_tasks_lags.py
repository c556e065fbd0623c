"""The rest of the 1997 experiments: ``long_lag`` (2a, 2b, 2c) and ``multiplication``. Each
generator is checked against the paper's protocol, the criteria against hand-made outputs
on either side of their thresholds, and the baselines against simulation."""

from __future__ import annotations

import math

import pytest
import torch

from lstmkit.app.tasks.base import Batch
from lstmkit.app.tasks.registry import TASKS, get_task
from lstmkit.app.tasks.synthetic import LongLagTask, MultiplicationTask, lag_extra_mean, multiplication_baselines


def draw(task, n: int, seed: int = 0) -> Batch:
    return next(task.train_batches(n, torch.Generator().manual_seed(seed)))


def symbols(batch: Batch, b: int) -> list[int]:
    n = int(batch.lengths[b]) if batch.lengths is not None else batch.x.shape[0]
    return batch.x[:n, b].argmax(-1).tolist()


def with_p_true(task, batch: Batch, p: float) -> torch.Tensor:
    """Logits whose softmax puts ``p`` on every target read and spreads the rest evenly."""
    t, b = batch.x.shape[:2]
    k = task.output_size
    rest = math.log((1 - p) / (k - 1))
    out = torch.full((t, b, k), rest)
    if task.variant == "2a":
        out.scatter_(-1, batch.y[..., None], math.log(p))
    else:
        last = batch.lengths - 1
        out[last, torch.arange(b), batch.y] = math.log(p)
    return out


def test_registered_with_their_options():
    assert TASKS["long_lag"] is LongLagTask and TASKS["multiplication"] is MultiplicationTask
    assert get_task("long_lag", variant="2c", p=1000, q=1000).input_size == 1004
    assert get_task("long_lag", variant="2c").output_size == 2
    assert get_task("long_lag", p=50).input_size == get_task("long_lag", p=50).output_size == 51
    for bad in ({"variant": "2d"}, {"p": 1}, {"q": 0}, {"eval_size": 0}):
        with pytest.raises(ValueError):
            get_task("long_lag", **bad)
    with pytest.raises(ValueError):
        get_task("multiplication", length=21)


# --------------------------------------------------------------------------- 2a, 2b


def test_2a_has_exactly_the_two_sequences_and_predicts_the_next_symbol():
    p = 12
    task = get_task("long_lag", p=p)
    b = draw(task, 400)
    assert b.x.shape == (p, 400, p + 1) and b.y.shape == (p, 400) and bool((b.lengths == p).all())
    a = list(range(p - 1))  # a_1 … a_(p-1)
    x, y = p - 1, p
    seen = set()
    for i in range(400):
        s = symbols(b, i)
        full = s + [int(b.y[-1, i])]
        assert full in ([x, *a, x], [y, *a, y])
        assert b.y[:, i].tolist() == full[1:]  # the next symbol at every step
        seen.add(full[0])
    assert seen == {x, y}
    assert abs(float((b.x[0, :, x] == 1).float().mean()) - 0.5) < 0.1


def test_2b_middle_is_uniform_noise_and_only_the_last_symbol_is_read():
    p = 6
    task = get_task("long_lag", variant="2b", p=p)
    b = draw(task, 3000)
    assert b.y.shape == (3000,) and b.y_batch_dim == 0
    first = b.x[0].argmax(-1)
    assert torch.equal(b.y, first) and set(first.tolist()) == {p - 1, p}
    middle = b.x[1:].argmax(-1)
    counts = torch.bincount(middle.flatten(), minlength=p + 1)
    assert int(counts[p - 1:].sum()) == 0  # x and y only come first
    expected = 3000  # 3000 sequences x (p - 1) positions over p - 1 symbols
    assert bool(((counts[:p - 1] - expected).abs() < 5 * math.sqrt(expected)).all())


@pytest.mark.parametrize("variant", ["2a", "2b"])
def test_2a_2b_error_threshold_is_0_25(variant):
    task = get_task("long_lag", variant=variant, p=8, eval_size=64)
    (b,) = list(task.eval_batches("test", 64))
    ok, bad = task.metrics(with_p_true(task, b, 0.76), b), task.metrics(with_p_true(task, b, 0.74), b)
    assert ok["accuracy"] == (64.0, 64.0) and bad["accuracy"][0] == 0
    # Everything right but a confident guess of the first symbol: right on about half.
    guess = with_p_true(task, b, 0.99)
    always_x = torch.full((64, task.output_size), -5.0)
    always_x[:, task.p - 1] = 5.0
    guess[b.lengths - 1, torch.arange(64)] = always_x  # the last step (all have length p)
    right = float((b.x[0].argmax(-1) == task.p - 1).sum())
    assert task.metrics(guess, b)["accuracy"][0] == right
    assert task.baselines == {"guess": 0.5}


# ------------------------------------------------------------------------------- 2c


def test_2c_sequences_follow_section_5_2():
    p, q = 7, 20
    task = get_task("long_lag", variant="2c", p=p, q=q)
    b_, e, x, y = p, p + 1, p + 2, p + 3
    batch = draw(task, 2000)
    assert batch.x.shape[2] == p + 4 and batch.y.shape == (2000,)
    ks = []
    for i in range(2000):
        s = symbols(batch, i)
        assert s[0] == b_ and s[1] in (x, y) and s[-1] == e
        assert all(0 <= c < p for c in s[2:-1])  # distractors only
        assert int(batch.y[i]) == s[1] - x
        ks.append(len(s) - 3 - q)
        assert bool((batch.x[len(s):, i] == 0).all())
    assert min(ks) >= 1
    mean_len = q + 3 + sum(ks) / len(ks) + 1  # with the final target symbol
    assert q + 3 + lag_extra_mean() + 1 == q + 14  # the paper's mean length "q + 14"
    assert mean_len == pytest.approx(q + 14, abs=0.6)  # sd of the mean ≈ 0.21
    assert sum(k == 1 for k in ks) / len(ks) == pytest.approx(0.1, abs=0.025)


def test_2c_error_threshold_is_0_2_and_marks_the_relevant_symbol():
    task = get_task("long_lag", variant="2c", p=5, q=10, eval_size=50)
    (b,) = list(task.eval_batches("test", 64))
    assert task.metrics(with_p_true(task, b, 0.81), b)["accuracy"] == (50.0, 50.0)
    assert task.metrics(with_p_true(task, b, 0.79), b)["accuracy"][0] == 0
    marks = task.marked_steps(b.x[:, 0])
    assert marks[0] == (1, "x" if int(b.y[0]) == 0 else "y") and marks[1][0] == int(b.lengths[0]) - 1
    signal, _ = task.memory_signal(b.x)
    assert bool(signal[0].isnan().all())
    assert torch.equal(signal[1], torch.where(b.y == 0, 1.0, -1.0))
    assert bool(signal[int(b.lengths.min()):].isnan().any())  # padding


def test_2c_table_and_targets():
    assert get_task("long_lag", variant="2c", q=1000, p=1000).target.published.count("49,000") == 1
    assert "(1000, 100): 135,000" in get_task("long_lag", variant="2c", q=300, p=300).target.published
    assert all(t.target.threshold == 1.0 for t in (get_task("long_lag"), get_task("long_lag", variant="2c")))
    assert get_task("long_lag").eval_size == 10_000


def test_evaluation_sets_are_stored_as_symbols():
    task = get_task("long_lag", variant="2c", p=1000, q=1000, eval_size=100)
    raw = task.eval_raw("test")
    assert raw["seq"].dtype == torch.int32 and raw["seq"].shape == (100, 1403)


# --------------------------------------------------------------------------- multiplication


def test_multiplication_sequences_follow_section_5_5():
    task = get_task("multiplication")
    raw = task._sample(3000, torch.Generator().manual_seed(0))
    values, markers, lengths, target = raw["values"], raw["markers"], raw["lengths"], raw["target"]
    assert int(lengths.min()) == 100 and int(lengths.max()) == 110
    assert bool(((values >= 0) & (values <= 1)).all())
    first_marked = 0
    for i in range(3000):
        n = int(lengths[i])
        plus = (markers[i] == 1).nonzero().flatten().tolist()
        assert len(plus) == 2 and plus[0] < 10 and plus[1] <= 48
        assert markers[i, n - 1] == -1 and (markers[i, 0] == -1 or plus[0] == 0)
        assert bool((values[i, n:] == 0).all())
        if plus[0] == 0:  # "we set X1 to 1.0": the product is the other value
            first_marked += 1
            assert values[i, 0] == 1.0 and target[i] == values[i, plus[1]]
        assert float(target[i]) == pytest.approx(float(values[i, plus[0]] * values[i, plus[1]]))
    assert first_marked / 3000 == pytest.approx(0.1 + 0.9 / 48, abs=0.02)
    assert task.target.threshold == pytest.approx(1 - 14 / 2560)


def test_multiplication_baselines_are_exact():
    task = get_task("multiplication")
    y = task._sample(60_000, torch.Generator().manual_seed(1))["target"]
    base = multiplication_baselines(100)
    best = float(((y - 0.0399).abs() < 0.04).float().mean())
    assert best == pytest.approx(base["best_constant"], abs=0.006)  # se 0.002
    assert base["best_constant"] == pytest.approx(0.2581, abs=1e-4)
    grid = torch.linspace(0.0, 0.5, 101)
    scores = torch.stack([((y - c).abs() < 0.04).float().mean() for c in grid])
    assert float(scores.max()) <= base["best_constant"] + 0.006  # no constant does better
    mean = float(y.mean())
    assert mean == pytest.approx(0.11875 / 2 + (1 - 0.11875) / 4, abs=0.003)
    assert float(((y - mean).abs() < 0.04).float().mean()) == pytest.approx(base["mean"], abs=0.006)
    assert float(((y - mean) ** 2).mean()) == pytest.approx(base["mean_mse"], rel=0.03)
    assert task.baselines == {"best_constant": base["best_constant"], "mean": base["mean"]}


def test_multiplication_accuracy_tolerance():
    task = get_task("multiplication", eval_size=40)
    (b,) = list(task.eval_batches("test", 64))
    out = torch.zeros(b.x.shape[0], 40, 1)
    out[b.lengths - 1, torch.arange(40), 0] = b.y
    for err, acc in ((0.039, 1.0), (0.041, 0.0)):
        o = out.clone()
        o[b.lengths - 1, torch.arange(40), 0] += err
        s, n = task.metrics(o, b)["accuracy"]
        assert s / n == acc
    assert "ok" in task.show(out, b, 2)
