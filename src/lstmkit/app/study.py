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
import io
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lstmkit import _atomic
from lstmkit._validate import check_int, loads_json
from lstmkit.app import runs
from lstmkit.app._argparse import add_config_options, config_values, key_value, path_arg
from lstmkit.app.config import MAX_JOBS, MAX_SEED, TrainConfig, option_of
from lstmkit.spec import resolve

__all__ = ["StudyConfig", "run_study", "summarize", "welch", "add_arguments", "run"]

#: Training settings a study may set (the rest are the study's own or TrainConfig defaults).
TRAIN_KEYS = ("task_options", "hidden_size", "num_layers", "dropout", "optimizer", "momentum", "weight_decay",
              "clip", "schedule", "warmup", "batch_size", "steps", "eval_every", "eval_batch_size", "patience",
              "backend")
@dataclass
class StudyConfig:
    """What a study runs. Same config → same runs, same numbers (up to thread timing)."""

    task: str
    variants: list[str]
    seeds: int = 5
    lr_trials: int = 4
    lr_range: tuple[float, float] = (1e-3, 3e-2)
    seed: int = 0
    baseline: str | None = None          # default: "vanilla" if studied, else the first variant
    metric: str | None = None            # default: the task's target metric
    train: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the setting, the expected and the actual value."""
        if not self.variants:
            raise ValueError("variants: expected at least one variant, got none")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: expected distinct names, got {self.variants}")
        for v in self.variants:
            if not isinstance(v, str) or not v:
                raise ValueError(f"variants: expected variant names, got an empty one in {self.variants}")
            if not _atomic.is_safe_name(v):
                raise ValueError(f"variants: {v!r} has characters that cannot name a directory")
            if v != "rnn":
                resolve(v)  # raises with the reason for an unknown or impossible variant
        for name in ("seeds", "lr_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
            if value > 1000:
                raise ValueError(f"{name}: expected an int <= 1000 (a sane bound), got {value!r}")
        if len(self.variants) > 1000:
            raise ValueError(f"variants: expected at most 1000 variants, got {len(self.variants)}")
        lo, hi = self.lr_range
        top = option_of(TrainConfig.__dataclass_fields__["lr"]).hi
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"lr_range: expected 0 < low <= high, got {self.lr_range}")
        if top is not None and hi > top:
            raise ValueError(f"lr_range: expected a high <= {top:g} (a sane upper bound), got {self.lr_range}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed (--study-seed): expected an int in [0, {MAX_SEED}], got {self.seed!r}")
        unknown = sorted(set(self.train) - set(TRAIN_KEYS))
        if unknown:
            raise ValueError(f"train: unknown settings {unknown}; a study may set {list(TRAIN_KEYS)}")
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"baseline: expected one of the studied variants {self.variants}, "
                             f"got {self.baseline!r}")

    @property
    def baseline_variant(self) -> str:
        """The variant every other one is tested against."""
        if self.baseline:
            return self.baseline
        return "vanilla" if "vanilla" in self.variants else self.variants[0]

    def learning_rates(self) -> list[float]:
        """``lr_trials`` log-uniform draws from ``lr_range``, ascending, the same for every variant.

        Stratified: draw k is uniform in the k-th of ``lr_trials`` equal slices of the
        log-range, so each draw is still log-uniform over the whole range, but a handful of
        draws cannot cluster in one corner of it (five plain draws often do).
        """
        rng = random.Random(f"lstmkit-study-{self.seed}")
        lo, hi = (math.log(v) for v in self.lr_range)
        width = (hi - lo) / self.lr_trials
        return [float(f"{math.exp(lo + width * (k + rng.random())):.3g}") for k in range(self.lr_trials)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        """Build from ``study.json``'s mapping, refusing unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"learning_rates"})
        if unknown:
            raise ValueError(f"study.json: unknown keys {unknown}; not an lstmkit study")
        d = {k: v for k, v in d.items() if k != "learning_rates"}  # study.json records the draws too
        d["lr_range"] = tuple(d.get("lr_range", cls.__dataclass_fields__["lr_range"].default))
        return cls(**d)


@dataclass(frozen=True)
class Run:
    """One training run of a study."""

    variant: str
    lr_index: int
    lr: float
    seed: int

    def directory(self, out: Path) -> Path:
        return out / "runs" / self.variant / f"lr{self.lr_index}-s{self.seed}"


