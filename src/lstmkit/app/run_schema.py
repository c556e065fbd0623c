"""What a run directory's JSON holds, as the trainer writes it: the types of ``summary.json``'s
fields (:func:`summary_problem`), and the numbers its records are made of. Pure checks on parsed
values; :mod:`lstmkit.app.runs` reads and writes the files and calls them."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["is_number", "is_int", "summary_problem", "SUMMARY_FIELDS", "TARGET_FIELDS", "TEST_FIELDS"]


def is_number(v: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


#: What each field of summary.json holds (checked where present): a test of the value, and its words.
SUMMARY_FIELDS: dict[str, tuple[Any, str]] = {
    **{k: (lambda v: isinstance(v, str), "a string") for k in ("task", "model", "cell", "stopped", "metric", "split")},
    **{k: (lambda v: isinstance(v, dict), "an object") for k in ("task_options", "final", "environment", "data")},
    **{k: (is_int, "an int") for k in ("seed", "parameters", "steps", "sequences")},
    "wall_time_s": (is_number, "a number"),
    "value": (lambda v: v is None or is_number(v), "a number or null"),
    "selected_step": (lambda v: v is None or is_int(v), "an int or null"),
    "solved": (lambda v: isinstance(v, bool), "true or false"),
    "baselines": (lambda v: isinstance(v, dict) and all(is_number(b) for b in v.values()),
                  "an object of baseline names and numbers"),
    "target": (lambda v: isinstance(v, dict), "an object"),
    "test": (lambda v: isinstance(v, dict), "an object"),
}
TARGET_FIELDS: dict[str, tuple[Any, str]] = {
    "goal": (lambda v: v in ("max", "min"), "'max' or 'min'"),
    "threshold": (lambda v: v is None or is_number(v), "a number or null"),
    "published": (lambda v: isinstance(v, str), "a string"),
    "met": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "first_met_step": (lambda v: v is None or is_int(v), "an int or null"),
    "sequences_to_target": (lambda v: v is None or is_int(v), "an int or null"),
}
TEST_FIELDS: dict[str, tuple[Any, str]] = {
    "value": (lambda v: v is None or is_number(v), "a number or null"),
    "met": (lambda v: isinstance(v, bool), "true or false"),
    "metrics": (lambda v: isinstance(v, dict) and all(is_number(m) or m is None for m in v.values()),
                "an object of metric names and numbers"),
}


def summary_problem(s: Any) -> str | None:
    """What is wrong with ``s`` as a parsed ``summary.json`` (the fields the readers use, with
    their types: :data:`SUMMARY_FIELDS`, its ``target`` and ``test`` objects), or None."""
    if not isinstance(s, dict):
        return f"expected a JSON object, got {'null' if s is None else type(s).__name__}"
    for fields, where, obj in ((SUMMARY_FIELDS, "", s), (TARGET_FIELDS, "target.", s.get("target") or {}),
                               (TEST_FIELDS, "test.", s.get("test") or {})):
        for key, (ok, words) in fields.items():
            if key in obj and not ok(obj[key]):
                return f"{where}{key}: expected {words}, got {str(obj[key])[:60]!r}"
    return None
