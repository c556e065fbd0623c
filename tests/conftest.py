"""Shared test helpers: tolerances per dtype and gradient comparison."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton's interpreter runs the GPU kernels on CPU tensors (tests/test_triton.py);
# it must be set before triton decorates them. On a GPU machine the compiled kernels run.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _patch_the_language_once_per_launch() -> None:
    """Triton's interpreter re-patches ``triton.language`` (an ``inspect.getmembers`` walk over
    five namespaces, ~2 ms) at every call of a ``@triton.jit`` device function, although the
    launch that runs the call has already patched it and restores it only when the launch ends.
    Our kernels call their cell step and activations as device functions thousands of times per
    test: measured on a 2-core EPYC, 43 % of a Triton test's time went to these repeats. Here a
    device function call inside a launch that has patched the same language modules skips them;
    the launch itself, and anything this Triton does not lay out so, runs as Triton wrote it.
    The Triton tests compare every result with the references, so a wrong skip would fail them."""
    import importlib.util
    import inspect

    if not importlib.util.find_spec("triton"):
        return
    from triton.runtime import interpreter

    needed = ("_patch_lang", "_LangPatchScope", "GridExecutor", "InterpretedFunction", "tl")
    if not all(hasattr(interpreter, name) for name in needed):
        return
    original_patch, original_launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    langs_of = (interpreter.tl, interpreter.tl.core)
    launches: list[set[int]] = []  # per running launch: ids of the language modules it patched
    langs_seen: dict[object, set[int]] = {}  # per function: ids of the language modules it sees

    def patch_lang(fn):
        langs = langs_seen.get(fn)
        if langs is None:
            langs = langs_seen[fn] = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in langs_of}
        if launches and launches[-1] and langs <= launches[-1]:
            return interpreter._LangPatchScope()  # a device function call: its language is patched
        scope = original_patch(fn)
        if launches:
            launches[-1] |= langs
        return scope

    def launch(self, *args, **kwargs):
        launches.append(set())
        try:
            return original_launch(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()
# The tests compare every Triton build with the references themselves: the first-use self-check
# would run each build twice (tests/test_selfcheck.py turns it on).
os.environ.setdefault("LSTMKIT_TRITON_SELFCHECK", "0")

# Test shapes are tiny: one thread is faster, and immune to OpenMP spin-wait slowdowns when
# the two cores are shared. Tests that exercise threading set the count themselves.
torch.set_num_threads(1)

#: (rtol, atol) per dtype, as the issues state them: 1e-5 float32, 1e-10 float64.
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Norm-wise relative agreement: max|a − b| <= rtol · max|b| (rtol 1e-5 f32, 1e-10 f64).

    Two correct float32 implementations that sum in different orders differ element-wise
    by more than 1e-5 where values cancel (layer-norm gradients); relative to the
    tensor's scale they agree to 1e-5.
    """
    rtol = TOL[dtype][0]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-3), f"{what}: max abs error {err:.3g} > {rtol:g} × scale {scale:.3g}"


def fixed_zoneout_masks(spec, c_shape, h_shape, like):
    """Zoneout's masks as a function of their shapes alone (a generator seeded by them): every
    call with the same shapes draws the same masks, so repeated runs of a layer in training
    mode (gradcheck, kernel against kernel) compute the same function, and the NumPy oracle
    can be given exactly the masks lstmkit used (:func:`zoneout_keep`)."""
    g = torch.Generator().manual_seed(1000 + 31 * sum(c_shape) + sum(h_shape))
    z_c, z_h = spec.zoneout
    d_c = (torch.rand(c_shape, generator=g, dtype=torch.float64) < z_c).to(like.dtype).to(like.device)
    d_h = (torch.rand(h_shape, generator=g, dtype=torch.float64) < z_h).to(like.dtype).to(like.device)
    return d_c, d_h


@pytest.fixture(autouse=True)
def _no_remembered_kernel_choice():
    """Tests fake facts the kernel rows read (the CPU's units, a failed build, oneDNN's switch):
    each starts without the choices :func:`lstmkit.kernels.select` remembered for earlier calls."""
    import lstmkit.kernels

    lstmkit.kernels.forget_choices()


@pytest.fixture(autouse=True)
def _deterministic_zoneout(monkeypatch):
    """Every test sees :func:`fixed_zoneout_masks` in place of torch's generator (tests of the
    generator itself restore it with ``monkeypatch.undo`` or call ``lstmkit.cell`` directly)."""
    import lstmkit.cell

    monkeypatch.setattr(lstmkit.cell, "zoneout_masks", fixed_zoneout_masks)


def zoneout_keep(layer, T, B):
    """The masks a layer's every layer-direction gets in training (:func:`fixed_zoneout_masks`),
    as the NumPy oracle takes them: ``keep[l][d] = (d_c, d_h)`` arrays; None without zoneout
    or in eval mode."""
    spec = layer.spec
    if not layer.training or spec.zoneout == (0.0, 0.0):
        return None
    d_c, d_h = fixed_zoneout_masks(spec, (T, B, layer.hidden_size), (T, B, layer.output_size),
                                   torch.empty(0, dtype=torch.float64))
    pair = (d_c.numpy(), d_h.numpy())
    return [[pair] * layer.num_directions for _ in range(layer.num_layers)]


@pytest.fixture
def forward_infer_calls(monkeypatch) -> list:
    """The shape of ``x`` in every call of the compiled kernel's ``forward_infer`` (inference with
    the input projection inside the loop, and one step per call) or of a ``PreparedLayer`` (a
    prepared step, without gradients forward_infer) during the test: a spy on the loaded
    extension, so a test can check that path ran."""
    from lstmkit.kernels import cpu_ext

    real, calls = cpu_ext.load(), []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def forward_infer(self, *args):
            calls.append(args[0].shape)
            return real.forward_infer(*args)

        def PreparedLayer(self, *args):  # noqa: N802 - the extension's class
            layer = real.PreparedLayer(*args)

            def call(x, *rest):
                calls.append(x.shape)
                return layer(x, *rest)
            return call

    monkeypatch.setattr(cpu_ext, "load", lambda verbose=False: Spy())
    return calls

