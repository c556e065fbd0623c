"""Synthetic tasks: each generator obeys its published protocol, the fixed evaluation sets
are fixed, metrics score hand-made perfect and wrong outputs as they should, baselines
are reproduced numerically, and metric sums/counts add up exactly across batches."""

from __future__ import annotations

import math
import random
from dataclasses import fields

import pytest
import torch

from lstmkit.app.tasks import reber
from lstmkit.app.tasks import synthetic as S
from lstmkit.app.tasks.base import Batch
from lstmkit.app.tasks.registry import TASKS
from lstmkit.app.tasks.synthetic import VALID_STRINGS

SYM = {c: i for i, c in enumerate(reber.SYMBOLS)}
NAMES = ["reber", "continual_reber", "adding", "temporal_order", "copy"]
# Small, fast instances of every task (and form/variant) for the generic tests.
SMALL = [
    ("reber", {}),
    ("continual_reber", {"eval_symbols": 500, "eval_streams": 3, "bptt": 20}),
    ("adding", {"eval_size": 200}),
    ("adding", {"form": "le", "length": 30, "eval_size": 200}),
    ("temporal_order", {"eval_size": 200}),
    ("temporal_order", {"variant": "6b", "eval_size": 200}),
    ("copy", {"length": 15, "eval_size": 200}),
]
IDS = [f"{n}-{'-'.join(map(str, o.values())) or 'default'}" for n, o in SMALL]


def make(name: str, **options: object):
    return TASKS[name](**options)


def first_batches(task, seed: int, n: int = 3, batch_size: int = 5) -> list[Batch]:
    it = task.train_batches(batch_size, torch.Generator().manual_seed(seed))
    return [next(it) for _ in range(n)]


