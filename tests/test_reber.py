"""Tests for the embedded Reber grammar task (Hochreiter & Schmidhuber 1997, §5.1).

The acceptor and the enumerator below are written independently of
``lstmkit.app.tasks.reber`` from the grammar graph:

    B -> s1;  s1: T->s2, P->s3;  s2: S->s2, X->s4;  s3: T->s3, V->s5;
    s4: X->s3, S->end;  s5: P->s4, V->end;  end: E.
"""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest
import torch

from lstmkit.app.tasks.reber import (
    SYMBOLS,
    embedded_reber_string,
    encode,
    legal_next,
    make_split,
    multi_hot_loss,
    reber_string,
    solved_fraction,
    symbol_accuracy,
)

# --- independent acceptor: a regular expression derived from the graph --------------
# From s4 the automaton either ends with S, or goes X -> s3 (T* V) -> s5, and from s5
# either ends with V or returns with P to s4. Hence
#   L(s4) = (X T* V P)* (S | X T* V V)
#   Reber = B ( T S* X L(s4) | P T* V ( V | P L(s4) ) ) E
_S4 = r"(?:XT*VP)*(?:S|XT*VV)"
_REBER_RE = re.compile(rf"B(?:TS*X{_S4}|PT*V(?:V|P{_S4}))E")
_EMBEDDED_RE = re.compile(rf"B(?P<a>[TP]){_REBER_RE.pattern}(?P=a)E")


def is_reber(s: str) -> bool:
    return _REBER_RE.fullmatch(s) is not None


def is_embedded_reber(s: str) -> bool:
    return _EMBEDDED_RE.fullmatch(s) is not None


# --- independent enumerator: breadth-first walk over the graph ----------------------
_GRAPH = {
    1: (("T", 2), ("P", 3)),
    2: (("S", 2), ("X", 4)),
    3: (("T", 3), ("V", 5)),
    4: (("X", 3), ("S", 0)),
    5: (("P", 4), ("V", 0)),
}


def all_reber(max_len: int) -> list[str]:
    """All Reber strings of length <= max_len (state 0 = end, followed by E)."""
    out = []
    frontier = [("B", 1)]
    while frontier:
        nxt = []
        for prefix, state in frontier:
            if state == 0:
                if len(prefix) + 1 <= max_len:
                    out.append(prefix + "E")
                continue
            for sym, target in _GRAPH[state]:
                if len(prefix) + 1 < max_len:
                    nxt.append((prefix + sym, target))
        frontier = nxt
    return out


def all_embedded(max_len: int) -> list[str]:
    return [f"B{a}{r}{a}E" for a in "TP" for r in all_reber(max_len - 4)]


# --- the acceptor itself must be right ----------------------------------------
def test_acceptor_on_hand_written_strings():
    for s in ["BTXSE", "BPVVE", "BTSSXXTVVE", "BPTVPXVVE", "BTXXVPSE", "BPVPXVPXVPSE"]:
        assert is_reber(s), s
    for s in [
        "BTSE",
        "BPVE",
        "BTXE",
        "TXSE",
        "BTXS",
        "BTXSEE",
        "BPVVPE",
        "BXSE",
        "BTTXSE",
    ]:
        assert not is_reber(s), s
    assert is_embedded_reber("BTBTXSETE")
    assert is_embedded_reber("BPBPVVEPE")
    assert not is_embedded_reber("BTBTXSEPE")  # second T/P differs from the first
    assert not is_embedded_reber("BTBTXSET")
    assert not is_embedded_reber("BTXSE")


def test_enumerator_agrees_with_acceptor():
    strings = all_reber(12)
    assert len(strings) == len(set(strings)) > 50
    assert all(is_reber(s) for s in strings)
    # every accepted string over the alphabet of length <= 7 is enumerated
    short = {s for s in strings if len(s) <= 7}
    brute = {
        "B" + "".join(mid) + "E"
        for n in range(3, 6)
        for mid in itertools.product("TPSXV", repeat=n)
        if is_reber("B" + "".join(mid) + "E")
    }
    assert brute == short


# --- generators ---------------------------------------------------------------
def test_symbols():
    assert SYMBOLS == "BTPSXVE"


def test_reber_strings_obey_grammar():
    rng = random.Random(1)
    for _ in range(2000):
        s = reber_string(rng)
        assert is_reber(s), s


def test_embedded_strings_obey_grammar_and_repeat_branch():
    rng = random.Random(2)
    firsts = []
    for _ in range(2000):
        s = embedded_reber_string(rng)
        assert is_embedded_reber(s), s
        assert s[1] in "TP" and s[-2] == s[1]
        assert is_reber(s[2:-2])
        firsts.append(s[1])
    frac_t = firsts.count("T") / len(firsts)
    assert 0.45 < frac_t < 0.55


