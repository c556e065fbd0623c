"""``lstmkit doctor``: every kernel row on every variant checked against the reference; a wrong
kernel is reported and the exit code says so."""

from __future__ import annotations

import argparse

from lstmkit import kernels
from lstmkit.app import doctor
from lstmkit.app.cli import main
from lstmkit.kernels import cpu_ext


def test_doctor_checks_every_variant_and_passes(capsys):
    assert main(["doctor", "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "capability" in out and "fused CPU kernel: ready" in out
    for cell in ("vanilla", "zoneout=0.2/0.1", "deep=3", "gate_act=hardsigmoid", "rnn_relu"):
        assert f"  {cell} " in out
    assert "cpu float64: torch, cpu_fused" in out and "every check passed" in out
    assert "torch refused (torch's LSTM computes the vanilla cell" in out


def test_a_wrong_kernel_fails_the_doctor(capsys, monkeypatch):
    row = kernels.REGISTRY["cpu_fused"]
    real = type(row).run

    def wrong(self, *args, **kw):
        out = real(self, *args, **kw)
        return out._replace(y=out.y * 1.01)
    monkeypatch.setattr(type(row), "run", wrong)
    assert doctor.run(argparse.Namespace(quick=True, no_timing=True)) == 1
    out = capsys.readouterr().out
    assert "cpu_fused FAILED: error" in out and "check(s) FAILED" in out


def test_a_kernel_that_cannot_be_built_fails_the_doctor(capsys, monkeypatch):
    """It said 'FAILED to build', then 'every check passed' and exit 0 (the cpu_fused rows were
    refused, not failed), and built a second time (found by a build sweep)."""
    def cannot(verbose=False):
        raise cpu_ext.BuildError("no C++ compiler: 'c++' is not on PATH")
    monkeypatch.setattr(cpu_ext, "_ext", None)
    monkeypatch.setattr(cpu_ext, "_failed", "no C++ compiler: 'c++' is not on PATH")  # as load() keeps it
    monkeypatch.setattr(cpu_ext, "load", cannot)
    assert doctor.run(argparse.Namespace(quick=True, no_timing=True)) == 1
    out = capsys.readouterr().out
    assert "fused CPU kernel: FAILED to build (BuildError: no C++ compiler" in out and "1 check(s) FAILED" in out
