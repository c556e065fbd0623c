"""Time lstmkit's kernels against torch.nn.LSTM in one process; write JSON and markdown.

    python benchmarks/bench_kernels.py                 # the full grid (~10-15 min on 2 cores)
    python benchmarks/bench_kernels.py --quick         # two shapes, fewer variants
    python benchmarks/bench_kernels.py --vanilla       # the whole grid, float32 vanilla rows only
    python benchmarks/bench_kernels.py --memory-only   # training peak memory, fresh processes
    python benchmarks/bench_kernels.py --neighbour     # also with another process spinning on one core
    python benchmarks/bench_kernels.py --heads-slstm   # heads 1/4/8 and the sLSTM vs the reference, FlashRNN, nn.LSTM

Every row is timed in this process with torch's default threads (plus one-thread rows
for nn.LSTM and the reference loop): warm-up, then the median of ``--repeats`` runs.
Ratios are reported, not absolute times (the machines are shared and noisy); GFLOP/s of
each row sit next to the machine's GEMM peak measured in the same run, and the CPU model and
capability (torch's: AVX512, AVX2) are recorded with every result.

bfloat16 rows: ``torch.nn.LSTM`` and lstmkit's vanilla layer converted with ``.to(torch.bfloat16)``,
timed like the others, with their error against float32 (max |Δ| of the output ÷ its max).
Neighbour rows (``--neighbour``): the same steps while another process spins on one core, as
on a shared machine; their ratios are to the quiet ``torch.nn.LSTM`` row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lstmkit
from lstmkit import kernels
from lstmkit.kernels.machine import cpuinfo

GRID = [(1, 100, 32, 32), (32, 100, 64, 64), (32, 100, 128, 128), (64, 100, 256, 256),
        (32, 200, 512, 512), (16, 50, 1024, 1024)]
EXTRA = [("2-layer", (32, 100, 256, 256), dict(num_layers=2)),
         ("bidirectional", (32, 100, 256, 256), dict(bidirectional=True))]
VARIANTS = ["peephole", "nig", "nfg", "nog", "niaf", "noaf", "cifg", "fgr", "layernorm", "clip=3",
            "peephole+cifg+layernorm"]
OUT = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:  # GEMM peak only
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs, seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_peak(repeats: int) -> dict[str, float]:
    """GFLOP/s of a large fp32 GEMM: MKL (torch.mm) and oneDNN with a prepacked weight."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = 2 * n ** 3
    out = {"mkl_mm": flops / median_time(lambda: torch.mm(a, b), repeats) / 1e9}
    try:
        wp = torch.ops.mkldnn._reorder_linear_weight(b, n)
        lin = torch.ops.mkldnn._linear_pointwise
        out["onednn_prepacked"] = flops / median_time(lambda: lin(a, wp, None, "none", [], ""), repeats) / 1e9
    except (RuntimeError, AttributeError):  # oneDNN ops missing in this build
        pass
    return out


def lstm_flops(B: int, T: int, I: int, H: int, layers: int = 1, dirs: int = 1, train: bool = False) -> float:
    """GEMM FLOPs of a vanilla LSTM (training ≈ 3× forward: dX, dW, dH GEMMs)."""
    fwd = 0.0
    for layer in range(layers):
        inp = I if layer == 0 else H * dirs
        fwd += dirs * 2 * T * B * 4 * H * (inp + H)
    return fwd * (3 if train else 1)


def make_step(module: torch.nn.Module, x: torch.Tensor, train: bool) -> Callable[[], object]:
    """A closure running inference (no_grad) or a training step (forward + backward)."""
    if not train:
        def infer():
            with torch.no_grad():
                return module(x)
        return infer
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        out, _ = module(x)
        out.sum().backward()
    return step


