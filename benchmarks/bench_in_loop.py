"""Inference: the input projection inside the compiled loop or as one GEMM before it, against
``torch.nn.LSTM``, in one process.

    python benchmarks/bench_in_loop.py            # writes results/bench_in_loop.{json,md}

For each shape (B, T, I, H) of the kernel grid and a long one, a vanilla layer under ``no_grad``:
lstmkit with the projection in the loop (``x_t W_ihᵀ`` per step, no (T, B, 4H) tensor), lstmkit
with one projection GEMM before the loop (the training path's forward), and ``nn.LSTM``; rounds
alternate, median of ``--repeats``. ``lstmkit.kernels.fused.in_loop_projection`` decides between
the two from these numbers. The CPU model, torch's capability and the thread count are recorded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import lstmkit
from lstmkit.kernels import fused

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import GRID, OUT, environment, save, title  # noqa: E402

SHAPES = [*GRID, (32, 1000, 64, 128), (8, 100, 128, 128), (4, 100, 128, 128)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rule = fused.in_loop_projection
    rows = []
    for B, T, I, H in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(T, B, I)
        ref = torch.nn.LSTM(I, H)
        ours = lstmkit.LSTM(I, H)
        ours.load_state_dict(ref.state_dict())

        def run(in_loop: bool | None, x: torch.Tensor = x, ours: lstmkit.LSTM = ours) -> None:
            fused.in_loop_projection = rule if in_loop is None else (lambda *_: in_loop)
            with torch.no_grad():
                ours(x)
        plan = {"nn.LSTM": lambda ref=ref, x=x: ref(x), "in the loop": lambda: run(True),
                "GEMM before the loop": lambda: run(False)}
        for fn in plan.values():
            with torch.no_grad():
                fn()
        times: dict[str, list[float]] = {k: [] for k in plan}
        for _ in range(args.repeats):
            for name, fn in plan.items():
                with torch.no_grad():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        fused.in_loop_projection = rule
        sec = {k: statistics.median(v) for k, v in times.items()}
        chosen = rule(x, ours.weight_ih_l0)
        rows.append({"shape": [B, T, I, H], "seconds": sec, "rule_chooses_in_loop": chosen,
                     "in_loop_vs_nn": sec["in the loop"] / sec["nn.LSTM"],
                     "gemm_before_vs_nn": sec["GEMM before the loop"] / sec["nn.LSTM"]})
        print(f"(B,T,I,H)={(B, T, I, H)}: nn {sec['nn.LSTM'] * 1e3:8.2f} ms; in the loop "
              f"{rows[-1]['in_loop_vs_nn']:.2f}x, GEMM before {rows[-1]['gemm_before_vs_nn']:.2f}x; "
              f"rule: {'in the loop' if chosen else 'GEMM before'}", flush=True)
    result = {**environment(), "repeats": args.repeats, "rows": rows}
    save(args.out, "bench_in_loop", result, markdown)
    return result


def markdown(result: dict) -> str:
    lines = [title("Inference: the input projection in the loop or before it", result), "",
             "Vanilla layer under no_grad, time ÷ `nn.LSTM`'s in the same process (below 1 is faster); "
             f"median of {result['repeats']} alternating rounds.", "",
             "| (B, T, I, H) | nn.LSTM ms | in the loop | GEMM before the loop | the rule picks |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {tuple(r['shape'])} | {r['seconds']['nn.LSTM'] * 1e3:.2f} | {r['in_loop_vs_nn']:.2f} | "
                     f"{r['gemm_before_vs_nn']:.2f} | {'in the loop' if r['rule_chooses_in_loop'] else 'before'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
