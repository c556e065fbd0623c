"""Which kernel row runs a layer: the registry's rows and what each claims (a row that lacks a
step refuses it by name), the CPU's choice of torch's operator (oneDNN) for the vanilla LSTM
where measured faster, the CPU vendor that choice reads, CUDA's order (cuDNN, then Triton or
the reference row), and the fallback to the reference row when the extension cannot be built."""

from __future__ import annotations

import pytest
import torch

import lstmkit
from kernel_compare import FUSED
from lstmkit import kernels
from lstmkit.spec import CellSpec, resolve


def test_registry_rows_and_selection():
    assert "reference" in kernels.REGISTRY
    cpu = torch.device("cpu")
    deep = lstmkit.CellSpec(gate_hidden=(3,))
    assert kernels.select(resolve("vanilla"), torch.device("meta"), torch.float32).name == "reference"
    assert kernels.select(resolve("vanilla"), cpu, torch.complex64).name == "reference"
    if FUSED:
        assert kernels.select(resolve("peephole"), cpu, torch.float32).name == FUSED[0]
        assert kernels.select(deep, cpu, torch.float32).name == FUSED[0]
        with pytest.raises(ValueError, match=r"cannot run this layer: it runs float32, float64"):
            kernels.select(deep, cpu, torch.complex64, backend=FUSED[0])
    assert kernels.REGISTRY["triton"].refuses(deep) is None
    assert kernels.REGISTRY["triton"].refuses(lstmkit.CellSpec(gate_hidden=(3,), layernorm=True)) is None


def test_a_row_that_lacks_a_step_refuses_it_by_name():
    """A fused row declares the variant table's flags it computes (the two rows here: every one,
    abi.FLAGS); a row that lacks some names each part it does not compute, and points to cpu_fused
    only where that row computes the whole cell."""
    from lstmkit.kernels import abi
    from lstmkit.kernels.fused import FusedKernel

    assert kernels.REGISTRY["cpu_fused"].implements == kernels.REGISTRY["triton"].implements == frozenset(abi.FLAGS)

    class Partial(FusedKernel):
        name, implements = "partial", frozenset({"peephole"})

        def unsupported(self, spec, device, dtype):
            return self.refuses_or_dtype(spec, dtype)

    why = Partial().refuses(resolve("peephole+layernorm+deep=3+heads=1"))
    assert why == ("its kernels do not compute deep gates (gate_hidden), layernorm: such layers run on the "
                   "'reference' kernel (on the CPU, 'cpu_fused' computes them)")
    assert Partial().refuses(resolve("peephole")) is None


def _workload(**kw):
    base = dict(kind="lstm", steps=100, batch=32, hidden=128, dtype=torch.float32, gradient=False, lengths=False,
                projection=False)
    return kernels.Workload(**{**base, **kw})