def same(a: Batch, b: Batch) -> bool:
    def eq(u, v):
        return (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
    return eq(a.x, b.x) and eq(a.y, b.y) and eq(a.lengths, b.lengths) and eq(a.reset, b.reset)


# ------------------------------------------------------------------ hand-made outputs


def perfect(task, batch: Batch) -> torch.Tensor:
    """Ideal raw outputs for ``batch`` (T, B, output_size)."""
    t, b = batch.x.shape[:2]
    if task.name in ("reber", "continual_reber"):
        return 20.0 * (2 * batch.y - 1)
    out = torch.randn(t, b, task.output_size)  # garbage except where the answer is read
    if task.name == "copy":
        return 20.0 * torch.nn.functional.one_hot(batch.y, 10).float()
    last = (batch.lengths - 1) if batch.lengths is not None else torch.full((b,), t - 1)
    if task.name == "adding":
        out[last, torch.arange(b), 0] = batch.y
    else:
        out[last, torch.arange(b)] = 20.0 * torch.nn.functional.one_hot(batch.y, task.output_size).float()
    return out


def aggregate(task, pairs) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for out, batch in pairs:
        for k, (s, n) in task.metrics(out, batch).items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += s
            acc[1] += n
    return {k: s / n for k, (s, n) in sums.items()}


# ---------------------------------------------------------------------- generic tests


def test_all_registered_with_their_names_and_options():
    for name in NAMES:
        cls = TASKS[name]
        task = cls()
        assert task.name == name
        assert task.seed == 0 and "seed" in {f.name for f in fields(task)}
        assert task.input_size > 0 and task.output_size > 0
        assert task.stream == (name == "continual_reber")
        assert task.target.goal in ("max", "min") and task.target.published
    assert make("temporal_order", variant="6b").output_size == 8
    assert make("temporal_order").output_size == 4


@pytest.mark.parametrize("name, options", [
    ("adding", {"form": "x"}), ("adding", {"length": 10}), ("temporal_order", {"variant": "6c"}),
    ("copy", {"length": 0}), ("continual_reber", {"bptt": 0}), ("adding", {"eval_size": -1}),
])
def test_bad_options_raise(name, options):
    with pytest.raises(ValueError):
        make(name, **options)


@pytest.mark.parametrize("name, options", SMALL, ids=IDS)
def test_training_draws_come_only_from_the_generator(name, options):
    task = make(name, **options)
    torch.manual_seed(1)
    random.seed(1)
    a = first_batches(task, seed=3)
    torch.manual_seed(2)
    random.seed(2)
    b = first_batches(make(name, **options), seed=3)
    assert all(same(u, v) for u, v in zip(a, b))
    c = first_batches(task, seed=4)
    assert not all(same(u, v) for u, v in zip(a, c))
    g = torch.Generator().manual_seed(3)
    state = g.get_state().clone()
    next(task.train_batches(5, g))
    assert not torch.equal(state, g.get_state())  # it did draw from the generator


@pytest.mark.parametrize("name, options", SMALL, ids=IDS)
def test_eval_set_is_fixed_and_independent_of_training_draws(name, options):
    task = make(name, **options)
    first = list(task.eval_batches("test", 64))
    first_batches(task, seed=0, n=4)  # training draws in between change nothing
    again = list(make(name, **options).eval_batches("test", 64))
    assert len(first) == len(again) and all(same(u, v) for u, v in zip(first, again))
    other_split = "train" if name == "reber" else "valid"
    assert not same(first[0], next(iter(task.eval_batches(other_split, 64))))
    assert not same(first[0], next(iter(make(name, **{**options, "seed": 1}).eval_batches("test", 64))))
    # The trainer's generator is seeded with the run seed (often equal to the task's seed):
    # its first training batch must not be the test set.
    tb = next(task.train_batches(first[0].x.shape[1], torch.Generator().manual_seed(0)))
    assert not same(tb, first[0])
    with pytest.raises(ValueError):
        task.eval_batches("nonsense", 64)


@pytest.mark.parametrize("name, options", SMALL, ids=IDS)
def test_metrics_aggregate_exactly_across_batches(name, options):
    task = make(name, **options)
    torch.manual_seed(0)
    if task.stream:  # one chunk holding the whole stream vs chunks of 20 steps
        whole = make(name, **{**options, "bptt": options["eval_symbols"]})
        (big,) = list(whole.eval_batches())
        parts = list(task.eval_batches())
        out = perfect(task, big) + 30 * torch.randn(big.x.shape) * (torch.rand(big.x.shape[:2]) < 0.1)[..., None]
        split = [(out[k * 20:(k + 1) * 20], p) for k, p in enumerate(parts)]
    else:
        (big,) = list(task.eval_batches("test", 10_000))
        parts = list(task.eval_batches("test", 7))
        out = perfect(task, big)
        bad = torch.rand(big.x.shape[1]) < 0.3  # spoil about 30 % of the sequences
        out[:, bad] += 30 * torch.randn(out[:, bad].shape)
        split, k = [], 0
        for p in parts:
            n = p.x.shape[1]
            split.append((out[:p.x.shape[0], k:k + n], p))
            k += n
        assert k == big.x.shape[1]
    whole_m, split_m = aggregate(task, [(out, big)]), aggregate(task, split)
    assert set(whole_m) == set(split_m) and task.target.metric in whole_m and "loss" in whole_m
    for key in whole_m:
        assert split_m[key] == pytest.approx(whole_m[key], rel=1e-5, abs=1e-7), key
    s, n = task.metrics(out, big)["loss"]
    assert s / n == pytest.approx(float(task.loss(out, big)), rel=1e-5)
    value = whole_m[task.target.metric]
    assert not task.target.met(value)  # spoiled outputs do not pass


@pytest.mark.parametrize("name, options", SMALL, ids=IDS)
def test_perfect_outputs_meet_the_target(name, options):
    task = make(name, **options)
    pairs = [(perfect(task, b), b) for b in task.eval_batches("test", 64)]
    m = aggregate(task, pairs)
    assert task.target.met(m[task.target.metric]), m
    for key in ("solved", "symbol_accuracy", "branch_accuracy", "accuracy", "argmax_accuracy",
                "recall_accuracy"):
        if key in m:
            assert m[key] == 1.0, key
    for key in ("mse", "xent"):
        if key in m:
            assert m[key] < 1e-6, key
    text = task.show(pairs[0][0], pairs[0][1], n=2)
    assert isinstance(text, str) and text


# ----------------------------------------------------------------------------- reber


def decode(x: torch.Tensor, steps: int) -> str:
    return "".join(reber.SYMBOLS[int(i)] for i in x[:steps].argmax(-1))


def test_reber_splits_are_the_published_256_plus_256():
    task = make("reber", seed=2)
    train, test, _ = reber.make_split(256, 256, seed=2, n_valid=VALID_STRINGS)
    assert task.strings("train") == train and task.strings("test") == test
    for split, strings in (("train", train), ("test", test)):
        got = []
        for b in task.eval_batches(split, 100):
            x, y, lengths = reber.encode([decode(b.x[:, i], int(b.lengths[i])) + "E" for i in range(b.x.shape[1])])
            assert torch.equal(b.y[: x.shape[0]], y) and torch.equal(b.lengths, lengths)
            got += [decode(b.x[:, i], int(b.lengths[i])) + "E" for i in range(b.x.shape[1])]
        assert got == strings
    for b in first_batches(task, seed=0, n=5, batch_size=8):
        assert b.x.shape[0] == int(b.lengths.max())
        assert all(decode(b.x[:, i], int(b.lengths[i])) + "E" in train for i in range(8))


def test_reber_validation_split_is_disjoint_and_fixed():
    task = make("reber", seed=2)
    train, test, valid = (set(task.strings(s)) for s in ("train", "test", "valid"))
    assert len(valid) == VALID_STRINGS == 256 and not valid & (train | test)
    assert task.strings("valid") == make("reber", seed=2).strings("valid")
    assert set(make("reber", seed=3).strings("valid")) != valid
    assert all(reber.legal_next(s) for s in valid)  # complete, legal embedded Reber strings
    n = sum(int(b.lengths.numel()) for b in task.eval_batches("valid", 100))
    assert n == 256


def test_reber_training_batches_cover_the_training_set_uniformly():
    task = make("reber")
    index = {s: i for i, s in enumerate(task.strings("train"))}
    counts = torch.zeros(256)
    for b in first_batches(task, seed=0, n=50, batch_size=64):
        for i in range(64):
            counts[index[decode(b.x[:, i], int(b.lengths[i])) + "E"]] += 1
    assert bool((counts > 0).all()) and float(counts.max()) < 30  # mean 12.5


def test_get_task_builds_every_synthetic_task_with_options():
    pytest.importorskip("lstmkit.app.tasks.corpora")
    from lstmkit.app.tasks.registry import get_task, task_names
    assert set(NAMES) <= set(task_names())
    assert get_task("adding", seed=3, form="le", length=200).length == 200
    assert get_task("temporal_order", variant="6b").output_size == 8
    with pytest.raises(ValueError):
        get_task("copy", lenght=5)


def test_reber_wrong_branch_guess_and_no_long_memory_baseline():
    task = make("reber")
    (batch,) = list(task.eval_batches("test"))
    out = perfect(task, batch)
    branch = (batch.y.sum(-1) == 1) & (batch.y[..., SYM["T"]] + batch.y[..., SYM["P"]] == 1)
    assert int(branch.sum()) == 256  # one remembered T/P per string
    guess = out.clone()  # a predictor without long memory: always says T at the branch
    guess[branch] = -20.0
    guess[..., SYM["T"]] = torch.where(branch, 20.0, guess[..., SYM["T"]])
    m = aggregate(task, [(guess, batch)])
    strings = task.strings("test")
    assert m["solved"] == sum(s[1] == "T" for s in strings) / 256
    assert abs(m["solved"] - task.baselines["no_long_memory"]) < 0.1
    assert m["branch_accuracy"] == m["solved"]
    n_valid = float(batch.lengths.sum())
    assert m["symbol_accuracy"] == pytest.approx(1 - (256 - sum(s[1] == "T" for s in strings)) / n_valid)


# ------------------------------------------------------------------- continual reber


def split_strings(stream: str) -> list[str]:
    """Cut a stream at every B that follows an E."""
    out, start = [], 0
    for i in range(1, len(stream)):
        if stream[i] == "B" and stream[i - 1] == "E":
            out.append(stream[start:i])
            start = i
    return out  # the last, maybe incomplete, string is dropped


def check_stream(x: torch.Tensor, y: torch.Tensor) -> int:
    """x, y (T, 7) of one stream starting at a string start: every complete string is an
    embedded Reber string and its targets are reber.legal_next (then {B} after the E)."""
    s = decode(x, x.shape[0])
    pos = 0
    strings = split_strings(s)
    for w in strings:
        sets = reber.legal_next(w) + [{"B"}]
        for t, legal in enumerate(sets):
            assert {reber.SYMBOLS[j] for j in range(7) if y[pos + t, j] > 0.5} == legal
        pos += len(w)
    return len(strings)


def test_continual_reber_streams_are_concatenated_embedded_reber_strings():
    task = make("continual_reber", bptt=13)
    chunks = first_batches(task, seed=5, n=40, batch_size=4)
    assert chunks[0].reset is not None and bool(chunks[0].reset.all())
    assert all(c.reset is None and c.x.shape == (13, 4, 7) and c.lengths is None for c in chunks[1:])
    x = torch.cat([c.x for c in chunks])  # streams continue across chunk boundaries
    y = torch.cat([c.y for c in chunks])
    assert all(check_stream(x[:, b], y[:, b]) >= 20 for b in range(4))
    symbols, _ = make("continual_reber").eval_stream("test")
    assert symbols.shape == (10_000, 10)
    ev = list(make("continual_reber").eval_batches())
    assert len(ev) == 200 and bool(ev[0].reset.all()) and all(b.reset is None for b in ev[1:])
    check_stream(torch.cat([b.x for b in ev])[:, 0], torch.cat([b.y for b in ev])[:, 0])


def test_continual_reber_criterion_and_baselines():
    task = make("continual_reber")
    batches = list(task.eval_batches())
    x, y = torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])
    n = x.shape[0] * x.shape[1]
    full = Batch(x, y, None, torch.ones(10, dtype=torch.bool))
    m = task.metrics(perfect(task, full), full)
    assert m["stream_perfect_steps"] == (n, 10.0)  # one error-free run of 10,000 per stream
    # An output of 0.5 everywhere is wrong at every step (absolute error 0.5 >= 0.49).
    assert task.metrics(torch.zeros_like(y), full)["symbol_accuracy"][0] == 0
    # Just inside / outside the 0.49 band: sigmoid = 0.52 on legal, 0.48 on illegal units.
    logit = math.log(0.52 / 0.48)
    assert task.metrics(logit * (2 * y - 1), full)["symbol_accuracy"][0] == n
    logit = math.log(0.505 / 0.495)  # |err| = 0.495 on every unit
    assert task.metrics(logit * (2 * y - 1), full)["symbol_accuracy"][0] == 0
    # No long memory: right everywhere but the remembered T/P, where it always says T.
    branch = (y.sum(-1) == 1) & (y[..., SYM["T"]] + y[..., SYM["P"]] == 1)
    guess = perfect(task, full)
    guess[branch] = -20.0
    guess[..., SYM["T"]] = torch.where(branch, 20.0, guess[..., SYM["T"]])
    gm = task.metrics(guess, full)
    acc = gm["symbol_accuracy"][0] / n
    assert float(branch.float().mean()) == pytest.approx(1 / 12, abs=0.002)
    assert acc == pytest.approx(task.baselines["no_long_memory"], abs=0.003)
    assert task.baselines["no_long_memory"] == pytest.approx(23 / 24)
    runs = gm["stream_perfect_steps"][0] / gm["stream_perfect_steps"][1]
    assert runs == pytest.approx(23, rel=0.05)
    assert gm["branch_accuracy"][0] / gm["branch_accuracy"][1] == pytest.approx(0.5, abs=0.02)
    # Memoryless: the best legal set given the current symbol, estimated from the stream.
    sym = x.argmax(-1).flatten()
    sets = (y > 0.5).reshape(-1, 7).long() @ (2 ** torch.arange(7))
    hits = 0
    for s in range(7):
        hits += int(torch.bincount(sets[sym == s]).max()) if bool((sym == s).any()) else 0
    assert hits / n == pytest.approx(task.baselines["memoryless"], abs=0.01)
    assert task.baselines["memoryless"] == pytest.approx(13 / 24)


