"""The one interface every built-in task implements (the registry of built-in tasks is
:mod:`lstmkit.app.tasks.registry`).

A task owns its data (generated, or read from files already on the machine), its loss,
its metrics, the published success criterion and its baselines. The trainer
(:mod:`lstmkit.app.train`) knows nothing about any particular task.

Two shapes of task exist:

* **sequence tasks** (``stream = False``): independent sequences; the recurrent state
  starts at zero for every batch;
* **stream tasks** (``stream = True``): ``batch_size`` long parallel streams cut into
  chunks of ``bptt`` steps; the trainer carries the state from one chunk to the next
  (truncated BPTT) and resets it only where the task says so.

Everything is time-major, as ``torch.nn.LSTM``'s default: inputs ``(T, B, input_size)``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Batch", "Target", "Task", "metric_goal", "check_batch_size", "check_positive", "check_split",
           "check_values", "EVAL_BATCH_SIZE", "MAX_LENGTH", "MAX_VALUES", "SPLITS"]


#: Sane upper bounds of a task's sizes, checked when the task is made (before any data is):
#: time steps of a sequence or chunk, and values one set of data (an evaluation split, a
#: batch of streams) holds (2**28 float32 = 1 GiB).
MAX_LENGTH = 100_000
MAX_VALUES = 2**28

#: The splits of a task's data, each a fixed set a run evaluates on (a generated task draws
#: each from its distribution with a seed of its own; its "train" is a fixed sample of the
#: training distribution, for training-set metrics without touching the training draws).
SPLITS: tuple[str, ...] = ("test", "valid", "train")

#: Sequences per batch when a task's split is evaluated.
EVAL_BATCH_SIZE = 256


def check_split(task: str, split: str, splits: tuple[str, ...]) -> None:
    """Raise ValueError if ``split`` is not one of ``splits``."""
    if split not in splits:
        raise ValueError(f"task {task!r}: unknown split {split!r}; expected one of {list(splits)}")


def check_batch_size(task: str, batch_size: int) -> None:
    """Raise ValueError unless ``batch_size`` is a positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"task {task!r}: batch_size must be a positive int, got {batch_size!r}")


def check_positive(task: str, maximum: int = MAX_VALUES, **options: object) -> None:
    """Raise ValueError unless every option is a positive int of at most ``maximum``."""
    for key, v in options.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"task {task!r}: {key} must be a positive int, got {v!r}")
        if v > maximum:
            raise ValueError(f"task {task!r}: {key} must be at most {maximum:,} (a sane bound), got {v:,}")


def check_values(task: str, what: str, values: int) -> None:
    """Raise ValueError if one set of the task's data would hold more than :data:`MAX_VALUES`."""
    if values > MAX_VALUES:
        raise ValueError(f"task {task!r}: {what} would hold {values:,} values, more than the bound of "
                         f"{MAX_VALUES:,} (1 GiB of float32); use smaller options")



@dataclass
class Batch:
    """One batch of a task.

    Attributes:
        x: (T, B, input_size) inputs.
        y: targets, in whatever form the task's ``loss``/``metrics`` expect.
        lengths: (B,) int64 valid lengths (CPU), or None when all are T.
        reset: stream tasks only: (B,) bool, True where a stream starts afresh at this
            chunk (the trainer zeroes that entry's state first); None = carry all.
        y_batch_dim: the dimension of ``y`` that indexes sequences (1 for time-major
            targets (T, B, ·), 0 for one target per sequence (B, ·)).
    """

    x: Tensor
    y: Tensor
    lengths: Tensor | None = None
    reset: Tensor | None = None
    y_batch_dim: int = 1

    @property
    def size(self) -> int:
        """Number of sequences (or streams) in the batch."""
        return self.x.shape[1]

    def take(self, start: int, stop: int) -> Batch:
        """Sequences ``start:stop`` of the batch (for splitting a global batch over ranks)."""
        sl = slice(start, stop)
        return Batch(self.x[:, sl], self.y.narrow(self.y_batch_dim, start, stop - start),
                     None if self.lengths is None else self.lengths[sl],
                     None if self.reset is None else self.reset[sl], self.y_batch_dim)


#: Which way each kind of metric improves, by the end of its name: the fractions right (``accuracy``,
#: ``solved``, …) up, the errors and losses down.
_HIGHER_IS_BETTER = ("accuracy", "solved", "perfect_steps", "generalization")
_LOWER_IS_BETTER = ("loss", "mse", "rmse", "xent", "nll", "bpc", "error")


def check_metric_name(metric: Any) -> None:
    """Refuse a chosen metric that names nothing (``--metric ''``: the default was taken silently);
    None (no choice) passes."""
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise ValueError(f"metric: expected a metric's name, got {metric!r}")


