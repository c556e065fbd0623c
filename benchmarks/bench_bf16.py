"""bfloat16 layers: lstmkit against ``torch.nn.LSTM`` in bfloat16 (oneDNN), in one process.

    python benchmarks/bench_bf16.py               # writes results/bench_bf16.{json,md}
    python benchmarks/bench_bf16.py --threads 2    # torch's thread count for every row

At (B, T, I, H) = (32, 100, 128, 128), (32, 100, 256, 256), (64, 100, 256, 256) and
(32, 100, 512, 512): inference (no_grad forward) and a training step (forward + backward of
``output.sum()``) of the vanilla layer, both modules converted with ``.to(torch.bfloat16)``
from the same float32 weights, with their float32 selves beside. Rows alternate within a
shape and mode; each is the median of ``--repeats`` rounds. Each bfloat16 output's error is
``max |y - y64| / max |y64|`` against the float64 run of the same rounded weights. The run
records where lstmkit's bfloat16 products ran (``cpu_ext.bf16_unit()``: ``amx`` or
``float32``) beside the CPU model and torch's capability: compare only within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lstmkit
from lstmkit.kernels import cpu_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import OUT, environment, make_step, save, title  # noqa: E402

SHAPES = [(32, 100, 128, 128), (32, 100, 256, 256), (64, 100, 256, 256), (32, 100, 512, 512)]
ROWS = ("nn.LSTM bf16", "lstmkit bf16", "lstmkit bf16 (cpu_fused)", "nn.LSTM fp32", "lstmkit fp32")


def modules(I: int, H: int) -> dict[str, torch.nn.Module]:
    """The timed modules on one set of weights (rounded to bfloat16 for all of them)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H).to(torch.bfloat16).float()
    ours = lstmkit.LSTM(I, H)
    ours.load_state_dict(ref.state_dict())
    low_ref = torch.nn.LSTM(I, H)
    low_ref.load_state_dict(ref.state_dict())
    low_ours = lstmkit.LSTM(I, H)
    low_ours.load_state_dict(ref.state_dict())
    low_fused = lstmkit.LSTM(I, H, backend="cpu_fused")  # the default runs oneDNN where measured faster
    low_fused.load_state_dict(ref.state_dict())
    return {"nn.LSTM bf16": low_ref.to(torch.bfloat16), "lstmkit bf16": low_ours.to(torch.bfloat16),
            "lstmkit bf16 (cpu_fused)": low_fused.to(torch.bfloat16), "nn.LSTM fp32": ref, "lstmkit fp32": ours}


def error(module: torch.nn.Module, exact: torch.Tensor, x: torch.Tensor) -> float:
    """max |y - y64| / max |y64| of ``module``'s output on ``x`` (its own dtype)."""
    with torch.no_grad():
        y = module(x)[0].double()
    return ((y - exact).abs().max() / exact.abs().max()).item()


def bench(shape: tuple[int, int, int, int], repeats: int) -> list[dict]:
    """Every row at one shape, inference then training: seconds (median) and bf16 error."""
    B, T, I, H = shape
    mods = modules(I, H)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    with torch.no_grad():
        exact = torch.nn.LSTM(I, H).double()
        exact.load_state_dict(mods["nn.LSTM fp32"].state_dict())
        y64 = exact(x.double())[0]
    inputs = {name: x.bfloat16() if "bf16" in name else x for name in ROWS}
    errors = {name: error(mods[name], y64, inputs[name]) for name in ROWS if "bf16" in name}
    rows = []
    for train in (False, True):
        steps: dict[str, Callable[[], object]] = {name: make_step(mods[name], inputs[name], train) for name in ROWS}
        for step in steps.values():  # warm-up: kernels built, weights packed once
            step(), step()
        times: dict[str, list[float]] = {name: [] for name in ROWS}
        for _ in range(repeats):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        for name in ROWS:
            rows.append({"shape": list(shape), "mode": "training" if train else "inference", "row": name,
                         "seconds": statistics.median(times[name]), "error_vs_float64": errors.get(name)})
    return rows


def markdown(result: dict) -> str:
    """The results page: one line per shape and mode, the ratios lstmkit / nn.LSTM per dtype."""
    lines = [title("bfloat16 layers: lstmkit vs torch.nn.LSTM", result), "",
             f"lstmkit's bfloat16 products ran on: **{result['bf16_unit']}** "
             f"(AMX tiles reported by torch: {result['amx']}). Median of {result['repeats']} alternating rounds; "
             "error: max |y - y64| / max |y64| of the inference output against float64 on the same "
             "rounded weights.", "",
             "'lstmkit bf16' is the default layer (oneDNN where measured faster, the fused kernel elsewhere); "
             "'fused' forces the fused kernel.", "",
             "| (B, T, I, H) | mode | nn.LSTM bf16 ms | lstmkit bf16 ms | **bf16 ratio** | fused bf16 ms | "
             "fused ratio | nn.LSTM fp32 ms | lstmkit fp32 ms | fp32 ratio | error nn.LSTM bf16 | error lstmkit bf16 | "
             "error fused bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(tuple(r["shape"]), r["mode"], r["row"]): r for r in result["rows"]}
    for shape in dict.fromkeys(tuple(r["shape"]) for r in result["rows"]):
        for mode in ("inference", "training"):
            t = {name: by[(shape, mode, name)]["seconds"] * 1e3 for name in ROWS}
            e = {name: by[(shape, mode, name)]["error_vs_float64"] for name in ROWS}
            fused = t["lstmkit bf16 (cpu_fused)"]
            lines.append(f"| {shape} | {mode} | {t['nn.LSTM bf16']:.2f} | {t['lstmkit bf16']:.2f} | "
                         f"**{t['lstmkit bf16'] / t['nn.LSTM bf16']:.2f}** | {fused:.2f} | "
                         f"{fused / t['nn.LSTM bf16']:.2f} | {t['nn.LSTM fp32']:.2f} | "
                         f"{t['lstmkit fp32']:.2f} | {t['lstmkit fp32'] / t['nn.LSTM fp32']:.2f} | "
                         f"{e['nn.LSTM bf16']:.1e} | {e['lstmkit bf16']:.1e} | {e['lstmkit bf16 (cpu_fused)']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {**environment(), "bf16_unit": cpu_ext.bf16_unit(), "amx": torch.cpu._is_amx_tile_supported(),
              "repeats": args.repeats, "rows": []}
    for shape in SHAPES:
        result["rows"] += bench(shape, args.repeats)
        print(markdown(result).splitlines()[-1], flush=True)
    save(args.out, "bench_bf16", result, markdown)
    print(markdown(result))


if __name__ == "__main__":
    main()