def test_mean_embedded_reber_length_is_12():
    rng = random.Random(0)
    lengths = [len(reber.embedded_reber_string(rng)) for _ in range(20_000)]
    assert sum(lengths) / len(lengths) == pytest.approx(12, abs=0.1)


# ------------------------------------------------------------------------------ adding


def test_adding_hochreiter_sequences_follow_section_5_4():
    task = make("adding", length=100)
    raw = task._sample(4000, torch.Generator().manual_seed(0))
    values, markers, lengths, target = raw["values"], raw["markers"], raw["lengths"], raw["target"]
    assert int(lengths.min()) == 100 and int(lengths.max()) == 110
    first_marked = 0
    for i in range(4000):
        n = int(lengths[i])
        v, m = values[i], markers[i]
        plus = (m == 1).nonzero().flatten().tolist()
        assert len(plus) == 2 and plus[0] < 10 and plus[1] <= 48 and int((m[:n] != 0).sum()) in (3, 4)
        assert m[n - 1] == -1 and (m[0] == -1 or plus[0] == 0)
        assert bool((m[n:] == 0).all()) and bool((v[n:] == 0).all()) and bool((v.abs() <= 1).all())
        if plus[0] == 0:
            first_marked += 1
            assert v[0] == 0
        assert float(target[i]) == pytest.approx(0.5 + float(v[plus[0]] + v[plus[1]]) / 4)
    assert first_marked / 4000 == pytest.approx(0.1 + 0.9 / 48, abs=0.02)
    # X1 lies among the first 10 pairs, uniformly; X2 anywhere in the first 49.
    b = next(task.train_batches(3, torch.Generator().manual_seed(0)))
    assert b.x.shape == (int(b.lengths.max()), 3, 2) and b.y.shape == (3,) and b.y_batch_dim == 0
    assert sum(1 for _ in task.eval_batches("test", 1000)) == 3 and task.eval_size == 2560


