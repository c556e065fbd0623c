"""Training: any lstmkit model on any built-in task, reproducible and resumable.

The loop knows nothing of the command line or of any particular task: a task supplies
batches, a loss and metrics (:mod:`lstmkit.app.tasks.base`); this module supplies the model,
optimiser, learning-rate schedule, gradient clipping, truncated BPTT with the state
carried across chunks of a stream, evaluation, early stopping on the task's published
criterion and the checkpoints' contents. The run directory — config, metrics,
checkpoints, summary and final model — is read and written by :mod:`lstmkit.app.runs`.

Evaluation during training reads the *validation* split (``eval_split``): it decides when
to stop (the target met, or ``patience`` evaluations without improvement) and which
weights are kept (those of the best evaluation: model selection; the checkpoint carries
them, so a resumed run selects the same). The test split is evaluated once, at the end,
on the kept weights; the summary reports both, and the final ``model.safetensors`` holds
the kept weights.

Everything is checked before anything is created: the config (:meth:`TrainConfig.validate`),
the task and its options, the model's size and a batch's activations against sane
bounds, that the chosen kernel runs the variant, and the run directory; a checkpoint to
resume from is validated against the model before it is read. A failed start leaves no
file behind, and a run killed before its first checkpoint starts afresh with the same
command.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lstmkit import _atomic
from lstmkit.app import runs
from lstmkit.app.config import MAX_ACTIVATIONS, TrainConfig
from lstmkit.app.model import SequenceModel, parameter_count
from lstmkit.app.runs import CheckpointError
from lstmkit.app.tasks.base import EVAL_BATCH_SIZE, Batch, Task
from lstmkit.app.tasks.registry import get_task

__all__ = ["TrainConfig", "SequenceModel", "Trainer", "train", "evaluate", "load_checkpoint", "CheckpointError",
           "FORMAT", "process_rank", "environment"]

#: Identifies lstmkit checkpoints (metadata key "format"); see :mod:`lstmkit.app.runs`.
FORMAT = runs.FORMAT

T = TypeVar("T")


def process_rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise): only rank 0 prints and writes."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[TrainConfig, dict[str, Tensor], dict[str, Any]]:
    """Read and validate a checkpoint: (config, tensors, trainer state). Never executes code.

    Accepts the checkpoint file or its run directory (see :func:`lstmkit.app.runs.read_checkpoint`).

    Raises:
        CheckpointError: missing, unreadable, corrupt, foreign or inconsistent file.
    """
    ck = runs.read_checkpoint(path)
    return ck.config, ck.tensors, ck.state


def environment() -> dict[str, Any]:
    """Versions, machine and date of this process: what a result was measured with."""
    import datetime
    import platform

    import lstmkit
    from lstmkit.kernels.machine import cpu_model

    return {"lstmkit": lstmkit.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": cpu_model(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    if cfg.schedule == "step":
        return 0.01 if step >= 0.75 * cfg.steps else 0.1 if step >= 0.5 * cfg.steps else 1.0
    return 1.0


def _detach(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return tuple(s.detach() for s in state)


def _reset_state(state: Any, reset: Tensor | None) -> Any:
    """Zero the carried state of the streams that start afresh at this chunk."""
    if state is None or reset is None or not bool(reset.any()):
        return state
    keep = (~reset).to(state[0].dtype if isinstance(state, tuple) else state.dtype).view(1, -1, 1)
    return state * keep if isinstance(state, Tensor) else tuple(s * keep for s in state)


def _distributed() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when torchrun started us, else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_same_settings(cfg: TrainConfig, checkpoint: runs.Checkpoint, run_dir: Path) -> None:
    """A resumed run is given the checkpoint's settings again, but for a budget of steps that may
    grow (not below the steps already trained: those would be recorded as the run's budget)."""
    mine, other = asdict(cfg), asdict(checkpoint.config)
    mine.pop("steps")
    other.pop("steps")
    if mine != other:
        diff = "; ".join(f"{k}: {other.get(k)!r} there, {mine[k]!r} now" for k in sorted(mine)
                         if mine[k] != other.get(k))
        raise CheckpointError(f"--resume: the checkpoint in {run_dir} was trained with other "
                              f"settings ({diff}); resume with the same settings (the command that started it)")
    done = checkpoint.state["step"]
    if cfg.steps < done:
        raise CheckpointError(f"--steps {cfg.steps}: the checkpoint in {run_dir} is at step {done} already; "
                              f"resume with --steps {done} or more (nothing was changed)")


def _check_budget(cfg: TrainConfig, task: Task) -> str:
    """Sizes against sane bounds, and the kernel against the variant, before anything is
    allocated: the model's parameters (counted on the meta device), the values a batch
    keeps for backward (from the length of the task's sequences or chunks), and whether
    the forced ``backend`` runs this variant (which builds the fused kernel on first use).
    Returns the name of the kernel the model will run on."""
    parameter_count(cfg, task.input_size, task.output_size)
    try:
        first = next(iter(task.eval_batches(cfg.eval_split, 1)))
    except StopIteration:
        raise ValueError(f"eval_split: task {cfg.task!r} has no {cfg.eval_split!r} sequences") from None
    T = first.x.shape[0]
    rows = 4 * cfg.hidden_size if cfg.model == "lstm" else cfg.hidden_size
    per_step = task.input_size + cfg.num_layers * (2 if cfg.bidirectional else 1) * (rows + 3 * cfg.hidden_size)
    batch = max(cfg.batch_size, cfg.eval_batch_size)
    if batch * T * per_step > MAX_ACTIVATIONS:
        raise ValueError(f"batch_size, hidden_size: a batch of {batch} sequences of {T} steps keeps about "
                         f"{batch * T * per_step * 4 / 2**30:.0f} GiB of activations, more than the bound of "
                         f"{MAX_ACTIVATIONS * 4 / 2**30:.0f} GiB; use a smaller batch, model or task length")
    from lstmkit import kernels
    return kernels.select(cfg.spec, torch.device("cpu"), torch.float32, cfg.backend).name  # a first build says so


class Trainer:
    """One training run of ``cfg`` in ``run_dir``.

    Args:
        cfg: the run's configuration.
        run_dir: where config, metrics, checkpoints and the summary go.
        resume: continue from ``run_dir``'s checkpoint (its config must match ``cfg``
            except for ``steps``); a run directory without a checkpoint yet (killed
            before its first one) starts afresh.
        progress: show a progress bar (rank 0 only).
        label: the progress bar's name (default ``TASK MODEL sSEED``, e.g. ``adding fb=5 s0``).
        position: the bar's line, counted from the cursor (several runs side by side).

    Raises:
        ValueError (CheckpointError, FileExistsError): before anything is created, for
            any bad setting, an impossible size, an unusable run directory or checkpoint.
        InUseError (a ValueError): another run is training in ``run_dir``; the run holds
            the directory's lock (:func:`lstmkit.app.runs.lock`) until :meth:`run` ends.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike[str], resume: bool = False,
                 progress: bool = True, label: str | None = None, position: int | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world = _distributed()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size: {cfg.batch_size} is not divisible by the {self.world} "
                             f"processes; use a multiple of {self.world}")
        self.progress = progress and self.rank == 0
        self.label = label if label is not None else f"{cfg.task} {cfg.cell_name} s{cfg.seed}"
        self.position = position
        # touches nothing yet; only rank 0 locks the directory (start()), the other ranks must not probe it
        self.resumed = runs.plan(self.run_dir, resume, check_in_use=self.rank == 0)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # a checkpoint that cannot be continued with these settings: refused before the task's data
        # are made and a kernel is chosen (which may build it)
        checkpoint = runs.read_checkpoint(self.run_dir, world=self.world) if self.resumed else None
        if checkpoint is not None:
            _check_same_settings(cfg, checkpoint, self.run_dir)
        self.task: Task = get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
        if self.task.stream and cfg.bidirectional:
            raise ValueError(f"bidirectional: task {cfg.task!r} is a stream predicted left to "
                             f"right; a backward direction would read the future")
        self.kernel = _check_budget(cfg, self.task)
        torch.manual_seed(cfg.seed)
        self.model = SequenceModel(cfg, self.task.input_size, self.task.output_size)
        self.ddp: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(self.model)
        params = list(self.model.parameters())
        if cfg.optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr,
                                                                weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)
        self.step = 0
        self.best: float | None = None
        self.bad_evals = 0
        self.state: Any = None  # carried stream state (stream tasks)
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self.stopped = ""
        self.best_step: int | None = None  # the evaluation whose weights are kept (model selection)
        self.best_weights: dict[str, Tensor] | None = None  # its weights
        self.test_metrics: dict[str, float] | None = None  # the one test-split evaluation, at the end
        if checkpoint is not None:
            self.state = self._local_state(runs.restore(checkpoint, self.model, self.opt))
            st = checkpoint.state
            self.step, self.best, self.bad_evals = st["step"], st["best"], st["bad_evals"]
            self.elapsed, self.history, self.stopped = st["elapsed"], st["history"], st.get("stopped", "")
            self.best_step = st.get("best_step")
            self.best_weights = runs.selected_weights(checkpoint)
        self._lock: runs.RunLock | None = None  # the run directory's, held from here to the end of run()
        if self.rank == 0:
            self._lock = runs.start(self.run_dir, cfg, self.resumed, self.history, checkpoint=checkpoint)
            if resume and not self.resumed:
                print(f"lstmkit: {self.run_dir} has no checkpoint yet (the run stopped before its first one); "
                      f"starting it afresh", file=sys.stderr)
        self._batches = self._batch_iter()

    # ------------------------------------------------------------------ files

    def save(self) -> None:
        """Write the checkpoint (rank 0), replacing the previous one atomically; every rank takes
        part (a stream's carried state is gathered: each process carries its share of the streams)."""
        carry = self._gathered_state()
        if self.rank != 0:
            return
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.state_dict()["param_groups"]]
        trainer = {"step": self.step, "best": self.best, "bad_evals": self.bad_evals,
                   "elapsed": self.elapsed, "param_groups": groups, "history": self.history,
                   "stopped": self.stopped, "best_step": self.best_step}
        runs.write_checkpoint(self.run_dir, self.cfg, runs.checkpoint_tensors(self.model, self.opt, carry,
                                                                              selected=self.best_weights), trainer)

    def _gathered_state(self) -> Any:
        """The carried stream state of every stream, (L·D, batch_size, ·) each: this process's alone,
        or every process's share side by side in rank order (as :meth:`_local` splits a batch)."""
        if self.state is None or self.world == 1:
            return self.state
        import torch.distributed as dist

        def gather(t: Tensor) -> Tensor:
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t.detach().contiguous())
            return torch.cat(parts, dim=1)  # (L·D, batch_size, ·)

        return tuple(map(gather, self.state)) if isinstance(self.state, tuple) else gather(self.state)

    def _local_state(self, state: Any) -> Any:
        """This process's share of a gathered carried state (the inverse of :meth:`_gathered_state`)."""
        if state is None or self.world == 1:
            return state
        n = self.cfg.batch_size // self.world

        def share(t: Tensor) -> Tensor:
            return t[:, self.rank * n:(self.rank + 1) * n].clone()
        return tuple(map(share, state)) if isinstance(state, tuple) else share(state)

    # ------------------------------------------------------------------ loop

    def _batch_iter(self) -> Iterator[Batch]:
        """Training batches from the seed. On resume the draws of the finished steps are
        replayed (data only, no model work), so the task's iterator — an epoch's order, a
        stream's position — is exactly where an uninterrupted run would have it."""
        generator = torch.Generator().manual_seed(self.cfg.seed)

        def endless() -> Iterator[Batch]:
            while True:
                yield from self.task.train_batches(self.cfg.batch_size, generator)

        it = endless()
        for _ in range(self.step):
            next(it)
        return it

    def _local(self, batch: Batch) -> Batch:
        if self.world == 1:
            return batch
        n = batch.size // self.world
        return batch.take(self.rank * n, (self.rank + 1) * n)

    def train_step(self) -> float:
        """One optimiser step; returns the training loss."""
        self.model.train()
        batch = self._local(next(self._batches))
        if self.task.stream:
            self.state = _reset_state(self.state, batch.reset)
        lr = self.cfg.lr * _lr_factor(self.cfg, self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        out, state = self.ddp(batch.x, self.state if self.task.stream else None, batch.lengths)
        loss = self.task.loss(out, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss is {loss.item()} at step {self.step} "
                                     f"(try a smaller --lr or a --clip)")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        if self.task.stream:
            self.state = _detach(state)  # truncated BPTT: carry the value, not the graph
        self.step += 1
        return loss.item()

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Metrics of the current model on the task's fixed ``split``."""
        return evaluate(self.model, self.task, split, self.cfg.eval_batch_size)

    def _improved(self, value: float) -> bool:
        if value != value:  # NaN is never an improvement (nor a best to compare with)
            return False
        goal = self.task.target.goal
        better = self.best is None or (value > self.best if goal == "max" else value < self.best)
        if better:
            self.best = value
        return better

    def run(self) -> dict[str, Any]:
        """Train until ``steps``, the target or early stopping; returns the summary. The run
        directory's lock (:func:`lstmkit.app.runs.lock`) is released when it returns or raises."""
        try:
            return self._run()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _run(self) -> dict[str, Any]:
        from tqdm import tqdm
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, unit="step", desc=self.label,
                   position=self.position, leave=self.position is None,
                   dynamic_ncols=True, mininterval=0.5)
        start = time.perf_counter() - self.elapsed
        # Vanishing gradients on long lags become denormal floats (below ~1e-38), which x86 CPUs
        # compute up to 4x slower (adding, T = 500); during training they are flushed to zero.
        torch.set_flush_denormal(True)
        try:
            self._loop(bar, start)
        except _atomic.WriteError as exc:
            raise _atomic.WriteError(exc.errno, f"{exc}; once there is space, the same command with --resume "
                                                f"continues from the last checkpoint") from None
        finally:
            torch.set_flush_denormal(False)
            bar.close()
        self.elapsed = time.perf_counter() - start
        if self.best_weights is not None and self.best_step != self.step:
            self.model.load_state_dict(self.best_weights)  # model selection: the best evaluation's weights
        self.test_metrics = self.evaluate("test")  # the one look at the test split
        summary = self.summary()
        if self.rank == 0:
            try:
                runs.write_model(self.run_dir, cfg, self.model)
                runs.write_summary(self.run_dir, summary)
            except _atomic.WriteError as exc:
                raise _atomic.WriteError(exc.errno, f"{exc}; once there is space, the same command with --resume "
                                                    f"writes it") from None
        return summary

    def _loop(self, bar: Any, start: float) -> None:
        cfg, target = self.cfg, self.task.target
        window: list[float] = []
        while self.step < cfg.steps and not self.stopped:
            window.append(self.train_step())
            bar.update(1)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                metrics = self.evaluate(cfg.eval_split)
                value = metrics[target.metric]
                self.elapsed = time.perf_counter() - start
                record = {"step": self.step, "train_loss": sum(window) / len(window),
                          "lr": self.opt.param_groups[0]["lr"], "time": round(self.elapsed, 3),
                          **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items()}}
                window = []
                self.history.append(record)
                if self.rank == 0:
                    runs.append_metrics(self.run_dir, record)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", **{target.metric: f"{value:.4g}"})
                if self._improved(value):
                    self.bad_evals = 0
                    self.best_step = self.step
                    self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                else:
                    self.bad_evals += 1
                if cfg.stop_at_target and target.met(value):
                    self.stopped = f"target met at step {self.step}"
                elif cfg.patience and self.bad_evals >= cfg.patience:
                    self.stopped = f"no improvement in {cfg.patience} evaluations"
                self.save()

    def summary(self) -> dict[str, Any]:
        """The run's result: task, variant, size, steps, time; the evaluation that selected
        the kept weights (``split`` = ``eval_split``, ``value``, ``selected_step``;
        ``target.met``: that value meets the criterion; ``target.first_met_step``: the first
        evaluation that met it) and, under ``test``, the one test-split evaluation of the kept
        weights (``solved``: it meets the criterion), next to the baselines."""
        target, cfg = self.task.target, self.cfg
        key = f"{cfg.eval_split}_{target.metric}"
        final = self.history[-1] if self.history else {}
        selected = next((r for r in self.history if r["step"] == self.best_step), final)
        value = selected.get(key)
        first_met = next((r["step"] for r in self.history if r.get(key) is not None and target.met(r[key])), None)
        test = None if self.test_metrics is None else self.test_metrics.get(target.metric)
        solved = test is not None and target.met(test)
        return {
            "task": cfg.task, "task_options": cfg.task_options,
            "model": cfg.model, "cell": cfg.cell_name, "seed": cfg.seed,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "steps": self.step, "sequences": self.step * cfg.batch_size,
            "wall_time_s": round(self.elapsed, 2), "stopped": self.stopped or "step budget reached",
            "metric": target.metric, "split": cfg.eval_split, "value": value,
            "selected_step": selected.get("step"),
            "target": {"goal": target.goal, "threshold": target.threshold, "published": target.published,
                       "met": value is not None and target.met(value), "first_met_step": first_met,
                       "sequences_to_target": None if first_met is None else first_met * cfg.batch_size},
            "test": {"value": test, "met": solved, "metrics": self.test_metrics or {}},
            "solved": solved,
            "baselines": self.task.baselines, "data": self.task.describe_data(),
            "final": final, "environment": {**environment(), "kernel": self.kernel},
        }


@torch.no_grad()
def evaluate(model: SequenceModel, task: Task, split: str = "test",
             batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
    """Exact metrics over the task's fixed ``split`` (sums and counts added over batches)."""
    model.eval()
    sums: dict[str, list[float]] = {}
    state = None
    for batch in task.eval_batches(split, batch_size):
        if task.stream:
            state = _reset_state(state, batch.reset)
            out, state = model(batch.x, state, batch.lengths)
        else:
            out, _ = model(batch.x, None, batch.lengths)
        for k, (s, n) in task.metrics(out, batch).items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)
    return {k: s / n if n else float("nan") for k, (s, n) in sums.items()}


def train(cfg: TrainConfig, run_dir: str | os.PathLike[str], resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` (see :class:`Trainer`); returns the summary."""
    return Trainer(cfg, run_dir, resume=resume, progress=progress).run()
