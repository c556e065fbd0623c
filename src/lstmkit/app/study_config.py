"""What a variant study runs (:mod:`lstmkit.app.study`): its settings, :class:`StudyConfig`, checked
when made, and its runs, :class:`Run` (variant × learning rate × seed), each an ordinary training
run whose config :func:`train_config` gives."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lstmkit import _atomic
from lstmkit.app.config import MAX_SEED, RNN_MODELS, TrainConfig, model_and_cell, option_of
from lstmkit.app.tasks.base import check_metric_name
from lstmkit.spec import resolve

__all__ = ["StudyConfig", "Run", "TRAIN_KEYS", "train_config", "setting"]


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
            if v not in RNN_MODELS:
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
        check_metric_name(self.metric)
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


def train_config(cfg: StudyConfig, run: Run, split: str) -> dict[str, Any]:
    d = {"task": cfg.task, **cfg.train, "lr": run.lr, "seed": run.seed, "eval_split": split,
         "stop_at_target": False, "threads": 1}
    return {**d, **model_and_cell(run.variant)}


def effective_train(train: Any) -> Any:
    """``train`` (a study's training settings) without those its runs would have anyway —
    TrainConfig's defaults, an empty ``task_options`` —: two studies that train alike compare
    equal however their settings were typed (``--batch-size 32``, the default, or nothing).
    Anything but a mapping is returned as it is (a damaged study.json, compared as found)."""
    if not isinstance(train, dict):
        return train
    return {k: v for k, v in train.items()
            if not (k == "task_options" and not v) and (k not in TRAIN_KEYS or v != setting({}, k))}


def setting(train: dict[str, Any], key: str) -> Any:
    """A training setting of the study: its own, else TrainConfig's default."""
    if key in train:
        return train[key]
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == key)
