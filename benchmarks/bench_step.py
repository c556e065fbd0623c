"""One step per call: ``lstmkit.LSTMCell`` and ``LSTM.step`` against ``torch.nn.LSTMCell``, in
one process, per call.

    python benchmarks/bench_step.py              # writes results/bench_step.{json,md}
    python benchmarks/bench_step.py --quick      # B = 1 only, vanilla and three variants

For (B, H) in {1, 32} x {32, 256} (I = H): inference (one call under ``no_grad``) and training
(a loop of ``--steps`` calls with gradients, then ``backward`` of the last state's sum; the time
per step of the whole loop and its backward). Rows: ``nn.LSTMCell`` (vanilla, torch's own),
``lstmkit.LSTMCell`` for one cell of every row of the variant table but fgr (a step cannot carry
its state), in inference also that cell frozen (``lstmkit.freeze``: its weights packed once), and
``lstmkit.LSTM(...).step`` for vanilla. Rounds alternate between the rows, and each row is timed
right after ``nn.LSTMCell`` (the mean of ``--calls`` calls each): a row's time is the median over
``--repeats`` rounds, its ratio the median of its rounds' ratios to the ``nn.LSTMCell`` timing just
before it — on a shared host whose speed drifts within seconds, the two sides of a ratio are then
timed under the same load (a row timed a second after its reference read 1.05-1.19 in one run where
rows doing the same work read 0.85-0.94). The CPU model, torch's capability and the thread count are
recorded.
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
from lstmkit import variants

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import OUT, environment, save, title  # noqa: E402

SHAPES = [(1, 32), (1, 256), (32, 32), (32, 256)]


def cells(quick: bool) -> dict[str, str]:
    """One cell per variant-table row that a step can run (every row but fgr)."""
    out = {}
    for cell in variants.example_cells():
        spec = lstmkit.resolve(cell)
        if spec.is_lstm and not spec.fgr and spec.init_biases == {} and spec.chrono is None:  # init rows: vanilla
            out[cell] = cell
    if quick:
        out = {k: out[k] for k in list(out)[:4]}
    return out


def cell_state(cell: str, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``state`` (h, c) extended by the cell's further states (the sLSTM's normaliser n = 1 and
    stabiliser m = 0: a cell that has seen nothing yet)."""
    h, c = state
    extra = {"n": torch.ones_like(c), "m": torch.zeros_like(c)}
    return (h, c, *(extra[name] for name in variants.cell_states(lstmkit.resolve(cell))[1:]))


def make_call(step: Callable, x: torch.Tensor, state: tuple, train: bool, steps: int) -> Callable[[], int]:
    """A closure running one timed unit; returns how many steps it ran."""
    if not train:
        def infer() -> int:
            with torch.no_grad():
                step(x, state)
            return 1
        return infer

    def train_loop() -> int:
        s = state
        for _ in range(steps):
            s = step(x, s)
        sum(t.sum() for t in s).backward()
        return steps
    return train_loop


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calls", type=int, default=50, help="calls (inference) per timed round")
    ap.add_argument("--steps", type=int, default=16, help="steps per training loop")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    shapes = [(1, 32), (1, 256)] if args.quick else SHAPES
    for B, H in shapes:
        torch.manual_seed(0)
        x = torch.randn(B, H)
        state = (torch.randn(B, H), torch.randn(B, H))
        for train in (False, True):
            plan: list[tuple[str, str, Callable[[], int]]] = []
            ref = torch.nn.LSTMCell(H, H)
            plan.append(("vanilla", "nn.LSTMCell", make_call(ref, x, state, train, args.steps)))
            for name, cell in cells(args.quick).items():
                ours = lstmkit.LSTMCell(H, H, cell=cell).train(train)  # inference: eval (zoneout's expectation)
                if name == "vanilla":
                    ours.load_state_dict(ref.state_dict())
                plan.append((name, "lstmkit.LSTMCell", make_call(ours, x, cell_state(cell, state), train,
                                                                   args.steps)))
                if not train:  # the same cell frozen: its weights packed once
                    plan.append((name, "lstmkit.freeze(LSTMCell)", make_call(lstmkit.freeze(ours), x,
                                                                              cell_state(cell, state), train,
                                                                              args.steps)))
            layer = lstmkit.LSTM(H, H).train(train)
            layer_state = (state[0][None], state[1][None])

            def layer_step(xt: torch.Tensor, s: tuple, layer: lstmkit.LSTM = layer) -> tuple:
                return layer.step(xt, s)[1]
            plan.append(("vanilla", "lstmkit.LSTM.step", make_call(layer_step, x, layer_state, train, args.steps)))
            if train:
                for p in [*ref.parameters(), *layer.parameters()]:
                    p.grad = None
            calls = args.calls if not train else max(1, args.calls // args.steps)
            for _, _, fn in plan:  # warm up (builds the kernel once)
                fn()
            def timed(fn: Callable[[], int], calls: int = calls) -> float:
                n = 0
                t0 = time.perf_counter()
                for _ in range(calls):
                    n += fn()
                return (time.perf_counter() - t0) / n

            reference = plan[0][2]
            times: dict[tuple[str, str], list[float]] = {(c, k): [] for c, k, _ in plan}
            ratios: dict[tuple[str, str], list[float]] = {(c, k): [] for c, k, _ in plan}
            for _ in range(args.repeats):
                for cell, kind, fn in plan[1:]:  # each row right after its own reference timing
                    base = timed(reference)
                    sec = timed(fn)
                    times[plan[0][:2]].append(base)
                    times[(cell, kind)].append(sec)
                    ratios[(cell, kind)].append(sec / base)
            ratios[plan[0][:2]] = [1.0]
            for (cell, kind), ts in times.items():
                sec, ratio = statistics.median(ts), statistics.median(ratios[(cell, kind)])
                rows.append({"B": B, "H": H, "mode": "train" if train else "infer", "cell": cell, "impl": kind,
                             "us_per_step": sec * 1e6, "ratio_vs_nn_lstmcell": ratio})
                print(f"B={B:3d} H={H:4d} {'train' if train else 'infer'} {kind:24s} {cell:22s} "
                      f"{sec * 1e6:8.1f} us  {ratio:5.2f}x", flush=True)
    result = {**environment(), "repeats": args.repeats, "calls": args.calls, "steps": args.steps, "rows": rows}
    save(args.out, "bench_step", result, markdown)
    return result


def markdown(result: dict) -> str:
    lines = [title("One step per call", result), "",
             "Time per step (µs, median over rounds) and ratio to `nn.LSTMCell` (vanilla) in the same process "
             "(the median of each round's ratio to the `nn.LSTMCell` timing just before the row); inference: one "
             f"call under no_grad; training: {result['steps']} steps with gradients, then backward, per step.", "",
             "| B | H | mode | implementation | cell | µs per step | × nn.LSTMCell |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['B']} | {r['H']} | {r['mode']} | {r['impl']} | {r['cell']} | {r['us_per_step']:.1f} | "
                     f"{r['ratio_vs_nn_lstmcell']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
