"""``lstmkit doctor``: what this machine gets — versions, the CPU kernel's build, every kernel row
on every variant on every device checked against the reference, and each timed against
``torch.nn.LSTM``.

    lstmkit doctor            # the report; exit code 1 if any check failed
    lstmkit doctor --quick    # vanilla and one variant per kind only

For each device (the CPU; CUDA when torch sees a GPU) and each kernel row that runs there
(the fused CPU kernel, torch's own operator, Triton on CUDA), each variant — one cell per row
of the variant table (:func:`lstmkit.variants.example_cells`) and the plain RNN — runs a small
problem (two layers, bidirectional, lengths) and its gradients, compared with the reference
kernel in float64 on the CPU; a row that does not compute a variant says why. Then a training
step at (B, T, I, H) = (32, 50, 64, 64) is timed against ``torch.nn.LSTM`` on the same device.
What a user runs to see what their machine gets, and what a GPU session runs first.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstmkit import kernels, variants
from lstmkit.kernels import cpu_ext
from lstmkit.kernels.machine import cpu_model

__all__ = ["add_arguments", "run", "check", "TOLERANCE"]

#: Largest error against the float64 reference, relative to each tensor's scale, per dtype.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
#: torch's operator on CUDA in float32 is cuDNN, which multiplies in TF32 (a 10-bit mantissa) while
#: ``torch.backends.cudnn.allow_tf32`` is on, torch's default (an H100: 3.6e-4 of the scale here).
TF32_TOLERANCE = 2e-3
T, B, I, H = 5, 3, 4, 6
LENGTHS = [5, 2, 4]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lstmkit doctor``."""
    parser.add_argument("--quick", action="store_true", help="vanilla and a few variants only")
    parser.add_argument("--no-timing", action="store_true", help="skip the timings against torch.nn.LSTM")


