"""The built-in tasks by name: one table, and the lookups the trainer and the command line use.

Adding a task: its class (a :class:`~lstmkit.app.tasks.base.Task` with a ``name``) in a task
module, and its row here. Importing this module imports every built-in task module; the
optional frameworks of the corpus tasks (music21, statsmodels) are imported only when a
task first needs its data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lstmkit._suggest import did_you_mean
from lstmkit.app.tasks.base import Task
from lstmkit.app.tasks.corpora import CO2, CharLM, Chorales, Sunspots
from lstmkit.app.tasks.synthetic import (
    AddingTask,
    ContinualReberTask,
    CopyTask,
    CountingTask,
    LongLagTask,
    MultiplicationTask,
    PeriodicTask,
    ReberTask,
    SpikeDelaysTask,
    TemporalOrderTask,
    TimedSpikesTask,
)

__all__ = ["TASKS", "task_names", "task_options", "task_description", "task_recipe", "get_task"]

#: name -> the task's class (keyword options such as ``seed``, ``length``), one row per task.
TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    ReberTask, ContinualReberTask, AddingTask, TemporalOrderTask, CopyTask,
    LongLagTask, MultiplicationTask, SpikeDelaysTask, TimedSpikesTask, PeriodicTask, CountingTask,
    CharLM, Chorales, Sunspots, CO2,
)}


def task_names() -> list[str]:
    """Names of the registered tasks."""
    return sorted(TASKS)


def _known(name: str) -> type[Task]:
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}{did_you_mean(str(name), sorted(TASKS))}; expected one of "
                         f"{sorted(TASKS)} (lstmkit tasks lists them with their options)")
    return TASKS[name]  # type: ignore[return-value]


def task_options(name: str) -> dict[str, Any]:
    """The options of task ``name`` and their defaults (``-o KEY=VALUE`` on the command line).

    Raises:
        ValueError: unknown task name.
    """
    cls = _known(name)
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init and f.default is not dataclasses.MISSING}


def task_description(name: str) -> str:
    """Task ``name``'s docstring (its first line says what it is)."""
    return (_known(name).__doc__ or "").strip()


def task_recipe(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The training settings task ``name`` recommends with ``options`` (:meth:`Task.recipe`).

    Raises:
        ValueError: unknown task name.
    """
    return dict(_known(name).recipe(dict(options or {})))


def get_task(name: str, **options: object) -> Task:
    """Build the task ``name`` with ``options`` (e.g. ``seed=0, length=100``).

    Raises:
        ValueError: unknown task name, or an option the task does not take (the message
            lists the task's options), or a bad option value.
    """
    known = task_options(name)
    for key in options:
        if key not in known:
            listed = ", ".join(f"{k}={v!r}" for k, v in known.items())
            raise ValueError(f"task {name!r}: unknown option {key!r}{did_you_mean(key, list(known))}; its options "
                             f"(with defaults) are {listed}")
    try:
        return TASKS[name](**options)
    except TypeError as exc:
        raise ValueError(f"task {name!r}: {exc}") from None