def bench_shape(shape, kw, variants, repeats, reference_repeats, threads_default, with_reference, neighbour=False,
                bf16=True):
    """Time every row at one shape, inference then training (``bf16``: with the bfloat16 rows).

    Rows are interleaved: each round runs every row once (reference rows only in the
    first ``reference_repeats`` rounds), so machine noise drifts over all rows alike;
    each row's time is its median over rounds. Rows with another thread count (the
    one-thread rows) run in their own interleaved pass. Within the pass of torch's default
    threads every row is timed right after ``torch.nn.LSTM`` and its ratio is the median of
    those pairs' ratios (on a shared host whose speed drifts within seconds, both sides of a
    ratio then run under the same load); other rows' ratios are their medians' ratio.
    """
    B, T, I, H = shape
    torch.manual_seed(0)
    x = torch.randn(T, B, I)
    rows = []
    torch_lstm = torch.nn.LSTM(I, H, **kw)
    layers = {}
    for cell in ["vanilla", *variants]:
        layers[cell] = lstmkit.LSTM(I, H, cell=cell, **kw)
        if cell == "vanilla":
            layers[cell].load_state_dict(torch_lstm.state_dict())
        layers[f"ref:{cell}"] = lstmkit.LSTM(I, H, cell=cell, backend="reference", **kw)
        layers[f"ref:{cell}"].load_state_dict(layers[cell].state_dict())
    # the vanilla layer also on the fused kernel alone (the default takes oneDNN where measured faster)
    layers["vanilla (cpu_fused)"] = lstmkit.LSTM(I, H, backend="cpu_fused", **kw)
    layers["vanilla (cpu_fused)"].load_state_dict(torch_lstm.state_dict())
    low = {"torch": torch.nn.LSTM(I, H, **kw), "lstmkit": lstmkit.LSTM(I, H, **kw),
           "lstmkit (cpu_fused)": lstmkit.LSTM(I, H, backend="cpu_fused", **kw)} if bf16 else {}
    for m in low.values():
        m.load_state_dict(torch_lstm.state_dict())
        m.to(torch.bfloat16)
    with torch.no_grad():
        exact = torch_lstm(x)[0]
        bf16_error = {name: ((low[m](x.bfloat16())[0].float() - exact).abs().max() / exact.abs().max()).item()
                      for name, m in (("torch.nn.LSTM bf16", "torch"), ("lstmkit vanilla bf16", "lstmkit")) if low}
    for train in (False, True):
        mode = "train" if train else "infer"
        flops = lstm_flops(B, T, I, H, kw.get("num_layers", 1), 2 if kw.get("bidirectional") else 1, train)
        # (row name, kernel, step function, threads, is a reference row)
        plan = [("torch.nn.LSTM", "oneDNN", make_step(torch_lstm, x, train), threads_default, False),
                ("torch.nn.LSTM (1 thread)", "oneDNN", make_step(torch_lstm, x, train), 1, False)]
        if low:
            plan += [("torch.nn.LSTM bf16", "oneDNN", make_step(low["torch"], x.bfloat16(), train), threads_default,
                      False),
                     ("lstmkit vanilla bf16", chosen(low["lstmkit"], x, torch.bfloat16, train),
                      make_step(low["lstmkit"], x.bfloat16(), train), threads_default, False),
                     ("lstmkit vanilla bf16 (cpu_fused)", "cpu_fused",
                      make_step(low["lstmkit (cpu_fused)"], x.bfloat16(), train), threads_default, False)]
        for cell in ["vanilla", "vanilla (cpu_fused)", *variants]:
            layer = layers[cell]
            kname = chosen(layer, x, x.dtype, train)
            plan.append((f"lstmkit {cell}", kname, make_step(layer, x, train), threads_default, False))
            if with_reference and f"ref:{cell}" in layers:
                ref = make_step(layers[f"ref:{cell}"], x, train)
                plan.append((f"reference {cell}", "reference", ref, threads_default, True))
                if cell == "vanilla":
                    plan.append(("reference vanilla (1 thread)", "reference", ref, 1, True))
        times: dict[str, list[float]] = {name: [] for name, *_ in plan}
        paired: dict[str, list[float]] = {}  # row -> its rounds' ratios to the nn.LSTM call just before

        def timed(fn: Callable[[], object], warm: bool) -> float:
            if warm:
                fn()  # untimed: caches warm with this row's data, as in a loop of it
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        reference_step = plan[0][2]  # torch.nn.LSTM, default threads
        # One interleaved pass per (thread count, reference or not): switching the count
        # wakes or parks the OpenMP pool, and the slow reference loops churn caches and the
        # allocator, either of which would tax the row that comes next.
        for threads, is_reference in sorted({(p[3], p[4]) for p in plan}, key=lambda k: (-k[0], k[1])):
            group = [p for p in plan if p[3] == threads and p[4] == is_reference]
            pairs = threads == threads_default and not is_reference
            torch.set_num_threads(threads)
            for _name, _, fn, _, is_ref in group:  # warm-up
                for _ in range(1 if is_ref else 2):
                    fn()
            for rnd in range(repeats):
                for name, _, fn, _, is_ref in group:
                    if is_ref and rnd >= reference_repeats:
                        continue
                    if pairs and name != "torch.nn.LSTM":
                        base_sec = timed(reference_step, True)
                        times["torch.nn.LSTM"].append(base_sec)
                        sec = timed(fn, True)
                        paired.setdefault(name, []).append(sec / base_sec)
                    else:
                        sec = timed(fn, not is_ref)
                    times[name].append(sec)
        torch.set_num_threads(threads_default)
        base = statistics.median(times["torch.nn.LSTM"])
        for name, kname, *_ in plan:
            sec = statistics.median(times[name])
            ratio = statistics.median(paired[name]) if name in paired else sec / base
            rows.append({"shape": list(shape), "mode": mode, "row": name, "kernel": kname, "seconds": sec,
                         "ratio_vs_torch": ratio, "gflops": flops / sec / 1e9})
            if name in bf16_error:
                rows[-1]["error_vs_float32"] = bf16_error[name]
        if neighbour:
            rows += neighbour_rows(shape, mode, base, flops, [
                ("torch.nn.LSTM (neighbour)", make_step(torch_lstm, x, train)),
                ("lstmkit vanilla (neighbour)", make_step(layers["vanilla"], x, train))], repeats)
        print(f"  {shape} {kw or ''} {mode}: nn.LSTM {base * 1e3:.2f} ms; "
              + ", ".join(f"{r['row'].replace('lstmkit ', '')} {r['ratio_vs_torch']:.2f}"
                          for r in rows if r["mode"] == mode and r["row"].startswith("lstmkit")), flush=True)
    return rows


