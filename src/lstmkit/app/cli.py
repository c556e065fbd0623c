"""The ``lstmkit`` command line: thin wrappers over the library's functions.

    lstmkit demo                          LSTM vs plain RNN: Reber grammar, adding problem (make demo)
    lstmkit tasks [TASK]                  the built-in tasks and their options
    lstmkit train TASK [options]          train on a built-in task (see train --help)
    lstmkit eval RUN_DIR|CHECKPOINT       evaluate a checkpoint on the task's test set
    lstmkit sample RUN_DIR|CHECKPOINT     generate text (charlm) or show predictions
    lstmkit convert SRC DST               convert weights between formats
    lstmkit plot KIND ...                 pictures of gates, weights, gradient flow, curves
    lstmkit report RUN_DIR                one self-contained HTML report of a run
    lstmkit study --task T ...            the variant study (Greff et al. style)
    lstmkit build                         compile the fused CPU kernel ahead of time
    lstmkit doctor                        every kernel on every variant, checked and timed here

Errors (unknown task, option or variant, impossible sizes, an unwritable output or a full
disk, a corrupt or incompatible checkpoint, a run directory another run is using, a
training run that diverged) print one line and exit with code 2; no existing file is
changed. Ctrl-C prints one line (for train: how to continue) and exits with code 130.
Under torchrun only rank 0 prints results.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lstmkit import _atomic
from lstmkit.app._argparse import Parser, add_config_options, add_task_options, config_values, path_arg

if TYPE_CHECKING:
    from lstmkit.app.config import TrainConfig

__all__ = ["main", "COMMANDS", "default_run_dir", "train_plan"]

#: Subcommands that live in their own modules: name -> (module, one-line help). Each module
#: defines ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code); it raises
#: ValueError/TypeError/OSError for bad input, which ``main`` prints as one line.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("lstmkit.app.convert_cmd",
                "convert weights between formats (.pt .safetensors .keras .weights.h5 .onnx)"),
    "plot": ("lstmkit.app.plot_cmd", "draw gate heatmaps, cell trajectories, weights, curves, gradient flow (PNG)"),
    "report": ("lstmkit.app.report", "write one self-contained HTML report of a run directory"),
    "study": ("lstmkit.app.study", "variant study: every variant x seed with a learning-rate search, tables and plots"),
    "build": ("lstmkit.app.build_cmd", "compile the fused CPU kernel ahead of time (else the first use does)"),
    "doctor": ("lstmkit.app.doctor", "what this machine gets: every kernel on every variant checked and timed"),
}


def _tasks_epilog() -> str:
    from lstmkit.app.tasks.registry import task_names, task_options

    lines = ["tasks and their options (-o KEY=VALUE; lstmkit tasks TASK describes one):"]
    for name in task_names():
        opts = ", ".join(f"{k}={v!r}" for k, v in task_options(name).items() if k != "seed")
        lines.append(f"  {name:<16} {opts or '-'}")
    return "\n".join(lines)


def _task_option_hint(extras: list[str], ns: argparse.Namespace) -> str:
    """``--length 3`` given to train: the task's options are ``-o KEY=VALUE``."""
    from lstmkit._suggest import closest
    from lstmkit.app.tasks.registry import task_options

    flag = next((w for w in extras if w.startswith("--")), None)
    try:
        names = list(task_options(ns.task))
    except ValueError:
        return ""
    if flag is None:
        return ""
    key = flag[2:].split("=")[0].replace("-", "_")
    close = key if key in names else closest(key, names)
    return f" (task options are given as -o KEY=VALUE: did you mean -o {close}=...?)" if close else ""


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lstmkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from lstmkit.app.demo import main as demo_main
    from lstmkit.app.tasks.base import SPLITS

    d = {k: v.default for k, v in inspect.signature(demo_main).parameters.items()}
    demo = sub.add_parser("demo", help="LSTM against the plain RNN: embedded Reber grammar and the adding problem",
                          description="the constant error carousel: LSTMs and plain RNNs on the embedded Reber grammar "
                          "and the adding problem (T = 100), several seeds each, next to the published results",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--seeds", type=int, default=d["seeds"], help="trials per model and task")
    demo.add_argument("--jobs", type=int, default=d["jobs"], help="trials run in parallel (one thread each)")
    demo.add_argument("--out", type=path_arg, default=None, help="directory of the runs (None: runs/demo-DATE-TIME)")

    ta = sub.add_parser("tasks", help="list the built-in tasks and their options",
                        description="list the built-in tasks and their options")
    ta.add_argument("task", nargs="?", default=None, help="describe this task (its options and criterion)")

    tr = sub.add_parser("train", help="train a model on a built-in task", description="train a model on a built-in "
                        "task; the run directory can be resumed after a kill (--resume)",
                        epilog=_tasks_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("task", help="task name (see below)")
    add_task_options(tr, "length=200; see below")
    tr.add_argument("--out", type=path_arg, help="run directory (default: runs/TASK[-OPTIONS]-MODEL-sSEED, e.g. "
                    "runs/adding-length100-lstm-s0; MODEL is lstm, rnn, rnn_relu, or the --cell given)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its checkpoint (or start it, if the directory holds none "
                         "yet; a directory that does not exist is refused)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_options(tr.add_argument_group(
        "model and training", "a setting not given is the task's recipe (lstmkit tasks TASK shows it: most\n"
        "tasks set the cell, hidden size, learning rate and steps), else the default shown"))
    tr.hint = _task_option_hint  # type: ignore[attr-defined]

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its task")
    ev.add_argument("checkpoint", type=path_arg, metavar="RUN_DIR|CHECKPOINT")
    ev.add_argument("--split", default="test", choices=SPLITS, help="split (default: test)")

    sa = sub.add_parser("sample", help="generate text (charlm) or show predictions",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sa.add_argument("checkpoint", type=path_arg, metavar="RUN_DIR|CHECKPOINT")
    sa.add_argument("-n", type=int, default=400, help="characters to generate (charlm)")
    sa.add_argument("--prime", default="def ", help="text to start from (charlm)")
    sa.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (> 0)")
    sa.add_argument("--seed", type=int, default=0, help="seed of the sampling")

    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sp)
    return parser


def train_plan(argv: list[str]) -> tuple[TrainConfig, Path]:
    """The configuration and the run directory that ``lstmkit train ARGV…`` would use;
    nothing is created. ``argv`` starts after ``train``."""
    return _plan(_parser().parse_args(["train", *argv]))


def _plan(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    from lstmkit.app import runs
    from lstmkit.app.config import TrainConfig, check_new_run

    given = config_values(args)
    cfg = TrainConfig.for_task(args.task, args.option, **given)
    out = args.out or default_run_dir(cfg, "cell" in given)
    # a saved run resumes with the settings it was started with; --resume where there is no
    # checkpoint yet starts a new run
    if not (getattr(args, "resume", False) and (Path(out) / runs.CHECKPOINT).is_file()):
        check_new_run(cfg, given)
    return cfg, out


def _train(args: argparse.Namespace) -> int:
    from lstmkit.app.train import Trainer

    cfg, out = _plan(args)
    args.run_dir = out
    trainer = Trainer(cfg, out, resume=args.resume, progress=not args.quiet)
    args.started = True  # the run directory is set up (and locked): an interrupt leaves it resumable
    summary = trainer.run()
    if trainer.rank == 0:
        _print_summary(summary, out)
    return 0


def default_run_dir(cfg: TrainConfig, cell_given: bool) -> Path:
    """``runs/TASK[-OPTIONS]-MODEL-sSEED``: the task options as written (``length100``),
    MODEL ``lstm`` (the task's recipe cell), a plain RNN's (``rnn``, ``rnn_relu``), or the ``--cell`` given."""
    label = cfg.model if cfg.model != "lstm" else cfg.cell if cell_given else "lstm"
    opts = [f"{k}{v}" for k, v in cfg.task_options.items()]
    name = "-".join([cfg.task, *opts, label, f"s{cfg.seed}"])
    return Path("runs") / _atomic.safe_name(name)  # one directory (zoneout=0.1/0.2: no '/')


def _print_summary(s: dict[str, Any], out: Path) -> None:
    t = s["target"]
    goal = "≥" if t["goal"] == "max" else "≤"
    criterion = "no published threshold" if t["threshold"] is None else f"target {goal} {t['threshold']:.4g}"

    def shown(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4g}"

    print(f"task {s['task']} | {s['model']} {s['cell']} | {s['parameters']:,} parameters | "
          f"{s['steps']:,} steps, {s['sequences']:,} sequences | {s['wall_time_s']:.1f} s | {s['stopped']}")
    first = "" if t["first_met_step"] is None else \
        f"; first met the target at step {t['first_met_step']:,} ({t['sequences_to_target']:,} sequences)"
    print(f"{s['split']} {s['metric']} = {shown(s['value'])} (step {s['selected_step']}, the weights kept){first}")
    test = s["test"]
    verdict = "" if t["threshold"] is None else (": solved" if test["met"] else ": NOT solved")
    print(f"test {s['metric']} = {shown(test['value'])} ({criterion}{verdict})")
    for name, v in (s.get("baselines") or {}).items():
        worse = test["value"] is not None and (test["value"] < v if t["goal"] == "max" else test["value"] > v)
        print(f"  baseline {name}: {v:.4g}{' (the result is worse than this baseline)' if worse else ''}")
    print(f"  published: {t['published']}")
    print(f"run directory: {out}")


def _recipe_text(task: str) -> str:
    """The settings ``lstmkit train TASK`` takes from the task's recipe at its default options."""
    from lstmkit.app.tasks.registry import task_recipe

    return ", ".join(f"{k}={v}" for k, v in task_recipe(task).items()) or "-"


def _tasks(args: argparse.Namespace) -> int:
    from lstmkit.app.tasks.registry import task_description, task_names, task_options

    if args.task is not None:
        opts = task_options(args.task)  # raises for an unknown name, with a suggestion
        print(f"{args.task}: {task_description(args.task)}\n")
        print("options (-o KEY=VALUE; the seed is --seed):")
        for k, v in opts.items():
            if k != "seed":
                print(f"  {k} = {v!r}")
        print(f"recipe (what `lstmkit train {args.task}` uses at these options; a setting given on the command "
              f"line replaces it):\n  {_recipe_text(args.task)}")
        return 0
    for name in task_names():
        first = " ".join(task_description(name).split("\n\n")[0].split())  # the summary, however it wraps
        opts = ", ".join(f"{k}={v!r}" for k, v in task_options(name).items() if k != "seed")
        print(f"{name:<16} {first}")
        print(f"{'':<16} options: {opts or '-'}")
        print(f"{'':<16} recipe: {_recipe_text(name)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lstmkit.app.runs import load_run
    from lstmkit.app.train import evaluate

    cfg, task, model = load_run(args.checkpoint)
    metrics = evaluate(model, task, args.split, cfg.eval_batch_size)
    shown = {k: v if math.isfinite(v) else None for k, v in metrics.items()}  # JSON has no NaN: null
    print(json.dumps({"task": cfg.task, "split": args.split, **shown}, allow_nan=False))
    target = task.target
    value = metrics.get(target.metric)
    if value is not None:
        print(f"{target.metric} = {value:.4g}; target {'met' if target.met(value) else 'not met'} "
              f"({target.published})", file=sys.stderr)
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from lstmkit.app.config import MAX_SEED
    from lstmkit.app.runs import load_run
    from lstmkit.app.tasks.corpora import CharLM

    if args.n < 1 or args.n > 10**7:
        raise ValueError(f"-n: expected an int in [1, 10000000], got {args.n}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):  # (inf sampled uniformly)
        raise ValueError(f"--temperature: expected a finite number > 0, got {args.temperature}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed: expected an int in [0, {MAX_SEED}], got {args.seed}")
    cfg, task, model = load_run(args.checkpoint)
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


def _demo(args: argparse.Namespace) -> int:
    from lstmkit.app.config import MAX_JOBS

    for name, hi in (("seeds", 1000), ("jobs", MAX_JOBS)):
        value = getattr(args, name)
        if not 1 <= value <= hi:
            raise ValueError(f"--{name}: expected an int in [1, {hi}], got {value}")
    from lstmkit.app.demo import main as demo_main

    if args.out is not None:
        from lstmkit.app.runs import plan

        plan(args.out, resume=False)  # an existing, non-empty directory is refused before any work
    demo_main(seeds=args.seeds, jobs=args.jobs, out=args.out)
    return 0


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not str(exc).strip().startswith(("[Errno", "(")) and str(exc).strip():
        text = str(exc)
    elif isinstance(exc, OSError):
        text = f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}"
    else:
        text = str(exc) or type(exc).__name__
    line = " ".join(text.split())
    return line if len(line) <= 400 else line[:397] + "..."


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Warnings as one line each (``lstmkit CMD: warning: …``), not Python's two; libraries'
    deprecation notices (meant for their callers' developers) are not shown."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            print(f"lstmkit {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

        warnings.showwarning = show
        yield


def _diverged(args: argparse.Namespace) -> str:
    """What a diverged ``train`` left in its run directory, and how it can be used again."""
    out = getattr(args, "run_dir", None)
    if args.command != "train" or out is None or not getattr(args, "started", False):
        return ""
    from lstmkit.app.runs import checkpoint_step

    step = checkpoint_step(out)
    if step is None:
        return f"; {out} has no checkpoint: a run with other settings can start afresh in it"
    return f"; {out} keeps the checkpoint of step {step} (a run with other settings needs another --out)"


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C left, in one line: for train, how the run directory continues."""
    if args.command == "study":
        return ("interrupted; the same command continues the study (finished runs are kept, an unfinished one "
                "resumes from its last checkpoint)")
    if args.command != "train":
        return "interrupted"
    out = getattr(args, "run_dir", None)
    if out is None or not out.is_dir():
        return "interrupted before the run started; nothing was written"
    from lstmkit.app.runs import checkpoint_step

    step = checkpoint_step(out)
    if step is not None:
        return (f"interrupted; the same command with --resume continues from step {step} (the last checkpoint in "
                f"{out})")
    if getattr(args, "started", False):  # the directory holds this run's config (and metrics) only
        return (f"interrupted before the first checkpoint; the same command starts the run in {out} afresh "
                f"(with or without --resume)")
    return "interrupted before the run started"


_RUN = {"demo": _demo, "tasks": _tasks, "train": _train, "eval": _eval, "sample": _sample}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lstmkit``; returns the process exit code."""
    from lstmkit.app.train import process_rank

    for stream in (sys.stdout, sys.stderr):  # an ASCII or latin-1 stream (PYTHONIOENCODING, a C locale
        # without UTF-8 mode) shows what it cannot encode as '?': a finished run's summary ("≥") failed it
        if isinstance(stream, io.TextIOWrapper) and stream.encoding.lower().replace("-", "") != "utf8":
            with contextlib.suppress(ValueError, OSError):  # (a closed stream)
                stream.reconfigure(errors="replace")
    parser = _parser()
    args = parser.parse_args(argv)
    rank = process_rank()
    with _one_line_warnings(args.command):
        try:
            if args.command in _RUN:
                return _RUN[args.command](args)
            return int(importlib.import_module(COMMANDS[args.command][0]).run(args))
        except (ValueError, TypeError, OSError, ImportError) as exc:
            where = f" (rank {rank})" if rank else ""
            print(f"lstmkit {args.command}{where}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except MemoryError as exc:  # (torch's std::bad_alloc comes as one: a ulimit, a container's limit)
            where = f" (rank {rank})" if rank else ""
            print(f"lstmkit {args.command}{where}: error: out of memory ({_one_line(exc) or 'MemoryError'})",
                  file=sys.stderr)
            return 2
        except FloatingPointError as exc:  # training diverged: the settings' (--lr, --clip), as a bad input's
            where = f" (rank {rank})" if rank else ""
            print(f"lstmkit {args.command}{where}: error: {_one_line(exc)}{_diverged(args)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"lstmkit {args.command}: {_interrupted(args)}", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
