"""The embedded Reber grammar task.

Reference: S. Hochreiter and J. Schmidhuber, "Long Short-Term Memory", Neural
Computation 9(8):1735-1780, 1997, section 5.1 (Experiment 1: embedded Reber grammar).

The Reber grammar is the finite automaton (``end`` is followed by ``E``)::

    B -> s1
    s1: T -> s2,  P -> s3
    s2: S -> s2,  X -> s4
    s3: T -> s3,  V -> s5
    s4: X -> s3,  S -> end
    s5: P -> s4,  V -> end

An *embedded* Reber string is ``B``, ``T`` or ``P``, a complete Reber string (which
itself starts with ``B`` and ends with ``E``), the same ``T``/``P`` again, and ``E``.
Every branch is taken with probability 0.5. To predict the second-to-last symbol the
network has to remember the second symbol across the whole inner string.

Symbols are one-hot coded over :data:`SYMBOLS` (7 units). At every step the network
reads one symbol and predicts the set of legal next symbols; activations are reset
between strings. A string is *solved* when at every step the output units of all legal
next symbols are the most active ones (for ``k`` legal symbols, the top-``k`` outputs
are exactly that set). The published protocol trains on 256 strings and tests on 256
other strings; the task is solved when every symbol of every training and test string
is predicted correctly. Hochreiter & Schmidhuber report that LSTM (3 blocks of 2 cells,
learning rate 0.5) solved 100 % of trials after about 8,440 training sequences
(3,800-24,100), while Elman nets solved 0 %.

Tensors are time-major like :class:`torch.nn.LSTM`'s default: ``(T, N, 7)``.
"""

from __future__ import annotations

import random

import torch

__all__ = [
    "N_SYMBOLS",
    "SYMBOLS",
    "embedded_reber_string",
    "encode",
    "legal_next",
    "make_split",
    "multi_hot_loss",
    "reber_string",
    "solved_fraction",
    "step_correct",
    "symbol_accuracy",
]

SYMBOLS = "BTPSXVE"
"""The 7 symbols; the index of a symbol in this string is its one-hot unit."""

N_SYMBOLS = len(SYMBOLS)

_INDEX = {c: i for i, c in enumerate(SYMBOLS)}

# Reber automaton: state -> {symbol: next state}. "start" reads the opening B,
# "end" reads the closing E, "done" accepts. Insertion order fixes the RNG draws.
_REBER: dict[str, dict[str, str]] = {
    "start": {"B": "s1"},
    "s1": {"T": "s2", "P": "s3"},
    "s2": {"S": "s2", "X": "s4"},
    "s3": {"T": "s3", "V": "s5"},
    "s4": {"X": "s3", "S": "end"},
    "s5": {"P": "s4", "V": "end"},
    "end": {"E": "done"},
    "done": {},
}


def reber_string(rng: random.Random) -> str:
    """Sample one (non-embedded) Reber string, e.g. ``"BTXSE"``.

    Every branch is taken with probability 0.5. The result starts with ``B`` and ends
    with ``E``; its length is unbounded (geometric tails), at least 5.
    """
    state = "start"
    out: list[str] = []
    while state != "done":
        options = list(_REBER[state].items())
        symbol, state = options[0] if len(options) == 1 else rng.choice(options)
        out.append(symbol)
    return "".join(out)


def embedded_reber_string(rng: random.Random) -> str:
    """Sample one embedded Reber string: B, T|P, a Reber string, the same T|P, E.

    Example: ``"BTBTXSETE"``. The length is at least 9.
    """
    branch = rng.choice("TP")
    return "B" + branch + reber_string(rng) + branch + "E"


def embedded_options(state: tuple[str, str]) -> dict[str, tuple[str, str]]:
    """Transitions of the embedded automaton from ``(phase, info)``.

    Phases: ``outer0`` (expects B), ``outer1`` (expects T|P), ``outer2`` (expects the
    inner B), ``inner`` (info = "reber_state:branch"), ``outer3`` (expects the
    remembered branch, info), ``outer4`` (expects E), ``done``.
    """
    phase, info = state
    if phase == "outer0":
        return {"B": ("outer1", "")}
    if phase == "outer1":
        return {"T": ("outer2", "T"), "P": ("outer2", "P")}
    if phase == "outer2":
        return {"B": ("inner", "s1:" + info)}
    if phase == "inner":
        reber_state, branch = info.split(":")
        nxt: dict[str, tuple[str, str]] = {}
        for symbol, target in _REBER[reber_state].items():
            nxt[symbol] = (
                ("outer3", branch)
                if target == "done"
                else ("inner", f"{target}:{branch}")
            )
        return nxt
    if phase == "outer3":
        return {info: ("outer4", "")}
    if phase == "outer4":
        return {"E": ("done", "")}
    return {}


