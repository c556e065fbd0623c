"""The ``lstmkit`` command line: thin wrappers over the library's functions.

    lstmkit demo                          the embedded Reber experiment (make demo)
    lstmkit train TASK [options]          train on a built-in task (see --help)
    lstmkit eval RUN_DIR|CHECKPOINT       evaluate a checkpoint on the task's test set
    lstmkit sample RUN_DIR|CHECKPOINT     generate text (charlm) or show predictions
    lstmkit convert SRC DST               convert weights between formats
    lstmkit plot KIND ...                 pictures of gates, weights, gradient flow, curves
    lstmkit report RUN_DIR                one self-contained HTML report of a run
    lstmkit study --task T ...            the variant study (Greff et al. style)
    lstmkit build                         compile the fused CPU kernel ahead of time

Errors (unknown task or variant, impossible sizes, unwritable output, a corrupt or
incompatible checkpoint) print one line and exit with code 2; nothing is overwritten.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "COMMANDS"]

#: Subcommands that live in their own modules: name -> (module, one-line help). Each module
#: defines ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code); it raises
#: ValueError/TypeError/FileExistsError for bad input, which ``main`` prints as one line.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("lstmkit.convert.files", "convert weights between formats (.pt .safetensors .keras .weights.h5 .onnx)"),
    "plot": ("lstmkit.plots", "draw gate heatmaps, cell trajectories, weights, curves, gradient flow (PNG)"),
    "report": ("lstmkit.report", "write one self-contained HTML report of a run directory"),
    "study": ("lstmkit.study", "variant study: every variant x seed with a learning-rate search, tables and plots"),
    "build": ("lstmkit.kernels.prebuild", "compile the fused CPU kernel ahead of time (else the first use does)"),
}


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstmkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train LSTMs and RNNs on the embedded Reber grammar")
    demo.add_argument("--seeds", type=int, default=5, help="trials per model (default 5)")
    demo.add_argument("--hidden", type=int, default=16, help="cells per layer (default 16)")
    demo.add_argument("--max-sequences", type=int, default=40_000,
                      help="training strings per trial at most (default 40,000)")

    tr = sub.add_parser("train", help="train a model on a built-in task")
    tr.add_argument("task", help="task name (e.g. reber, adding, copy, charlm)")
    tr.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="task option, e.g. -o length=200 (repeatable)")
    tr.add_argument("--out", type=Path, help="run directory (default runs/TASK-CELL-sSEED)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    m = tr.add_argument_group("model")
    m.add_argument("--model", choices=["lstm", "rnn"], default="lstm")
    m.add_argument("--cell", default="vanilla", help="variant: a preset name or names joined with '+'")
    m.add_argument("--hidden", type=int, default=64, dest="hidden_size")
    m.add_argument("--layers", type=int, default=1, dest="num_layers")
    m.add_argument("--bidirectional", action="store_true")
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--proj-size", type=int, default=0)
    m.add_argument("--backend", default=None, help="force a kernel (reference, cpu_fused)")
    o = tr.add_argument_group("optimisation")
    o.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    o.add_argument("--schedule", choices=["constant", "cosine", "step"], default="constant")
    o.add_argument("--warmup", type=int, default=0)
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--steps", type=int, default=1000)
    o.add_argument("--eval-every", type=int, default=100)
    o.add_argument("--patience", type=int, default=None, help="stop after N evaluations without improvement")
    o.add_argument("--no-stop-at-target", dest="stop_at_target", action="store_false",
                   help="keep training after the task's success criterion is met")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=int, default=None)
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its task")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--split", default="test")

    sa = sub.add_parser("sample", help="generate text (charlm) or show predictions")
    sa.add_argument("checkpoint", type=Path)
    sa.add_argument("-n", type=int, default=400, help="characters to generate (charlm)")
    sa.add_argument("--prime", default="def ", help="text to start from (charlm)")
    sa.add_argument("--temperature", type=float, default=0.8)
    sa.add_argument("--seed", type=int, default=0)

    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sp)
    return parser


def _train(args: argparse.Namespace) -> int:
    from lstmkit.train import TrainConfig, train

    cfg = TrainConfig(
        task=args.task, task_options=dict(args.option), model=args.model, cell=args.cell,
        hidden_size=args.hidden_size, num_layers=args.num_layers, bidirectional=args.bidirectional,
        dropout=args.dropout, proj_size=args.proj_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, clip=args.clip or None,
        schedule=args.schedule, warmup=args.warmup, batch_size=args.batch_size, steps=args.steps,
        eval_every=args.eval_every, patience=args.patience, stop_at_target=args.stop_at_target,
        seed=args.seed, backend=args.backend, threads=args.threads)
    out = args.out or Path("runs") / f"{args.task}-{args.cell if args.model == 'lstm' else 'rnn'}-s{args.seed}"
    summary = train(cfg, out, resume=args.resume, progress=not args.quiet)
    _print_summary(summary, out)
    return 0


def _print_summary(s: dict[str, Any], out: Path) -> None:
    t = s["target"]
    value = s["value"]
    shown = "n/a" if value is None else f"{value:.4g}"
    goal = "≥" if t["goal"] == "max" else "≤"
    thr = "" if t["threshold"] is None else f" (target {goal} {t['threshold']:g}: {'met' if t['met'] else 'not met'})"
    print(f"task {s['task']} | {s['model']} {s['cell']} | {s['parameters']:,} parameters | "
          f"{s['steps']:,} steps, {s['sequences']:,} sequences | {s['wall_time_s']:.1f} s | {s['stopped']}")
    print(f"{s.get('split', 'test')} {s['metric']} = {shown}{thr}")
    for name, v in (s.get("baselines") or {}).items():
        print(f"  baseline {name}: {v:.4g}")
    print(f"  published: {t['published']}")
    print(f"run directory: {out}")


def _load_model(path: Path):  # type: ignore[no-untyped-def]
    from lstmkit.tasks.base import get_task
    from lstmkit.train import SequenceModel, load_checkpoint

    cfg, tensors, _ = load_checkpoint(path)
    task = get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    model = SequenceModel(cfg, task.input_size, task.output_size)
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:
        from lstmkit.train import CheckpointError
        raise CheckpointError(f"checkpoint: {path} does not match its own config ({exc})") from None
    return cfg, task, model.eval()


def _eval(args: argparse.Namespace) -> int:
    from lstmkit.train import evaluate

    cfg, task, model = _load_model(args.checkpoint)
    metrics = evaluate(model, task, args.split, cfg.eval_batch_size)
    print(json.dumps({"task": cfg.task, "split": args.split, **metrics}))
    target = task.target
    value = metrics.get(target.metric)
    if value is not None:
        print(f"{target.metric} = {value:.4g}; target {'met' if target.met(value) else 'not met'} "
              f"({target.published})", file=sys.stderr)
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from lstmkit.tasks.corpora import CharLM

    cfg, task, model = _load_model(args.checkpoint)
    if isinstance(task, CharLM):
        gen = torch.Generator().manual_seed(args.seed)
        text = task.sample(lambda x, state: model(x, state), args.prime, args.n, args.temperature, gen)
        print(args.prime + text)
        return 0
    batch = next(iter(task.eval_batches("test", 8)))
    with torch.no_grad():
        out, _ = model(batch.x, None, batch.lengths)
    print(task.show(out, batch, n=3))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lstmkit``; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    from lstmkit.train import CheckpointError

    try:
        if args.command == "demo":
            for name in ("seeds", "hidden", "max_sequences"):
                if getattr(args, name) < 1:
                    parser.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
            from lstmkit.demo import main as demo_main
            demo_main(seeds=args.seeds, hidden=args.hidden, max_sequences=args.max_sequences)
            return 0
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "sample":
            return _sample(args)
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args))
    except (ValueError, TypeError, FileExistsError, CheckpointError) as exc:
        print(f"lstmkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"lstmkit {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
