"""Triton builds are checked against the reference before their first use (under Triton's
interpreter here; on a GPU the same code checks the compiled kernels): a good build runs, a
build that computes something else is caught, warned about once and replaced by the reference
kernel; LSTMKIT_TRITON_SELFCHECK=0 turns the check off."""

from __future__ import annotations

import warnings

import pytest
import torch

import lstmkit
from lstmkit.kernels import fused, selfcheck

pytest.importorskip("triton")


@pytest.fixture
def checked(monkeypatch):
    """The check on, with no verdicts from earlier tests."""
    monkeypatch.setenv(selfcheck.ENV, "1")
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})


def _layers(cell: str = "peephole"):
    torch.manual_seed(0)
    tri = lstmkit.LSTM(3, 8, cell=cell, backend="triton")
    ref = lstmkit.LSTM(3, 8, cell=cell, backend="reference")
    ref.load_state_dict(tri.state_dict())
    return tri, ref


def _no_warning_but_triton_interpreters() -> None:
    """Every warning an error, but those Triton's own interpreter raises about numpy (Triton
    3.6: 'Conversion of an array with ndim > 0 to a scalar is deprecated', from its handling
    of scalar kernel arguments; fixed in 3.7): not lstmkit's, and not what these tests count."""
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"triton\.")


def test_a_good_build_passes_and_runs(checked):
    tri, ref = _layers()
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings():
        _no_warning_but_triton_interpreters()  # no warning at all
        y = tri(x)[0]
    torch.testing.assert_close(y, ref(x)[0], rtol=1e-5, atol=1e-5)
    assert list(selfcheck._VERDICTS.values()) == [None]


@pytest.mark.parametrize("cell", ["slstm+heads=2", "deep=4x3+fgr"])
def test_the_sLSTM_and_deep_gates_pass_with_given_states(checked, cell):
    """The check draws states of the cell's own width (the sLSTM: c, n > 0, m side by side) and
    passes good sLSTM and deep-gate builds; a state of the wrong width is refused before any
    launch, as the C++ kernel refuses it."""
    tri, ref = _layers(cell)
    x = torch.randn(5, 2, 3)
    states = tuple(torch.rand(1, 2, 8) + 0.2 for _ in range(4 if cell.startswith("slstm") else 2))
    with warnings.catch_warnings():
        _no_warning_but_triton_interpreters()
        y = tri(x, states)[0]
    torch.testing.assert_close(y, ref(x, states)[0], rtol=1e-5, atol=1e-5)
    assert list(selfcheck._VERDICTS.values()) == [None]
    if cell.startswith("slstm"):
        impl, c0 = fused._triton_impl(), torch.zeros(2, 8)  # (B, H), not (B, 3H)
        plist = [torch.empty(0)] * len(lstmkit.kernels.abi.PARAMS)
        with pytest.raises(RuntimeError, match=r"c0 must be \(B, S·H\) = \(2, 24\): the cell's 3 states"):
            impl.forward(torch.zeros(5, 2, 32), torch.zeros(32, 4), torch.zeros(2, 8), c0, torch.empty(0),
                         *plist, lstmkit.kernels.abi.flags(tri.spec), [], 0.0, 0.0, 0.0, 8, 0, False)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_the_first_call_in_any_context_checks_with_gradients(checked, context):
    """The first use may come under no_grad or inference_mode (a benchmark, a server) or autocast:
    the check still differentiates, in the build's own dtype, and passes a good build (on an H200
    every build once failed here: 'element 0 of tensors does not require grad')."""
    tri, ref = _layers()
    x = torch.randn(5, 2, 3)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[context]
    with warnings.catch_warnings():
        _no_warning_but_triton_interpreters()
        with ctx():
            y = tri(x)[0]
    assert list(selfcheck._VERDICTS.values()) == [None]
    if context != "autocast":
        torch.testing.assert_close(y, ref(x)[0], rtol=1e-5, atol=1e-5)


def test_a_wrong_build_is_caught_warned_once_and_replaced_by_the_reference(checked, monkeypatch):
    impl = fused._triton_impl()
    real = impl.forward

    def wrong(*args):  # a build whose forward computes something else (an off-by-0.5 output)
        y, *rest = real(*args)
        return (y + 0.5, *rest)
    monkeypatch.setattr(impl, "forward", wrong)
    tri, ref = _layers()
    x = torch.randn(5, 2, 3)
    with pytest.warns(RuntimeWarning, match=r"Triton build for cell 'peephole', float32, \w+ path failed its "
                                            r"self-check .*y differs by .* run on the 'reference' kernel") as rec:
        y = tri(x)[0]
    assert len([w for w in rec if str(w.message).startswith("lstmkit:")]) == 1  # (Triton 3.6's interpreter adds its own)
    torch.testing.assert_close(y, ref(x)[0], rtol=0, atol=0)  # the reference ran: right, not wrong
    with warnings.catch_warnings():
        _no_warning_but_triton_interpreters()  # once per build: no second warning
        tri(x)
    monkeypatch.setenv(selfcheck.ENV, "0")  # unchecked, the wrong build would have been used
    assert (tri(x)[0] - ref(x)[0]).abs().max() > 0.4


def test_a_build_that_raises_is_caught(checked, monkeypatch):
    impl = fused._triton_impl()

    def broken(*args):
        raise RuntimeError("simulated launch failure")
    monkeypatch.setattr(impl, "forward", broken)
    tri, ref = _layers("vanilla")
    x = torch.randn(4, 3, 3)
    with pytest.warns(RuntimeWarning, match="RuntimeError: simulated launch failure"):
        y = tri(x)[0]
    torch.testing.assert_close(y, ref(x)[0], rtol=0, atol=0)


def test_16_bit_builds_are_held_to_the_reference_kernels_own_error_in_their_dtype(checked, monkeypatch):
    """In 16 bits a cell's sensitivity sets the error (the sLSTM's exponential gates once failed a
    fixed 6e-2 on an H100, and its layers silently ran the reference loop, 20x slower): a build
    passes within FACTOR16 times the 16-bit reference kernel's own error, and a wrong one is still
    caught. A fixed tolerance too tight for any 16-bit run makes the second rule the one that decides."""
    monkeypatch.setitem(selfcheck.TOLERANCE, torch.bfloat16, 1e-9)
    tri, _ = _layers("slstm+heads=2")
    tri = tri.to(torch.bfloat16)
    x = torch.randn(5, 2, 3, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        _no_warning_but_triton_interpreters()
        tri(x)
    assert list(selfcheck._VERDICTS.values()) == [None]

    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    impl = fused._triton_impl()
    real = impl.forward

    def wrong(*args):  # off by 0.05 of the scale: past 2.5x the loop's error (about 0.005 here)
        y, *rest = real(*args)
        return (y + 0.05 * y.abs().max(), *rest)
    monkeypatch.setattr(impl, "forward", wrong)
    tri = _layers("peephole")[0].to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match=r"cell 'peephole', bfloat16, \w+ path failed its self-check .*y differs"):
        tri(x)
