"""The one way lstmkit writes a user's file (runs, studies, plots, reports, conversions).

Writers serialise to bytes in memory first; :func:`write_bytes` then puts the bytes in a
temporary file next to the target, flushes them to disk and renames the file over the
target in one step. A failure at any point (a full disk, a read-only file system, a
permission) raises :class:`WriteError` with one line that names the file, and leaves every
existing file as it was and no partial file behind.

The temporary files are named ``.NAME.HOST-PID-XXXXXXXX.tmp[.ext]``: a process killed
while writing leaves one behind, and :func:`clean_stale` removes those whose process (on
this machine) is gone; every write first removes those in its directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["WriteError", "check_writable", "atomic_path", "write_bytes", "write_text", "write_json",
           "clean_stale", "is_temporary", "exclusive", "safe_name", "is_safe_name", "scratch_directory"]

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp(\..*)?$")
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16]
# Names of an older version (no process id): ``.NAME.XXXXXXXX.tmp[.ext]`` — of the kinds of file
# lstmkit writes only (a user's ``.backup.20240101.tmp`` has that shape too, and is not lstmkit's).
_OLD_TEMP = re.compile(r"^\.(?P<name>.+\.(json|jsonl|safetensors|png|svg|pdf|md|html|onnx|keras|h5|pt|pth))"
                       r"\.[a-z0-9_]{8}\.tmp(\..*)?$")


#: The characters of a file or directory name lstmkit makes from words (a run's, a study variant's):
#: a cell word's own (``zoneout=0.1``, ``deep=f:16x8``, ``peephole+cifg``), no separator.
_NAME_CHARS = r"A-Za-z0-9._+=,:-"


def safe_name(text: str) -> str:
    """``text`` as one file name: each character outside :data:`_NAME_CHARS` replaced by ``_``."""
    return re.sub(f"[^{_NAME_CHARS}]", "_", text)


def is_safe_name(text: str) -> bool:
    """Whether ``text`` is a name of :data:`_NAME_CHARS` alone (and not empty)."""
    return re.fullmatch(f"[{_NAME_CHARS}]+", text) is not None


class WriteError(OSError):
    """A file could not be written; ``str(exc)`` is one line naming the file and the reason.
    Nothing was left behind and no existing file was changed."""

    def __str__(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else super().__str__()


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def _fail(path: Path, exc: OSError, what: str) -> WriteError:
    return WriteError(exc.errno or errno.EIO, f"{what}: cannot write {path} ({_reason(exc)}); nothing was changed")


def check_writable(path: str | os.PathLike[str], *, overwrite: bool = False, what: str = "output",
                   suffix: str | None = None, exists_error: str | None = None) -> Path:
    """Check, before any work, that a file can be written at ``path``.

    Args:
        overwrite: whether an existing file may be replaced.
        what: the argument's name, for the messages (``"-o"``, ``"DST"``, …).
        suffix: the extension the name must end with (lower case), if any.
        exists_error: the FileExistsError message (default: "WHAT: PATH exists; nothing was overwritten").

    Raises:
        TypeError: ``path`` is not a str or an os.PathLike.
        ValueError: wrong extension, no such directory, a directory at ``path``.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        WriteError: the directory cannot be written (read-only, permissions).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a file name (str or os.PathLike), got {type(path).__name__}")
    p = Path(path)
    if suffix is not None and not p.name.lower().endswith(suffix):
        raise ValueError(f"{what}: expected a file name ending in {suffix}, got {str(p)!r}")
    if p.is_dir():
        raise ValueError(f"{what}: {str(p)!r} is a directory, expected a file name")
    parent = p.parent
    if not parent.is_dir():
        if parent.exists():
            raise ValueError(f"{what}: {str(parent)!r} is not a directory (for {str(p)!r})")
        raise ValueError(f"{what}: directory {str(parent)!r} does not exist (for {str(p)!r})")
    if p.exists() and not overwrite:
        raise FileExistsError(exists_error or f"{what}: {p} exists; nothing was overwritten")
    if not os.access(parent, os.W_OK | os.X_OK):
        readonly = _read_only(parent)
        raise WriteError(errno.EROFS if readonly else errno.EACCES,
                         f"{what}: cannot write in {parent} "
                         f"({'read-only file system' if readonly else 'permission denied'})")
    return p


