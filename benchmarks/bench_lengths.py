"""Variable lengths: ``PackedSequence`` and ``lengths=`` against ``torch.nn.LSTM`` packed and padded,
in one process.

    python benchmarks/bench_lengths.py               # writes results/bench_lengths.{json,md}
    python benchmarks/bench_lengths.py --T 100        # one length only

At B = 32, I = 64, H = 128 and T in {100, 1000}, with lengths drawn uniformly from [T/4, T]
(seeded; the longest is T): inference (no_grad forward) and a training step (forward + backward
of ``output.sum() + h_n.sum()``), for ``nn.LSTM`` on a PackedSequence (packing inside the timed
call, as a user pays it), ``nn.LSTM`` on the padded batch (every sequence run to T: the speed
users trade correctness for when they skip packing), and lstmkit on the PackedSequence and with
``lengths=`` on the padded batch. Rows alternate; each is the median of at least ``--repeats``
rounds or as many as ``--budget`` seconds allow per row (slow rows get fewer, never under 3).
The CPU model, torch's capability and the thread count are recorded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import OUT, environment, save, title  # noqa: E402

B, I, H = 32, 64, 128


def plan(T: int, train: bool) -> list[tuple[str, Callable[[], object]]]:
    """The timed calls at length ``T``: (name, call)."""
    g = torch.Generator().manual_seed(T)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    lengths[0] = T
    x = torch.randn(T, B, I, generator=g)
    ref = torch.nn.LSTM(I, H)
    ours = lstmkit.LSTM(I, H)
    ours.load_state_dict(ref.state_dict())

    def run(fn: Callable[[], tuple]) -> Callable[[], object]:
        def call() -> object:
            if not train:
                with torch.no_grad():
                    return fn()
            out, (h, _) = fn()
            data = out.data if hasattr(out, "data") and not isinstance(out, torch.Tensor) else out
            (data.sum() + h.sum()).backward()
            return None
        return call

    def packed() -> object:
        return pack_padded_sequence(x, lengths, enforce_sorted=False)
    return [("nn.LSTM packed", run(lambda: ref(packed()))),
            ("nn.LSTM padded (runs every sequence to T)", run(lambda: ref(x))),
            ("lstmkit packed", run(lambda: ours(packed()))),
            ("lstmkit lengths=", run(lambda: ours(x, lengths=lengths)))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="*", default=[100, 1000])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per row at most (never under 3 rounds)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for T in args.T:
        for train in (False, True):
            mode = "train" if train else "infer"
            calls = plan(T, train)
            first = {}
            for name, fn in calls:  # warm-up, and each row's first time sizes its rounds
                t0 = time.perf_counter()
                fn()
                first[name] = time.perf_counter() - t0
            rounds = {name: max(3, min(args.repeats, int(args.budget / max(first[name], 1e-9)))) for name, _ in calls}
            times: dict[str, list[float]] = {name: [] for name, _ in calls}
            for r in range(max(rounds.values())):
                for name, fn in calls:
                    if r < rounds[name]:
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["nn.LSTM packed"])
            for name, ts in times.items():
                sec = statistics.median(ts)
                rows.append({"T": T, "B": B, "I": I, "H": H, "mode": mode, "impl": name, "seconds": sec,
                             "rounds": len(ts), "speedup_vs_nn_packed": base / sec})
                print(f"T={T:5d} {mode} {name:44s} {sec * 1e3:10.1f} ms  {base / sec:7.1f}x vs nn packed "
                      f"({len(ts)} rounds)", flush=True)
    result = {**environment(), "rows": rows}
    save(args.out, "bench_lengths", result, markdown)
    return result


def markdown(result: dict) -> str:
    lines = [title("Variable lengths", result), "",
             f"B = {B}, I = {I}, H = {H}, lengths uniform in [T/4, T]; median seconds per call (packing included); "
             "speed-up over `nn.LSTM` on the PackedSequence, same process.", "",
             "| T | mode | implementation | seconds | × faster than nn.LSTM packed | rounds |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['T']} | {r['mode']} | {r['impl']} | {r['seconds']:.4g} | "
                     f"{r['speedup_vs_nn_packed']:.1f} | {r['rounds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
