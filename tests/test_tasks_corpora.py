"""Tests of the corpus tasks (lstmkit.app.tasks.corpora): data facts, loss/metrics on
hand-made outputs, baselines, determinism of the training batches, exact aggregation."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lstmkit.app.tasks import corpora
from lstmkit.app.tasks.base import Batch
from lstmkit.app.tasks.corpora import CO2, CharLM, Chorales, Sunspots
from lstmkit.app.tasks.registry import TASKS

HAS_MUSIC21 = importlib.util.find_spec("music21") is not None
HAS_STATSMODELS = importlib.util.find_spec("statsmodels") is not None


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory):
    """A fresh cache directory for the whole module (never the user's ~/.cache)."""
    path = tmp_path_factory.mktemp("lstmkit-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMKIT_CACHE", str(path))
        yield path


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same_batches(a: list[Batch], b: list[Batch]) -> bool:
    def eq(u, v):
        return (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))

    return all(eq(p.x, q.x) and eq(p.y, q.y) and eq(p.lengths, q.lengths) and eq(p.reset, q.reset)
               for p, q in zip(a, b, strict=True))


def _batches_from(task, seed: int, n: int, batch_size: int, global_seed: int) -> list[Batch]:
    torch.manual_seed(global_seed)  # the task must not draw from torch's global generator
    np.random.seed(global_seed)
    return _take(task.train_batches(batch_size, torch.Generator().manual_seed(seed)), n)


def _add(total: dict, m: dict) -> None:
    for k, (s, n) in m.items():
        acc = total.setdefault(k, [0.0, 0.0])
        acc[0] += s
        acc[1] += n


def test_registered():
    for name, cls in (("charlm", CharLM), ("chorales", Chorales), ("sunspots", Sunspots), ("co2", CO2)):
        assert TASKS[name] is cls and cls.name == name
    assert CharLM.stream and not Chorales.stream and not Sunspots.stream


# ---------------------------------------------------------------------------------- charlm


@pytest.fixture(scope="module")
def lm() -> CharLM:
    return CharLM(max_bytes=200_000, bptt=50, eval_streams=4)


def test_stdlib_file_list_deterministic_and_exclusions():
    files = corpora.stdlib_files()
    assert files == corpora.stdlib_files() == sorted(files)
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    for f in files:
        parts = f.split("/")
        assert "/test/" not in "/" + f and "/tests/" not in "/" + f, f
        assert not set(parts[:-1]) & {"test", "tests", "idlelib", "lib2to3", "site-packages"}, f
    assert "os.py" in files and "json/decoder.py" in files
    root = Path(sysconfig.get_paths()["stdlib"])
    if (root / "ctypes" / "test").is_dir():  # a nested test package is excluded too
        assert not any(f.startswith("ctypes/test/") for f in files)


def test_charlm_subset_hash_and_splits(lm: CharLM):
    d = lm.describe_data()
    c = lm._corpus
    split_files = [set(c.files[s]) for s in ("train", "valid", "test")]
    assert all(split_files) and not (split_files[0] & split_files[1] or split_files[0] & split_files[2]
                                     or split_files[1] & split_files[2])
    chosen = sorted(set().union(*split_files))
    assert d["files"] == len(chosen) and 0 < d["bytes"] <= 200_000
    root = Path(d["stdlib_root"])
    text = b"".join((root / p).read_bytes() for p in chosen)
    assert d["bytes"] == len(text)
    assert d["sha256"] == hashlib.sha256(text).hexdigest()
    assert d["file_list_sha256"] == hashlib.sha256("\n".join(chosen).encode()).hexdigest()
    again = CharLM(max_bytes=200_000).describe_data()
    assert again["sha256"] == d["sha256"] and again["split_sha256"] == d["split_sha256"]
    # the splits are ~90/5/5 % of the characters
    frac = d["split_chars"]["train"] / d["chars"]
    assert 0.8 < frac < 0.95, d["split_chars"]
    assert lm.input_size == lm.output_size == len(lm.vocab) + 1 <= 97
    assert list(lm.vocab) == sorted(lm.vocab)