def _train_config(cfg: StudyConfig, run: Run, split: str) -> dict[str, Any]:
    d = {"task": cfg.task, **cfg.train, "lr": run.lr, "seed": run.seed, "eval_split": split,
         "stop_at_target": False, "threads": 1}
    if run.variant == "rnn":
        d.update(model="rnn", cell="vanilla")
    else:
        d.update(model="lstm", cell=run.variant)
    return d


def _setting(train: dict[str, Any], key: str) -> Any:
    """A training setting of the study: its own, else TrainConfig's default."""
    if key in train:
        return train[key]
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == key)


def train_one(run_dir: str, config: dict[str, Any], metric: str) -> dict[str, Any]:
    """Train (or resume, or read back) one run and return its result (also ``result.json``).

    Runs in a worker process; the result records the selection-split value of ``metric``
    (``valid``), every test-split metric, the budget and the time. A run whose loss
    diverges is recorded as diverged, not retried.
    """
    import torch

    path = Path(run_dir)
    result = runs.read_study_result(path)
    if result is not None:
        if result.get("config") != config:
            raise ValueError(f"{path}: holds a finished run with other settings than this study's; "
                             f"nothing was touched (use another --out)")
        return result
    threads = torch.get_num_threads()
    try:
        return _train_one(path, TrainConfig.from_dict(config), config, metric)
    finally:
        torch.set_num_threads(threads)  # the run sets one thread; in-process (jobs=1) callers get theirs back


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
    if settings.is_file():
        try:
            theirs = loads_json(settings.read_text(), "not valid JSON")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{settings}: {exc}; not an lstmkit study") from None
        if not isinstance(theirs, dict):
            raise ValueError(f"{settings}: expected a JSON object (a study's settings), got "
                             f"{'null' if theirs is None else type(theirs).__name__}; not an lstmkit study, or "
                             f"damaged (nothing was touched)")
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


def _better(goal: str) -> Callable[[float | None], float]:
    """Sort key: smaller is better; a missing (diverged) value is worst."""
    def key(v: float | None) -> float:
        if v is None or not math.isfinite(v):
            return math.inf
        return -v if goal == "max" else v
    return key


