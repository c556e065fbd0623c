"""The optional packages and the extra of lstmkit's that installs each (pyproject.toml's
``[project.optional-dependencies]``): one ImportError that says how to install what is missing,
raised before any work that needs it starts."""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "require"]

#: module -> the lstmkit extra that installs it.
EXTRAS: dict[str, str] = {
    "matplotlib": "plot",
    "scipy": "tasks", "statsmodels": "tasks", "music21": "tasks",
    "keras": "interop", "onnx": "interop", "onnxruntime": "interop", "onnxscript": "interop",
    "triton": "gpu",
}


def require(what: str, *modules: str) -> None:
    """Raise ImportError naming every one of ``modules`` that is not installed and the extra that
    installs it ("lstmkit study needs matplotlib, scipy: pip install 'lstmkit[plot,tasks]'")."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({EXTRAS[m] for m in missing if m in EXTRAS})
        hint = f"pip install 'lstmkit[{','.join(extras)}]'" if extras else f"pip install {' '.join(missing)}"
        raise ImportError(f"{what} needs {', '.join(missing)}: {hint}")
