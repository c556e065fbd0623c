"""lstmkit._atomic, the one way files are written: all or nothing, never an existing file
replaced by accident, and the leftovers of killed writers (and only theirs) removed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from lstmkit import _atomic


def test_write_is_all_or_nothing_and_refuses_existing(tmp_path):
    target = tmp_path / "a.bin"
    _atomic.write_bytes(target, b"one")
    with pytest.raises(FileExistsError, match="exists; nothing was overwritten"):
        _atomic.write_bytes(target, b"two", overwrite=False)
    with pytest.raises(RuntimeError, match="writer died"):
        with _atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"one" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    _atomic.write_json(target, {"x": 1})
    assert target.read_text() == '{\n "x": 1\n}\n'


def test_leftovers_of_dead_writers_go_and_live_ones_stay(tmp_path):
    with _atomic.atomic_path(tmp_path / "live.bin") as live:  # a writer at work (this process)
        name = live.name
        assert _atomic.is_temporary(name)
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout.strip()
        host, pid = re.match(r"^\.live\.bin\.([A-Za-z0-9]*)-(\d+)-", name).groups()  # .live.bin.HOST-PID-X.tmp
        dead = tmp_path / name.replace(f"{host}-{pid}-", f"{host}-{dead_pid}-")
        dead.write_bytes(b"left by a killed writer")
        foreign = tmp_path / ".x.bin.elsewhere-1-abcdefgh.tmp"
        foreign.write_bytes(b"another machine's")
        _atomic.write_bytes(tmp_path / "other.bin", b"data")  # any write cleans its directory
        assert live.exists() and not dead.exists() and foreign.exists()
        assert _atomic.clean_stale(tmp_path, exclusive=True) == [foreign]  # an owned directory: all but live ones
        live.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.bin", "other.bin"]


def test_a_users_file_shaped_like_an_old_temporary_one_stays(tmp_path, capsys):
    """An older version's temporary names (.NAME.XXXXXXXX.tmp) are taken for the kinds of file lstmkit
    writes only: a user's .backup.20240101.tmp made a run directory look empty, and train deleted it."""
    from lstmkit.app.cli import main

    old = tmp_path / ".checkpoint.safetensors.k2j4h5l6.tmp"
    mine = tmp_path / ".backup.20240101.tmp"
    for p in (old, mine):
        p.write_bytes(b"x")
    assert _atomic.is_temporary(old.name) and not _atomic.is_temporary(mine.name)
    assert _atomic.clean_stale(tmp_path, exclusive=True) == [old] and mine.exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / mine.name).write_bytes(b"mine")
    assert main(["train", "adding", "-o", "length=10", "--steps", "1", "--hidden", "4", "--quiet",
                 "--out", str(run)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == [mine.name] and (run / mine.name).read_bytes() == b"mine"


def test_exclusive_lock_is_released_when_its_holder_is_killed(tmp_path):
    """A process killed while holding :func:`_atomic.exclusive` leaves nothing that blocks the
    next holder (the OS drops an flock with its process); while it lives, the lock is held."""
    import fcntl
    import os

    lock = tmp_path / "build.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom lstmkit import _atomic\n"
        f"with _atomic.exclusive({str(lock)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        fd = os.open(lock, os.O_RDWR)
        with pytest.raises(BlockingIOError):  # held by the live process
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()
    with _atomic.exclusive(lock):  # the killed holder's lock is gone
        pass


def test_scratch_directories_of_killed_processes_are_removed(tmp_path, monkeypatch):
    """A killed conversion or gradflow run left its temporary directory in the system's temporary
    directory (found by a sweep of killed runs: one more per kill); the next one removes those of
    this machine whose process is gone, and no other."""
    monkeypatch.setattr(_atomic.tempfile, "tempdir", str(tmp_path))
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    host = _atomic._HOST
    dead = tmp_path / f"lstmkit-convert-{host}-{dead_pid}-abcd1234"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.keras").write_bytes(b"left by a killed conversion")
    live = tmp_path / f"lstmkit-convert-{host}-{os.getpid()}-efgh5678"  # this process: alive
    foreign = tmp_path / "lstmkit-convert-elsewhere-1-ijkl9012"  # another machine's
    users = tmp_path / "lstmkit-mine"  # not lstmkit's shape
    for d in (live, foreign, users):
        d.mkdir()
    with _atomic.scratch_directory("gradflow") as scratch:
        assert scratch.parent == tmp_path and scratch.name.startswith(f"lstmkit-gradflow-{host}-{os.getpid()}-")
        assert not dead.exists() and live.exists() and foreign.exists() and users.exists()
    assert not scratch.exists()