def run_study(cfg: StudyConfig, out: str | os.PathLike[str], jobs: int | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study in ``out``; returns the aggregated results (see module doc)."""
    from tqdm import tqdm

    from lstmkit.app.tasks.base import metric_goal
    from lstmkit.app.tasks.registry import get_task

    cfg.validate()
    out = Path(out)
    jobs = (os.cpu_count() or 1) if jobs is None else check_int("jobs", jobs, 1, MAX_JOBS)
    for variant in cfg.variants:  # every variant's configuration, before the task (and anything written)
        TrainConfig.from_dict(_train_config(cfg, Run(variant, 0, 1e-3, 0), "valid"))
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
    for variant in cfg.variants:
        TrainConfig.from_dict(_train_config(cfg, Run(variant, 0, 1e-3, 0), split))
    _check_out(out)
    _prepare(cfg, out)
    lrs = cfg.learning_rates()
    results: dict[Run, dict[str, Any]] = {}
    total = len(cfg.variants) * (len(lrs) + cfg.seeds - 1)
    bar = tqdm(total=total, disable=not progress, unit="run", dynamic_ncols=True)
    start = time.perf_counter()

    def submit_all(pool: Any, runs: Iterable[Run], pending: dict[Future[Any], Run]) -> None:
        for r in runs:
            args = (str(r.directory(out)), _train_config(cfg, r, split), metric)
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
            best = min(tuning, key=lambda x: (_better(goal)(results[x]["select"]), x.lr_index))
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


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value of ``mean(a) - mean(b)`` (NaN if undefined)."""
    from scipy import stats
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return (math.nan, math.nan) if statistics.mean(a) != statistics.mean(b) else (0.0, 1.0)
    t, p = stats.ttest_ind(a, b, equal_var=False)
    return float(t), float(p)


def _median_or_none(values: list[Any]) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def summarize(cfg: StudyConfig, results: dict[Run, dict[str, Any]], metric: str, goal: str, split: str,
              target: Any, wall_time: float, baselines: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-variant statistics and per-run rows, as written to ``results.json`` (``baselines``:
    the task's baselines of ``metric``, drawn with the target in the box plot)."""
    rows = [{"variant": r.variant, "lr": r.lr, "lr_index": r.lr_index, "seed": r.seed,
             "diverged": res["diverged"], "select": res.get("select"), "test": res["test"].get(metric),
             "target_step": res.get("target_step"), "wall_time_s": res.get("wall_time_s"),
             "parameters": res.get("parameters")}
            for r, res in sorted(results.items(), key=lambda kv: (cfg.variants.index(kv[0].variant),
                                                                  kv[0].lr_index, kv[0].seed))]
    chosen: dict[str, Run] = {}  # variant -> a run at the chosen rate (its index: draws may coincide)
    for v in cfg.variants:
        finals = [r for r in results if r.variant == v and r.seed > 0]
        tuning = [r for r in results if r.variant == v and r.seed == 0]
        if finals:
            chosen[v] = finals[0]
        elif tuning:  # seeds == 1: the best of the search
            chosen[v] = min(tuning, key=lambda x: (_better(goal)(results[x]["select"]), x.lr_index))

    def at_chosen_rate(v: str) -> list[Run]:
        return [r for r in results if r.variant == v and v in chosen and r.lr_index == chosen[v].lr_index]

    def final_values(v: str) -> tuple[list[float], int]:
        runs = at_chosen_rate(v)
        vals = [results[r]["test"][metric] for r in runs if not results[r]["diverged"]]
        return [x for x in vals if x is not None and math.isfinite(x)], len(runs) - len(vals)

    base = cfg.baseline_variant
    base_vals, _ = final_values(base)
    variants = []
    for v in cfg.variants:
        vals, diverged = final_values(v)
        runs = at_chosen_rate(v)
        entry: dict[str, Any] = {"variant": v, "lr": chosen[v].lr if v in chosen else None, "n": len(vals),
                                 "diverged": diverged,
                                 "parameters": next((results[r].get("parameters") for r in runs
                                                     if results[r].get("parameters")), None),
                                 "values": vals}
        if vals:
            q1, med, q3 = _quartiles(vals)
            entry.update(median=med, q1=q1, q3=q3, mean=statistics.mean(vals),
                         std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                         met=sum(bool(target.met(x)) for x in vals) if metric == target.metric else None,
                         target_step=_median_or_none([results[r].get("target_step") for r in runs]),
                         time_s=statistics.mean(results[r].get("wall_time_s") or 0.0 for r in runs))
        if v != base and vals and base_vals:
            t, p = welch(vals, base_vals)
            entry.update(t=t, p=p, delta=entry["median"] - statistics.median(base_vals))
        variants.append(entry)
    return {"task": cfg.task, "task_options": cfg.train.get("task_options", {}), "metric": metric, "goal": goal,
            "selection_split": split, "baseline": base, "learning_rates": cfg.learning_rates(),
            "settings": {**asdict(cfg), "lr_range": list(cfg.lr_range)},
            "target": {"metric": target.metric, "threshold": target.threshold if metric == target.metric else None,
                       "published": target.published},
            "baselines": dict(baselines or {}),
            "runs": len(results), "cpu_time_s": round(sum(r.get("wall_time_s") or 0 for r in rows), 1),
            "wall_time_s": round(wall_time, 1), "variants": variants, "rows": rows}


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, spec)


def results_table(summary: dict[str, Any]) -> str:
    """The markdown table of per-variant statistics."""
    goal = summary["goal"]
    lines = [f"| variant | lr | n | median {summary['metric']} | IQR | mean ± sd | Δ median vs {summary['baseline']} "
             f"| Welch t | p | target met | steps to target | parameters |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary["variants"]:
        if not e["n"]:
            lines.append(f"| {e['variant']} | {_fmt(e['lr'], 'g')} | 0 ({e['diverged']} diverged) "
                         f"| — | — | — | — | — | — | — | — | — |")
            continue
        p = e.get("p")
        sig = ""
        if p is not None and p < 0.05 and e.get("delta"):
            worse = (e["delta"] < 0) == (goal == "max")
            sig = " (worse)" if worse else " (better)"
        n = f"{e['n']}" + (f" (+{e['diverged']} diverged)" if e["diverged"] else "")
        lines.append(
            f"| {e['variant']} | {_fmt(e['lr'], 'g')} | {n} | {_fmt(e['median'])} | {_fmt(e['q1'])}–{_fmt(e['q3'])} "
            f"| {_fmt(e['mean'])} ± {_fmt(e['std'], '.2g')} | {_fmt(e.get('delta'), '+.3g')} "
            f"| {_fmt(e.get('t'), '.2f')} "
            f"| {_fmt(p, '.2g')}{sig} | {_fmt(e['met'])}{'' if e['met'] is None else '/' + str(e['n'])} "
            f"| {_fmt(e['target_step'], 'g')} "
            f"| {_fmt(e['parameters'], ',')} |")
    return "\n".join(lines)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The study's markdown summary: settings, budget, the table and the significant differences."""
    s = summary["settings"]
    train = s["train"]
    goal = "higher" if summary["goal"] == "max" else "lower"
    opts = json.dumps(summary["task_options"]) if summary["task_options"] else "defaults"
    lines = [
        f"# Variant study: {summary['task']} ({opts})", "",
        f"Metric: test `{summary['metric']}` ({goal} is better) of the weights of each run's best "
        f"`{summary['selection_split']}` evaluation within a fixed budget of "
        f"{_setting(train, 'steps')} steps × batch {_setting(train, 'batch_size')}; "
        f"H = {_setting(train, 'hidden_size')}, {_setting(train, 'num_layers')} layer(s). "
        f"Learning rate: best of {s['lr_trials']} log-uniform draws from "
        f"[{s['lr_range'][0]:g}, {s['lr_range'][1]:g}] ({', '.join(f'{x:g}' for x in summary['learning_rates'])}; "
        f"the same for every variant), chosen on the `{summary['selection_split']}` split with seed 0; "
        f"then {s['seeds']} seeds at that rate. Welch's t-test against `{summary['baseline']}`. "
        + (f"Target: the task's criterion ({'≥' if summary['goal'] == 'max' else '≤'} "
         f"{_fmt(summary['target']['threshold'])}); steps to target: the median, over the runs that met it, of "
         f"the first evaluation (every {_setting(train, 'eval_every')} steps) on the `{summary['selection_split']}` "
         f"split that met it." if summary["target"].get("metric", summary["metric"]) == summary["metric"] else
         f"Target: none on `{summary['metric']}` (the task's criterion is on another metric)."), "",
        f"Budget: {summary['runs']} runs, {summary['cpu_time_s'] / 60:.1f} CPU-minutes of training "
        f"(one thread per run).", "",
        results_table(summary), "",
    ]
    worse, better, same = [], [], []
    for e in summary["variants"]:
        if e["variant"] == summary["baseline"] or e.get("p") is None or not e["n"]:
            continue
        if e["p"] < 0.05 and e.get("delta"):
            (worse if (e["delta"] < 0) == (summary["goal"] == "max") else better).append(e["variant"])
        else:
            same.append(e["variant"])
    lines.append(f"Significantly worse than {summary['baseline']} (p < 0.05): {', '.join(worse) or 'none'}. "
                 f"Significantly better: {', '.join(better) or 'none'}. "
                 f"No significant difference: {', '.join(same) or 'none'}.")
    lines.append("")
    lines.append(f"Regenerate: `{command_line(summary['settings'])}`")
    return "\n".join(lines) + "\n"


def command_line(settings: dict[str, Any]) -> str:
    """The ``lstmkit study`` command that reproduces ``settings``."""
    t = settings["train"]
    parts = ["lstmkit study", f"--task {settings['task']}", f"--variants {','.join(settings['variants'])}",
             f"--seeds {settings['seeds']}", f"--lr-trials {settings['lr_trials']}",
             f"--lr-range {settings['lr_range'][0]:g} {settings['lr_range'][1]:g}"]
    if settings["seed"]:
        parts.append(f"--study-seed {settings['seed']}")
    if settings.get("baseline"):
        parts.append(f"--baseline {settings['baseline']}")
    if settings.get("metric"):
        parts.append(f"--metric {settings['metric']}")
    for k, v in sorted(t.get("task_options", {}).items()):
        parts.append(f"-o {k}={json.dumps(v)}")
    options = {f.name: option_of(f) for f in dataclasses.fields(TrainConfig)}
    for k in TRAIN_KEYS[1:]:
        if k in t:
            parts.append(f"--{k.replace('_', '-')} {options[k].none_word if t[k] is None else t[k]}")
    return " ".join(parts)


def boxplot(summary: dict[str, Any]) -> Any:
    """A box plot (with the points) of the test metric per variant; returns the Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in summary["variants"] if e["n"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(entries) + 2), 4.5))
    if entries:
        ax.boxplot([e["values"] for e in entries], tick_labels=[e["variant"] for e in entries], showfliers=False)
        for k, e in enumerate(entries, start=1):
            jitter = [k + 0.08 * ((j % 5) - 2) for j in range(len(e["values"]))]
            p = e.get("p")
            color = "tab:red" if p is not None and p < 0.05 else "tab:blue"
            ax.scatter(jitter, e["values"], s=14, color=color, alpha=0.8, zorder=3)
        base = next((e for e in entries if e["variant"] == summary["baseline"]), None)
        if base:
            ax.axhline(base["median"], color="tab:blue", lw=0.8, ls="-.", label=f"{summary['baseline']} median")
    # the task's target and trivial baselines, and a y axis that spans them (no zoom into noise)
    from lstmkit.app.plots import reference_lines

    reference_lines(ax, {**summary["target"], "goal": summary["goal"]}, summary.get("baselines") or {},
                    [v for e in entries for v in e["values"]])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel("variant")
    ax.set_ylabel(f"test {summary['metric']}")
    ax.set_title(f"{summary['task']}: test {summary['metric']} per variant (red: p < 0.05 vs {summary['baseline']})")
    fig.tight_layout()
    return fig


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    """``results.json``, ``results.md``, ``boxplot.png`` and ``summary.md`` in ``out`` (each atomically)."""
    import matplotlib.pyplot as plt

    _atomic.write_json(out / "results.json", summary, what="study")
    _atomic.write_text(out / "results.md", results_table(summary) + "\n", what="study")
    _atomic.write_text(out / "summary.md", summary_markdown(summary), what="study")
    fig = boxplot(summary)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic.write_bytes(out / "boxplot.png", buf.getvalue(), what="study")


# ---------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lstmkit study``; the training settings are TrainConfig's fields."""
    d = {f.name: f.default for f in dataclasses.fields(StudyConfig) if f.default is not dataclasses.MISSING}
    parser.add_argument("--task", required=True, help="task name (e.g. chorales, continual_reber, adding; see "
                                                       "lstmkit tasks)")
    parser.add_argument("--variants", required=True,
                        help="comma-separated variants, e.g. vanilla,peephole,nfg,cifg,vanilla+fb=1 ('rnn': plain RNN)")
    parser.add_argument("--seeds", type=int, default=d["seeds"],
                        help=f"seeds per variant at its chosen rate (default {d['seeds']})")
    parser.add_argument("--lr-trials", type=int, default=d["lr_trials"],
                        help=f"learning rates tried per variant (default {d['lr_trials']})")
    parser.add_argument("--lr-range", type=float, nargs=2, default=d["lr_range"], metavar=("LOW", "HIGH"),
                        help=f"log-uniform learning-rate range (default {d['lr_range'][0]:g} {d['lr_range'][1]:g})")
    parser.add_argument("--study-seed", type=int, default=d["seed"], help="seed of the learning-rate draws")
    parser.add_argument("--baseline", default=None, help="variant to test against (default vanilla)")
    parser.add_argument("--metric", default=None, help="test metric (default: the task's target metric)")
    parser.add_argument("--out", type=path_arg, default=None, help="study directory (default studies/TASK)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: one per core)")
    parser.add_argument("-o", "--option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="task option, e.g. -o length=100 (repeatable; see lstmkit tasks TASK)")
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
    cfg = config_from_args(args)
    out = args.out or Path("studies") / cfg.task
    summary = run_study(cfg, out, jobs=args.jobs, progress=not args.quiet)
    print(summary_markdown(summary))
    print(f"study directory: {out} (results.json, results.md, boxplot.png, summary.md)", file=sys.stderr)
    return 0