def test_branch_probabilities_are_one_half():
    rng = random.Random(3)
    inner = [reber_string(rng) for _ in range(4000)]
    # P(second symbol T) = 0.5; P(BTXSE) = 0.5 * 0.5 * 0.5 = 1/8
    assert 0.46 < sum(s[1] == "T" for s in inner) / len(inner) < 0.54
    assert 0.10 < inner.count("BTXSE") / len(inner) < 0.15


def test_generators_deterministic_under_seed():
    a = [embedded_reber_string(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


# --- legal_next ---------------------------------------------------------------
def test_legal_next_hand_written():
    s = "BTBTXSETE"
    assert is_embedded_reber(s)
    assert legal_next(s) == [
        {"T", "P"},  # after B
        {"B"},  # after BT
        {"T", "P"},  # after inner B
        {"S", "X"},  # s2
        {"X", "S"},  # s4
        {"E"},  # inner end
        {"T"},  # second T/P is determined by the first
        {"E"},
    ]
    s = "BPBPVPXTVVEPE"
    assert is_embedded_reber(s)
    assert legal_next(s) == [
        {"T", "P"},
        {"B"},
        {"T", "P"},
        {"T", "V"},  # s3
        {"P", "V"},  # s5
        {"X", "S"},  # s4
        {"T", "V"},  # s3
        {"T", "V"},  # s3
        {"P", "V"},  # s5
        {"E"},
        {"P"},
        {"E"},
    ]


@pytest.mark.parametrize(
    "bad", ["", "B", "BTBTXSEPE", "BTBTXSET", "BTXSE", "BTBTXSETEE", "BTBTSETE"]
)
def test_legal_next_rejects_invalid(bad):
    with pytest.raises(ValueError):
        legal_next(bad)


def test_legal_next_matches_brute_force():
    """Legal set after a prefix = symbols continuing it in some grammatical string."""
    strings = all_embedded(22)
    assert all(is_embedded_reber(s) for s in strings)
    continuations: dict[str, set[str]] = {}
    for s in strings:
        for t in range(1, len(s)):
            continuations.setdefault(s[:t], set()).add(s[t])
    # from any state a completion needs at most 3 inner + 2 outer symbols, so prefixes
    # of strings of length <= 16 have all their continuations among strings <= 22
    checked = 0
    for s in strings:
        if len(s) <= 16:
            expected = [continuations[s[: t + 1]] for t in range(len(s) - 1)]
            assert legal_next(s) == expected, s
            checked += 1
    assert checked > 100


# --- split --------------------------------------------------------------------
def test_make_split_disjoint_distinct_valid():
    train, test, valid = make_split()
    assert valid == []
    assert len(train) == 256 and len(test) == 256
    assert len(set(train)) == 256 and len(set(test)) == 256
    assert not set(train) & set(test)
    assert all(is_embedded_reber(s) for s in train + test)
    for part in (train, test):
        assert {s[1] for s in part} == {"T", "P"}


def test_make_split_deterministic():
    assert make_split(seed=5) == make_split(seed=5)
    assert make_split(seed=5) != make_split(seed=6)
    train, test, _ = make_split(n_train=10, n_test=20, seed=1)
    assert len(train) == 10 and len(test) == 20 and not set(train) & set(test)


def test_make_split_same_distribution():
    # train and test are exchangeable: mean lengths are close
    train, test, _ = make_split(seed=0)
    mean_train = sum(map(len, train)) / len(train)
    mean_test = sum(map(len, test)) / len(test)
    assert abs(mean_train - mean_test) < 2.0


def test_make_split_validation_strings_like_the_test_strings():
    """Three disjoint sets from one draw: the validation set holds short strings too (a set
    drawn after the other two, disjoint from them, held none shorter than 16 symbols, while
    the test set has strings of 9)."""
    train, test, valid = make_split(256, 256, seed=1, n_valid=256)
    assert len(train) == len(test) == len(valid) == 256
    assert not set(train) & set(test) and not set(valid) & (set(train) | set(test))
    assert all(is_embedded_reber(s) for s in valid)
    assert min(map(len, valid)) <= 10 and min(map(len, test)) <= 10
    assert abs(sum(map(len, valid)) / 256 - sum(map(len, test)) / 256) < 2.0


# --- encode -------------------------------------------------------------------
def test_encode_shapes_and_padding():
    strings = ["BTBTXSETE", "BPBPVPXTVVEPE", "BPBPVVEPE"]
    x, targets, lengths = encode(strings)
    assert x.shape == targets.shape == (12, 3, 7)
    assert x.dtype == targets.dtype == torch.float32
    assert lengths.dtype == torch.int64
    assert lengths.tolist() == [8, 12, 8]
    for n, s in enumerate(strings):
        legal = legal_next(s)
        for t in range(12):
            if t < len(s) - 1:
                assert x[t, n].sum() == 1 and x[t, n, SYMBOLS.index(s[t])] == 1
                expected = {SYMBOLS[i] for i in range(7) if targets[t, n, i] == 1}
                assert expected == legal[t]
                assert targets[t, n].sum() == len(legal[t])
            else:
                assert not x[t, n].any() and not targets[t, n].any()
    x64, t64, _ = encode(strings, dtype=torch.float64)
    assert x64.dtype == t64.dtype == torch.float64
    with pytest.raises(ValueError):
        encode(["BTBTXSEPE"])


# --- metrics ------------------------------------------------------------------
def _oracle(targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Perfect scores from targets, with garbage at padded steps (must be ignored)."""
    scores = targets * 4.0 - 2.0
    steps = torch.arange(targets.shape[0])[:, None]
    pad = steps >= lengths[None, :]
    garbage = (
        torch.randn(targets.shape, generator=torch.Generator().manual_seed(0)) * 10
    )
    return torch.where(pad[..., None], garbage, scores)


def test_solved_fraction_oracle_and_perturbation():
    train, _, _ = make_split(n_train=32, n_test=0, seed=0)
    _, targets, lengths = encode(train)
    assert (lengths < lengths.max()).any()  # there is padding to ignore
    scores = _oracle(targets, lengths)
    assert solved_fraction(scores, targets, lengths) == 1.0
    assert symbol_accuracy(scores, targets, lengths) == 1.0

    n_steps = int(lengths.sum())
    # one illegal unit beats the legal ones at one step of one string
    bad = scores.clone()
    n, t = 3, int(lengths[3]) - 2  # the step that must predict the second T/P
    illegal = int((targets[t, n] == 0).nonzero()[0])
    bad[t, n, illegal] = 5.0
    assert solved_fraction(bad, targets, lengths) == pytest.approx(31 / 32)
    assert symbol_accuracy(bad, targets, lengths) == pytest.approx(1 - 1 / n_steps)

    # a two-legal step where only one legal symbol is in the top 2
    bad = scores.clone()
    n, t = 5, 0  # after B: T and P are legal
    assert targets[t, n].sum() == 2
    bad[t, n, SYMBOLS.index("P")] = -1.0
    bad[t, n, SYMBOLS.index("E")] = 0.0
    assert bad[t, n].argmax() == SYMBOLS.index("T")  # top-1 alone would call it right
    assert solved_fraction(bad, targets, lengths) == pytest.approx(31 / 32)

    # a tie across the legal/illegal boundary counts as wrong
    bad = scores.clone()
    bad[0, 0, SYMBOLS.index("E")] = bad[0, 0, SYMBOLS.index("T")]
    assert solved_fraction(bad, targets, lengths) < 1.0

    # uniform scores solve nothing
    flat = torch.zeros_like(scores)
    assert solved_fraction(flat, targets, lengths) == 0.0
    assert symbol_accuracy(flat, targets, lengths) == 0.0


def test_metrics_only_ranking_matters():
    strings = ["BTBTXSETE", "BPBPVVEPE"]
    _, targets, lengths = encode(strings)
    probs = torch.sigmoid(_oracle(targets, lengths))
    assert solved_fraction(probs, targets, lengths) == 1.0


# --- loss ---------------------------------------------------------------------
def test_multi_hot_loss_masks_padding_and_matches_manual():
    strings = ["BTBTXSETE", "BPBPVPXTVVEPE"]
    _, targets, lengths = encode(strings, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(
        targets.shape, generator=g, dtype=torch.float64, requires_grad=True
    )
    loss = multi_hot_loss(scores, targets, lengths)
    assert loss.dim() == 0

    scores_d = scores.detach()
    total, count = 0.0, 0
    for n in range(2):
        for t in range(int(lengths[n])):
            for i in range(7):
                z, y = float(scores_d[t, n, i]), float(targets[t, n, i])
                p = 1.0 / (1.0 + math.exp(-z))
                total -= y * math.log(p) + (1 - y) * math.log(1 - p)
            count += 1
    assert loss.item() == pytest.approx(float(total) / count, rel=1e-10)

    # padding does not matter and gets no gradient
    loss.backward()
    assert scores.grad is not None
    assert not scores.grad[8:, 0].any()
    assert scores.grad[:8, 0].abs().sum() > 0
    other = scores.detach().clone()
    other[8:, 0] = 100.0
    assert float(multi_hot_loss(other, targets, lengths)) == pytest.approx(
        loss.item(), rel=1e-12
    )

    # confident oracle scores give a small loss
    assert float(multi_hot_loss(_oracle(targets, lengths) * 5, targets, lengths)) < 1e-3
