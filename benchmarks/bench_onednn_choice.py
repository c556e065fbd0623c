"""Where the vanilla LSTM should run on oneDNN: the fused kernel against torch's own operator, in
one process, for the table in ``lstmkit.kernels.torch_native.ONEDNN_FASTER``.

    python benchmarks/bench_onednn_choice.py --threads 1    # writes results/onednn_choice_1t.{json,md}
    python benchmarks/bench_onednn_choice.py --threads 2
    OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/bench_onednn_choice.py --threads 1 --float32-only --out benchmarks/results/avx2

For each shape (B, T, I, H) and dtype (float32; bfloat16 where the CPU has AMX tiles) the vanilla
layer with ``backend="cpu_fused"`` and with ``backend="torch"`` (the same weights): inference
(no_grad forward) and a training step (forward + backward of ``output.sum()``). The two rows
alternate within a round; each time is the median over ``--repeats`` rounds; the ratio is
fused ÷ oneDNN (above 1: oneDNN faster). The last column says which row the default layer runs
for that call. The CPU model, torch's capability and the thread count are recorded.
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
from lstmkit import kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import OUT, environment, save, title  # noqa: E402

SHAPES = [(1, 100, 32, 32), (4, 100, 256, 256), (8, 100, 128, 128), (16, 100, 64, 64), (32, 100, 64, 64),
          (32, 100, 128, 128), (64, 100, 256, 256), (32, 200, 512, 512), (16, 50, 1024, 1024), (32, 20, 128, 128),
          (1, 100, 512, 512), (8, 100, 256, 256), (32, 100, 256, 256), (8, 100, 512, 512), (16, 100, 512, 512),
          (128, 100, 128, 128)]


def step(layer: lstmkit.LSTM, x: torch.Tensor, train: bool) -> Callable[[], object]:
    """One timed call: inference under no_grad, or forward + backward."""
    if not train:
        def infer() -> object:
            with torch.no_grad():
                return layer(x)
        return infer
    xg = x.clone().requires_grad_()

    def training() -> object:
        layer(xg)[0].sum().backward()
        return None
    return training


def measure(shape: tuple[int, int, int, int], dtype: torch.dtype, train: bool, repeats: int) -> dict:
    B, T, I, H = shape
    torch.manual_seed(0)
    fused = lstmkit.LSTM(I, H, backend="cpu_fused").to(dtype)
    onednn = lstmkit.LSTM(I, H, backend="torch").to(dtype)
    onednn.load_state_dict(fused.state_dict())
    default = lstmkit.LSTM(I, H).to(dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    calls = {"fused": step(fused, x, train), "oneDNN": step(onednn, x, train)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    workload = kernels.Workload(kind="lstm", steps=T, batch=B, hidden=H, dtype=dtype, gradient=train, lengths=False,
                                projection=False)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "mode": "train" if train else "infer",
            "fused_ms": med["fused"] * 1e3, "onednn_ms": med["oneDNN"] * 1e3, "ratio": med["fused"] / med["oneDNN"],
            "default": kernels.select(default.spec, x.device, dtype, workload=workload).name}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--float32-only", action="store_true",
                    help="no bfloat16 rows (e.g. with oneDNN held to AVX2, where its bfloat16 is emulated and slow)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    amx = torch.cpu._is_amx_tile_supported()
    dtypes = [torch.float32] + ([torch.bfloat16] if amx and not args.float32_only else [])
    result = {**environment(), "amx": torch.cpu._is_amx_tile_supported(), "repeats": args.repeats, "rows": []}
    for dtype in dtypes:
        for shape in SHAPES:
            for train in (False, True):
                row = measure(shape, dtype, train, args.repeats)
                result["rows"].append(row)
                print(f"{row['dtype']:9s} {str(tuple(shape)):22s} {row['mode']}: fused {row['fused_ms']:8.2f} ms, "
                      f"oneDNN {row['onednn_ms']:8.2f} ms, ratio {row['ratio']:.2f}, default {row['default']}",
                      flush=True)
    save(args.out, f"onednn_choice_{torch.get_num_threads()}t", result, markdown)
    return result


def markdown(result: dict) -> str:
    lines = [title("The vanilla LSTM: fused kernel or oneDNN", result), "",
             f"AMX tiles: {result['amx']}. Median of {result['repeats']} alternating rounds; ratio = fused ÷ oneDNN "
             "(above 1: oneDNN faster); 'default' is the row a default layer runs for that call.", "",
             "| dtype | (B, T, I, H) | mode | fused ms | oneDNN ms | ratio | default |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['dtype']} | {tuple(r['shape'])} | {r['mode']} | {r['fused_ms']:.2f} | "
                     f"{r['onednn_ms']:.2f} | {r['ratio']:.2f} | {r['default']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