def test_charlm_uniform_and_perfect_outputs(lm: CharLM):
    batch = next(lm.eval_batches("test"))
    t, b, v = batch.x.shape
    assert v == lm.input_size and batch.y.shape == (t, b)
    m = lm.metrics(torch.zeros(t, b, v), batch)
    assert m["bpc"][1] == t * b
    assert m["bpc"][0] / m["bpc"][1] == pytest.approx(math.log2(v), rel=1e-6)
    assert float(lm.loss(torch.zeros(t, b, v), batch)) == pytest.approx(math.log(v), rel=1e-6)
    perfect = F.one_hot(batch.y, v).float() * 50.0
    m = lm.metrics(perfect, batch)
    assert m["bpc"][0] / m["bpc"][1] < 1e-6
    assert m["accuracy"][0] == m["accuracy"][1] == t * b
    assert "target:" in lm.show(perfect, batch, n=2) and "predicted:" in lm.show(perfect, batch, n=2)


def test_charlm_baselines_and_target(lm: CharLM, _cache: Path):
    base = lm.baselines
    assert 1.0 < base["xz"] < 4.0
    assert base["xz_given_train"] < base["xz"] < base["unigram"] < math.log2(lm.input_size)
    assert base["xz"] == pytest.approx(corpora.xz_bpc(lm._corpus.text["test"]))
    assert (_cache / "charlm_xz.json").is_file()
    tgt = lm.target
    assert (tgt.metric, tgt.goal, tgt.threshold) == ("bpc", "min", base["xz"])
    assert tgt.met(base["xz"] - 0.01) and not tgt.met(base["xz"] + 0.01)


def test_charlm_train_batches_deterministic_and_contiguous(lm: CharLM):
    a = _batches_from(lm, 7, 6, 8, global_seed=1)
    b = _batches_from(lm, 7, 6, 8, global_seed=2)
    assert _same_batches(a, b)
    assert a[0].x.shape == (50, 8, lm.input_size) and a[0].y.shape == (50, 8)
    assert a[0].reset is not None and bool(a[0].reset.all()) and a[1].reset is None
    for k in range(len(a) - 1):
        x, y = a[k].x.argmax(-1), a[k].y
        assert torch.equal(x[1:], y[:-1])  # the next input is the current target
        assert torch.equal(a[k + 1].x[0].argmax(-1), y[-1])  # streams continue across chunks


