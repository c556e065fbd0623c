"""Training: any lstmkit model on any built-in task, reproducible and resumable.

The loop knows nothing of the command line or of any particular task: a task supplies
batches, a loss and metrics (:mod:`lstmkit.tasks.base`); this module supplies the model,
optimiser, learning-rate schedule, gradient clipping, truncated BPTT with the state
carried across chunks of a stream, evaluation, early stopping on the task's published
criterion, JSON-lines metrics, and checkpoints.

A run directory holds::

    config.json               the run's configuration (written once, atomically)
    checkpoint.safetensors    model + optimiser + RNG + carried state; trainer state
                              and config in its JSON metadata (one file, replaced atomically)
    metrics.jsonl             one JSON object per evaluation
    summary.json              the final result, against the target and the baselines
    model.safetensors         the final weights alone

Loading never executes code from a file: safetensors and JSON only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstmkit._atomic import atomic_path, write_text
from lstmkit.nn import LSTM, RNN
from lstmkit.spec import resolve
from lstmkit.tasks.base import Batch, Task, get_task

__all__ = ["TrainConfig", "SequenceModel", "Trainer", "train", "load_checkpoint", "evaluate",
           "CheckpointError", "FORMAT"]

#: Identifies lstmkit checkpoints (metadata key "format").
FORMAT = "lstmkit-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, foreign or incompatible."""


