"""What defines a training run: :class:`TrainConfig` and the model it describes.

Every setting is a field of :class:`TrainConfig` with its default, its bounds and its help
text in one place (the field's :class:`Option`); the command line (``lstmkit train``,
``lstmkit study``) derives its options from these fields, and :meth:`TrainConfig.validate`
checks every value against them — types, ranges and sane upper bounds — before anything
is created or allocated. A config read back from a file (``config.json``, a checkpoint's
metadata) goes through the same checks. The network it defines is :class:`lstmkit.app.model.SequenceModel`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lstmkit import variants
from lstmkit._suggest import did_you_mean
from lstmkit.app.tasks.base import EVAL_BATCH_SIZE, SPLITS
from lstmkit.spec import CellSpec, resolve

__all__ = ["TrainConfig", "Option", "option_of", "MAX_PARAMETERS",
           "MAX_ACTIVATIONS", "MAX_LR", "MAX_SEED", "MAX_JOBS", "TASK_FIELDS"]

#: Sane upper bounds: a config (typed, or read from a file) beyond them is refused before
#: anything is allocated. Parameters of the whole model (2**28 float32 = 1 GiB, 4 GiB with
#: Adam's state and the gradients).
MAX_PARAMETERS = 2**28
#: Values one training or evaluation batch keeps for the backward pass (inputs and the
#: per-step activations of every layer), 2**31 float32 = 8 GiB.
MAX_ACTIVATIONS = 2**31
#: Learning rate and weight decay: far beyond any that trains, and small enough that the
#: optimiser's float32 arithmetic cannot overflow (1e40 did, with a traceback).
MAX_LR = 1e4
#: Seeds are ints in [0, MAX_SEED]: torch.Generator's manual_seed takes 64 bits; these fit int64.
MAX_SEED = 2**63 - 1
#: Processes a study or the demo runs at once.
MAX_JOBS = 256
#: TrainConfig's fields that say what to train on rather than how: a task's recipe sets the
#: others, the command line takes these apart (--task, -o KEY=VALUE).
TASK_FIELDS: tuple[str, ...] = ("task", "task_options")


@dataclass(frozen=True)
class Option:
    """How one :class:`TrainConfig` field is checked and offered on the command line.

    Attributes:
        help: one line for ``--help``.
        kind: the value's type (``int``, ``float``, ``str``, ``bool``, ``dict``).
        lo, hi: inclusive bounds (``lo_open``/``hi_open``: exclusive).
        choices: the allowed values of a ``str`` field.
        optional: None is allowed (it means "off"; ``none_word`` names it on the command line).
        flags: the command-line spellings (default ``--field-name``).
    """

    help: str
    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    none_word: str = "none"
    flags: tuple[str, ...] = ()


def _f(default: Any, help: str, kind: type, **kw: Any) -> Any:
    meta = {"option": Option(help, kind, **kw)}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def option_of(f: dataclasses.Field[Any]) -> Option:
    """The :class:`Option` of a :class:`TrainConfig` field."""
    return f.metadata["option"]


def _check(name: str, value: Any, opt: Option) -> None:
    """Raise ValueError naming ``name``, what it expects and what it got."""
    if value is None:
        if opt.optional:
            return
        raise ValueError(f"{name}: expected a value, got None")
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return
    if opt.kind is str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}: expected a name, got {value!r}")
        if opt.choices and value not in opt.choices:
            raise ValueError(f"{name}: expected one of {list(opt.choices)}, got {value!r}"
                             f"{did_you_mean(value, opt.choices)}")
        return
    if opt.kind is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{name}: expected a mapping of option names to values, got {value!r}")
        return
    if opt.kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name}: expected an int, got {value!r}")
        what = "an int"
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        what = "a number"
    none = f" or {'None' if opt.none_word[:1].isdigit() else opt.none_word}" if opt.optional else ""
    if opt.lo is not None and (value <= opt.lo if opt.lo_open else value < opt.lo):
        raise ValueError(f"{name}: expected {what} {'>' if opt.lo_open else '>='} {opt.lo:g}{none}, got {value!r}")
    if opt.hi is not None and (value >= opt.hi if opt.hi_open else value > opt.hi):
        raise ValueError(f"{name}: expected {what} {'<' if opt.hi_open else '<='} {opt.hi:g}{none}, got {value!r}"
                         + ("" if opt.hi_open else " (a sane upper bound)"))


#: The plain RNNs a run's ``model`` can name besides ``"lstm"``: the variant table's words of the
#: RNN (``rnn``: tanh, ``rnn_relu``), which ``study --variants`` and ``plot gradflow --cells`` also take.
RNN_MODELS: tuple[str, ...] = tuple(r.word for r in variants.ROWS if r.sets.get("kind") == "rnn")


def model_and_cell(word: str) -> dict[str, str]:
    """The settings ``model`` and ``cell`` of a run of ``word``, a variant as ``study --variants``
    and ``plot gradflow --cells`` take it: a plain RNN's word is the model (its cell unused,
    vanilla), anything else an LSTM variant."""
    return {"model": word, "cell": "vanilla"} if word in RNN_MODELS else {"model": "lstm", "cell": word}


@dataclass
class TrainConfig:
    """Everything that defines a run. Same config and seed → same loss curve."""

    task: str = field(metadata={"option": Option("task name (see lstmkit tasks)", str)})
    task_options: dict[str, Any] = _f({}, "task options (-o KEY=VALUE; see lstmkit tasks TASK)", dict)
    model: str = _f("lstm", "recurrent layer: an lstmkit LSTM (its variant: --cell) or the plain RNN, rnn (tanh) "
                    "or rnn_relu", str, choices=("lstm", *RNN_MODELS))
    cell: str = _f("vanilla", "LSTM variant: a preset or names joined with '+', e.g. peephole, cifg+layernorm, "
                   "deep=16, and initial biases: fb=5 (forget gate), ib=-2, ob=-1, chrono=T (not for a plain RNN "
                   "model)", str)
    hidden_size: int = _f(64, "cells per layer and direction (H)", int, lo=1, hi=65536,
                          flags=("--hidden", "--hidden-size"))
    num_layers: int = _f(1, "stacked recurrent layers", int, lo=1, hi=1024, flags=("--layers", "--num-layers"))
    bidirectional: bool = _f(False, "a forward and a backward direction per layer", bool)
    dropout: float = _f(0.0, "dropout between stacked layers", float, lo=0, hi=1, hi_open=True)
    proj_size: int = _f(0, "LSTMP: project h_t to this size (0 = no projection; < hidden size)", int, lo=0,
                        hi=65535)
    optimizer: str = _f("adam", "optimiser", str, choices=("adam", "sgd"))
    lr: float = _f(1e-3, "learning rate", float, lo=0, lo_open=True, hi=MAX_LR)
    momentum: float = _f(0.9, "momentum (sgd only)", float, lo=0, hi=1, hi_open=True)
    weight_decay: float = _f(0.0, "L2 weight decay", float, lo=0, hi=MAX_LR)
    clip: float | None = _f(1.0, "max gradient norm (0 or none: no clipping)", float, lo=0, lo_open=True,
                            optional=True, none_word="0")
    schedule: str = _f("constant", "learning-rate schedule (step: x0.1 at half and at three quarters of the "
                       "steps)", str, choices=("constant", "cosine", "step"))
    warmup: int = _f(0, "linear learning-rate warm-up steps", int, lo=0, hi=10**9)
    batch_size: int = _f(32, "sequences (or streams) per training batch", int, lo=1, hi=2**20)
    steps: int = _f(1000, "optimiser steps", int, lo=1, hi=10**9)
    eval_every: int = _f(100, "evaluate (and checkpoint) every this many steps", int, lo=1, hi=10**9)
    eval_batch_size: int = _f(EVAL_BATCH_SIZE, "sequences per evaluation batch", int, lo=1, hi=2**20)
    patience: int | None = _f(None, "stop after this many evaluations without improvement (none: never)", int,
                              lo=1, hi=10**9, optional=True)
    eval_split: str = _f("valid", "split evaluated during training: stopping at the target, patience, the "
                         "choice of the weights kept, metrics.jsonl (the test split is evaluated once, at the "
                         "end, on the weights kept)", str, choices=SPLITS)
    stop_at_target: bool = _f(True, "stop once the task's published success criterion is met", bool)
    seed: int = _f(0, "seed of the initialisation and of the training data", int, lo=0, hi=MAX_SEED)
    backend: str | None = _f(None, "force a kernel, reference or cpu_fused (none: the fastest that runs the "
                             "variant)", str, optional=True)
    threads: int | None = _f(None, "torch threads (none: torch's choice)", int, lo=1, hi=4096, optional=True)

    def validate(self) -> None:
        """Raise ValueError naming the setting, what it expects and what it got, for any
        value of the wrong type, out of its bounds, or an impossible combination."""
        for f in dataclasses.fields(self):
            _check(f.name, getattr(self, f.name), option_of(f))
        if "seed" in self.task_options:
            raise ValueError(f"task_options: the seed is not a task option (the run's seed seeds the task's data "
                             f"and the model), got seed={self.task_options['seed']!r}")
        if self.proj_size and self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size: expected 0 <= proj_size < hidden_size ({self.hidden_size}), "
                             f"got {self.proj_size}")
        if self.model == "lstm":
            _check_cell(self.cell)
        elif self.proj_size:
            raise ValueError(f"proj_size: only the LSTM has a projection, not the plain RNN (--model {self.model})")
        if self.backend is not None:  # as the layer refuses it, here before any run
            from lstmkit.checks import check_backend  # (the registry; importing it builds nothing)

            check_backend(self.backend, self.spec)

    @classmethod
    def for_task(cls, task: str, task_options: Mapping[str, Any] | None = None, **given: Any) -> TrainConfig:
        """The validated config of a run of ``task``: the field defaults, then the task's
        recipe (the settings it recommends for ``task_options``, :meth:`Task.recipe`), then
        ``given``.

        ``given`` holds only the settings someone chose explicitly (the command line
        passes only the options that were typed), so a recipe value is replaced only by a
        value someone asked for.

        Raises:
            ValueError: an unknown task or setting (with the closest name), or a bad value.
        """
        from lstmkit.app.tasks.registry import task_options as task_options_of
        from lstmkit.app.tasks.registry import task_recipe

        names = [f.name for f in dataclasses.fields(cls) if f.name not in TASK_FIELDS]
        for key in given:
            if key not in names:
                raise ValueError(f"{key}: not a training setting{did_you_mean(key, names)}; the settings are "
                                 f"{names}")
        options = dict(task_options or {})
        if "seed" in options:
            raise ValueError(f"-o seed: the run's seed is set with --seed (it seeds the task's data and the model), "
                             f"not as a task option; got -o seed={options['seed']!r}")
        task_options_of(task)  # an unknown task is reported as such
        try:
            recipe = task_recipe(task, options)
        except (TypeError, KeyError, ArithmeticError, ValueError):  # a bad option value: the task reports it
            _check_task_options(task, options)
            recipe = {}
        bad = sorted(set(recipe) - set(names))
        if bad:  # the task's own mistake, not the user's
            raise ValueError(f"task {task!r}: its recipe sets unknown settings {bad}")
        cfg = cls(task=task, task_options=options, **{**recipe, **given})
        try:
            cfg.validate()
        except ValueError:
            if recipe and _valid(cls(task=task, task_options=options, **given)):
                # a recipe value made from a bad option (chrono=T from length=-5): the task names the option
                _check_task_options(task, options)
            raise
        return cfg

    @classmethod
    def from_dict(cls, d: Any) -> TrainConfig:
        """Build and validate from a mapping (a ``config.json`` or a checkpoint's metadata),
        refusing unknown or missing keys (a foreign or newer config).

        Raises:
            ValueError: not a mapping, unknown keys, no task, or a bad value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; not an lstmkit training config")
        if "task" not in d:
            raise ValueError("config: no 'task'; not an lstmkit training config")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @property
    def spec(self) -> CellSpec:
        """The recurrent layer's cell: the LSTM variant ``cell`` names, or the plain RNN ``model`` names."""
        return resolve(self.cell if self.model == "lstm" else self.model)

    @property
    def cell_name(self) -> str:
        """The variant's name (``"rnn"``, ``"rnn_relu"`` for the plain RNNs)."""
        return self.spec.name


def _valid(cfg: TrainConfig) -> bool:
    try:
        cfg.validate()
    except ValueError:
        return False
    return True


def _check_task_options(task: str, options: Mapping[str, Any]) -> None:
    """Raise the task's own error for bad ``options`` (the task is made: on error paths only)."""
    from lstmkit.app.tasks.registry import get_task

    try:
        get_task(task, **options)
    except (TypeError, KeyError, ArithmeticError) as exc:
        raise ValueError(f"task {task!r}: bad options {dict(options)} ({exc})") from None


def _check_cell(cell: Any) -> None:
    if not isinstance(cell, str):
        raise ValueError(f"cell: expected a variant name, got {cell!r}")
    spec = resolve(cell)  # an unknown word or an impossible combination raises with the reason
    if not spec.is_lstm:
        raise ValueError(f"cell: {cell!r} is the plain RNN, not an LSTM variant; the plain RNNs are models of their "
                         f"own: {', '.join(RNN_MODELS)}")


def check_new_run(cfg: TrainConfig, given: Iterable[str] = ()) -> None:
    """Refuse, for a run about to start, settings it would not use as asked: ``--cell`` with a
    plain RNN model, ``--momentum`` with an optimiser other than sgd (``given``: the settings
    typed), a warm-up longer than the step budget, task options that make the task measure
    nothing (:meth:`Task.training_problem`). Not part of :meth:`TrainConfig.validate`: a saved
    run's config from before these rules still reads (eval, report, ``--resume``).

    Raises:
        ValueError: the first such setting, by name.
    """
    from lstmkit.app.tasks.registry import TASKS

    given = set(given)
    if "cell" in given and cfg.model != "lstm":
        raise ValueError(f"--cell: the plain RNN (--model {cfg.model}) has no cell variant; leave --cell out")
    if "momentum" in given and cfg.optimizer != "sgd":
        raise ValueError(f"--momentum: applies to --optimizer sgd, not {cfg.optimizer} (which keeps moments of its "
                         f"own); leave it out or add --optimizer sgd")
    if cfg.warmup > cfg.steps:
        raise ValueError(f"warmup: {cfg.warmup} steps of warm-up is more than the budget of {cfg.steps} steps "
                         f"(the learning rate would never reach its full value)")
    problem = TASKS[cfg.task].training_problem(cfg.task_options) if cfg.task in TASKS else None
    if problem:
        raise ValueError(problem)
