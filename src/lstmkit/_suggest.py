""""Did you mean …?" for names a user types (tasks, options, variants, kernels, flags)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest", "did_you_mean"]


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The one of ``choices`` closest to ``word``, or None if none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""`` if none is close."""
    close = closest(word, choices)
    return f" (did you mean {close!r}?)" if close else ""