def test_adding_le_sequences():
    task = make("adding", form="le", length=50)
    b = next(task.train_batches(500, torch.Generator().manual_seed(0)))
    assert b.lengths is None and b.x.shape == (50, 500, 2)
    v, m = b.x[..., 0], b.x[..., 1]
    assert bool(((v >= 0) & (v <= 1)).all())
    assert bool((m[:25].sum(0) == 1).all()) and bool((m[25:].sum(0) == 1).all())
    torch.testing.assert_close(b.y, (v * m).sum(0))


def test_adding_accuracy_tolerance_and_last_step():
    task = make("adding")
    b = next(task.train_batches(50, torch.Generator().manual_seed(0)))
    out = perfect(task, b)
    last = b.lengths - 1
    for err, acc in ((0.039, 1.0), (0.041, 0.0), (-0.039, 1.0)):
        o = out.clone()
        o[last, torch.arange(50), 0] += err
        m = aggregate(task, [(o, b)])
        assert m["accuracy"] == acc and m["mse"] == pytest.approx(err * err, rel=1e-4)
    o = out.clone()
    o[-1] = o[-1] + 5  # the padded last row of shorter sequences is not read
    short = b.lengths < b.x.shape[0]
    assert aggregate(task, [(o[:, short], Batch(b.x[:, short], b.y[short], b.lengths[short], None, 0))])["mse"] < 1e-10


