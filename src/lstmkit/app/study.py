"""The variant study: every variant × seed on one task, with a learning-rate search per variant.

The design follows Greff et al. (2017, "LSTM: A Search Space Odyssey") at a size one
machine can afford:

1. **Learning-rate search.** ``lr_trials`` learning rates are drawn log-uniformly from
   ``lr_range`` (the same draws for every variant, so that no variant is luckier in its
   draws; seeded by the study's ``seed``). Each variant trains once (seed 0) at each of
   them; the one with the best metric on the task's *validation* split is kept.
2. **Seeds.** Each variant then trains with seeds ``0 … seeds-1`` at its chosen rate (the
   seed-0 run of the search is reused: same configuration, same result). Every run has
   the same fixed budget of optimiser steps and is scored on the *test* split.
3. **Statistics.** Per variant: median and interquartile range of the test metric, mean
   and standard deviation, and Welch's t-test (unequal variances) against the baseline
   variant (``vanilla`` by default), with its p-value.

A study directory holds ``study.json`` (the settings, written once), ``runs/VARIANT/
lrK-sSEED/`` (one ordinary training run each, with ``result.json`` once it is finished),
``results.json``, ``results.md``, ``boxplot.png`` and ``summary.md``. Runs are
independent processes (``jobs`` at a time, one thread each), so both cores work. A killed
study resumes where it stopped: finished runs (those with ``result.json``) are read back,
not redone; an interrupted run continues from its last checkpoint; a run that diverged
is recorded as diverged and not retried.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lstmkit import _atomic
from lstmkit._optional import require
from lstmkit._validate import check_int, loads_json
from lstmkit.app import runs
from lstmkit.app._argparse import add_config_options, add_task_options, config_values, path_arg
from lstmkit.app.config import MAX_JOBS, TrainConfig, check_new_run
from lstmkit.app.study_config import TRAIN_KEYS, Run, StudyConfig, effective_train, train_config
from lstmkit.app.study_results import better, boxplot, summarize, summary_markdown, welch, write_outputs

__all__ = ["StudyConfig", "run_study", "summarize", "welch", "boxplot", "add_arguments", "run"]

def train_one(run_dir: str, config: dict[str, Any], metric: str) -> dict[str, Any]:
    """Train (or resume, or read back) one run and return its result (also ``result.json``).

    Runs in a worker process; the result records the selection-split value of ``metric``
    (``valid``), every test-split metric, the budget and the time. A run whose loss
    diverges is recorded as diverged, not retried.
    """
    import torch

    path = Path(run_dir)
    result = runs.read_study_result(path, metric)  # (every field this module reads, checked)
    if result is not None:
        if not _same_training(result.get("config"), config):
            raise ValueError(f"{path}: holds a finished run with other settings than this study's; "
                             f"nothing was touched (use another --out)")
        return result
    threads = torch.get_num_threads()
    try:
        return _train_one(path, TrainConfig.from_dict(config), config, metric)
    finally:
        torch.set_num_threads(threads)  # the run sets one thread; in-process (jobs=1) callers get theirs back


def _same_training(recorded: Any, config: dict[str, Any]) -> bool:
    """Whether a finished run's recorded config trains as ``config`` does: the same TrainConfig,
    whichever settings were spelled out at their defaults (compared as written if either is not one)."""
    try:
        return TrainConfig.from_dict(recorded) == TrainConfig.from_dict(config)
    except (TypeError, ValueError):
        return recorded == config


def _train_one(path: Path, cfg: Any, config: dict[str, Any], metric: str) -> dict[str, Any]:
    from lstmkit.app.train import Trainer

    result: dict[str, Any] = {"config": config}
    try:  # a run killed before its first checkpoint starts afresh (lstmkit.app.runs)
        trainer = Trainer(cfg, path, resume=path.exists(), progress=False)
        summary = trainer.run()
    except FloatingPointError as exc:
        result.update(diverged=True, error=str(exc), select=None, test={})
    else:
        history = trainer.history
        key = f"{cfg.eval_split}_{metric}"
        target = trainer.task.target  # (its threshold is of its own metric)
        met_at = None if metric != target.metric else \
            next((r["step"] for r in history if key in r and target.met(r[key])), None)
        kept = next((r for r in history if r["step"] == summary["selected_step"]), history[-1])
        result.update(diverged=False, select=kept.get(key), test=summary["test"]["metrics"],
                      steps=summary["steps"], wall_time_s=summary["wall_time_s"],
                      parameters=summary["parameters"], target_step=met_at)
    runs.write_study_result(path, result)
    return result


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end the worker when the study process is gone (killed), instead of
    finishing its run and idling as an orphan; the interrupted run resumes from its checkpoint.
    Ctrl-C is the study process's to handle (it ends the workers: :func:`_stop_workers`), so a
    worker ignores SIGINT rather than print a traceback of its own."""
    import signal
    import threading

    from tqdm import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a multiprocessing one: a named semaphore that a worker ended by
    # _stop_workers leaves registered (the resource tracker reports it as leaked). A thread lock will do.
    tqdm.set_lock(threading.RLock())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Ctrl-C: cancel the queued runs and end the running ones now (each resumes from its last
    checkpoint when the study is run again), instead of waiting for them to finish."""
    import multiprocessing

    pool.shutdown(wait=False, cancel_futures=True)
    workers = multiprocessing.active_children()
    for w in workers:
        w.terminate()
    for w in workers:
        w.join(timeout=10)
    pool.shutdown(wait=True)  # its queues closed and their semaphores released, not reported as leaked at exit


def _selection_split(task: Any) -> str:
    try:
        next(iter(task.eval_batches("valid", 1)))
        return "valid"
    except ValueError:
        return "train"


def _prepare(cfg: StudyConfig, out: Path) -> None:
    settings = out / "study.json"
    mine = asdict(cfg)
    mine["lr_range"] = list(cfg.lr_range)
    mine["learning_rates"] = cfg.learning_rates()
    mine["train"] = effective_train(cfg.train)
    if settings.is_file():
        try:
            theirs = loads_json(settings.read_text(encoding="utf-8"), "not valid JSON")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{settings}: {exc}; not an lstmkit study") from None
        if not isinstance(theirs, dict):
            raise ValueError(f"{settings}: expected a JSON object (a study's settings), got "
                             f"{'null' if theirs is None else type(theirs).__name__}; not an lstmkit study, or "
                             f"damaged (nothing was touched)")
        theirs = {**theirs, "train": effective_train(theirs.get("train", {}))}  # (as an older study wrote it)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            detail = "; ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in diff)
            raise ValueError(f"--out {out}: holds a study with other settings ({detail}); "
                             f"choose another directory or repeat the original settings")
        return
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: exists, is not empty and holds no study.json; nothing was "
                              f"touched (choose another directory)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _atomic.WriteError(exc.errno or 5, f"--out {out}: cannot create the directory "
                                                 f"({exc.strerror or exc})") from None
    _atomic.write_json(settings, mine, what="--out")


def _check_out(out: Path) -> None:
    """Before any work: ``out`` is (or can become) a writable directory."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, expected a study directory (new, empty, or a study to resume)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a directory")
    _atomic.check_writable(existing / ".lstmkit-study-probe", overwrite=True, what="--out")


