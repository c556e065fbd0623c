"""Argument checks shared by the library's public functions: one wording everywhere.

torch refuses a string where it wants a ``bool`` (``bias should be of type bool, got: str``);
lstmkit does the same for every ``bool`` and ``int`` argument, before anything is built.
A ``bool`` is not an ``int`` here (``layer=True`` is refused), although Python says it is.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["check_bool", "check_int", "check_optional_bool", "loads_json"]


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (numpy's ``bool_`` too), else TypeError naming ``name``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__} ({value!r})"[:300])


def check_optional_bool(name: str, value: Any) -> bool | None:
    """``None`` or :func:`check_bool`."""
    return None if value is None else check_bool(name, value)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool) within ``[minimum, maximum]``.

    Raises:
        TypeError: not an integer (a float such as 2.0, a string, a bool).
        ValueError: outside the range; the message names ``name``, the range and the value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})"[:300])
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        if maximum is None:
            want = f">= {minimum}"
        elif minimum is None:
            want = f"<= {maximum}"
        else:
            want = f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name}: expected an int {want}, got {value}")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} is given twice")
        seen[key] = value
    return seen


def loads_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` that refuses a key given twice in one object (the standard parser keeps
    the last silently, so ``{"cell": "peephole", "cell": "vanilla"}`` would lose a setting).

    Raises:
        ValueError: not JSON, or a repeated key; the message starts with ``what``.
    """
    import json

    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{what}: {exc}") from None
    except RecursionError:  # (arrays nested thousands deep: no file lstmkit writes)
        raise ValueError(f"{what}: JSON nested too deeply to read") from None
