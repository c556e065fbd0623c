"""Time lstmkit's Triton kernels on one GPU against torch.nn.LSTM (cuDNN) and the reference loop.

    python benchmarks/bench_gpu.py               # the full run on one GPU (planned: < 8 min on an H100)
    python benchmarks/bench_gpu.py --dry-run     # tiny shapes, every code path; CPU: Triton's interpreter
    python benchmarks/bench_gpu.py --aot         # no GPU needed: registers / spills / shared memory of
                                                 # every kernel build -> results/gpu_kernels_aot.md

Every variant (float32) against ``torch.nn.LSTM`` (cuDNN, vanilla) and against the
reference loop of the same variant, inference (no_grad forward) and a training step
(forward + backward), at the issue's (B, T, I, H) shapes; CUDA events, median of
``--repeats`` after warm-up, interleaved rounds (noise drifts over all rows alike); peak
memory of one training step (``torch.cuda.max_memory_allocated`` above what was allocated
before it). A second section times vanilla on both ways of running the time loop
(persistent, per step; float32 and bfloat16) at small H, the data :func:`choose_path`
is to be tuned from. Triton builds are warmed first in ``--jobs`` processes (they share
Triton's cache), so compile time stays out of the timings and the wall clock. JSON and
markdown go to ``benchmarks/results/bench_gpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # the dry run on a CPU: Triton's interpreter (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lstmkit  # noqa: E402
from lstmkit import kernels  # noqa: E402

#: (B, T, I, H), in the order they are run: the most telling first, so that a run cut short by
#: ``--budget`` (a GPU lent for minutes) still answers the main questions.
SHAPES = [(64, 100, 256, 256), (1, 100, 32, 32), (32, 100, 128, 128), (64, 200, 512, 512),
          (32, 100, 1024, 1024), (256, 50, 256, 256)]
VARIANTS = ["vanilla", "peephole", "nig", "nfg", "nog", "niaf", "noaf", "cifg", "fgr", "layernorm", "clip=3",
            "peephole+cifg+layernorm", "projection", "heads=4", "deep=32", "deep_f=32", "slstm+heads=4"]
#: Rows that no cell word names: "deep_f=32" = only the forget gate deep (the fused kernels' per-gate case).
ROW_SPECS: dict[str, lstmkit.CellSpec] = {"deep_f=32": lstmkit.CellSpec(gate_hidden={"f": (32,)})}
#: The sLSTM against FlashRNN's (same equations: its normaliser floor, block-diagonal heads): (B, T, I, H),
#: heads, FlashRNN's backends timed by default (its "cuda"/"cuda_fused" compile CUDA code first: --peer-backends).
PEER_SHAPES = [(64, 100, 256, 256), (16, 256, 768, 768)]
PEER_HEADS = 4
PEER_BACKENDS = ("triton_fused",)
PEER_CELL = "slstm+n_clamp+heads=4"
DRY_PEER_SHAPES = [(2, 3, 4, 8)]
PATH_SHAPES = [(1, 100, 32, 32), (64, 100, 32, 32), (64, 100, 64, 64), (256, 100, 64, 64)]
#: The newer rows of the variant table, built by --aot after the variants above (their launches with
#: zoneout's masks in training); not timed yet.
AOT_NEW_ROWS = ["cand_act=relu", "out_act=relu", "gate_act=hard_sigmoid", "gate_act=hardsigmoid", "zoneout=0.3/0.2",
                "zoneout=0.25+peephole+layernorm", "gate_act=hard_sigmoid+cifg+out_act=relu+clip=0.5",
                "zoneout=0.3/0.2+fgr+gate_act=hardsigmoid"]
DRY_SHAPES = [(2, 4, 3, 8)]
DRY_PATH_SHAPES = [(2, 3, 3, 8)]
OUT = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------- layers


def make_layer(row: str, I: int, H: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """The module of one row: ``cudnn`` (torch.nn.LSTM), ``cudnn projection``, or
    ``<backend>:<variant>`` (variant "projection" = vanilla with proj_size H/2)."""
    torch.manual_seed(0)
    if row.startswith("cudnn"):
        m = torch.nn.LSTM(I, H, proj_size=H // 2 if row.endswith("projection") else 0)
    else:
        backend, cell = row.split(":")
        proj = H // 2 if cell == "projection" else 0
        spec = ROW_SPECS.get(cell, "vanilla" if cell == "projection" else cell)
        m = lstmkit.LSTM(I, H, cell=spec, proj_size=proj, backend=backend)
    return m.to(device=device, dtype=dtype)


def step_fn(module: Any, x: torch.Tensor, train: bool) -> Callable[[], object]:
    if not train:
        def infer() -> object:
            with torch.no_grad():
                return module(x)
        return infer
    params = list(module.parameters())

    def step() -> object:
        for p in params:
            p.grad = None
        out, _ = module(x)
        out.float().sum().backward()
        return out
    return step


class Timer:
    """Seconds of one call: CUDA events on a GPU, perf_counter on a CPU (the dry run)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def peak_memory(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB allocated at the peak of one call above what was allocated before it (CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def lstm_flops(B: int, T: int, I: int, H: int, train: bool) -> float:
    """GEMM FLOPs of a vanilla LSTM layer (training ≈ 3× forward)."""
    return 2 * T * B * 4 * H * (I + H) * (3 if train else 1)


# ---------------------------------------------------------------------------- timing


def time_rows(rows: list[tuple[str, Callable[[], object]]], timer: Timer, repeats: int,
              slow: set[str], slow_repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per row: warm-up, then interleaved rounds (slow rows: fewer)."""
    for name, fn in rows:
        for _ in range(min(warmup, 1) if name in slow else warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for rnd in range(repeats):
        for name, fn in rows:
            if name in slow and rnd >= slow_repeats:
                continue
            times[name].append(timer(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_shape(shape: tuple[int, int, int, int], variants: list[str], device: torch.device, repeats: int,
                slow_repeats: int, with_reference: bool, warmup: int) -> list[dict[str, Any]]:
    B, T, I, H = shape
    timer = Timer(device)
    x = torch.randn(T, B, I, device=device)
    out = []
    names = ["cudnn", "cudnn projection"] + [f"triton:{v}" for v in variants]
    if with_reference:
        names += [f"reference:{v}" for v in variants]
    layers = {n: make_layer(n, I, H, device) for n in names}
    for train in (False, True):
        mode = "train" if train else "infer"
        rows = [(n, step_fn(layers[n], x, train)) for n in names]
        slow = {n for n in names if n.startswith("reference:")}
        secs = time_rows(rows, timer, repeats, slow, slow_repeats, warmup)
        base = secs["cudnn"]
        for n, fn in rows:
            cell = n.split(":")[-1]
            rec = {"shape": list(shape), "mode": mode, "row": n, "seconds": secs[n], "ratio_vs_cudnn": secs[n] / base,
                   "gflops": lstm_flops(B, T, I, H, train) / secs[n] / 1e9}
            if n.startswith("triton:"):
                ref = secs.get(f"reference:{cell}")
                rec["speedup_vs_reference"] = ref / secs[n] if ref else None
                rec["kernel"] = kernels.select(layers[n].spec, device, torch.float32, layers[n].backend).name
            if train:
                rec["peak_mib"] = peak_memory(fn, device)
            out.append(rec)
        if device.type == "cuda":  # the memory the cached CUDA graphs of this mode's Triton rows hold
            from lstmkit.kernels import cuda_graphs

            n_graphs = cuda_graphs.graph_count()
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            cuda_graphs.clear()
            torch.cuda.synchronize()
            out.append({"shape": list(shape), "mode": mode, "row": "cuda graphs", "graphs": n_graphs,
                        "held_mib": (held - torch.cuda.memory_allocated()) / 2 ** 20})
        print(f"  {shape} {mode}: cuDNN {base * 1e3:.3f} ms; "
              + ", ".join(f"{r['row'].split(':')[1]} {r['ratio_vs_cudnn']:.2f}" for r in out
                          if r["mode"] == mode and r["row"].startswith("triton:")), flush=True)
    return out


def bench_paths(shape: tuple[int, int, int, int], device: torch.device, repeats: int,
                warmup: int) -> list[dict[str, Any]]:
    """Vanilla on each way of running the time loop, float32 and bfloat16."""
    from lstmkit.kernels.triton_impl import PATH_ENV, PATHS

    B, T, I, H = shape
    timer = Timer(device)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(T, B, I, device=device, dtype=dtype)
        cudnn = make_layer("cudnn", I, H, device, dtype)
        layer = make_layer("triton:vanilla", I, H, device, dtype)
        for train in (False, True):
            rows: list[tuple[str, Callable[[], object]]] = [("cudnn", step_fn(cudnn, x, train))]
            secs: dict[str, float] = {}
            for path in PATHS:
                os.environ[PATH_ENV] = path
                try:
                    secs[path] = time_rows([(path, step_fn(layer, x, train))], timer, repeats, set(), 0, warmup)[path]
                except Exception as exc:  # noqa: BLE001 - a path that cannot run this shape is a result too
                    secs[path] = float("nan")
                    print(f"  {shape} {dtype} {path}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                finally:
                    del os.environ[PATH_ENV]
            secs["cudnn"] = time_rows(rows, timer, repeats, set(), 0, warmup)["cudnn"]
            for name, sec in secs.items():
                out.append({"shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                            "mode": "train" if train else "infer", "row": name, "seconds": sec,
                            "ratio_vs_cudnn": sec / secs["cudnn"]})
            print(f"  paths {shape} {dtype} {'train' if train else 'infer'}: "
                  + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in secs.items()), flush=True)
    return out


def flashrnn_fn(backend: str, shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype,
                train: bool) -> Callable[[], object]:
    """FlashRNN's sLSTM (``flashrnn.flashrnn(..., function="slstm")``) with the input projection
    ``x Wᵀ`` in torch before it, as lstmkit's layer has it inside: one inference call or one
    training step (forward, backward to W, R, b)."""
    import flashrnn

    B, T, I, H = shape
    NH, D = PEER_HEADS, H // PEER_HEADS
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(4 * H, I, generator=g) * I ** -0.5).to(device, dtype).requires_grad_(train)
    R = (torch.randn(4, NH, D, D, generator=g) * D ** -0.5).to(device, dtype).requires_grad_(train)
    b = torch.zeros(4, NH, D, device=device, dtype=dtype).requires_grad_(train)
    x = torch.randn(B, T, I, generator=g).to(device, dtype)
    kernel_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]

    def run() -> object:
        with torch.set_grad_enabled(train):
            Wx = (x @ W.t()).view(B, T, 4, NH, D)
            states, _ = flashrnn.flashrnn(Wx, R, b, function="slstm", backend=backend, dtype=kernel_dtype)
            if train:
                for p in (W, R, b):
                    p.grad = None
                states[0].float().sum().backward()  # states[0]: h (B, T, NH, D)
        return states
    return run


def bench_peers(shape: tuple[int, int, int, int], device: torch.device, repeats: int, warmup: int,
                backends: tuple[str, ...]) -> list[dict[str, Any]]:
    """lstmkit's Triton sLSTM (:data:`PEER_CELL`) against FlashRNN's backends, float32 and bfloat16,
    inference and a training step; a backend that cannot run is a row with its error."""
    B, T, I, H = shape
    timer = Timer(device)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(T, B, I, device=device, dtype=dtype)
        layer = make_layer(f"triton:{PEER_CELL}", I, H, device, dtype)
        for train in (False, True):
            rows: list[tuple[str, Callable[[], object]]] = [("lstmkit triton", step_fn(layer, x, train))]
            errors: dict[str, str] = {}
            for backend in backends:
                fn = flashrnn_fn(backend, shape, device, dtype, train)
                try:
                    fn()
                    rows.append((f"flashrnn {backend}", fn))
                except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is a result too
                    errors[f"flashrnn {backend}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            secs = time_rows(rows, timer, repeats, set(), 0, warmup)
            mode, dt = "train" if train else "infer", str(dtype).removeprefix("torch.")
            for name, sec in secs.items():
                out.append({"shape": list(shape), "dtype": dt, "mode": mode, "row": name, "seconds": sec,
                            "ratio_vs_lstmkit": sec / secs["lstmkit triton"]})
            out += [{"shape": list(shape), "dtype": dt, "mode": mode, "row": name, "error": e}
                    for name, e in errors.items()]
            print(f"  sLSTM {shape} {dt} {mode}: " + ", ".join(f"{n} {sec * 1e3:.3f} ms" for n, sec in secs.items())
                  + "".join(f"; {n}: {e}" for n, e in errors.items()), flush=True)
    return out


# ---------------------------------------------------------------------------- warm-up


def _warm(job: tuple[str, tuple[int, int, int, int], str, str | None]) -> str:
    """In a worker: run one layer briefly (T = 3) so its Triton builds land in the cache."""
    row, (B, _T, I, H), dtype_name, path = job
    from lstmkit.kernels.triton_impl import PATH_ENV

    if path:
        os.environ[PATH_ENV] = path
    device = torch.device("cuda")
    dtype = getattr(torch, dtype_name)
    try:
        layer = make_layer(row, I, H, device, dtype)
        x = torch.randn(3, B, I, device=device, dtype=dtype)
        step_fn(layer, x, False)()
        step_fn(layer, x, True)()
        torch.cuda.synchronize()
        return f"{row} {B, I, H} {dtype_name} {path or ''}: ok"
    except Exception as exc:  # noqa: BLE001 - reported; the timing run will show it again
        return f"{row} {B, I, H} {dtype_name} {path or ''}: {type(exc).__name__}: {str(exc)[:200]}"


def warm_up(shapes: list, variants: list[str], path_shapes: list, jobs: int) -> None:
    work = [(f"triton:{v}", s, "float32", None) for s in shapes for v in variants]
    work += [("triton:vanilla", s, d, p) for s in path_shapes for d in ("float32", "bfloat16")
             for p in ("persistent", "per_step")]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for msg in pool.map(_warm, work):
            if not msg.endswith(": ok"):
                print("  warm-up:", msg, flush=True)
    print(f"warm-up: {len(work)} layers built in {time.perf_counter() - t0:.0f} s ({jobs} processes)", flush=True)


# ---------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    lines = ["# GPU benchmark: Triton kernels vs cuDNN and the reference loop", "",
             f"Device: {result['device']}; torch {result['torch']}, triton {result['triton']}; median of "
             f"{result['repeats']} repeats after warm-up (reference loop: {result['slow_repeats']}), CUDA events.", "",
             "Ratios are time ÷ torch.nn.LSTM's (cuDNN, vanilla, float32) at the same shape and mode; "
             "below 1 is faster. `×ref` is the reference loop's time ÷ the Triton row's.", ""]
    if not result.get("complete", True):
        lines[2:2] = ["**Incomplete**: the run stopped (time budget or limit) before every shape was measured.", ""]
    if result.get("dry_run"):
        lines[2:2] = ["**Dry run** (tiny shapes, no warm-up, one repeat; on a CPU through Triton's interpreter): "
                      "it checks the code paths and measures nothing.", ""]
    rows = result["rows"]
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: SHAPES.index(s) if s in SHAPES else 99)
    for mode in ("infer", "train"):
        lines += [f"## {'Inference' if mode == 'infer' else 'Training step (forward + backward)'}", "",
                  "| row | " + " | ".join(str(s) for s in shapes) + " |", "|" + "---|" * (len(shapes) + 1)]
        names = []
        for r in rows:
            if r["mode"] == mode and r["row"] not in names and not r["row"].startswith(("reference:", "cuda graphs")):
                names.append(r["row"])
        for name in names:
            cells = []
            for s in shapes:
                r = next((r for r in rows if r["row"] == name and tuple(r["shape"]) == s and r["mode"] == mode), None)
                if r is None:
                    cells.append("")
                    continue
                text = f"{r['ratio_vs_cudnn']:.2f}"
                if r.get("speedup_vs_reference"):
                    text += f" ({r['speedup_vs_reference']:.0f}×ref)"
                if mode == "train" and r.get("peak_mib") is not None:
                    text += f" {r['peak_mib']:.0f} MiB"
                cells.append(text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    held = [r for r in rows if r["row"] == "cuda graphs"]
    if held:
        lines += ["Memory held by the cached CUDA graphs of the per-step Triton rows (one call's inputs, outputs "
                  "and work space each; not in the peaks above, which count what one call allocates): "
                  + "; ".join(f"{tuple(r['shape'])} {r['mode']} {r['graphs']} graphs {r['held_mib']:.0f} MiB"
                              for r in held) + ".", ""]
    van = [r["ratio_vs_cudnn"] for r in rows if r["row"] == "triton:vanilla"]
    if van:
        lines.append(f"Vanilla Triton ÷ cuDNN over the grid (both modes): geometric mean "
                     f"{math.exp(sum(map(math.log, van)) / len(van)):.2f}, worst {max(van):.2f}.")
        lines.append("")
    if result.get("paths"):
        lines += ["## Persistent vs per step (vanilla)", "", "| shape | dtype | mode | persistent | per step | cuDNN |",
                  "|---|---|---|---|---|---|"]
        keys = []
        for r in result["paths"]:
            k = (tuple(r["shape"]), r["dtype"], r["mode"])
            if k not in keys:
                keys.append(k)
        for k in keys:
            sec = {r["row"]: r["seconds"] for r in result["paths"] if (tuple(r["shape"]), r["dtype"], r["mode"]) == k}
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {sec.get('persistent', float('nan')) * 1e3:.3f} ms | "
                         f"{sec.get('per_step', float('nan')) * 1e3:.3f} ms | {sec['cudnn'] * 1e3:.3f} ms |")
        lines.append("")
    if result.get("peers"):
        lines += [f"## The sLSTM: lstmkit's Triton kernels vs FlashRNN (`{PEER_CELL}`, {PEER_HEADS} heads)", "",
                  "Both with the input projection; ratio = time ÷ lstmkit's at the same shape, dtype and mode."
                  + (f" From {result['peers_note']}." if result.get("peers_note") else ""), "",
                  "| shape | dtype | mode | row | time | ratio |", "|---|---|---|---|---|---|"]
        for r in result["peers"]:
            if "error" in r:
                lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['mode']} | {r['row']} | {r['error']} | |")
            else:
                lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['mode']} | {r['row']} | "
                             f"{r['seconds'] * 1e3:.3f} ms | {r['ratio_vs_lstmkit']:.2f} |")
    return "\n".join(lines) + "\n"


def aot_report(out: Path, cells: list[str], dtypes: list[str], stem: str = "gpu_kernels_aot",
               command: str = "python benchmarks/bench_gpu.py --aot", gate_hidden: str | None = None) -> None:
    """Build every kernel of the launch plan for sm_80 and sm_90 (no GPU needed) and write the
    worst registers / stack (spill) bytes / shared memory per kernel, shape class and dtype
    (``gate_hidden``: triton_aot's --gate-hidden, these gates deep in every cell)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-W", "ignore", "-m", "lstmkit.kernels.triton_aot", "--cells", ",".join(cells),
           "--dtypes", ",".join(dtypes)] + (["--gate-hidden", gate_hidden] if gate_hidden else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not rows:  # the build plan itself failed: say why instead of writing an empty table
        raise SystemExit(f"{' '.join(cmd)} built nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    from lstmkit.kernels import triton_aot

    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["class"], r["dtype"], r["kernel"], r["arch"]), []).append(r)
    import triton

    lines = ["# Triton kernels built ahead of time (no GPU)", "",
             f"`{command}` with triton {triton.__version__}: every launch of the "
             f"launch plan (`lstmkit.kernels.triton_aot.launches`: forward with and without buffers, backward) "
             f"of {len(cells)} variants × {len(dtypes)} dtypes × {len(triton_aot.SHAPE_CLASSES)} shape classes, "
             f"built with `triton.compile(..., target=GPUTarget('cuda', cc, 32))` for sm_80 (A100) and sm_90 "
             f"(H100); {len(rows)} builds, {sum(not r['ok'] for r in rows)} failed, "
             f"{time.perf_counter() - t0:.0f} s. Registers per thread (255 is the most), stack bytes (spills; "
             f"0 = none) and shared memory per block (limits: 163 KiB sm_80, 227 KiB sm_90), each the worst over "
             f"the variants; the variant that gave the most registers is named.", "",
             "Shape classes (B, H, P): " + "; ".join(f"{k} = {v}" for k, v in triton_aot.SHAPE_CLASSES.items())
             + ". Kernels: `name [BB×BH(×BO)] wN` = block of batch rows × cells (× output cells), N warps.", "",
             "| shape class | dtype | kernel | arch | registers | stack (spill) bytes | shared KiB | most registers |",
             "|---|---|---|---|---|---|---|---|"]
    for (cls, dtype, kernel, arch), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        if not ok:
            lines.append(f"| {cls} | {dtype} | {kernel} | {arch} | FAILED | | | {rs[0].get('error', '')[:80]} |")
            continue
        top = max(ok, key=lambda r: r["registers"] or 0)
        stack, shared = max(r["stack"] or 0 for r in ok), max(r["shared"] for r in ok) / 1024
        lines.append(f"| {cls} | {dtype} | {kernel} | {arch} | {top['registers']} | {stack} | {shared:.1f} | "
                     f"{top['cell']} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--slow-repeats", type=int, default=3, help="repeats of the reference-loop rows")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, one repeat: every code path")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-paths", action="store_true", help="skip the persistent-vs-per-step section")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="warm-up processes")
    ap.add_argument("--aot", action="store_true", help="write results/gpu_kernels_aot.md (no GPU needed)")
    ap.add_argument("--aot-cells", default=None,
                    help="--aot: these comma-separated cells only, into results/gpu_kernels_aot_cells.md")
    ap.add_argument("--aot-gate-hidden", default=None,
                    help="--aot-cells: LETTERS=WIDTH, these gates deep in every cell (e.g. f=32), into "
                         "results/gpu_kernels_aot_gate_hidden.md")
    ap.add_argument("--budget", type=float, default=math.inf,
                    help="seconds: start no new shape after this (results are written after every shape)")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated indexes into SHAPES of the rows section (default: all; 'none': no rows)")
    ap.add_argument("--variants", default=None, help="comma-separated variants of the rows section (default: all)")
    ap.add_argument("--peer-backends", default=",".join(PEER_BACKENDS),
                    help="FlashRNN backends of the sLSTM section ('none': skip it; needs flashrnn importable)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.aot and args.aot_cells:
        more = f" --aot-gate-hidden {args.aot_gate_hidden}" if args.aot_gate_hidden else ""
        aot_report(args.out, args.aot_cells.split(","), ["float32", "bfloat16"],
                   "gpu_kernels_aot_gate_hidden" if args.aot_gate_hidden else "gpu_kernels_aot_cells",
                   f"python benchmarks/bench_gpu.py --aot --aot-cells {args.aot_cells}{more}", args.aot_gate_hidden)
        return None
    if args.aot:
        # the variant flag words (the projection and heads change launch sizes, not the kernels' code)
        cells = [v for v in VARIANTS if v not in ("projection", "heads=4", *ROW_SPECS)]
        cells += ["fgr+peephole+nog+clip=0.4", "fgr+cifg+noaf", "nig+niaf+noaf", "nfg+peephole+layernorm",
                  "fgr+layernorm", "rnn_tanh", "rnn_relu"] + AOT_NEW_ROWS
        aot_report(args.out, cells, ["float32", "bfloat16"])
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes, path_shapes = (DRY_SHAPES, DRY_PATH_SHAPES) if args.dry_run else (SHAPES, PATH_SHAPES)
    peer_shapes = DRY_PEER_SHAPES if args.dry_run else PEER_SHAPES
    import importlib.util

    backends = () if args.peer_backends == "none" else tuple(args.peer_backends.split(","))
    if args.dry_run and backends:
        backends = ("vanilla",)  # FlashRNN's PyTorch loop: the one backend that runs on a CPU
    if backends and importlib.util.find_spec("flashrnn") is None:
        print("flashrnn is not importable: the sLSTM section is skipped", flush=True)
        backends = ()
    if args.shapes is not None:
        shapes = [] if args.shapes == "none" else [shapes[int(k)] for k in args.shapes.split(",")]
    variants = VARIANTS if args.variants is None else args.variants.split(",")
    repeats, slow_repeats, warmup = (1, 1, 0) if args.dry_run else (args.repeats, args.slow_repeats, 2)
    import triton

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.machine()}), Triton interpreter"
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                              "repeats": repeats, "slow_repeats": slow_repeats, "dry_run": args.dry_run,
                              "rows": [], "paths": [], "peers": []}
    t0 = time.perf_counter()
    stem = "bench_gpu_dry_run" if args.dry_run else "bench_gpu"

    def write(final: bool) -> None:
        """JSON and markdown of what is measured so far (a run killed later keeps them)."""
        result["seconds"] = time.perf_counter() - t0
        result["complete"] = final
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (args.out / f"{stem}.md").write_text(markdown(result))

    if device.type == "cuda" and args.jobs > 1:
        warm_up(shapes, variants, [] if args.no_paths else path_shapes, args.jobs)
    # The first shape, then the (quick) path section, then the other shapes.
    work = [("rows", s) for s in shapes[:1]] + ([] if args.no_paths else [("paths", s) for s in path_shapes])
    work += [("peers", s) for s in peer_shapes if backends] + [("rows", s) for s in shapes[1:]]
    complete = True
    for k, (section, shape) in enumerate(work):
        if time.perf_counter() - t0 > args.budget:
            print(f"budget of {args.budget:.0f} s spent: skipped {[s for _, s in work[k:]]}", flush=True)
            complete = False
            break
        if section == "rows":
            result["rows"] += bench_shape(shape, variants, device, repeats, slow_repeats, not args.no_reference,
                                          warmup)
        elif section == "peers":
            result["peers"] += bench_peers(shape, device, repeats, warmup, backends)
        else:
            result["paths"] += bench_paths(shape, device, repeats, warmup)
        write(final=False)
    write(final=complete)
    print(markdown(result))
    print(f"total {result['seconds']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