def chosen(layer: lstmkit.LSTM, x: torch.Tensor, dtype: torch.dtype, train: bool) -> str:
    """The kernel row a call of ``layer`` on ``x`` (T, B, I) in ``dtype`` runs (training: with gradients)."""
    workload = kernels.Workload(kind=layer.spec.kind, steps=x.shape[0], batch=x.shape[1], hidden=layer.hidden_size,
                                dtype=dtype, gradient=train, lengths=False, projection=layer.proj_size > 0)
    return kernels.select(layer.spec, x.device, dtype, layer.backend, workload=workload).name


def neighbour_rows(shape, mode: str, base: float, flops: float, plan: list, repeats: int) -> list[dict]:
    """Time ``plan``'s steps, interleaved, while another process spins on one core."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        times: dict[str, list[float]] = {name: [] for name, _ in plan}
        for _name, fn in plan:
            fn()
        for _ in range(repeats):
            for name, fn in plan:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        spinner.kill()
        spinner.wait()
    rows = []
    for name, _ in plan:
        sec = statistics.median(times[name])
        rows.append({"shape": list(shape), "mode": mode, "row": name, "kernel": "", "seconds": sec,
                     "ratio_vs_torch": sec / base, "gflops": flops / sec / 1e9})
    return rows


# ---------------------------------------------------------------------------- heads and the sLSTM

HEADS_SHAPE = (32, 100, 512, 512)


def heads_flops(B: int, T: int, I: int, H: int, heads: int, train: bool) -> float:
    """GEMM FLOPs of one layer with ``heads`` block-diagonal recurrent blocks (the sLSTM's are the same)."""
    fwd = 2 * T * B * 4 * H * (I + H // heads)
    return 3 * fwd if train else fwd


def _flashrnn_step(x: torch.Tensor, W: torch.Tensor, R: torch.Tensor, b: torch.Tensor, function: str,
                   train: bool) -> Callable[[], object]:
    """FlashRNN's PyTorch path (backend "vanilla") on Wx = x Wᵀ, as a layer would run it."""
    from flashrnn import flashrnn

    B, T, _ = x.shape
    NH, D = R.shape[1], R.shape[2]
    params = [W, R, b]

    def run():
        Wx = (x @ W.t()).view(B, T, 4, NH, D)
        return flashrnn(Wx, R, b, function=function, backend="vanilla", dtype="float32")[0][0]

    if not train:
        def infer():
            with torch.no_grad():
                return run()
        return infer

    def step():
        for p in params:
            p.grad = None
        run().sum().backward()
    return step


def bench_heads_slstm(repeats: int, reference_repeats: int, threads: int, with_reference: bool,
                      shape: tuple[int, int, int, int] = HEADS_SHAPE) -> dict:
    """heads = 1, 4, 8 and the sLSTM with 4 heads at one shape: lstmkit's fused kernel against its
    reference loop, FlashRNN's PyTorch path on the same weights and torch.nn.LSTM (vanilla), plus
    heads = 4 run as one GEMM over the dense block-diagonal matrix (the alternative the kernel's
    per-head GEMMs were chosen over). Rows interleaved, medians; ratios within this run only."""
    from lstmkit.cell import block_diagonal
    from lstmkit.convert import to_flashrnn

    B, T, I, H = shape
    torch.manual_seed(0)
    x = torch.randn(T, B, I)
    xb = x.transpose(0, 1).contiguous()  # (B, T, I): FlashRNN's layout
    configs = [("vanilla", "heads=1", 1), ("vanilla", "heads=4", 4), ("vanilla", "heads=8", 8),
               ("slstm", "slstm heads=4", 4)]
    try:
        import flashrnn  # noqa: F401
        peers = True
    except ImportError:
        peers = False
    layers = {}
    for cell, label, k in configs:
        layer = lstmkit.LSTM(I, H, cell=cell, heads=k)
        ref = lstmkit.LSTM(I, H, cell=cell, heads=k, backend="reference")
        ref.load_state_dict(layer.state_dict())
        layers[label] = (layer, ref, k)
    dense = lstmkit.LSTM(I, H)  # heads=4 as one GEMM over its dense block-diagonal matrix
    sd = dict(layers["heads=4"][0].state_dict())
    sd["weight_hh_l0"] = block_diagonal(sd["weight_hh_l0"], layers["heads=4"][0].spec, H).detach().clone()
    dense.load_state_dict(sd)
    torch_lstm = torch.nn.LSTM(I, H)
    rows = []
    for train in (False, True):
        mode = "train" if train else "infer"
        plan = [("torch.nn.LSTM", "oneDNN", make_step(torch_lstm, x, train), 1, False)]
        for label, (layer, ref, k) in layers.items():
            plan.append((f"lstmkit {label}", kernels.select(layer.spec, x.device, x.dtype).name,
                         make_step(layer, x, train), k, False))
            if with_reference:
                plan.append((f"reference {label}", "reference", make_step(ref, x, train), k, True))
            if peers:
                fr = {n: v.requires_grad_(train) for n, v in to_flashrnn(layer).items() if n != "function"}
                plan.append((f"FlashRNN {label}", "flashrnn vanilla",
                             _flashrnn_step(xb, fr["W"], fr["R"], fr["b"], "slstm" if "slstm" in label else "lstm",
                                            train), k, True))
        plan.append(("lstmkit heads=4 as a dense block-diagonal GEMM", "cpu_fused", make_step(dense, x, train), 1,
                     False))
        times: dict[str, list[float]] = {name: [] for name, *_ in plan}
        torch.set_num_threads(threads)
        for slow in (False, True):  # the slow rows in their own pass (they churn caches and the allocator)
            group = [p for p in plan if p[4] == slow]
            for _name, _, fn, _, _ in group:
                fn()
            for _ in range(reference_repeats if slow else repeats):
                for name, _, fn, _, _ in group:
                    if not slow:
                        fn()  # untimed: caches warm with this row's data
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["torch.nn.LSTM"])
        for name, kname, _, k, _ in plan:
            sec = statistics.median(times[name])
            rows.append({"shape": list(shape), "mode": mode, "row": name, "kernel": kname, "heads": k,
                         "seconds": sec, "ratio_vs_torch": sec / base,
                         "gflops": heads_flops(B, T, I, H, k, train) / sec / 1e9})
        print(f"  heads/sLSTM {shape} {mode}: " + ", ".join(
            f"{r['row']} {r['seconds'] * 1e3:.1f} ms" for r in rows if r["mode"] == mode), flush=True)
    return {"machine": machine(), "torch": torch.__version__, "threads": threads, "repeats": repeats,
            "reference_repeats": reference_repeats, "rows": rows}


def markdown_heads_slstm(result: dict) -> str:
    """The heads/sLSTM rows as a table, and the issue's two targets computed from this run."""
    shape = tuple(result["rows"][0]["shape"])
    lines = ["# Heads and the sLSTM", "",
             machine_line(result) +
             f"{result['threads']} threads; median of {result['repeats']} rounds ({result['reference_repeats']} for "
             f"the reference loop and FlashRNN); (B, T, I, H) = {shape}, float32. Every ratio is within this "
             f"run (the machine is shared).", ""]
    for mode in ("infer", "train"):
        rows = {r["row"]: r for r in result["rows"] if r["mode"] == mode}
        lines += [f"## {'Inference' if mode == 'infer' else 'Training step (forward + backward)'}", "",
                  "| row | ms | ÷ nn.LSTM | GFLOP/s | ÷ lstmkit's fused row |", "|---|---|---|---|---|"]
        for name, r in rows.items():
            label = name.split(" ", 1)[1] if name.split(" ", 1)[0] in ("reference", "FlashRNN") else None
            fused = rows.get(f"lstmkit {label}") if label else None
            vs = f"{r['seconds'] / fused['seconds']:.1f}" if fused else ""
            lines.append(f"| {name} | {r['seconds'] * 1e3:.1f} | {r['ratio_vs_torch']:.2f} | {r['gflops']:.0f} | "
                         f"{vs} |")
        one = rows["lstmkit heads=1"]
        lines.append("")
        for k in (4, 8):
            rk = rows[f"lstmkit heads={k}"]
            flop_ratio = heads_flops(*shape, 1, mode == "train") / heads_flops(*shape, k, mode == "train")
            speed = one["seconds"] / rk["seconds"]
            lines.append(f"- heads={k}: {speed:.2f}× faster than heads=1 (FLOP ratio {flop_ratio:.2f}; target ≥ "
                         f"{flop_ratio / 2:.2f}: {'met' if speed >= flop_ratio / 2 else 'NOT met'})")
        s4 = rows["lstmkit slstm heads=4"]["seconds"] / rows["lstmkit heads=4"]["seconds"]
        lines.append(f"- sLSTM ÷ vanilla LSTM, both 4 heads (equal FLOPs): {s4:.2f} (target ≤ 1.3: "
                     f"{'met' if s4 <= 1.3 else 'NOT met'})")
        dense = rows["lstmkit heads=4 as a dense block-diagonal GEMM"]["seconds"] / rows["lstmkit heads=4"]["seconds"]
        lines.append(f"- heads=4 as one GEMM over the dense block-diagonal matrix ÷ per-head GEMMs: {dense:.2f}")
        lines.append("")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """The CPU this run measured: model name (with x86 family and model number, which tell apart CPUs
    that a VM names alike), torch's capability, the 16-bit units torch reports, cores."""
    fields = cpuinfo()
    model = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    units = [name for name, has in (("AVX512_BF16", torch.cpu._is_avx512_bf16_supported()),
                                    ("AMX", torch.cpu._is_amx_tile_supported())) if has]
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "units": ", ".join(units) or "none", "cores": str(os.cpu_count())}