def test_adding_constant_baselines():
    n = 40_000
    h = make("adding")
    y = h._sample(n, torch.Generator().manual_seed(1))["target"]
    acc = float(((y - 0.5).abs() < 0.04).float().mean())
    base = S.hochreiter_adding_baselines(100)
    assert acc == pytest.approx(h.baselines["constant_0.5"], abs=0.006)  # 3.5 standard errors
    assert float(((y - 0.5) ** 2).mean()) == pytest.approx(base["mse"], rel=0.03)
    le = make("adding", form="le")
    y = le._sample(n, torch.Generator().manual_seed(1))["target"]
    mse = float(((y - 1) ** 2).mean())
    assert mse == pytest.approx(le.baselines["constant_1"], abs=0.004)  # se 0.001
    assert abs(mse - le.baselines["le2015_printed"]) > 0.006  # 0.1767 is not the value
    assert le.baselines["constant_1"] == pytest.approx(0.167, abs=5e-4)
    assert float(((y - 1).abs() < 0.04).float().mean()) == pytest.approx(0.0784, abs=0.006)


# ---------------------------------------------------------------------- temporal order


@pytest.mark.parametrize("variant, windows", [("6a", [(10, 20), (50, 60)]),
                                              ("6b", [(10, 20), (33, 43), (66, 76)])])
