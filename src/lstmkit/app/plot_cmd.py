"""``lstmkit plot KIND``: draws one picture of :mod:`lstmkit.app.plots` from a run and writes it."""

from __future__ import annotations

import argparse
from pathlib import Path

from lstmkit._optional import require
from lstmkit.app import plots, runs

__all__ = ["KINDS", "add_arguments", "run"]

#: The kinds of ``lstmkit plot KIND``.
KINDS: tuple[str, ...] = ("gates", "cells", "weights", "curves", "compare", "gradflow")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``lstmkit plot KIND …``: one subcommand per picture."""
    from lstmkit.app._argparse import path_arg

    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND",
                                help="one of: " + ", ".join(KINDS))

    def common(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("-o", "--output", type=path_arg, default=None,
                       help=f"PNG file to write (default: {default})")
        p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")

    for kind, text in (("gates", "heatmaps of the gate activations over time for one input"),
                       ("cells", "trajectories of the cell state c_t and h_t for one input")):
        p = sub.add_parser(kind, help=text, description=text)
        p.add_argument("run", type=path_arg, metavar="RUN_DIR|CHECKPOINT")
        p.add_argument("--text", default=None, help="input text (charlm runs; default: the test set's start)")
        p.add_argument("--max-steps", type=int, default=None, help="draw at most this many time steps")
        p.add_argument("--layer", type=int, default=0)
        p.add_argument("--direction", type=int, default=0, help="0 forward, 1 reverse")
        if kind == "cells":
            p.add_argument("--units", type=int, default=16, help="draw at most this many units (default 16)")
        common(p, f"RUN_DIR/{kind}.png")
    p = sub.add_parser("weights", help="each gate's W (H x (I + H)) with the [x | h] split",
                       description="each gate's W (H x (I + H)) with the [x | h] split")
    p.add_argument("run", type=path_arg, metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--direction", type=int, default=0)
    common(p, "RUN_DIR/weights.png")
    p = sub.add_parser("curves", help="training loss and the metric on the evaluated split (metrics.jsonl)",
                       description="training loss and the metric on the split each run evaluated during "
                                   "training (metrics.jsonl; valid unless --eval-split said otherwise)")
    p.add_argument("runs", type=path_arg, nargs="+", metavar="RUN_DIR")
    common(p, "curves.png")
    p = sub.add_parser("compare", help="final test metric per cell variant over a set of runs",
                       description="final test metric per cell variant over a set of runs")
    p.add_argument("runs", type=path_arg, nargs="+", metavar="RUN_DIR")
    p.add_argument("--metric", default=None, help="metric to compare (default: the task's target metric)")
    common(p, "compare.png")
    text = ("gradient norms per step on the adding problem: plain RNN, LSTM, no-forget-gate LSTM, "
            "at initialisation and after training; prints the table and writes it as JSON next to the PNG")
    p = sub.add_parser("gradflow", help=text, description=text)
    import inspect

    from lstmkit.app.gradflow import gradflow_experiment

    d = {k: v.default for k, v in inspect.signature(gradflow_experiment).parameters.items()}
    p.add_argument("--cells", default=None,
                   help=f"comma-separated models: 'rnn', 'rnn_relu' or LSTM variants (default {','.join(d['cells'])})")
    p.add_argument("--length", type=int, default=d["length"], help=f"sequence length T (default {d['length']})")
    p.add_argument("--hidden", type=int, default=d["hidden"], help=f"cells per model (default {d['hidden']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"(default {d['batch_size']})")
    p.add_argument("--steps", type=int, default=d["steps"],
                   help=f"training steps per model (default {d['steps']}; 0 = none)")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"Adam learning rate (default {d['lr']:g})")
    p.add_argument("--seed", type=int, default=d["seed"], help=f"(default {d['seed']})")
    p.add_argument("--probe-size", type=int, default=d["probe_size"],
                   help=f"test sequences the gradients are measured on (default {d['probe_size']})")
    p.add_argument("--threads", type=int, default=d["threads"],
                   help=f"torch threads for training (default {d['threads']})")
    p.add_argument("--runs", type=path_arg, nargs="+", default=None, metavar="RUN_DIR",
                   help="use these trained adding runs instead of training")
    common(p, "gradflow.png (and gradflow.json)")


def _default_output(args: argparse.Namespace) -> Path:
    if args.output is not None:
        return Path(args.output)
    if args.kind in ("gates", "cells", "weights"):
        base = args.run if args.run.is_dir() else args.run.parent
        return base / f"{args.kind}.png"
    return Path(f"{args.kind}.png")


def run(args: argparse.Namespace) -> int:
    """Draw the picture ``args.kind`` and write it; returns the exit code."""
    require("lstmkit plot", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    kind = args.kind
    if kind not in KINDS:
        raise ValueError(f"kind: unknown plot kind {kind!r}; expected one of {list(KINDS)}")
    if kind in ("gates", "cells", "weights") and not args.run.exists():
        raise ValueError(f"run: no run directory or checkpoint at {str(args.run)!r}")
    for run_dir in args.runs if kind in ("curves", "compare") else []:  # the inputs before the output
        runs.check_run_dir(run_dir)
    out = plots.check_output(_default_output(args), args.overwrite, ".png")
    if kind in ("gates", "cells", "weights"):
        cfg, task, model = runs.load_run(args.run)
        if kind == "weights":
            plots.plot_weights(model, layer=args.layer, direction=args.direction, path=out, overwrite=args.overwrite)
        else:
            x, labels, marks = plots.shown_input(task, args.text, args.max_steps)
            if kind == "gates":
                plots.plot_gates(model, x, labels=labels, layer=args.layer, direction=args.direction, path=out,
                           overwrite=args.overwrite, marks=marks)
            else:
                highlight = plots.memory_highlight(model, task, layer=args.layer, direction=args.direction)
                plots.plot_cells(model, x, labels=labels, layer=args.layer, direction=args.direction,
                           max_units=args.units, path=out, overwrite=args.overwrite, marks=marks,
                           highlight=highlight)
                for _, label in highlight:
                    print(f"holds the memory: {label}")
    elif kind == "curves":
        plots.plot_curves(args.runs, path=out, overwrite=args.overwrite)
    elif kind == "compare":
        metric, rows = runs.final_values(args.runs, args.metric)
        plots.plot_compare(args.runs, metric=metric, path=out, overwrite=args.overwrite)
        for variant, value, name, split in rows:
            print(f"{variant:<24} {name:<32} {split} {metric} = {value:.4g}")
    else:
        from lstmkit.app.gradflow import gradflow_experiment, gradflow_table

        json_out = plots.check_output(out.with_suffix(".json"), args.overwrite, ".json")
        chosen: dict[str, list[str]] = {}  # the cells given (else gradflow_experiment's own default)
        if args.cells is not None:
            if args.runs:
                raise ValueError("--cells: --runs measures the models of the runs given; leave --cells out")
            chosen["cells"] = [c.strip() for c in args.cells.split(",") if c.strip()]  # (each made before any trains)
            if not chosen["cells"]:
                raise ValueError(f"--cells: expected comma-separated models, got {args.cells!r}")
        result = gradflow_experiment(**chosen, length=args.length, hidden=args.hidden, batch_size=args.batch_size,
                                     steps=args.steps, lr=args.lr, seed=args.seed, probe_size=args.probe_size,
                                     threads=args.threads, runs=args.runs, log=print)
        print(gradflow_table(result))
        print(f"({result['elapsed_s']:.1f} s)")
        plots.plot_gradflow(result, path=out, overwrite=args.overwrite)
        plots.save_json(result, json_out, args.overwrite)
        print(f"wrote {json_out}")
    print(f"wrote {out}")
    return 0