@dataclass
class TrainConfig:
    """Everything that defines a run. Same config and seed → same loss curve."""

    task: str
    task_options: dict[str, Any] = field(default_factory=dict)
    model: str = "lstm"                 # "lstm" or "rnn"
    cell: str = "vanilla"               # any lstmkit variant (ignored for "rnn")
    hidden_size: int = 64
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    proj_size: int = 0
    optimizer: str = "adam"             # "adam" or "sgd"
    lr: float = 1e-3
    momentum: float = 0.9               # sgd only
    weight_decay: float = 0.0
    clip: float | None = 1.0            # max gradient norm; None = no clipping
    schedule: str = "constant"          # "constant", "cosine" or "step" (×0.1 at 50 % and 75 %)
    warmup: int = 0                     # linear warm-up steps
    batch_size: int = 32
    steps: int = 1000
    eval_every: int = 100
    eval_batch_size: int = 256
    patience: int | None = None         # evaluations without improvement before stopping
    eval_split: str = "test"            # split evaluated during training (target, patience, metrics log)
    stop_at_target: bool = True         # stop once the task's success criterion is met
    seed: int = 0
    backend: str | None = None
    threads: int | None = None

    def validate(self) -> None:
        """Raise ValueError with a clear message for impossible settings."""
        def positive(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        for name in ("hidden_size", "num_layers", "batch_size", "steps", "eval_every",
                     "eval_batch_size"):
            positive(name)
        if self.model not in ("lstm", "rnn"):
            raise ValueError(f"model: expected 'lstm' or 'rnn', got {self.model!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"schedule: expected 'constant', 'cosine' or 'step', got {self.schedule!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip: expected a number > 0 or None, got {self.clip!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        if self.proj_size < 0 or (self.proj_size and self.proj_size >= self.hidden_size):
            raise ValueError(f"proj_size: expected 0 <= proj_size < hidden_size ({self.hidden_size}), "
                             f"got {self.proj_size}")
        if self.warmup < 0:
            raise ValueError(f"warmup: expected an int >= 0, got {self.warmup}")
        if self.eval_split not in ("train", "valid", "test"):
            raise ValueError(f"eval_split: expected 'train', 'valid' or 'test', got {self.eval_split!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience: expected an int >= 1 or None, got {self.patience}")
        if self.model == "lstm":
            resolve(self.cell)  # raises with the reason for an unknown or impossible variant

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, refusing unknown keys (a foreign or newer config)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"config: unknown keys {unknown}; not an lstmkit training config")
        return cls(**d)


class SequenceModel(nn.Module):
    """A recurrent stack (lstmkit LSTM or RNN) and a linear read-out per time step.

    Shapes: x (T, B, input_size) -> output (T, B, output_size); state as the layer's.
    """

    def __init__(self, cfg: TrainConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        kw = dict(num_layers=cfg.num_layers, dropout=cfg.dropout, bidirectional=cfg.bidirectional)
        if cfg.model == "lstm":
            self.rnn: LSTM | RNN = LSTM(input_size, cfg.hidden_size, proj_size=cfg.proj_size,
                                        cell=cfg.cell, backend=cfg.backend, **kw)
        else:
            self.rnn = RNN(input_size, cfg.hidden_size, backend=cfg.backend, **kw)
        self.head = nn.Linear(self.rnn.output_size * self.rnn.num_directions, output_size)

    def forward(self, x: Tensor, state: Any = None, lengths: Tensor | None = None) -> tuple[Tensor, Any]:
        """Run the stack; ``lengths`` (B,) packs the batch so padding never enters the state."""
        if lengths is not None and bool((lengths < x.shape[0]).any()):
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            y, state = self.rnn(packed, state)
            y, _ = pad_packed_sequence(y, total_length=x.shape[0])
        else:
            y, state = self.rnn(x, state)
        return self.head(y), state


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


def _atomic_save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[TrainConfig, dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint: (config, tensors, trainer state). Never executes code.

    Accepts the checkpoint file or its run directory.

    Raises:
        CheckpointError: missing, unreadable, corrupt or foreign file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.safetensors"
    if not p.is_file():
        raise CheckpointError(f"checkpoint: no file at {p}")
    try:
        tensors = load_file(str(p))
        from safetensors import safe_open
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: {p} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint: {p} is not an lstmkit checkpoint (format {meta.get('format')!r}, "
            f"expected {FORMAT!r})")
    try:
        cfg = TrainConfig.from_dict(json.loads(meta["config"]))
        state = json.loads(meta["trainer"])
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint: {p} has damaged metadata ({exc})") from None
    return cfg, tensors, state


class Trainer:
    """One training run of ``cfg`` in ``run_dir``.

    Args:
        cfg: the run's configuration.
        run_dir: where config, metrics, checkpoints and the summary go.
        resume: continue from ``run_dir``'s checkpoint (its config must match ``cfg``
            except for ``steps``).
        progress: show a progress bar (rank 0 only).
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike[str], resume: bool = False,
                 progress: bool = True) -> None:
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world = _distributed()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size: {cfg.batch_size} is not divisible by the {self.world} "
                             f"processes; use a multiple of {self.world}")
        self.progress = progress and self.rank == 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.task: Task = get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
        if self.task.stream and cfg.bidirectional:
            raise ValueError(f"bidirectional: task {cfg.task!r} is a stream predicted left to "
                             f"right; a backward direction would read the future")
        self._prepare_dir(resume)
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
        if resume:
            self._load()
        self._batches = self._batch_iter()

    # ------------------------------------------------------------------ files

    def _prepare_dir(self, resume: bool) -> None:
        ckpt = self.run_dir / "checkpoint.safetensors"
        if self.rank != 0:
            return
        if resume:
            if not ckpt.is_file():
                raise CheckpointError(f"--resume: no checkpoint in {self.run_dir}")
            return
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise FileExistsError(
                f"output directory {self.run_dir} is not empty; nothing was overwritten "
                f"(use --resume to continue that run, or choose another directory)")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"output directory {self.run_dir}: cannot write there ({exc.strerror})") from None
        write_text(self.run_dir / "config.json", json.dumps(asdict(self.cfg), indent=1))

    def _tensors(self) -> dict[str, Tensor]:
        t = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for idx, st in self.opt.state_dict()["state"].items():
            for key, v in st.items():
                t[f"optim.{idx}.{key}"] = v if isinstance(v, Tensor) else torch.tensor(v)
        t["rng.torch"] = torch.get_rng_state()  # dropout masks
        if self.state is not None:
            for i, s in enumerate(self.state if isinstance(self.state, tuple) else (self.state,)):
                t[f"carry.{i}"] = s
        return t

    def save(self) -> None:
        """Write the checkpoint (rank 0), replacing the previous one atomically."""
        if self.rank != 0:
            return
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.state_dict()["param_groups"]]
        trainer = {"step": self.step, "best": self.best, "bad_evals": self.bad_evals,
                   "elapsed": self.elapsed, "param_groups": groups, "history": self.history,
                   "stopped": self.stopped}
        meta = {"format": FORMAT, "config": json.dumps(asdict(self.cfg)), "trainer": json.dumps(trainer)}
        _atomic_save_tensors(self.run_dir / "checkpoint.safetensors", self._tensors(), meta)

    def _load(self) -> None:
        cfg, tensors, st = load_checkpoint(self.run_dir)
        mine, theirs = asdict(self.cfg), asdict(cfg)
        mine.pop("steps")
        theirs.pop("steps")
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise CheckpointError(f"--resume: the checkpoint in {self.run_dir} was trained with other "
                                  f"settings ({', '.join(diff)}); resume with the same settings")
        try:
            model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
            self.model.load_state_dict(model)
            opt_state: dict[int, dict[str, Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith("optim."):
                    _, idx, key = k.split(".", 2)
                    opt_state.setdefault(int(idx), {})[key] = v
            groups = self.opt.state_dict()["param_groups"]
            for g, saved in zip(groups, st["param_groups"]):
                g.update(saved)
            self.opt.load_state_dict({"state": opt_state, "param_groups": groups})
            torch.set_rng_state(tensors["rng.torch"])
            carry = [tensors[f"carry.{i}"] for i in range(2) if f"carry.{i}" in tensors]
            self.state = None if not carry else (carry[0] if len(carry) == 1 else tuple(carry))
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"--resume: checkpoint in {self.run_dir} does not fit this model ({exc})") from None
        self.step, self.best, self.bad_evals = st["step"], st["best"], st["bad_evals"]
        self.elapsed, self.history, self.stopped = st["elapsed"], st["history"], st.get("stopped", "")

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
        goal = self.task.target.goal
        better = self.best is None or (value > self.best if goal == "max" else value < self.best)
        if better:
            self.best = value
        return better

    def run(self) -> dict[str, Any]:
        """Train until ``steps``, the target or early stopping; returns the summary."""
        from tqdm import tqdm
        cfg, target = self.cfg, self.task.target
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, mininterval=0.5)
        start = time.perf_counter() - self.elapsed
        window: list[float] = []
        try:
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
                        with open(self.run_dir / "metrics.jsonl", "a") as fh:
                            fh.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}", **{target.metric: f"{value:.4g}"})
                    if self._improved(value):
                        self.bad_evals = 0
                    else:
                        self.bad_evals += 1
                    if cfg.stop_at_target and target.met(value):
                        self.stopped = f"target met at step {self.step}"
                    elif cfg.patience and self.bad_evals >= cfg.patience:
                        self.stopped = f"no improvement in {cfg.patience} evaluations"
                    self.save()
        finally:
            bar.close()
        self.elapsed = time.perf_counter() - start
        summary = self.summary()
        if self.rank == 0:
            write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                      str(self.run_dir / "model.safetensors"),
                      metadata={"format": "lstmkit-weights-1", "config": json.dumps(asdict(cfg))})
        return summary

    def summary(self) -> dict[str, Any]:
        """Task, variant, size, steps, time, final metrics against target and baselines."""
        target = self.task.target
        final = self.history[-1] if self.history else {}
        value = final.get(f"{self.cfg.eval_split}_{target.metric}")
        return {
            "task": self.cfg.task, "task_options": self.cfg.task_options,
            "model": self.cfg.model, "cell": resolve(self.cfg.cell).name if self.cfg.model == "lstm" else "rnn",
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "steps": self.step, "sequences": self.step * self.cfg.batch_size,
            "wall_time_s": round(self.elapsed, 2), "stopped": self.stopped or "step budget reached",
            "metric": target.metric, "split": self.cfg.eval_split, "value": value,
            "target": {"goal": target.goal, "threshold": target.threshold, "published": target.published,
                       "met": value is not None and target.met(value)},
            "baselines": self.task.baselines, "data": self.task.describe_data(),
            "final": final,
        }


@torch.no_grad()
def evaluate(model: SequenceModel, task: Task, split: str = "test", batch_size: int = 256) -> dict[str, float]:
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