def machine_line(result: dict) -> str:
    """A results page's line on the run's machine and torch (ending in '; ')."""
    m = result["machine"]
    return (f"Machine: {m['cpu']}, capability {m['capability']}, 16-bit units {m.get('units', 'not recorded')}, "
            f"{m['cores']} cores; torch {result['torch']}; ")


def environment() -> dict:
    """What every result records of the run: the machine (with torch's thread count) and torch."""
    return {"machine": {**machine(), "threads": str(torch.get_num_threads())}, "torch": torch.__version__}


def title(what: str, result: dict) -> str:
    """A results page's first line: ``what`` and the run's machine, threads and torch."""
    m = result["machine"]
    units = f", 16-bit units: {m['units']}" if "units" in m else ""
    return (f"# {what} ({m['cpu']}, capability {m['capability']}{units}, {m['threads']} threads, "
            f"torch {result['torch']})")


def save(out: Path, stem: str, result: dict, markdown: Callable[[dict], str]) -> None:
    """Write ``result`` as ``out/stem.json`` and its table as ``out/stem.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(which: str, shape: tuple[int, int, int, int]) -> None:
    """Run in a fresh process: one training step; print the peak-RSS increase in MiB.

    The peak is the kernel's high-water mark (VmHWM), reset just before the step through
    /proc/self/clear_refs, minus the resident size before the step.
    """
    B, T, I, H = shape
    torch.manual_seed(0)
    x = torch.randn(T, B, I)
    module = torch.nn.LSTM(I, H) if which == "torch" else lstmkit.LSTM(I, H, cell=which)
    if which != "torch":
        kernels.select(module.spec, x.device, x.dtype)  # build/load the extension first
    step = make_step(module, x, train=True)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"which": which, "peak_increase_mib": (peak - before) / 1024}))


def measure_memory(variants: list[str], shape=(32, 200, 512, 512)) -> list[dict]:
    rows = []
    for which in ["torch", "vanilla", *variants]:
        out = subprocess.run([sys.executable, __file__, "--memory-child", which,
                              "--memory-shape", ",".join(map(str, shape))],
                             capture_output=True, text=True, check=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rec["shape"] = list(shape)
        rows.append(rec)
        print(f"  memory {which}: +{rec['peak_increase_mib']:.0f} MiB", flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Kernel benchmark", "",
             machine_line(result) +
             f"{result['threads']} threads (default); median of {result['repeats']} repeats after warm-up.", "",
             "GEMM peak measured in this run: " + ", ".join(
                 f"{k} {v:.0f} GFLOP/s" for k, v in result["gemm_peak"].items()), "",
             "Ratios are time ÷ torch.nn.LSTM's time (vanilla, default threads) at the same "
             "shape and mode; below 1 is faster. Rows with torch's default threads are each timed right after "
             "an nn.LSTM call, their ratio the median of those pairs'; the others: the medians' ratio.", ""]
    for mode in ("infer", "train"):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        shapes = []
        for r in rows:
            key = (tuple(r["shape"]), r.get("extra", ""))
            if key not in shapes:
                shapes.append(key)
        names = []
        for r in rows:
            if r["row"] not in names:
                names.append(r["row"])
        head = "| row | " + " | ".join(f"{s} {e}".strip() for s, e in shapes) + " |"
        lines += [f"## {'Inference' if mode == 'infer' else 'Training step (forward + backward)'}", "",
                  head, "|" + "---|" * (len(shapes) + 1)]
        for name in names:
            cells = []
            for s, e in shapes:
                r = next((r for r in rows if r["row"] == name and tuple(r["shape"]) == s
                          and r.get("extra", "") == e), None)
                err = "" if r is None or "error_vs_float32" not in r else f", err {r['error_vs_float32']:.1e}"
                by = ", oneDNN" if r is not None and r["kernel"] == "torch" else ""
                cells.append("" if r is None else f"{r['ratio_vs_torch']:.2f} ({r['gflops']:.0f} GF/s{err}{by})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("'oneDNN': the default vanilla layer ran torch's own operator there (measured faster than "
                 "the fused kernel for that call; the '(cpu_fused)' rows force the fused kernel).")
    for row in ("lstmkit vanilla", "lstmkit vanilla (cpu_fused)"):
        ratios = [r["ratio_vs_torch"] for r in result["rows"] if r["row"] == row and not r.get("extra")]
        if ratios:
            gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
            lines.append(f"{row.replace('lstmkit vanilla', 'Vanilla lstmkit')} ÷ nn.LSTM over the grid: "
                         f"geometric mean {gm:.2f}, worst {max(ratios):.2f}.")
    if result.get("memory"):
        lines += ["", "## Training peak memory (fresh process each, one step)", "",
                  "| row | shape | peak RSS increase (MiB) |", "|---|---|---|"]
        for m in result["memory"]:
            lines.append(f"| {m['which']} | {tuple(m['shape'])} | {m['peak_increase_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--reference-repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="two shapes and three variants")
    ap.add_argument("--vanilla", action="store_true",
                    help="the whole grid, float32 vanilla rows only (nn.LSTM, lstmkit's default and fused kernel)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-loop rows")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--neighbour", action="store_true", help="also time with a process spinning on one core")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--memory-shape", help=argparse.SUPPRESS)
    ap.add_argument("--heads-slstm", action="store_true",
                    help="only the heads / sLSTM rows (heads 1, 4, 8 and the sLSTM with 4 heads at (32, 100, 512, 512) "
                         "against the reference loop, FlashRNN's PyTorch path and nn.LSTM)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, tuple(int(v) for v in args.memory_shape.split(",")))
        return
    if args.heads_slstm:
        res = bench_heads_slstm(args.repeats, args.reference_repeats, torch.get_num_threads(), not args.no_reference)
        save(args.out, "bench_heads_slstm", res, markdown_heads_slstm)
        print(markdown_heads_slstm(res))
        return
    threads = torch.get_num_threads()
    grid, extra, variants = GRID, EXTRA, VARIANTS
    if args.quick:
        grid, extra, variants = [GRID[0], GRID[3]], [], ["peephole", "layernorm", "cifg"]
    if args.vanilla:
        grid, extra, variants = GRID, [], []
    result = {"machine": machine(),
              "torch": torch.__version__, "threads": threads, "repeats": args.repeats,
              "gemm_peak": {}, "rows": [], "memory": []}
    if not args.memory_only:
        result["gemm_peak"] = gemm_peak(args.repeats)
        print("GEMM peak:", {k: round(v) for k, v in result["gemm_peak"].items()}, flush=True)
        for shape in grid:
            result["rows"] += bench_shape(shape, {}, variants, args.repeats, args.reference_repeats,
                                          threads, not args.no_reference, args.neighbour, bf16=not args.vanilla)
        for name, shape, kw in extra:
            rows = bench_shape(shape, kw, [], args.repeats, args.reference_repeats, threads,
                               not args.no_reference)
            for r in rows:
                r["extra"] = name
            result["rows"] += rows
    result["memory"] = measure_memory(variants if not (args.quick or args.vanilla) else [])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("bench_kernels_quick" if args.quick else "bench_kernels_vanilla" if args.vanilla
            else "memory" if args.memory_only else "bench_kernels")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