def legal_next(s: str) -> list[set[str]]:
    """Legal next symbols after every proper prefix of the embedded Reber string ``s``.

    Returns a list of length ``len(s) - 1`` whose entry ``t`` is the set of symbols that
    may legally follow ``s[: t + 1]`` under the embedded grammar. The second ``T``/``P``
    is fully determined by the first one; inside the inner string one or two symbols are
    legal. Example: ``legal_next("BTBTXSETE")`` is
    ``[{T,P}, {B}, {T,P}, {S,X}, {S,X}, {E}, {T}, {E}]``.

    Raises:
        ValueError: if ``s`` is not a complete embedded Reber string.
    """
    state: tuple[str, str] = ("outer0", "")
    sets: list[set[str]] = []
    for t, symbol in enumerate(s):
        options = embedded_options(state)
        if symbol not in options:
            raise ValueError(
                f"not an embedded Reber string: {s!r} (symbol {symbol!r} at "
                f"position {t}, expected one of {sorted(options)})"
            )
        state = options[symbol]
        if t < len(s) - 1:
            sets.append(set(embedded_options(state)))
    if state[0] != "done":
        raise ValueError(f"not a complete embedded Reber string: {s!r}")
    return sets


def make_split(
    n_train: int = 256, n_test: int = 256, seed: int = 0, n_valid: int = 0
) -> tuple[list[str], list[str], list[str]]:
    """Draw disjoint training, test and validation sets of distinct embedded Reber strings.

    Strings are sampled i.i.d. from ``random.Random(seed)`` until ``n_train + n_test +
    n_valid`` distinct ones have been seen; these are shuffled (so that the sets have the
    same distribution; the first distinct draws are biased towards short, frequent
    strings) and split in that order. No string occurs twice in a set or in two sets.
    Deterministic in ``seed``; with ``n_valid=0`` the training and test sets are those of
    the two-way split.

    A validation set drawn *after* the other two instead, disjoint from them, would hold
    none of the short frequent strings (they are all taken): a net that gets it right can
    still miss a short test string it never saw (measured: 2 of 5 seeds, each on one
    string of length 9).

    Returns:
        ``(train, test, valid)``, lists of ``n_train``, ``n_test`` and ``n_valid`` strings.
    """
    if n_train < 0 or n_test < 0 or n_valid < 0:
        raise ValueError("n_train, n_test and n_valid must be non-negative")
    rng = random.Random(seed)
    need = n_train + n_test + n_valid
    seen: dict[str, None] = {}
    max_draws = 1000 * need + 1000
    for _ in range(max_draws):
        if len(seen) >= need:
            break
        seen.setdefault(embedded_reber_string(rng), None)
    else:
        raise RuntimeError(f"could not draw {need} distinct strings")
    strings = list(seen)
    rng.shuffle(strings)
    return strings[:n_train], strings[n_train : n_train + n_test], strings[n_train + n_test : need]


