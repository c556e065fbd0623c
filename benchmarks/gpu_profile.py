"""Where a Triton layer's time goes on a GPU: kernel time against wall time, launches per call,
and the same call replayed from a CUDA graph (no Python, no launch overhead).

    python benchmarks/gpu_profile.py            # on a GPU machine; writes results/gpu_profile.{json,md}
    python benchmarks/gpu_profile.py --cells deep=32,slstm+heads=4 --shapes 0 --stem gpu_profile_cells

For each (B, T, I, H), cell (default vanilla) and path (persistent where it fits, per step),
float32, inference and a training step, against torch.nn.LSTM (cuDNN): wall time per call (CUDA
events, median of repeats), the sum of the GPU kernels' own times in one call (torch.profiler),
the number of kernel launches, the kernels that took most of that time, and inference replayed
from a captured CUDA graph when the call can be captured (a call that synchronises with the host
cannot; the error is recorded). If kernel time is far below wall time, the loop is bound by
launches and Python, not by the kernels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import Timer, make_layer, step_fn  # noqa: E402
from bench_kernels import save  # noqa: E402

SHAPES = [(64, 100, 256, 256), (32, 100, 128, 128), (64, 100, 32, 32), (32, 100, 1024, 1024)]
OUT = Path(__file__).resolve().parent / "results"


def kernel_profile(fn: Any) -> tuple[float, int, list[tuple[str, float, int]]]:
    """Seconds of GPU kernels and number of kernel launches in one call of ``fn``, and the five
    kernels that took most of that time: (name, milliseconds, launches)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in events) / 1e6  # device_time: microseconds
    per_name: Counter[str] = Counter()
    launches: Counter[str] = Counter()
    for e in events:
        per_name[e.name[:160]] += e.device_time / 1e3
        launches[e.name[:160]] += 1
    return busy, len(events), [(n, ms, launches[n]) for n, ms in per_name.most_common(5)]


def graph_replay(fn: Any, timer: Timer, repeats: int) -> float | str:
    """Median seconds of ``fn`` replayed from a CUDA graph, or why it could not be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        return statistics.median(timer(g.replay) for _ in range(repeats))
    except Exception as exc:  # noqa: BLE001 - the failure is the result
        return f"{type(exc).__name__}: {str(exc)[:160]}"


def main(argv: list[str] | None = None) -> None:
    from lstmkit.kernels.triton_impl import PATH_ENV

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="vanilla", help="comma-separated cells of the Triton rows")
    ap.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    ap.add_argument("--stem", default="gpu_profile", help="results/<stem>.{json,md}")
    args = ap.parse_args(argv)
    shapes = SHAPES if args.shapes is None else [SHAPES[int(k)] for k in args.shapes.split(",")]
    device = torch.device("cuda")
    timer = Timer(device)
    repeats = 7
    rows: list[dict[str, Any]] = []
    for B, T, I, H in shapes:
        x = torch.randn(T, B, I, device=device)
        runs = [("cudnn", None)] + [(f"triton:{cell}", path) for cell in args.cells.split(",")
                                    for path in ("per_step", "persistent")]
        for row, path in runs:
            if path:
                os.environ[PATH_ENV] = path
            try:
                layer = make_layer(row, I, H, device)
                for train in (False, True):
                    fn = step_fn(layer, x, train)
                    for _ in range(2):
                        fn()
                    wall = statistics.median(timer(fn) for _ in range(repeats))
                    busy, launches, top = kernel_profile(fn)
                    rec = {"shape": [B, T, I, H], "row": row, "path": path, "mode": "train" if train else "infer",
                           "wall_ms": wall * 1e3, "kernel_ms": busy * 1e3, "launches": launches, "top": top}
                    if not train:
                        g = graph_replay(fn, timer, repeats)
                        rec["graph_ms"] = g * 1e3 if isinstance(g, float) else g
                    rows.append(rec)
                    print(rec, flush=True)
            except Exception as exc:  # noqa: BLE001 - a path that cannot run a shape is a result too
                rows.append({"shape": [B, T, I, H], "row": row, "path": path,
                             "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(rows[-1], flush=True)
            finally:
                os.environ.pop(PATH_ENV, None)
        save(OUT, args.stem, {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                   "repeats": repeats, "rows": rows}, markdown)


def markdown(result: dict[str, Any]) -> str:
    """The table of :func:`main`'s rows."""
    rows, repeats = result["rows"], result["repeats"]
    lines = ["# Where the GPU time goes (float32)", "",
             f"Device: {result['device']}; torch {result['torch']}. Wall: CUDA events, median of "
             f"{repeats}; kernels: the sum of the GPU kernels' times in one call (torch.profiler); graph: "
             "inference replayed from a captured CUDA graph.", "",
             "| shape | row | path | mode | wall ms | kernels ms | launches | graph ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {tuple(r['shape'])} | {r['row']} | {r['path']} | | {r['error'][:100]} | | | |")
            continue
        g = r.get("graph_ms", "")
        g = f"{g:.3f}" if isinstance(g, float) else str(g)[:100]
        lines.append(f"| {tuple(r['shape'])} | {r['row']} | {r['path'] or ''} | {r['mode']} | {r['wall_ms']:.3f} | "
                     f"{r['kernel_ms']:.3f} | {r['launches']} | {g} |")
    lines += ["", "The kernels that took most of each call's kernel time (name: ms over launches):", ""]
    lines += [f"- {tuple(r['shape'])} {r['row']} {r['path'] or ''} {r['mode']}: "
              + "; ".join(f"`{n}` {ms:.3f} ms / {k}" for n, ms, k in r["top"]) for r in rows if r.get("top")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
