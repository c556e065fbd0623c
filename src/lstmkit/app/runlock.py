"""One training run per directory: an exclusive ``flock`` on the run directory itself, which
:func:`lstmkit.app.runs.start` takes for the run. No file is created, and the OS drops the lock
when the holder's process ends, however it ends, so a killed run can be resumed at once."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from lstmkit import _atomic

__all__ = ["InUseError", "RunLock", "lock"]


class InUseError(ValueError):
    """The run directory is being trained by another process (it holds its lock)."""


class RunLock:
    """This process's exclusive hold on a run directory (see :func:`lock`); :meth:`release`
    (or the end of the process, however it ends) lets the next run in."""

    def __init__(self, directory: Path, fd: int | None) -> None:
        self.directory = directory
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether the lock is held (False once released, or where the file system has no locks)."""
        return self._fd is not None

    def release(self) -> None:
        """Let go of the directory (closing the descriptor drops the lock); idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _holder(d: Path) -> int | None:
    """The process id holding the flock on directory ``d`` (Linux' /proc/locks), if it can be told."""
    try:
        st = os.stat(d)
        with open("/proc/locks") as fh:
            text = fh.read()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        f = line.split()  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2147372 0 EOF"; a waiter's has "->" after "1:"
        if len(f) >= 6 and f[1] == "FLOCK" and f[3] == "WRITE" and f[5] == inode and f[4].isdigit():
            return int(f[4]) or None  # 0: a process outside this PID namespace
    return None


def lock(run_dir: str | os.PathLike[str]) -> RunLock:
    """Take the exclusive lock of the existing run directory ``run_dir``, without waiting.

    An ``flock`` on the directory itself: no file is created, and the OS drops it when the
    holder's process ends (a killed run can be resumed at once). On a file system without
    ``flock`` on directories (some network file systems) the run goes on unlocked.

    Raises:
        InUseError: another process holds it (the message names its process id where it can).
        WriteError: the directory cannot be opened.
    """
    d = Path(run_dir)
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise _atomic.WriteError(exc.errno or errno.EIO, f"--out {d}: cannot open the run directory "
                                                         f"({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = _holder(d)
        raise InUseError(f"--out {d}: is in use by another run{f' (pid {pid})' if pid else ''}; nothing was "
                         f"changed (wait for it to end, or stop it: --resume then continues it)") from None
    except OSError:  # no flock on this file system: unlocked, as before
        os.close(fd)
        return RunLock(d, None)
    return RunLock(d, fd)
