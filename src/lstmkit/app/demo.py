"""``make demo``: the constant error carousel in two classic experiments, LSTM against the
plain tanh RNN, each with several seeds.

1. **Embedded Reber grammar** (Hochreiter & Schmidhuber 1997, §5.1): a trial is *solved*
   when every legal next symbol of every one of the 256 training and 256 test strings is
   predicted (the paper's criterion). Published: LSTM 100 % of trials (8,440 sequences at
   lr 0.5, range 3,800–24,100); Elman nets 0 %.
2. **Adding problem, T = 100** (1997, §5.4): a lag of 50–110 steps between the two marked
   values and the answer. *Solved*: at most 3 of the 2,560 test sequences have an error of
   0.04 or more (the paper's 1 wrong). Predicting the mean, 0.5, gets 15.4 % of them
   right: a model that does not bridge the lag stays there. Published: LSTM 74,000
   sequences; a plain RNN has no gradient across such lags.

Every trial is ``lstmkit train TASK`` with the task's own recipe (:meth:`Task.recipe`,
through :meth:`TrainConfig.for_task`), the model (``--model rnn``) and seed changed, and a
budget of training sequences; it stops when its validation split meets the criterion, and
the test split is evaluated once, on the kept weights. Trials run in parallel processes
(one thread each); each leaves a run directory that ``lstmkit report`` reads.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Experiment", "EXPERIMENTS", "Trial", "run_trial", "main"]


@dataclass(frozen=True)
class Experiment:
    """One task of the demo, with what "solved" means and the published numbers."""

    key: str
    title: str
    task: str
    options: dict[str, Any] = field(default_factory=dict)
    solved: str = ""
    published: dict[str, str] = field(default_factory=dict)
    #: training sequences per trial at most (both models get the same budget)
    max_sequences: int = 40_000


EXPERIMENTS: dict[str, Experiment] = {e.key: e for e in (
    Experiment("reber", "Embedded Reber grammar (Hochreiter & Schmidhuber 1997, §5.1)", "reber",
               solved="every legal next symbol of all 256 training and all 256 test strings predicted",
               published={"lstm": "100 % of trials; 8,440 sequences (range 3,800-24,100; 3 blocks x 2 cells, lr 0.5)",
                          "rnn": "Elman nets: 0 % of trials (> 200,000 sequences)"},
               max_sequences=36_000),
    Experiment("adding", "Adding problem, T = 100 (Hochreiter & Schmidhuber 1997, §5.4)", "adding",
               {"length": 100},
               solved="at most 3 of the 2,560 test sequences with |error| >= 0.04 (always answering 0.5 gets "
                      "15.4 % right)",
               published={"lstm": "74,000 sequences, 1 of 2,560 wrong (2 blocks x 2 cells, lr 0.5)",
                          "rnn": "no result: the error vanishes across lags of 50-110 steps"},
               max_sequences=64_000),
)}


@dataclass
class Trial:
    """Outcome of one training run."""

    experiment: str
    model: str
    seed: int
    solved: bool
    sequences: int          # training sequences until the criterion was first met, else in total
    test: float             # the test split's value of the task's metric (kept weights)
    metric: str
    seconds: float
    run_dir: str


_SLOT: list[int] = [0]


def _init_worker(counter: Any) -> None:
    """Each worker process draws its progress bar on its own line."""
    import torch

    torch.set_num_threads(1)  # tiny shapes: one thread each, one process per core
    with counter.get_lock():
        _SLOT[0] = counter.value
        counter.value += 1


def run_trial(key: str, model: str, seed: int, run_dir: str | os.PathLike[str], max_sequences: int | None = None,
              progress: bool = True) -> Trial:
    """Train one trial of experiment ``key`` (``"reber"`` or ``"adding"``) with ``model``
    (``"lstm"``: the task's recipe; ``"rnn"``: the plain tanh RNN on the same recipe)."""
    from lstmkit.app.train import TrainConfig, Trainer

    exp = EXPERIMENTS[key]
    probe = TrainConfig.for_task(exp.task, exp.options)
    budget = max_sequences or exp.max_sequences
    cfg = TrainConfig.for_task(exp.task, exp.options, model=model, seed=seed, threads=1,
                               steps=max(1, budget // probe.batch_size))
    start = time.perf_counter()
    trainer = Trainer(cfg, run_dir, progress=progress, label=f"{key} {model} seed {seed}", position=_SLOT[0])
    s = trainer.run()
    solved = bool(s["solved"])
    if key == "reber":  # the paper's criterion covers the training strings too
        solved = solved and trainer.evaluate("train")["solved"] == 1.0
    first = s["target"]["sequences_to_target"]
    return Trial(key, model, seed, solved, first if solved and first is not None else s["sequences"],
                 float(s["test"]["value"]), s["metric"], time.perf_counter() - start, str(run_dir))


def _report(exp: Experiment, trials: list[Trial]) -> list[str]:
    lines = [exp.title, f"  solved = {exp.solved}", "",
             f"  {'model':<6} {'seed':>4} {'solved':>6} {'sequences':>10} {'test ' + trials[0].metric:>14} {'time':>7}"]
    for t in trials:
        lines.append(f"  {t.model:<6} {t.seed:>4} {'yes' if t.solved else 'no':>6} {t.sequences:>10,} "
                     f"{t.test:>14.4g} {t.seconds:>6.1f}s")
    lines.append("")
    for model in ("lstm", "rnn"):
        mine = [t for t in trials if t.model == model]
        if not mine:
            continue
        ok = [t.sequences for t in mine if t.solved]
        med = f", median {statistics.median(ok):,.0f} sequences to the criterion (range {min(ok):,}-{max(ok):,})" \
            if ok else f" within {max(t.sequences for t in mine):,} sequences each"
        lines.append(f"  {model.upper():<5} lstmkit: {len(ok)}/{len(mine)} trials solved{med}.")
        lines.append(f"        published: {exp.published[model]}.")
    return lines + [""]


def main(seeds: int = 3, jobs: int = 2, out: Path | None = None, experiments: tuple[str, ...] = ("reber", "adding"),
         progress: bool = True) -> list[Trial]:
    """Run ``seeds`` LSTM and ``seeds`` RNN trials of each experiment on ``jobs`` processes;
    print the results next to the published ones and where the run directories are."""
    out = Path(out) if out is not None else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    unknown = [k for k in experiments if k not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"experiments: unknown {unknown}; expected names from {list(EXPERIMENTS)}")
    print(f"The constant error carousel: LSTM against the plain tanh RNN, {seeds} seed(s) each, {jobs} "
          f"process(es) of one thread. Every trial is the task's own recipe (lstmkit train TASK), stopped when "
          f"its validation split meets the criterion; the test split is read once, at the end. Runs in {out}/.",
          flush=True)
    work = [(key, model, seed) for key in reversed(experiments) for seed in range(seeds) for model in ("lstm", "rnn")]
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(counter,)) as pool:
        futures = [pool.submit(run_trial, key, model, seed, str(out / f"{key}-{model}-s{seed}"), None, progress)
                   for key, model, seed in work]
        trials = [f.result() for f in futures]
    print("\n" * jobs)
    for key in experiments:
        mine = sorted((t for t in trials if t.experiment == key), key=lambda t: (t.model, t.seed))
        print("\n".join(_report(EXPERIMENTS[key], mine)))
    print(f"{time.perf_counter() - start:.0f} s in all. Each trial's run directory holds its metrics, checkpoint "
          f"and summary; a report of one, with pictures: lstmkit report {out / 'adding-lstm-s0'} (or "
          f"lstmkit report {out}: one report per run).")
    return trials
