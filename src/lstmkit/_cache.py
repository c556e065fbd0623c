"""Where lstmkit keeps what it computes once per machine: the compiled CPU kernels and the
experiment tasks' parsed corpora.

``$LSTMKIT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lstmkit``, else ``~/.cache/lstmkit``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """The cache directory (not created here: a read-only one is read, never an error)."""
    root = os.environ.get("LSTMKIT_CACHE_DIR")
    if root:
        try:
            return Path(root).expanduser()
        except RuntimeError:  # ~user of no such user
            raise ValueError(f"LSTMKIT_CACHE_DIR={root!r}: no home directory to expand {root.split('/')[0]!r} "
                             f"to") from None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lstmkit"