def _read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _temporary_prefix(name: str, suffix: str) -> str:
    """``.NAME.HOST-PID-`` for mkstemp, NAME cut short where the whole temporary name (with mkstemp's 8
    random characters and ``.tmp`` + ``suffix``) would pass the 255 bytes a file name may have (an
    output named with 233-255 bytes was refused after all its work)."""
    tail = f".{_HOST}-{os.getpid()}-"
    room = 255 - len(f".{tail}.tmp{suffix}".encode("utf-8", "surrogateescape")) - 8
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > room:
        name = encoded[:max(room, 1)].decode("utf-8", "surrogateescape")
    return f".{name}{tail}"


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike[str], *, overwrite: bool = True, exists_error: str | None = None,
                suffix: str = "", what: str = "output") -> Iterator[Path]:
    """Yield a temporary path next to ``dst``; when the block succeeds it becomes ``dst``.

    For writers that can only write to a path. Prefer :func:`write_bytes`.

    Args:
        overwrite: replace an existing ``dst``; if False, an existing ``dst`` (even one
            created meanwhile: the file is hard-linked into place) is never replaced.
        exists_error: the FileExistsError message (default: "DST exists; nothing was overwritten").
        suffix: the temporary file's extension, for writers that choose the format by it.
    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        WriteError: the file system refused (full, read-only, permissions).
    """
    dst = Path(dst)
    message = exists_error or f"{dst} exists; nothing was overwritten"
    if not overwrite and dst.exists():
        raise FileExistsError(message)
    clean_stale(dst.parent)  # what killed writers left behind
    try:
        fd, name = tempfile.mkstemp(dir=dst.parent, prefix=_temporary_prefix(dst.name, suffix), suffix=f".tmp{suffix}")
        os.close(fd)
    except OSError as exc:
        raise _fail(dst, exc, what) from None
    tmp = Path(name)
    try:
        yield tmp
        try:  # a file replaced keeps its mode (a user's 0600 report stays private); a new one gets the
            mode = dst.stat().st_mode & 0o777  # mode a plain open() would give (mkstemp makes 0600)
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
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
        _sync_dir(dst.parent)
    except (FileExistsError, WriteError):
        raise
    except OSError as exc:
        raise _fail(dst, exc, what) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every file system lets a directory be synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True,
                exists_error: str | None = None, what: str = "output") -> Path:
    """Write ``data`` to ``path`` atomically, flushed to disk before the rename.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        WriteError: the file system refused; nothing was changed.
    """
    with atomic_path(path, overwrite=overwrite, exists_error=exists_error, what=what) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True,
               exists_error: str | None = None, what: str = "output") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), overwrite=overwrite, exists_error=exists_error, what=what)


def write_json(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = True, what: str = "output") -> Path:
    """Write ``obj`` as indented JSON (and a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=1) + "\n", overwrite=overwrite, what=what)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file's name (this version's or an older one's)."""
    return bool(_TEMP.match(name) or _OLD_TEMP.match(name))


def clean_stale(directory: str | os.PathLike[str], name: str | None = None, *, exclusive: bool = False) -> list[Path]:
    """Remove temporary files that killed writers left in ``directory``; returns them.

    Args:
        name: only the temporary files of this target name (e.g. ``"lstm.onnx"``).
        exclusive: the caller owns the directory (a run directory): also remove the
            temporary files of other machines and of an older version (which does not
            record the process).
    """
    d = Path(directory)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        m = _TEMP.match(p.name)
        if m is not None:  # this machine's: stale when its writer is gone; another's: in an owned directory
            stale = not _alive(int(m["pid"])) if m["host"] == _HOST else exclusive
        else:
            m = _OLD_TEMP.match(p.name)
            stale = exclusive and m is not None
        if not stale or m is None or (name is not None and m["name"] != name) or not p.is_file():
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


#: A scratch directory's name in the system's temporary directory: ``lstmkit-KIND-HOST-PID-XXXXXXXX``.
_SCRATCH = re.compile(r"^lstmkit-(?P<kind>[a-z]+)-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


@contextlib.contextmanager
def scratch_directory(kind: str) -> Iterator[Path]:
    """A temporary directory for the ``with`` block (removed after it), named with this machine and
    process: one that a killed process left (of this machine, its process gone) is removed first,
    so kills do not pile them up in the system's temporary directory."""
    root = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for p in root.iterdir():
            m = _SCRATCH.match(p.name)
            if m is not None and m["host"] == _HOST and not _alive(int(m["pid"])) and p.is_dir() \
                    and not p.is_symlink() and p.stat().st_uid == os.getuid():
                shutil.rmtree(p, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"lstmkit-{kind}-{_HOST}-{os.getpid()}-", dir=root) as d:
        yield Path(d)


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike[str], what: str = "lock", wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the (empty) file ``lock`` for the ``with`` block: one holder
    at a time across processes, and the OS releases it when its holder dies, so no lock is ever
    left behind by a killed process. ``wait=False``: BlockingIOError where another holds it."""
    path = Path(lock)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _fail(path, exc, what) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