def _layer(cell: str, backend: str | None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if cell.startswith("rnn"):
        return lstmkit.RNN(I, H, num_layers=2, bidirectional=True, nonlinearity=cell.partition("_")[2] or "tanh",
                           backend=backend)
    return lstmkit.LSTM(I, H, num_layers=2, bidirectional=True, cell=cell, backend=backend)


def _outputs(layer: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Outputs, final states and every gradient of a fixed problem, as float64 CPU tensors."""
    g = torch.Generator().manual_seed(1)
    layer = layer.to(device=device, dtype=dtype).eval()
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(True)
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
    y, state = layer(packed)
    y, _ = pad_packed_sequence(y, total_length=T)
    states = state if isinstance(state, tuple) else (state,)
    weights = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device)
    loss = (y.double() * weights).sum() + sum(s.double().sum() for s in states)
    params = list(layer.parameters())
    grads = torch.autograd.grad(loss, [x, *params])
    names = ["output"] + [f"state {k}" for k in range(len(states))] + ["grad input"] + \
        [f"grad {n}" for n, _ in layer.named_parameters()]
    return {n: t.detach().double().cpu() for n, t in zip(names, [y, *states, *grads])}


def check(cell: str, backend: str, device: torch.device, dtype: torch.dtype) -> tuple[str, float | None]:
    """``("ok" | "FAILED: …" | "refused: …", worst relative error)`` of one kernel row on one
    variant against the float64 reference on the CPU."""
    why = kernels.why_not(kernels.kernel_named(backend), _layer(cell, None).spec, device, dtype)
    if why:  # "<why>[; <more>]", or "it runs …, not <what was asked>": the first clause
        return f"refused ({why.split(';')[0].split(', not ')[0]})", None
    try:
        got = _outputs(_layer(cell, backend), device, dtype)
        want = _outputs(_layer(cell, "reference"), torch.device("cpu"), torch.float64)
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, reported with the others
        return f"FAILED: {type(exc).__name__}: {str(exc).strip()[:160]}", None
    worst = 0.0
    for name, w in want.items():
        scale = max(w.abs().max().item(), 1e-3) if w.numel() else 1.0
        err = (got[name] - w).abs().max().item() / scale if w.numel() else 0.0
        worst = max(worst, err) if err == err else float("nan")
    tf32 = backend == "torch" and device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    ok = worst <= (TF32_TOLERANCE if tf32 else TOLERANCE.get(dtype, 1e-4))
    if ok and tf32 and worst > TOLERANCE[dtype]:
        return f"ok in TF32 ({worst:.1g}; torch.backends.cudnn.allow_tf32)", worst
    return ("ok" if ok else f"FAILED: error {worst:.2g} of the scale"), worst


def timing(cell: str, backend: str, device: torch.device) -> float | None:
    """A training step's time ÷ ``torch.nn.LSTM``'s (vanilla, same device) at (32, 50, 64, 64)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(50, 32, 64, device=device)
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(64, 64).to(device)
    try:
        ours = (lstmkit.RNN(64, 64, backend=backend) if cell.startswith("rnn")
                else lstmkit.LSTM(64, 64, cell=cell, backend=backend)).to(device)
    except ValueError:  # a row that cannot run this variant (the check said why)
        return None

    def step(m: torch.nn.Module) -> Callable[[], None]:
        def go() -> None:
            for p in m.parameters():
                p.grad = None
            m(x)[0].sum().backward()
        return go
    fns = [step(ours), step(theirs)]
    times: list[list[float]] = [[], []]
    try:
        for rnd in range(9):  # alternating rounds: the machine's noise falls on both alike
            for k, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                sync()
                if rnd >= 2:  # two warm-up rounds
                    times[k].append(time.perf_counter() - t0)
    except Exception:  # noqa: BLE001 - a row that cannot run this layer was reported by the check
        return None
    return statistics.median(times[0]) / statistics.median(times[1])


def _environment() -> list[str]:
    cap = torch.backends.cpu.get_cpu_capability()
    lines = [f"lstmkit {lstmkit.__version__}, python {platform.python_version()}, torch {torch.__version__}",
             f"CPU: {cpu_model()}, capability {cap}, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        lines.append(f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}, cuDNN "
                     f"{torch.backends.cudnn.version()}")
    else:
        lines.append("CUDA: no GPU visible to torch")
    if importlib.util.find_spec("triton") is not None:
        import triton

        lines.append(f"Triton {triton.__version__}")
    else:
        lines.append("Triton: not installed (pip install 'lstmkit[gpu]' for the GPU kernels)")
    return lines


def _rows(device: torch.device) -> list[str]:
    """The kernel rows that run on ``device`` (the interpreter's Triton on the CPU excluded)."""
    names = []
    for name, kernel in kernels.REGISTRY.items():
        if name in ("reference", "onnx_export") or device.type not in kernel.devices:
            continue
        if name == "triton" and device.type != "cuda":
            continue
        names.append(name)
    return names


def run(args: argparse.Namespace) -> int:
    """``lstmkit doctor``: print the report; exit code 0 if every check passed, else 1."""
    for line in _environment():
        print(line)
    t0 = time.perf_counter()
    failed = 0
    try:
        where = cpu_ext.build_dir(cpu_ext.capability())
        cpu_ext.load()
        print(f"fused CPU kernel: ready ({time.perf_counter() - t0:.1f} s) in {where}")
    except Exception as exc:  # noqa: BLE001 - reported (a failed check); the CPU then runs the reference kernel
        failed += 1  # (load() keeps the failure: no second build is tried in this process)
        print(f"fused CPU kernel: FAILED to build ({type(exc).__name__}: {exc}); CPU layers run 'reference'")
    cells = variants.example_cells() + ["rnn_tanh", "rnn_relu"]
    if args.quick:
        cells = ["vanilla", "peephole+layernorm", "zoneout=0.2", "deep=3", "rnn_tanh"]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float64, torch.float32):
            rows = _rows(device)
            print(f"\n{device.type} {str(dtype).removeprefix('torch.')}: " + ", ".join(rows))
            width = max(len(c) for c in cells)
            for cell in cells:
                results = []
                for row in rows:
                    verdict, err = check(cell, row, device, dtype)
                    failed += verdict.startswith("FAILED")
                    results.append(f"{row} {verdict if verdict != 'ok' else f'ok ({err:.1g})'}")
                print(f"  {cell:<{width}}  " + "; ".join(results))
        if not args.no_timing:
            print(f"\n{device.type} training step (32, 50, 64, 64) ÷ torch.nn.LSTM's:")
            for cell in (["vanilla", "peephole", "layernorm", "deep=32"] if args.quick else cells):
                ratios = [(row, timing(cell, row, device)) for row in _rows(device)]
                shown = [f"{row} {r:.2f}" for row, r in ratios if r is not None]
                print(f"  {cell:<{width}}  " + ("; ".join(shown) or "-"))
    print(f"\n{'every check passed' if not failed else f'{failed} check(s) FAILED'}")
    return 1 if failed else 0
