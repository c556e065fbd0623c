"""A full (or read-only) disk is one line, exit code 2, no partial or temporary file and no existing file
changed — for training (the first checkpoint, a later one, the final model), every convert
format (and ``--overwrite``), plot and report — and never a crash of the process.

The disk is a small tmpfs when the tests run as root (and may mount), else an injected
writer that fails with ENOSPC once a byte budget is spent (lstmkit writes every file from
Python, so that is where a full disk shows).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lstmkit
from lstmkit.app.cli import main
from lstmkit.app.train import load_checkpoint

TRAIN = ["train", "adding", "-o", "length=24", "--hidden", "8", "--batch-size", "8", "--threads", "1", "--quiet",
         "--no-stop-at-target"]
PAGE = os.sysconf("SC_PAGE_SIZE")


class Disk:
    """A directory on a small file system; ``grow()`` makes room."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path, self.mode, self.budget, self.used = path, mode, 0, 0

    def grow(self) -> None:
        if self.mode == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(self.path)], check=True)
        self.budget = 1 << 40


class _Counting:
    """A file object whose writes fail with ENOSPC once the disk's budget is spent."""

    def __init__(self, fh, disk: Disk) -> None:
        self._fh, self._disk = fh, disk

    def write(self, data):
        if self._disk.used + len(data) > self._disk.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._disk.used += len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@contextlib.contextmanager
def small_disk(root: Path, pages: int, budget: int, monkeypatch) -> Iterator[Disk]:
    """``pages`` of tmpfs at ``root/disk`` as root, else ``budget`` bytes of injected writes there."""
    d = root / "disk"
    d.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * PAGE}", "tmpfs", str(d)],
                                            capture_output=True).returncode == 0:
        try:
            yield Disk(d, "tmpfs")
        finally:
            subprocess.run(["umount", "-l", str(d)], check=True)
        return
    disk = Disk(d, "injected")
    disk.budget = budget
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        inside = isinstance(file, (str, os.PathLike)) and Path(file).resolve().is_relative_to(d.resolve())
        return _Counting(fh, disk) if inside and any(c in mode for c in "wax") else fh

    monkeypatch.setattr(builtins, "open", open_)
    yield disk


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def full(capsys, argv: list) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(no space left on the device)" in err, err
    return err