def test_cpu_vanilla_selects_onednn_where_measured_faster(monkeypatch):
    """On the CPU the vanilla LSTM's calls go to torch's operator (oneDNN) where the table says it
    is faster, every other call and cell to the fused kernel; a forced backend is kept."""
    from lstmkit.kernels import torch_native

    cpu, vanilla = torch.device("cpu"), resolve("vanilla")

    def chosen(spec=vanilla, **kw):
        return kernels.select(spec, cpu, kw.get("dtype", torch.float32), workload=_workload(**kw)).name

    big = dict(batch=64, hidden=256)  # float32 inference on oneDNN (B >= 32, H = 256-512)
    # the table was measured on Intel's CPUs at torch's AVX-512 capability; on another vendor's (AMD's)
    # and held to AVX2 the fused kernel keeps every call
    for vendor, capability, cell_row in (("AuthenticAMD", "AVX512", FUSED[0]), (None, "AVX512", "torch"),
                                         ("GenuineIntel", "AVX2", FUSED[0]), ("GenuineIntel", "AVX512", "torch")):
        monkeypatch.setattr(torch_native, "cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(torch_native, "_capability", lambda c=capability: c)
        kernels.forget_choices()
        assert chosen(**big) == cell_row, (vendor, capability)
    assert chosen(**big) == "torch" and chosen(batch=32, hidden=512) == "torch"
    assert chosen(batch=32, hidden=256) == "torch" and chosen(batch=16, hidden=512) == FUSED[0]  # B < 32
    assert chosen(batch=16, hidden=1024) == FUSED[0] and chosen(batch=64, hidden=1024) == FUSED[0]  # H = 1,024
    assert chosen(batch=128, hidden=128) == FUSED[0] and chosen() == FUSED[0]  # H = 128
    assert chosen(gradient=True, **big) == FUSED[0] and chosen(gradient=True) == FUSED[0]  # training: the fused kernel
    assert chosen(steps=10, **big) == FUSED[0]
    assert chosen(lengths=True, **big) == FUSED[0] and chosen(projection=True, **big) == FUSED[0]
    assert chosen(dtype=torch.float64, **big) == FUSED[0] and chosen(kind="rnn", **big) == FUSED[0]
    assert chosen(resolve("peephole"), **big) == FUSED[0] and chosen(resolve("vanilla+fb=1"), **big) == "torch"
    assert kernels.select(vanilla, cpu, torch.float32).name == FUSED[0]  # a call not described
    with monkeypatch.context() as m:  # oneDNN switched off (torch.backends.mkldnn.flags): aten's own loop, slower
        m.setattr(torch._C, "_get_mkldnn_enabled", lambda: False)
        assert chosen(**big) == FUSED[0]
    assert kernels.select(vanilla, cpu, torch.float32, record=True, workload=_workload(**big)).name == FUSED[0]
    assert kernels.select(vanilla, cpu, torch.float32, backend=FUSED[0], workload=_workload(**big)).name == FUSED[0]
    monkeypatch.setattr(torch_native, "_onednn_amx", lambda: True)
    kernels.forget_choices()  # (a fact that does not change in a process: the choices made stand)
    assert chosen(dtype=torch.bfloat16) == "torch" and chosen(dtype=torch.bfloat16, hidden=1024) == FUSED[0]
    assert chosen(dtype=torch.bfloat16, gradient=True) == "torch"
    assert chosen(dtype=torch.bfloat16, gradient=True, batch=16) == FUSED[0]
    monkeypatch.setattr(torch_native, "_onednn_amx", lambda: False)
    kernels.forget_choices()  # (a fact that does not change in a process: the choices made stand)
    assert chosen(dtype=torch.bfloat16) == FUSED[0]

    # A layer's call: oneDNN where chosen (the same values as the fused kernel; the torch row's
    # gradients are tested with its other rows), the fused kernel in training, under autocast, in a
    # trace and for lengths.
    ran = []
    real = torch_native.TorchKernel._call
    monkeypatch.setattr(torch_native.TorchKernel, "_call", lambda self, *a, **k: ran.append(1) or real(self, *a, **k))
    torch.manual_seed(0)
    layer = lstmkit.LSTM(16, 256)
    fused = lstmkit.LSTM(16, 256, backend=FUSED[0])
    fused.load_state_dict(layer.state_dict())
    x = torch.randn(60, 64, 16)
    with torch.no_grad():
        (y, _), (y_fused, _) = layer(x), fused(x)
    assert len(ran) == 1
    torch.testing.assert_close(y, y_fused, rtol=1e-5, atol=1e-5)
    layer(x[:, :16].requires_grad_())  # float32 training: the fused kernel
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
        lstmkit.trace(layer, x)
        layer(x, lengths=torch.full((64,), 59))
    assert len(ran) == 1


def test_cpu_vendor_is_the_one_proc_cpuinfo_names():
    """The vendor checks (the oneDNN table's, the 16-bit units') read the first processor's
    vendor_id (None without one)."""
    from pathlib import Path

    from lstmkit.kernels import machine

    info = Path("/proc/cpuinfo")
    lines = info.read_text(errors="replace").split("\n\n")[0].splitlines() if info.exists() else []
    named = [line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == "vendor_id"]
    assert machine.cpu_vendor() == (named[0] if named else None)


def test_cuda_layers_select_cudnn_then_triton_or_the_reference_row():
    """On CUDA: torch's own operator (cuDNN) for the cells it computes, Triton for the rest,
    and for a trace (record mode) the first row that records."""
    import importlib.util

    cuda = torch.device("cuda")
    fast = "triton" if importlib.util.find_spec("triton") else "reference"
    for cell in ("vanilla", "vanilla+fb=1", CellSpec(kind="rnn", nonlinearity="relu")):
        assert kernels.select(resolve(cell), cuda, torch.float32).name == "torch"
        assert kernels.select(resolve(cell), cuda, torch.float32, record=True).name == fast
    assert kernels.select(resolve("vanilla"), cuda, torch.float32, backend="triton").name == fast
    for cell in ("peephole+layernorm", "zoneout=0.1", "cand_act=relu"):
        assert kernels.select(resolve(cell), cuda, torch.float32).name == fast


def test_build_failure_falls_back_to_reference_with_one_warning(monkeypatch):
    from lstmkit.kernels import cpu_ext

    def broken_build(cap, verbose=False):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(cpu_ext, "_ext", None)
    monkeypatch.setattr(cpu_ext, "_failed", None)
    monkeypatch.setattr(cpu_ext, "_build", broken_build)
    layer = lstmkit.LSTM(3, 4).double()
    ref = lstmkit.LSTM(3, 4, backend="reference").double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="could not be built.*simulated compiler failure") as rec:
        out = layer(x)[0]
        layer(x)  # a second call warns no more
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(out, ref(x)[0], rtol=0, atol=0)
    assert kernels.select(layer.spec, x.device, x.dtype).name == "reference"
