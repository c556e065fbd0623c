"""Helpers shared by the corpus tasks (:mod:`lstmkit.app.tasks.corpora`): cache directory,
hashing, progress lines, time masks."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from lstmkit._cache import cache_root

__all__ = ["cache_dir", "hash_order", "progress", "sha256_hex", "time_mask"]


def cache_dir() -> Path:
    """The tasks' cache directory: ``$LSTMKIT_CACHE`` (this cache alone) if set, else lstmkit's
    (:func:`lstmkit._cache.cache_root`: ``$LSTMKIT_CACHE_DIR``, ``$XDG_CACHE_HOME/lstmkit`` or
    ``~/.cache/lstmkit``); created where it can be (a read-only one is read, never an error)."""
    env = os.environ.get("LSTMKIT_CACHE")
    path = Path(env).expanduser() if env else cache_root()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only: each cached value is computed again (the writers say so)
        pass
    return path


def sha256_hex(data: bytes | str) -> str:
    """SHA-256 hex digest of ``data`` (a ``str`` is hashed as UTF-8)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def hash_order(names: list[str], salt: str = "") -> list[str]:
    """``names`` in a fixed pseudo-random order: sorted by SHA-256 of ``salt + name``.

    Unlike a seeded RNG permutation this order does not depend on any library version,
    and adding or removing one name does not move the others.
    """
    return sorted(names, key=lambda s: (sha256_hex(salt + s), s))


def progress(message: str) -> None:
    """One progress line on stderr (flushed)."""
    print(message, file=sys.stderr, flush=True)


def time_mask(lengths: Tensor | None, t: int, b: int, device: torch.device) -> Tensor | None:
    """(T, B) bool mask of valid steps from ``lengths`` (B,), or None when all are valid."""
    if lengths is None:
        return None
    steps = torch.arange(t, device=device).unsqueeze(1)
    return steps < lengths.to(device).view(1, b)