def _pages(n: int) -> int:
    return math.ceil(n / PAGE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """Runs on a roomy disk: their files' sizes size the small disks, their results are the truth."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name, extra in (("two", ["--eval-every", "10", "--steps", "20"]), ("one", ["--eval-every", "10",
                                                                                   "--steps", "10"])):
        assert main(TRAIN + extra + ["--out", str(root / name)]) == 0
        out[name] = root / name
    return out


@pytest.mark.parametrize("where", ["first checkpoint", "later checkpoint", "final model"])
def test_train_on_a_full_disk(reference, tmp_path, capsys, monkeypatch, where):
    ref = reference["one" if where == "final model" else "two"]
    size = {p.name: p.stat().st_size for p in ref.iterdir()}
    base = size["config.json"] + size["metrics.jsonl"]
    ck, model = size["checkpoint.safetensors"], size["model.safetensors"]
    pages = _pages(size["config.json"]) + _pages(size["metrics.jsonl"]) + _pages(ck)
    pages, budget = {"first checkpoint": (pages - 1, base + ck // 2),
                     "later checkpoint": (pages + _pages(ck) - 1, base + ck + ck // 2),
                     "final model": (pages, base + ck + model // 2)}[where]
    extra = ["--eval-every", "10", "--steps", "10" if where == "final model" else "20"]
    with small_disk(tmp_path, pages, budget, monkeypatch) as disk:
        run = disk.path / "run"
        err = full(capsys, TRAIN + extra + ["--out", run])
        assert ("model: cannot write" if where == "final model" else "checkpoint: cannot write") in err
        assert "the same command with --resume" in err
        names = sorted(p.name for p in run.iterdir())  # what was there before the failed write, and no temporary
        if where == "first checkpoint":
            assert names == ["config.json", "metrics.jsonl"]
        else:
            assert names == ["checkpoint.safetensors", "config.json", "metrics.jsonl"]
            assert load_checkpoint(run)[2]["step"] == 10  # the last one written, whole
        disk.grow()
        assert main(TRAIN + extra + ["--out", str(run), "--resume"]) == 0  # the same command finishes the run
        a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
        steps = [line.split(",")[0] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [line.split(",")[0] for line in (ref / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "lstm.pt"
    torch.manual_seed(0)
    torch.save(torch.nn.LSTM(30, 64, num_layers=2).state_dict(), src)  # about 200 kB in every format
    return src


@pytest.mark.parametrize("ext", [".pt", ".safetensors", ".keras", ".weights.h5", ".onnx"])
def test_convert_to_a_full_disk(big_layer, tmp_path, capsys, monkeypatch, ext):
    with small_disk(tmp_path, 8, 8 * 1024, monkeypatch) as disk:
        old = disk.path / "old.safetensors"
        lstmkit.convert.write_layer(lstmkit.LSTM(2, 2), old)  # a small file that fits
        before = snapshot(disk.path)
        err = full(capsys, ["convert", big_layer, disk.path / f"x{ext}"])
        assert err.startswith("lstmkit convert: error: DST: cannot write")
        assert snapshot(disk.path) == before  # nothing new, no temporary file
        if ext == ".safetensors":  # --overwrite of an existing file keeps it whole
            full(capsys, ["convert", big_layer, old, "--overwrite"])
            assert snapshot(disk.path) == before
        if ext == ".weights.h5" and disk.mode == "tmpfs":  # h5py used to crash the process (exit 139) here
            p = subprocess.run([sys.executable, "-m", "lstmkit", "convert", str(big_layer),
                                str(disk.path / "y.weights.h5")], capture_output=True, text=True, timeout=300)
            assert p.returncode == 2 and p.stderr.count("\n") == 1, (p.returncode, p.stderr)
            assert snapshot(disk.path) == before


def test_plot_and_report_to_a_full_disk(reference, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(reference["two"], run)
    with small_disk(tmp_path, 2, 2 * 1024, monkeypatch) as disk:
        (disk.path / "keep.png").write_bytes(b"mine")
        before = snapshot(disk.path)
        full(capsys, ["plot", "weights", run, "-o", disk.path / "w.png"])
        full(capsys, ["plot", "gates", run, "-o", disk.path / "keep.png", "--overwrite"])
        full(capsys, ["plot", "curves", run, "-o", disk.path / "c.png"])
        full(capsys, ["report", run, "-o", disk.path / "r.html", "--no-gradflow"])
        assert snapshot(disk.path) == before


@contextlib.contextmanager
def read_only_dir(root: Path) -> Iterator[tuple[Path, str]]:
    """A directory that cannot be written: a read-only tmpfs as root, else one without write permission."""
    d = root / "ro"
    d.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                                            capture_output=True).returncode == 0:
        (d / "keep.png").write_bytes(b"mine")
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        try:
            yield d, "read-only file system"
        finally:
            subprocess.run(["umount", "-l", str(d)], check=True)
        return
    (d / "keep.png").write_bytes(b"mine")
    d.chmod(0o500)
    try:
        yield d, "permission denied"
    finally:
        d.chmod(0o700)


def test_outputs_on_a_read_only_file_system(reference, big_layer, tmp_path, capsys):
    run = reference["two"]
    with read_only_dir(tmp_path) as (d, why):
        before = snapshot(d)
        for argv in (["plot", "weights", run, "-o", d / "w.png"],
                     ["plot", "gates", run, "-o", d / "keep.png", "--overwrite"],
                     ["report", run, "-o", d / "r.html"],
                     ["study", "--task", "adding", "--variants", "vanilla", "--out", d / "study"],
                     TRAIN + ["--out", d / "run"],
                     ["convert", big_layer, d / "x.onnx"]):
            capsys.readouterr()
            assert main([str(a) for a in argv]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"({why})" in err, err
        assert snapshot(d) == before
