"""Deep gates on the fused CPU kernel: time per FLOP against the vanilla fused kernel, and
speed against the reference loop, in one process.

    python benchmarks/bench_deep.py            # writes results/bench_deep.{json,md}

At (B, T, I, H) = (32, 100, 64, 64) and (64, 100, 256, 256), for ``gate_hidden=(32,)`` and
``(H,)`` (every gate an MLP with one hidden layer): inference (no_grad forward) and a training
step (forward + backward), interleaved rounds, median of ``--repeats`` (reference rows: fewer).
FLOPs are the GEMM FLOPs of the forward (input projection, recurrent product, the MLP layers;
a training step counts 3×), so "time per FLOP ÷ vanilla's" says how efficiently the deep cell
runs its larger or smaller work. Each deep cell's call is timed right after a vanilla call, and
its time per FLOP ÷ vanilla's is the median of those pairs' ratios (on a shared host whose speed
drifts, the two sides of a ratio then run under the same load). The CPU model and torch's
capability are recorded, and so are the page faults of each fused call and glibc's malloc
settings (MALLOC_* in the environment): a large call's buffers are mapped anew when the
allocator has given freed memory back to the system, and which of the two calls of a pair pays
for that moves the ratio (at (64, 100, 256, 256), training, 1.2–1.9 with glibc's defaults);
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000`` keeps the memory (below
32 MiB a buffer) and measures the kernels without it; ``THP_MEM_ALLOC_ENABLE=1`` (torch's huge
pages) maps it in 2 MiB pages.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lstmkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import OUT, machine, machine_line, make_step, save  # noqa: E402

SHAPES = [(32, 100, 64, 64), (64, 100, 256, 256)]
DEFAULTS = "glibc's and torch's defaults"  # no MALLOC_* nor THP_MEM_ALLOC_ENABLE in the environment


def flops(spec: lstmkit.CellSpec, B: int, T: int, I: int, H: int, train: bool) -> float:
    """GEMM FLOPs of one layer: x W_ihᵀ, h W_hhᵀ (R rows each) and every deep gate's layers."""
    R = spec.gate_rows(H)
    total = 2 * T * B * R * (I + H)
    for _, widths in spec.gate_hidden:
        sizes = [*widths, H]
        total += sum(2 * T * B * sizes[j] * sizes[j + 1] for j in range(len(sizes) - 1))
    return total * (3 if train else 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--reference-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows = []
    faults: dict[object, list[int]] = {}  # a timed call -> the page faults of each of its timings
    for B, T, I, H in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(T, B, I)
        cells = {"vanilla": lstmkit.CellSpec(), "deep=32": lstmkit.CellSpec(gate_hidden=(32,)),
                 f"deep={H}": lstmkit.CellSpec(gate_hidden=(H,))}
        for train in (False, True):
            mode = "train" if train else "infer"
            plan = []
            for name, spec in cells.items():
                # the fused kernel forced: the default runs vanilla inference on oneDNN from B·H = 2048
                fused = lstmkit.LSTM(I, H, cell=spec, backend="cpu_fused")
                ref = lstmkit.LSTM(I, H, cell=spec, backend="reference")
                ref.load_state_dict(fused.state_dict())
                plan += [(name, "fused", make_step(fused, x, train)), (name, "reference", make_step(ref, x, train))]
            for _, _, fn in plan:
                fn()
            def timed(fn: Callable[[], object]) -> float:
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                fn()
                sec = time.perf_counter() - t0
                faults.setdefault(fn, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                return sec

            steps = {(n, k): fn for n, k, fn in plan}
            times: dict[tuple[str, str], list[float]] = {(n, k): [] for n, k, _ in plan}
            vs_vanilla: dict[str, list[float]] = {name: [] for name in cells}  # paired time ratios
            for rnd in range(args.repeats):
                for name in cells:
                    if name != "vanilla":  # each deep call right after a vanilla one
                        base = timed(steps[("vanilla", "fused")])
                        sec = timed(steps[(name, "fused")])
                        times[("vanilla", "fused")].append(base)
                        times[(name, "fused")].append(sec)
                        vs_vanilla[name].append(sec / base)
                    if rnd < args.reference_repeats:
                        times[(name, "reference")].append(timed(steps[(name, "reference")]))
            vs_vanilla["vanilla"] = [1.0]
            sec = {key: statistics.median(v) for key, v in times.items()}
            for name, spec in cells.items():
                f = flops(spec, B, T, I, H, train)
                flop_ratio = f / flops(cells["vanilla"], B, T, I, H, train)
                rows.append({"shape": [B, T, I, H], "mode": mode, "cell": name, "seconds": sec[(name, "fused")],
                             "reference_seconds": sec[(name, "reference")], "flops": f,
                             "flop_ratio_vs_vanilla": flop_ratio,
                             "time_per_flop_vs_vanilla": statistics.median(vs_vanilla[name]) / flop_ratio,
                             "speedup_vs_reference": sec[(name, "reference")] / sec[(name, "fused")],
                             "page_faults_per_call": statistics.median(faults[steps[(name, "fused")]])})
            print(f"  {(B, T, I, H)} {mode}: " + ", ".join(
                f"{r['cell']} {r['seconds'] * 1e3:.2f} ms ({r['time_per_flop_vs_vanilla']:.2f}x/FLOP, "
                f"{r['speedup_vs_reference']:.1f}x ref)" for r in rows[-3:]), flush=True)
    # glibc's tunables and torch's huge-page switch, if set
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "THP_MEM_ALLOC_ENABLE"}
    result = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(), "malloc": malloc,
              "repeats": args.repeats, "reference_repeats": args.reference_repeats, "rows": rows}
    save(args.out, "bench_deep", result, markdown)
    return result


def markdown(result: dict) -> str:
    lines = ["# Deep gates on the fused CPU kernel", "",
             machine_line(result) +
             f"{result['threads']} threads; median of {result['repeats']} interleaved rounds "
             f"(reference loop: {result['reference_repeats']}); time per FLOP ÷ vanilla's: the median of the "
             "rounds' ratios to a vanilla call timed just before; page faults: the median over the fused "
             "calls (memory the allocator maps anew). Allocator settings: "
             f"{', '.join(f'{k}={v}' for k, v in result.get('malloc', {}).items()) or DEFAULTS}. "
             "`python benchmarks/bench_deep.py`.", "",
             "| shape (B, T, I, H) | mode | cell | fused ms | FLOPs ÷ vanilla's | time per FLOP ÷ vanilla's "
             "| page faults per call | reference ms | fused speed-up over the reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {tuple(r['shape'])} | {r['mode']} | `{r['cell']}` | {r['seconds'] * 1e3:.2f} | "
                     f"{r['flop_ratio_vs_vanilla']:.2f} | {r['time_per_flop_vs_vanilla']:.2f} | "
                     f"{r.get('page_faults_per_call', float('nan')):,.0f} | "
                     f"{r['reference_seconds'] * 1e3:.2f} | {r['speedup_vs_reference']:.1f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
