"""Atomic file writes, used wherever lstmkit writes a user's file (runs, studies, plots,
conversions): the data goes to a temporary file in the target's directory, which then
replaces the target in one rename, so a failure at any point leaves every existing file
as it was and no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_bytes", "write_text"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike[str], *, overwrite: bool = True, exists_error: str | None = None,
                suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``dst``; when the block succeeds it becomes ``dst``.

    Args:
        overwrite: replace an existing ``dst``; if False, an existing ``dst`` (even one
            created meanwhile: the file is hard-linked into place) is never replaced.
        exists_error: the FileExistsError message (default: "DST exists; nothing was overwritten").
        suffix: the temporary file's extension, for writers that choose the format by it.
    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
    """
    dst = Path(dst)
    message = exists_error or f"{dst} exists; nothing was overwritten"
    if not overwrite and dst.exists():
        raise FileExistsError(message)
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give dst the mode a plain open() would
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:
                os.link(tmp, dst)  # atomic and never clobbers: FileExistsError if dst appeared
            except FileExistsError:
                raise FileExistsError(message) from None
            except OSError:  # a filesystem without hard links
                if dst.exists():
                    raise FileExistsError(message) from None
                os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True,
                exists_error: str | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path, overwrite=overwrite, exists_error=exists_error) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True,
               exists_error: str | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), overwrite=overwrite, exists_error=exists_error)