def metric_goal(name: str) -> str | None:
    """``"max"`` if a larger value of metric ``name`` is better, ``"min"`` if a smaller one, None
    where its name does not say."""
    if name.endswith(_HIGHER_IS_BETTER):
        return "max"
    if name.endswith(_LOWER_IS_BETTER):
        return "min"
    return None


@dataclass(frozen=True)
class Target:
    """A task's published success criterion.

    Attributes:
        metric: the metrics key it reads (e.g. ``"solved"``, ``"mse"``, ``"bpc"``).
        goal: ``"max"`` if larger is better, ``"min"`` if smaller is better.
        threshold: the value that counts as solved (None: no published threshold).
        published: the published result, in words, with its source.
    """

    metric: str
    goal: str
    threshold: float | None
    published: str

    def __post_init__(self) -> None:
        if self.goal not in ("max", "min") or metric_goal(self.metric) not in (None, self.goal):
            raise ValueError(f"Target: goal {self.goal!r} of metric {self.metric!r} contradicts the direction its "
                             f"name gives (metric_goal: {metric_goal(self.metric)!r})")

    def met(self, value: float) -> bool:
        """True when ``value`` reaches the threshold."""
        if self.threshold is None:
            return False
        return value >= self.threshold if self.goal == "max" else value <= self.threshold


class Task(ABC):
    """A built-in task. Subclasses are dataclasses whose fields are the task's options
    (always including ``seed``, which seeds every random draw of the task's data).

    Class attributes:
        name: registry key (``lstmkit train NAME``).
        input_size, output_size: feature sizes of ``x`` and of the model's output (a
            subclass whose sizes depend on its options sets them in ``__post_init__``).
        stream: True for stream tasks (state carried across chunks).
    """

    name: ClassVar[str] = ""
    input_size: int = 0
    output_size: int = 0
    stream: ClassVar[bool] = False
    seed: int

    @classmethod
    def recipe(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The training settings this task recommends with ``options`` (the task options
        given, before their defaults): ``TrainConfig`` field values, measured to meet the
        task's criterion (each subclass documents its measurements; docs/results.md has the
        seeds). :meth:`TrainConfig.for_task` applies them between the fields' defaults and
        the settings given explicitly. The default: no recommendation.
        """
        return {}

    @classmethod
    def training_problem(cls, options: Mapping[str, Any]) -> str | None:
        """Why a new run should not train on ``options`` (valid options that make the task
        measure nothing, e.g. a training range that reaches the criterion), or None. Asked
        only when a run starts (:func:`lstmkit.app.config.check_new_run`): a saved run with such
        options still reads. The default: none."""
        return None

    @classmethod
    def option(cls, options: Mapping[str, Any], name: str) -> Any:
        """The value of task option ``name`` in ``options``, else the class's default."""
        if name in options:
            return options[name]
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name == name and f.default is not dataclasses.MISSING:
                return f.default
        raise KeyError(f"task {cls.name!r} has no option {name!r} with a default")

    @property
    @abstractmethod
    def target(self) -> Target:
        """The published success criterion."""

    @property
    def baselines(self) -> dict[str, float]:
        """Baseline values of the target metric, by name."""
        return {}

    @property
    def baseline_notes(self) -> dict[str, str]:
        """What each baseline of :attr:`baselines` is, in one sentence, by name."""
        return {}

    def describe_data(self) -> dict[str, object]:
        """Facts to record with a run (sizes, file lists and hashes of corpora, …)."""
        return {}

    def marked_steps(self, x: Tensor) -> list[tuple[int, str]]:
        """The steps of one input sequence ``x`` (T, input_size) that carry what must be
        remembered, as ``(step, label)`` (the adding problem's two flagged values; none by
        default). Pictures of gates and cells mark them."""
        return []

    @abstractmethod
    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """An endless (or epoch-long, then restarted) iterator of training batches.

        ``generator`` is the trainer's; all randomness must come from it (or from
        ``self.seed``) so that a run is reproducible and resumable.
        """

    @abstractmethod
    def eval_batches(self, split: str = "test", batch_size: int = EVAL_BATCH_SIZE) -> Iterator[Batch]:
        """The fixed evaluation set of ``split`` (``"test"``, ``"valid"``, ``"train"``)."""

    @abstractmethod
    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        """Scalar training loss from the model's output (T, B, output_size)."""

    @abstractmethod
    def metrics(self, output: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        """Per-batch metric *sums and counts*: ``{name: (sum, count)}``.

        The trainer adds them over batches and reports ``sum / count``, so a metric is
        exact over an evaluation set of many batches.
        """

    def show(self, output: Tensor, batch: Batch, n: int = 3) -> str:
        """A few predictions next to their targets, as text (``lstmkit sample``)."""
        return ""