def run_study(cfg: StudyConfig, out: str | os.PathLike[str], jobs: int | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study in ``out``; returns the aggregated results (see module doc)."""
    from lstmkit.app.tasks.base import metric_goal
    from lstmkit.app.tasks.registry import get_task

    cfg.validate()
    out = Path(out)
    jobs = (os.cpu_count() or 1) if jobs is None else check_int("jobs", jobs, 1, MAX_JOBS)
    for variant in cfg.variants:  # every variant's configuration, before the task (and anything written)
        TrainConfig.from_dict(train_config(cfg, Run(variant, 0, 1e-3, 0), "valid"))
    task = get_task(cfg.task, seed=0, **cfg.train.get("task_options", {}))
    metric = cfg.metric or task.target.metric
    split = _selection_split(task)
    names = _metric_names(task)
    if metric not in names:
        raise ValueError(f"metric: expected one of task {cfg.task!r}'s metrics {names}, got {metric!r}")
    goal = task.target.goal if metric == task.target.metric else metric_goal(metric)
    if goal is None:
        raise ValueError(f"metric: whether a higher or a lower {metric!r} is better is unknown; choose one of "
                         f"{[m for m in names if metric_goal(m)]}")
    fresh = not (out / "study.json").is_file()  # (a study resumes with the settings it was started with)
    for variant in cfg.variants:
        run_cfg = TrainConfig.from_dict(train_config(cfg, Run(variant, 0, 1e-3, 0), split))
        if fresh:
            check_new_run(run_cfg, cfg.train)
    _check_out(out)
    _prepare(cfg, out)
    try:  # held until the results are written: a second study in out would train the same runs beside it
        held = runs.lock(out)
    except runs.InUseError:
        raise runs.InUseError(f"--out {out}: another lstmkit study is running in it; nothing was changed (wait "
                              f"for it to end, or stop it: the same command then continues it)") from None
    try:
        return _run_locked(cfg, out, jobs, progress, task, metric, goal, split)
    finally:
        held.release()


def _run_locked(cfg: StudyConfig, out: Path, jobs: int, progress: bool, task: Any, metric: str, goal: str,
                split: str) -> dict[str, Any]:
    """:func:`run_study`'s runs and results, once it holds ``out``'s lock."""
    from tqdm import tqdm

    lrs = cfg.learning_rates()
    results: dict[Run, dict[str, Any]] = {}
    total = len(cfg.variants) * (len(lrs) + cfg.seeds - 1)
    bar = tqdm(total=total, disable=not progress, unit="run", dynamic_ncols=True)
    start = time.perf_counter()

    def submit_all(pool: Any, runs: Iterable[Run], pending: dict[Future[Any], Run]) -> None:
        for r in runs:
            args = (str(r.directory(out)), train_config(cfg, r, split), metric)
            if pool is None:
                pending_done(r, train_one(*args))
            else:
                pending[pool.submit(train_one, *args)] = r

    def pending_done(r: Run, res: dict[str, Any]) -> None:
        results[r] = res
        bar.update(1)
        value = res["test"].get(metric)
        bar.set_postfix_str(f"{r.variant} lr={r.lr:g} seed={r.seed}: "
                            f"{'diverged' if res['diverged'] else f'{metric}={value:.4g}'}")
        tuning = [x for x in results if x.variant == r.variant and x.seed == 0]
        if r.seed == 0 and len(tuning) == len(lrs):
            best = min(tuning, key=lambda x: (better(goal)(results[x]["select"]), x.lr_index))
            finals.extend(Run(r.variant, best.lr_index, best.lr, s) for s in range(1, cfg.seeds))

    finals: list[Run] = []
    tuning_runs = [Run(v, k, lr, 0) for v in cfg.variants for k, lr in enumerate(lrs)]
    try:
        if jobs == 1:
            submit_all(None, tuning_runs, {})
            while finals:
                batch, finals[:] = list(finals), []
                submit_all(None, batch, {})
        else:
            import multiprocessing
            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
                pending: dict[Future[Any], Run] = {}
                try:
                    submit_all(pool, tuning_runs, pending)
                    while pending:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            pending_done(pending.pop(fut), fut.result())
                        batch, finals[:] = list(finals), []
                        submit_all(pool, batch, pending)
                except KeyboardInterrupt:
                    _stop_workers(pool)
                    raise
    finally:
        bar.close()
    summary = summarize(cfg, results, metric, goal, split, task.target, time.perf_counter() - start,
                        baselines=task.baselines if metric == task.target.metric else {})
    write_outputs(summary, out)
    return summary


def _metric_names(task: Any) -> list[str]:
    """The task's metric names (from a zero output of the model's shape, (T, B, output_size))."""
    import torch
    batch = next(iter(task.eval_batches("test", 1)))
    return list(task.metrics(torch.zeros(*batch.x.shape[:2], task.output_size), batch))


# ---------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lstmkit study``; the training settings are TrainConfig's fields."""
    d = {f.name: f.default for f in dataclasses.fields(StudyConfig) if f.default is not dataclasses.MISSING}
    parser.add_argument("--task", required=True, help="task name (e.g. chorales, continual_reber, adding; see "
                                                       "lstmkit tasks)")
    parser.add_argument("--variants", required=True,
                        help="comma-separated variants, e.g. vanilla,peephole,nfg,cifg,vanilla+fb=1 ('rnn', "
                             "'rnn_relu': plain RNNs)")
    parser.add_argument("--seeds", type=int, default=d["seeds"],
                        help=f"seeds per variant at its chosen rate (default {d['seeds']})")
    parser.add_argument("--lr-trials", type=int, default=d["lr_trials"],
                        help=f"learning rates tried per variant (default {d['lr_trials']})")
    parser.add_argument("--lr-range", type=float, nargs=2, default=d["lr_range"], metavar=("LOW", "HIGH"),
                        help=f"log-uniform learning-rate range (default {d['lr_range'][0]:g} {d['lr_range'][1]:g})")
    parser.add_argument("--study-seed", type=int, default=d["seed"], help="seed of the learning-rate draws")
    parser.add_argument("--baseline", default=None,
                        help="variant to test against (default: vanilla if studied, else the first variant)")
    parser.add_argument("--metric", default=None,
                        help="the metric compared on test, and on the selection split to choose the rate (default: "
                             "the task's target metric; each run keeps the weights of its best evaluation of the "
                             "target metric, on which another metric is then read)")
    parser.add_argument("--out", type=path_arg, default=None, help="study directory (default studies/TASK)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: one per core)")
    add_task_options(parser, "length=100; see lstmkit tasks TASK")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_options(parser.add_argument_group("training (every run; default: TrainConfig's)"),
                       only=TRAIN_KEYS[1:])


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The StudyConfig the command line describes (training settings: only those given)."""
    train: dict[str, Any] = config_values(args)
    if args.option:
        train["task_options"] = dict(args.option)
    return StudyConfig(task=args.task, variants=[v.strip() for v in args.variants.split(",")],
                       seeds=args.seeds, lr_trials=args.lr_trials, lr_range=tuple(args.lr_range),
                       seed=args.study_seed, baseline=args.baseline, metric=args.metric, train=train)


def run(args: argparse.Namespace) -> int:
    """``lstmkit study``: run or resume, then print the summary."""
    require("lstmkit study", "matplotlib", "scipy")  # (its summary's plot and tests, after every run)
    cfg = config_from_args(args)
    out = args.out or Path("studies") / cfg.task
    summary = run_study(cfg, out, jobs=args.jobs, progress=not args.quiet)
    print(summary_markdown(summary))
    print(f"study directory: {out} (results.json, results.md, boxplot.png, summary.md)", file=sys.stderr)
    return 0