def encode(
    strings: list[str], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode embedded Reber strings for next-symbol prediction (time-major, padded).

    Args:
        strings: N embedded Reber strings (validated with :func:`legal_next`).
        dtype: dtype of ``x`` and ``targets``.

    Returns:
        ``x`` (T_max, N, 7): one-hot of ``s[:-1]`` (input at step t is ``s[t]``);
        ``targets`` (T_max, N, 7): multi-hot of ``legal_next(s)[t]``;
        ``lengths`` (N,) int64: ``len(s) - 1``.
        ``T_max = max(lengths)``; steps ``t >= lengths[n]`` are all zeros.
    """
    if not strings:
        raise ValueError("encode needs at least one string")
    legal = [legal_next(s) for s in strings]
    lengths = torch.tensor([len(s) - 1 for s in strings], dtype=torch.int64)
    t_max = int(lengths.max())
    x = torch.zeros(t_max, len(strings), N_SYMBOLS, dtype=dtype)
    targets = torch.zeros(t_max, len(strings), N_SYMBOLS, dtype=dtype)
    for n, (s, sets) in enumerate(zip(strings, legal, strict=True)):
        for t, symbol in enumerate(s[:-1]):
            x[t, n, _INDEX[symbol]] = 1
            for nxt in sets[t]:
                targets[t, n, _INDEX[nxt]] = 1
    return x, targets, lengths


def _valid_mask(
    t_max: int, lengths: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """(T_max, N) bool: step t of sequence n is valid iff t < lengths[n]."""
    steps = torch.arange(t_max, device=device)
    return steps[:, None] < lengths.to(device)[None, :]


def _check(scores: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> None:
    if scores.dim() != 3 or scores.shape != targets.shape:
        raise ValueError(
            f"scores and targets must both be (T, N, 7); got {tuple(scores.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if lengths.shape != (scores.shape[1],):
        raise ValueError(
            f"lengths must be ({scores.shape[1]},); got {tuple(lengths.shape)}"
        )
    if int(lengths.max()) > scores.shape[0]:
        raise ValueError("lengths exceed the time dimension of scores")


def step_correct(
    scores: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step correctness of next-symbol predictions.

    A step is correct iff every legal symbol scores strictly higher than every illegal
    one, i.e. the top-k outputs (k = number of legal symbols) are exactly the legal set;
    ties across the boundary count as wrong.

    Args:
        scores: (T, N, 7) network outputs (logits or probabilities; only order matters).
        targets: (T, N, 7) multi-hot legal next symbols, as from :func:`encode`.
        lengths: (N,) number of valid steps per string.

    Returns:
        ``(correct, valid)``, both (T, N) bool; ``correct`` is False at invalid steps.
    """
    _check(scores, targets, lengths)
    legal = targets > 0.5
    s = scores.detach()
    inf = torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
    min_legal = torch.where(legal, s, inf).amin(dim=-1)
    max_illegal = torch.where(legal, -inf, s).amax(dim=-1)
    valid = _valid_mask(scores.shape[0], lengths, scores.device)
    correct = (min_legal > max_illegal) & legal.any(dim=-1) & valid
    return correct, valid


def solved_fraction(
    scores: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor
) -> float:
    """Fraction of strings whose every valid step is predicted correctly.

    Shapes: ``scores``, ``targets`` (T, N, 7); ``lengths`` (N,). See
    :func:`step_correct` for the per-step criterion. The task is solved when this is
    1.0 on both the training and the test set.
    """
    correct, valid = step_correct(scores, targets, lengths)
    string_ok = (correct | ~valid).all(dim=0)
    return float(string_ok.float().mean())


def symbol_accuracy(
    scores: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor
) -> float:
    """Fraction of valid steps (over all strings) predicted correctly.

    Shapes: ``scores``, ``targets`` (T, N, 7); ``lengths`` (N,).
    """
    correct, valid = step_correct(scores, targets, lengths)
    return float(correct.sum()) / float(valid.sum())


def multi_hot_loss(
    scores: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Training loss: binary cross-entropy with logits, averaged over valid steps.

    Each of the 7 output units is an independent sigmoid ("may this symbol come
    next?"). The per-step loss is the BCE summed over the 7 units; it is averaged over
    the valid steps (``t < lengths[n]``) of all strings, padding is ignored.

    Args:
        scores: (T, N, 7) logits.
        targets: (T, N, 7) multi-hot legal next symbols.
        lengths: (N,) number of valid steps per string.

    Returns:
        A scalar tensor (differentiable w.r.t. ``scores``).
    """
    _check(scores, targets, lengths)
    per_unit = torch.nn.functional.binary_cross_entropy_with_logits(
        scores, targets.to(scores.dtype), reduction="none"
    )
    valid = _valid_mask(scores.shape[0], lengths, scores.device)
    per_step = per_unit.sum(dim=-1)
    return (per_step * valid.to(per_step.dtype)).sum() / valid.sum().clamp(min=1)
