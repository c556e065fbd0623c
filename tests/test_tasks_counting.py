"""Counting languages (Gers & Schmidhuber 2001): the legal next-symbol sets against a brute
force over the language's strings, the encoding against them, and ``generalization``
against hand-spoiled outputs."""

from __future__ import annotations

import pytest
import torch

from lstmkit.app.tasks._synth_counting import COUNTING_CRITERION, INPUTS, OUTPUTS, legal_sets, string_of
from lstmkit.app.tasks.base import Batch
from lstmkit.app.tasks.registry import TASKS, get_task
from lstmkit.app.tasks.synthetic import CountingTask

LANGUAGES = ["anbn", "anbncn"]


def brute_force_legal(language: str, n: int, n_max: int = 30) -> list[set[str]]:
    """Legal next symbols after each prefix of string n: the symbols that continue the
    prefix towards some string of the language (T where the prefix is a whole string)."""
    words = ["a" * k + "b" * k + ("c" * k if language == "anbncn" else "") for k in range(1, n_max)]
    body = string_of(language, n)[1:]
    sets = []
    for i in range(len(body) + 1):
        prefix = body[:i]
        legal = {w[i] for w in words if w.startswith(prefix) and len(w) > i}
        if prefix in words:
            legal.add("T")
        sets.append(legal)
    return sets


@pytest.mark.parametrize("language", LANGUAGES)
def test_legal_sets_are_the_languages(language):
    for n in range(1, 12):
        assert legal_sets(language, n) == brute_force_legal(language, n)


@pytest.mark.parametrize("language", LANGUAGES)
def test_batches_encode_the_strings_and_their_legal_sets(language):
    task = get_task("counting", language=language)
    assert TASKS["counting"] is CountingTask
    b = next(task.train_batches(200, torch.Generator().manual_seed(0)))
    outputs = OUTPUTS[language]
    ns = set()
    for i in range(200):
        length = int(b.lengths[i])
        s = "".join(INPUTS[int(k)] for k in b.x[:length, i].argmax(-1))
        n = s.count("a")
        ns.add(n)
        assert s == string_of(language, n) and 1 <= n <= 10
        assert bool((b.x[length:, i] == 0).all()) and bool((b.y[length:, i] == 0).all())
        got = [{outputs[k] for k in range(len(outputs)) if b.y[t, i, k] > 0.5} for t in range(length)]
        assert got == legal_sets(language, n)
    assert ns == set(range(1, 11))


@pytest.mark.parametrize("language", LANGUAGES)
def test_splits_and_generalization(language):
    task = get_task("counting", language=language, test_max=120)
    for split, last in (("train", 10), ("valid", COUNTING_CRITERION[language]), ("test", 120)):
        (b,) = list(task.eval_batches(split, 7))
        assert b.size == last and torch.equal(task.strings(split), torch.arange(1, last + 1))
    (b,) = list(task.eval_batches("test"))
    perfect = 10.0 * (2 * b.y - 1)
    m = task.metrics(perfect, b)
    assert m["generalization"] == (120.0, 1.0) and m["solved"] == (120.0, 120.0)
    spoiled = perfect.clone()
    spoiled[int(b.lengths[6]) - 1, 6] *= -1  # string n = 7 gets its last step wrong
    m = task.metrics(spoiled, b)
    assert m["generalization"][0] == 6 and m["solved"][0] == 119
    spoiled[0, 0] *= -1  # and n = 1 its first
    assert task.metrics(spoiled, b)["generalization"][0] == 0
    padding = perfect.clone()
    padding[int(b.lengths[0]):, 0] = -perfect[int(b.lengths[0]):, 0] + 3  # padding is not read
    assert task.metrics(padding, b)["generalization"][0] == 120
    # The order of the strings in a batch does not matter.
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    shuffled = Batch(b.x[:, perm], b.y[:, perm], b.lengths[perm])
    assert task.metrics(perfect[:, perm], shuffled)["generalization"][0] == 120
    assert task.baselines == {"training_range": 10.0}
    assert task.target.threshold == COUNTING_CRITERION[language]


def test_memory_signal_counts_and_marks():
    task = get_task("counting", language="anbncn")
    (b,) = list(task.eval_batches("train"))
    signal, _ = task.memory_signal(b.x)
    n = 4
    col = signal[:3 * n + 1, n - 1]
    assert col.tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0, 0, 0, 0, 0]
    assert bool(signal[3 * n + 1:, n - 1].isnan().all())
    assert task.marked_steps(b.x[:, n - 1]) == [(n + 1, "first b"), (2 * n + 1, "first c"), (3 * n, "then T")]
    with pytest.raises(ValueError):
        get_task("counting", language="anbn", test_max=50)  # below the criterion


@pytest.mark.parametrize(("options", "message"), [
    ({"train_max": 100}, "train_max must be below the criterion 100"),
    ({"language": "anbncn", "train_max": 50}, "train_max must be below the criterion 30"),
])
def test_a_training_range_that_reaches_the_criterion_is_refused_for_a_new_run(options, message):
    """The criterion is generalisation beyond the training strings: with train_max at or above it
    the validation strings were training strings, and the baseline met the target. Refused when a
    run starts (check_new_run); the task itself is still made, so a run saved with it reads."""
    from lstmkit.app.config import TrainConfig, check_new_run

    get_task("counting", **options)
    with pytest.raises(ValueError, match=message):
        check_new_run(TrainConfig.for_task("counting", options))
    check_new_run(TrainConfig.for_task("counting", {}))  # the defaults pass


def test_a_test_range_below_the_criterion_is_refused():
    with pytest.raises(ValueError, match="test_max must be at least the criterion 100"):
        get_task("counting", test_max=50)