def test_charlm_train_epochs_restart_with_reset(lm: CharLM):
    n = lm._corpus.data["train"].numel()
    per_epoch = math.ceil(((n - 1 - 49) // 64) / 50)  # at most this many chunks (B=64, bptt=50)
    batches = _take(lm.train_batches(64, torch.Generator().manual_seed(0)), per_epoch + 2)
    resets = [k for k, bt in enumerate(batches) if bt.reset is not None]
    assert resets[0] == 0 and len(resets) >= 2
    assert all(bool(batches[k].reset.all()) for k in resets)


def test_charlm_eval_walks_text_in_order(lm: CharLM):
    data = lm._corpus.data["test"].long()
    batches = list(lm.eval_batches("test", batch_size=256))  # eval_streams=4 decides
    ys = torch.cat([bt.y for bt in batches], dim=0)  # (L, 4)
    length = (data.numel() - 1) // 4
    assert ys.shape == (length, 4)
    for s in range(4):
        assert torch.equal(ys[:, s], data[s * length + 1 : (s + 1) * length + 1])
    assert bool(batches[0].reset.all()) and all(bt.reset is None for bt in batches[1:])
    head = lm._corpus.text["test"][:200]
    expected = "".join(ch if ch in lm.vocab else "\ufffd" for ch in head)
    assert lm.decode(data[:200]) == expected and lm.decode(ys[:199, 0]) == expected[1:]


def test_charlm_metric_sums_aggregate_exactly(lm: CharLM):
    gen = torch.Generator().manual_seed(3)
    total: dict = {}
    outs, ys = [], []
    for bt in CharLM(max_bytes=200_000, bptt=50, eval_streams=5).eval_batches("valid"):
        out = torch.randn(*bt.x.shape, generator=gen)
        _add(total, lm.metrics(out, bt))
        outs.append(out)
        ys.append(bt.y)
    out, y = torch.cat(outs), torch.cat(ys)
    whole = F.cross_entropy(out.reshape(-1, out.shape[-1]).double(), y.reshape(-1), reduction="sum")
    assert total["loss"][1] == y.numel()
    assert total["loss"][0] == pytest.approx(float(whole), rel=1e-6)
    assert total["bpc"][0] == pytest.approx(float(whole) / math.log(2), rel=1e-6)


def test_sample_helper(lm: CharLM):
    v = lm.input_size
    calls = []

    def step(x, state):  # favours the character after the one read
        assert x.shape == (1, 1, v) and float(x.sum()) == 1.0
        i = int(x.argmax())
        calls.append(i)
        logits = torch.full((1, 1, v), -30.0)
        logits[0, 0, (i + 1) % (v - 1)] = 30.0
        return logits, (0 if state is None else state + 1)

    vocab = lm.vocab
    start = vocab.index("a")
    out = corpora.sample(step, "a", 5, 0.0, None, vocab=vocab)
    assert out == vocab[start + 1 : start + 6]
    assert len(calls) == 1 + 4  # prime, then each generated character but the last
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert lm.sample(step, "ab", 10, 1.0, g1) == lm.sample(step, "ab", 10, 1.0, g2)
    assert len(lm.sample(step, "", 3, 2.0, g1)) == 3


# ---------------------------------------------------------------------------------- chorales


@pytest.fixture(scope="module")
def chor(_cache: Path) -> Chorales:
    assert HAS_MUSIC21, "music21 is missing: `make test` installs the 'tasks' extra"
    task = Chorales(limit=5)
    task.data  # noqa: B018 (parses into the module's cache directory)
    return task


def test_chorale_rolls_binary_in_range_and_cached(chor: Chorales, _cache: Path):
    d = chor.data
    assert len(d.rolls) == 5 and d.paths == sorted(d.paths)
    assert all(p.endswith((".mxl", ".xml")) for p in d.paths)
    assert chor.input_size == corpora.PITCH_HIGH - corpora.PITCH_LOW + 2 == 47 and chor.output_size == 46
    for r in d.rolls:
        assert r.ndim == 2 and r.shape[1] == 46 and r.shape[0] >= 8
        assert set(np.unique(r).tolist()) <= {0, 1}
        assert 3.0 < r.sum(1).mean() <= 4.0  # four voices, some unisons and rests
    assert d.dropped_notes == 0
    cache_file = Path(d.cache_file)
    assert cache_file.parent == _cache and cache_file.is_file()
    from lstmkit.app.tasks import _chorales

    _chorales._load_cached.cache_clear()
    again = corpora.load_chorales(5)  # read back from the .npz
    assert again.paths == d.paths and all(np.array_equal(a, b) for a, b in zip(again.rolls, d.rolls))


def test_chorale_roll_matches_music21(chor: Chorales):
    from music21 import corpus

    off_beat = 0
    for path, roll in zip(chor.data.paths, chor.data.rolls):
        score = corpus.parse(path)
        notes = [n for part in score.parts for n in part.flatten().notes]
        off_beat += sum(n.offset != int(n.offset) for n in notes)
        end = max(n.offset + n.quarterLength for n in notes)
        assert roll.shape[0] == math.ceil(end)
        for t in range(roll.shape[0]):
            on = {p.midi for n in notes if n.offset <= t < n.offset + n.quarterLength for p in n.pitches}
            assert set((np.nonzero(roll[t])[0] + corpora.PITCH_LOW).tolist()) == on, (path, t)
    assert off_beat > 0  # the check covers notes that start between beats


def test_chorale_split_fixed(chor: Chorales):
    sp = chor.splits
    assert [len(sp[s]) for s in ("train", "valid", "test")] == [3, 1, 1]
    assert sorted(sp["train"] + sp["valid"] + sp["test"]) == list(range(5))
    assert Chorales(limit=5, seed=9).splits == sp


def test_chorale_batches_and_metrics(chor: Chorales):
    bt = next(chor.eval_batches("train", batch_size=3))
    t, b, _ = bt.x.shape
    assert bt.y.shape == (t, b, 46) and bt.lengths.tolist() == [
        chor.data.rolls[i].shape[0] for i in chor.splits["train"]]
    assert bool((bt.x[0, :, 46] == 1).all()) and float(bt.x[0, :, :46].abs().sum()) == 0
    assert float(bt.x[1:, :, 46].abs().sum()) == 0
    for j, n in enumerate(bt.lengths.tolist()):
        assert torch.equal(bt.x[1:n, j, :46], bt.y[: n - 1, j])
        assert float(bt.y[n:, j].abs().sum()) == 0
    frames = int(bt.lengths.sum())
    m = chor.metrics(torch.zeros(t, b, 46), bt)
    assert m["nll"][1] == frames and m["nll"][0] / frames == pytest.approx(46 * math.log(2), rel=1e-6)
    perfect = (bt.y * 2 - 1) * 40.0
    perfect[bt.y.sum(-1) == 0] = 40.0  # padding: garbage that must not count
    m = chor.metrics(perfect, bt)
    assert m["nll"][0] / frames < 1e-6 and m["frame_accuracy"][0] == m["frame_accuracy"][1] > 0
    assert float(chor.loss(perfect, bt)) < 1e-6
    assert "target" in chor.show(perfect, bt, n=1)


def test_chorale_baselines(chor: Chorales):
    base = chor.baselines
    tr = np.concatenate([chor.data.rolls[i] for i in chor.splits["train"]]).astype(float)
    te = np.concatenate([chor.data.rolls[i] for i in chor.splits["test"]]).astype(float)
    q = (tr.sum(0) + 1) / (len(tr) + 2)
    indep = -(te * np.log(q) + (1 - te) * np.log(1 - q)).sum(1).mean()
    assert base["independent_bernoulli"] == pytest.approx(indep, rel=1e-9)
    assert 0 < base["repeat_previous"] < 46 * math.log(2)
    tgt = chor.target
    assert (tgt.metric, tgt.goal, tgt.threshold) == ("nll", "min", base["independent_bernoulli"])


def test_chorale_train_batches_deterministic_epochs(chor: Chorales):
    a = _batches_from(chor, 11, 4, 2, global_seed=1)
    b = _batches_from(chor, 11, 4, 2, global_seed=2)
    assert _same_batches(a, b)
    train_lengths = sorted(chor.data.rolls[i].shape[0] for i in chor.splits["train"])
    assert sorted(a[0].lengths.tolist() + a[1].lengths.tolist()) == train_lengths  # one epoch


def test_chorale_metrics_independent_of_batching(chor: Chorales):
    def run(bs: int) -> dict:
        total: dict = {}
        for bt in chor.eval_batches("train", batch_size=bs):
            out = bt.x[..., :46] * 3.0 - 1.5 + bt.x[..., 46:] * 0.7  # "repeat the previous frame"
            _add(total, chor.metrics(out, bt))
        return total

    one, three = run(1), run(3)
    for k in one:
        assert one[k][1] == three[k][1]
        assert one[k][0] == pytest.approx(three[k][0], rel=1e-6)


# ---------------------------------------------------------------------------------- series


@pytest.fixture(scope="module")
def sun() -> Sunspots:
    assert HAS_STATSMODELS, "statsmodels is missing: `make test` installs the 'tasks' extra"
    return Sunspots()


def _raw_sunspots() -> np.ndarray:
    from statsmodels.datasets import sunspots

    return sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype=float)


def test_series_split_chronological_and_normalised(sun: Sunspots):
    s = _raw_sunspots()
    assert (sun.ranges["train"], sun.ranges["valid"], sun.ranges["test"]) == ((0, 216), (216, 262), (262, 309))
    years = [int(y) for y in sun.raw.labels]
    assert years == sorted(years) and years[0] == 1700 and years[-1] == 2008
    assert np.allclose(sun.z, (s - s[:216].mean()) / s[:216].std())
    assert abs(sun.z[:216].mean()) < 1e-12 and abs(sun.z[:216].std() - 1) < 1e-12
    assert abs(sun.z[262:].mean()) > 0.1  # the test part is not normalised with its own stats


def test_series_persistence_and_ar_baselines(sun: Sunspots):
    s = _raw_sunspots()
    hand = math.sqrt(sum((s[j] - s[j - 1]) ** 2 for j in range(262, 309)) / 47)
    base = sun.baselines
    assert base["persistence"] == pytest.approx(hand, rel=1e-12)
    assert 0 < base["ar"] < base["persistence"]
    assert 1 <= sun.describe_data()["ar_order"] <= 12
    tgt = sun.target
    assert (tgt.metric, tgt.goal, tgt.threshold) == ("rmse", "min", base["ar"])
    assert "no published LSTM target" in tgt.published


def test_series_eval_batch_and_metrics(sun: Sunspots):
    (bt,) = list(sun.eval_batches("test"))
    assert bt.x.shape == (64 + 47, 1, 1) and bt.y.shape == (64 + 47, 1, 1)
    assert bool(torch.isnan(bt.y[:64]).all()) and not bool(torch.isnan(bt.y[64:]).any())
    assert float(bt.x[64, 0, 0]) == pytest.approx(sun.z[261], rel=1e-6)  # warm-up ends at 1961
    # the model output "previous value" is the persistence forecast
    m = sun.metrics(bt.x.clone(), bt)
    assert m["rmse"][1] == m["mse"][1] == 47
    assert m["rmse"][0] / 47 == pytest.approx(sun.baselines["persistence"], rel=1e-5)
    assert m["mse"][0] / 47 == pytest.approx(sun.baselines["persistence"] ** 2, rel=1e-5)
    perfect = torch.nan_to_num(bt.y, nan=123.0)
    assert sun.metrics(perfect, bt)["mse"][0] == 0.0 and float(sun.loss(perfect, bt)) == 0.0
    # mse sums add exactly over pieces of the sequence
    halves = [Batch(x=bt.x[:80], y=bt.y[:80]), Batch(x=bt.x[80:], y=bt.y[80:])]
    total: dict = {}
    for h in halves:
        _add(total, sun.metrics(h.x.clone(), h))
    assert total["mse"][1] == 47 and total["mse"][0] == pytest.approx(m["mse"][0], rel=1e-9)
    assert "target" in sun.show(bt.x, bt)


def test_series_difference_mode_and_lags():
    task = Sunspots(difference=True, lags=3, window=32)
    assert task.input_size == 3
    (bt,) = list(task.eval_batches("test"))
    lo = task.ranges["test"][0]
    assert bt.x.shape == (32 + 47, 1, 3)
    for k in range(3):
        assert float(bt.x[32, 0, k]) == pytest.approx(task.z[lo - 1 - k], rel=1e-6)
    zero_change = torch.full_like(bt.y, -task.mean / task.std)  # predicted difference 0
    m = task.metrics(zero_change, bt)
    assert m["rmse"][0] / m["rmse"][1] == pytest.approx(task.baselines["persistence"], rel=1e-5)


def test_series_lags_that_do_not_fit_are_refused_naming_lags():
    """(It said only 'window=64 does not fit', though lags was the option given.)"""
    n_train = Sunspots().ranges["train"][1]
    Sunspots(lags=n_train - 64)  # the most that fits at window 64
    with pytest.raises(ValueError, match=rf"window=64 and lags={n_train - 63} do not fit the {n_train}-value "
                                         rf"train part: window \+ lags <= {n_train}, so lags <= {n_train - 64}"):
        Sunspots(lags=n_train - 63)
    with pytest.raises(ValueError, match=r"lags=\d+ \(after difference=true\) .* window \+ lags \+ 1 <= "):
        Sunspots(lags=n_train - 64, difference=True)


def test_series_train_batches_deterministic_inside_train(sun: Sunspots):
    a = _batches_from(sun, 5, 3, 16, global_seed=1)
    b = _batches_from(sun, 5, 3, 16, global_seed=2)
    assert _same_batches(a, b)
    train_z = torch.from_numpy(sun.z[:216]).float()
    for bt in a:
        assert bt.x.shape == (64, 16, 1) and bt.y.shape == (64, 16, 1)
        assert torch.equal(bt.x[1:], bt.y[:-1])
        assert bool(torch.isin(bt.y, train_z).all())  # targets come from the train part


def test_co2_gaps_filled():
    from statsmodels.datasets import co2

    raw = co2.load_pandas().data["co2"].to_numpy(dtype=float)
    task = CO2()
    vals = task.raw.values
    assert task.raw.filled == int(np.isnan(raw).sum()) > 0 and not np.isnan(vals).any()
    j = int(np.flatnonzero(np.isnan(raw))[0])
    if not np.isnan(raw[j - 1]) and not np.isnan(raw[j + 1]):
        assert vals[j] == pytest.approx((raw[j - 1] + raw[j + 1]) / 2)
    assert task.ranges["test"][1] == len(vals) == 2284
    assert 0 < task.baselines["ar"] and 0 < task.baselines["persistence"]


def test_frameworks_imported_lazily():
    import subprocess
    import sys

    code = ("import sys; from lstmkit.app.tasks.corpora import Chorales, Sunspots; Chorales(limit=3); "
            "bad = [m for m in ('music21', 'statsmodels', 'pandas') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_task_cache_follows_lstmkit_s_cache_and_tolerates_a_read_only_one(monkeypatch, tmp_path):
    """$LSTMKIT_CACHE_DIR and $XDG_CACHE_HOME move the tasks' cache as they move the kernels' (it
    read $LSTMKIT_CACHE or ~/.cache only); a cache directory that cannot be made is no error (a
    read-only home failed every charlm run)."""
    from lstmkit.app.tasks._corpus_util import cache_dir

    monkeypatch.delenv("LSTMKIT_CACHE", raising=False)
    monkeypatch.delenv("LSTMKIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lstmkit" and cache_dir().is_dir()
    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path / "all"))
    assert cache_dir() == tmp_path / "all"
    monkeypatch.setenv("LSTMKIT_CACHE", str(tmp_path / "tasks"))
    assert cache_dir() == tmp_path / "tasks"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LSTMKIT_CACHE", str(tmp_path / "file" / "below"))  # cannot be made
    assert cache_dir() == tmp_path / "file" / "below"