def test_temporal_order_sequences_follow_section_5_6(variant, windows):
    task = make("temporal_order", variant=variant)
    b = next(task.train_batches(300, torch.Generator().manual_seed(0)))
    assert b.x.shape[2] == 8 and b.y_batch_dim == 0
    assert 100 <= int(b.lengths.min()) and int(b.lengths.max()) <= 110
    for i in range(300):
        n = int(b.lengths[i])
        assert bool((b.x[n:, i] == 0).all()) and bool((b.x[:n, i].sum(-1) == 1).all())
        s = "".join("EBabcdXY"[int(k)] for k in b.x[:n, i].argmax(-1))
        assert s[0] == "E" and s[-1] == "B" and set(s[1:-1]) <= set("abcdXY")
        pos = [t for t, c in enumerate(s) if c in "XY"]
        assert len(pos) == len(windows) and all(lo <= p <= hi for p, (lo, hi) in zip(pos, windows))
        label = int("".join("0" if s[p] == "X" else "1" for p in pos), 2)  # XX->Q=0 … YY->U=3
        assert int(b.y[i]) == label
    assert set(b.y.tolist()) == set(range(2 ** len(windows)))


def test_temporal_order_error_criterion():
    task = make("temporal_order")
    b = next(task.train_batches(40, torch.Generator().manual_seed(0)))

    def with_p(p: float) -> torch.Tensor:  # softmax p on the true class, the rest equal
        out = perfect(task, b)
        logits = torch.full((40, 4), math.log((1 - p) / 3))
        logits[torch.arange(40), b.y] = math.log(p)
        out[b.lengths - 1, torch.arange(40)] = logits
        return out

    hi, lo = aggregate(task, [(with_p(0.71), b)]), aggregate(task, [(with_p(0.69), b)])
    assert hi["accuracy"] == 1.0 and lo["accuracy"] == 0.0 and lo["argmax_accuracy"] == 1.0
    guess = perfect(task, Batch(b.x, torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(1)),
                                b.lengths, None, 0))
    assert aggregate(task, [(guess, b)])["accuracy"] < 0.6  # confident guesses: chance 1/4
    assert task.baselines == {"chance": 0.25} and task.target.threshold == pytest.approx(2559 / 2560)


# -------------------------------------------------------------------------------- copy


@pytest.mark.parametrize("t", [100, 7])
def test_copy_layout_and_uniform_baseline(t):
    task = make("copy", length=t)
    b = next(task.train_batches(64, torch.Generator().manual_seed(0)))
    seq = b.x.argmax(-1)
    assert b.x.shape == (t + 20, 64, 10) and b.y.shape == (t + 20, 64) and b.lengths is None
    assert bool(((seq[:10] >= 1) & (seq[:10] <= 8)).all())
    assert bool((seq[10:t + 9] == 0).all()) and bool((seq[t + 9] == 9).all()) and bool((seq[t + 10:] == 0).all())
    assert bool((b.y[:t + 10] == 0).all()) and torch.equal(b.y[t + 10:], seq[:10])
    # Blank with certainty until the recall, then uniform over the 8 symbols.
    out = torch.full((t + 20, 64, 10), -1e9)
    out[:t + 10, :, 0] = 0.0
    out[t + 10:, :, 1:9] = 0.0
    m = aggregate(task, [(out, b)])
    assert m["xent"] == pytest.approx(10 * math.log(8) / (t + 20), rel=1e-6)
    assert task.baselines["uniform_recall"] == pytest.approx(10 * math.log(8) / (t + 20))
    assert task.target.threshold == pytest.approx(0.1 * task.baselines["uniform_recall"])
    assert not task.target.met(m["xent"])
    one_wrong = perfect(task, b)
    one_wrong[-1] = torch.roll(one_wrong[-1], 1, dims=-1)  # last recalled symbol wrong everywhere
    assert aggregate(task, [(one_wrong, b)])["recall_accuracy"] == pytest.approx(0.9)
