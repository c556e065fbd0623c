"""The CLI and the library in unusual environments: an ASCII locale or stream, a short write, a
memory limit, files a user keeps private — each works as in a plain environment, or fails with one
line and nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import pytest

from lstmkit import _atomic
from lstmkit.app import cli, runs
from lstmkit.kernels import cpu_ext

_ASCII = {"PYTHONUTF8": "0", "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0"}


@pytest.mark.skipif(not cpu_ext.available(), reason="the CPU kernel does not build here")
def test_the_fused_kernel_loads_in_an_ascii_locale():
    """(the kernel's ABI header was read back in the locale's encoding: every call ran the reference
    loop in a C locale without UTF-8 mode, with one 4,000-character warning)"""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from lstmkit.kernels import cpu_ext; assert cpu_ext.available(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **_ASCII}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-1000:]


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, _ASCII], ids=["ascii_stream", "c_locale"])
def test_the_cli_writes_to_a_stream_that_cannot_encode_its_text(env):
    """(``lstmkit tasks`` printed nothing and exited 2; a finished run's summary, with its '≥', made
    ``train`` exit 2 after writing the whole run)"""
    done = subprocess.run([sys.executable, "-m", "lstmkit", "tasks"], env={**os.environ, **env},
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    assert b"reber" in done.stdout and b"?" in done.stdout  # what ASCII has not: replaced


def test_a_short_metrics_write_leaves_no_half_line(monkeypatch, tmp_path):
    """(a full disk or a file size limit left half a JSON line, and report and plot refused the run
    until a later --resume repaired it)"""
    runs.append_metrics(tmp_path, {"step": 1, "loss": 0.5})
    before = (tmp_path / runs.METRICS).read_bytes()
    real = os.write

    def short(fd: int, data: bytes) -> int:
        if len(data) > 10:
            return real(fd, bytes(data)[:10])  # part of it, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", short)
    with pytest.raises(_atomic.WriteError, match="metrics: cannot write"):
        runs.append_metrics(tmp_path, {"step": 2, "loss": 0.25})
    monkeypatch.setattr(os, "write", real)
    assert (tmp_path / runs.METRICS).read_bytes() == before
    runs.append_metrics(tmp_path, {"step": 2, "loss": 0.25})
    assert [json.loads(line)["step"] for line in (tmp_path / runs.METRICS).read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_a_replaced_file_keeps_its_mode(tmp_path, mode):
    """(``--overwrite`` and ``--resume`` made a user's 0600 report or checkpoint 0644)"""
    path = tmp_path / "report.html"
    path.write_text("old")
    path.chmod(mode)
    _atomic.write_text(path, "new")
    assert stat.S_IMODE(path.stat().st_mode) == mode and path.read_text() == "new"
    fresh = tmp_path / "fresh.html"
    _atomic.write_text(fresh, "new")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~_atomic._umask()


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    """(torch's std::bad_alloc under a memory limit ended in a 16-frame traceback, exit 1)"""
    def exhausted(args: object) -> int:
        raise MemoryError("std::bad_alloc")
    monkeypatch.setitem(cli._RUN, "tasks", exhausted)
    assert cli.main(["tasks"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lstmkit tasks: error: out of memory (std::bad_alloc)"]


@pytest.mark.parametrize("length", [233, 250, 255])
def test_an_output_name_up_to_the_file_system_s_limit_is_written(tmp_path, length):
    """(the temporary name added ~23 bytes: outputs named with 233-255 bytes were refused as 'File name
    too long' after all the work)"""
    name = "é" * ((length - 5) // 2) + "x" * ((length - 5) % 2) + ".html"
    assert len(name.encode()) == length
    _atomic.write_text(tmp_path / name, "report")
    assert (tmp_path / name).read_text() == "report" and len(list(tmp_path.iterdir())) == 1


def test_an_unreadable_checkpoint_is_named_unreadable(monkeypatch, tmp_path):
    """(a checkpoint without read permission was reported as 'No such file or directory', safetensors'
    word for any failure to open)"""
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"")
    real = os.open

    def denied(file: object, flags: int, *rest: object) -> int:
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(file, flags, *rest)
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(runs.CheckpointError, match=r"cannot read .*checkpoint.safetensors \(Permission denied\)"):
        runs.read_checkpoint(path)


def test_a_path_that_is_not_utf8_is_refused_before_a_run_is_written(tmp_path, monkeypatch, capsys):
    """(``train --out $'bad\\xffname'`` wrote a whole run that eval, report, --resume and convert then
    could not read: safetensors takes UTF-8 paths)"""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "reber", "--out", os.fsdecode(b"bad\xffname"), "--steps", "2"])
    assert done.value.code == 2 and "is not valid UTF-8" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
