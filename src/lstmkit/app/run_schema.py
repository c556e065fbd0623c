"""What a run directory's files hold, as the trainer writes them: the types of ``summary.json``'s
fields (:func:`summary_problem`) and of a study's ``result.json`` (:func:`study_result_problem`),
the numbers its records are made of, and a checkpoint's tensors and trainer state against its
config (:func:`check_tensors`, :func:`check_trainer_state`).
Pure checks on parsed values and headers; :mod:`lstmkit.app.runs` reads and writes the files and
calls them."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import torch

from lstmkit.app.config import TrainConfig
from lstmkit.app.model import SequenceModel
from lstmkit.app.tasks.base import Task
from lstmkit.variants import cell_states

__all__ = ["is_number", "is_int", "summary_problem", "SUMMARY_FIELDS", "TARGET_FIELDS", "TEST_FIELDS",
           "numbers_problem", "record_problem", "study_result_problem", "STUDY_RESULT_FIELDS", "CheckpointError",
           "expected_tensors", "check_tensors", "check_trainer_state"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, foreign or incompatible."""


def is_number(v: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


#: What each field of summary.json holds (checked where present): a test of the value, and its words.
SUMMARY_FIELDS: dict[str, tuple[Any, str]] = {
    **{k: (lambda v: isinstance(v, str), "a string") for k in ("task", "model", "cell", "stopped", "metric", "split")},
    **{k: (lambda v: isinstance(v, dict), "an object") for k in ("task_options", "final", "environment", "data")},
    **{k: (is_int, "an int") for k in ("seed", "parameters", "steps", "sequences")},
    "wall_time_s": (is_number, "a number"),
    "value": (lambda v: v is None or is_number(v), "a number or null"),
    "selected_step": (lambda v: v is None or is_int(v), "an int or null"),
    "solved": (lambda v: isinstance(v, bool), "true or false"),
    "baselines": (lambda v: isinstance(v, dict) and all(is_number(b) for b in v.values()),
                  "an object of baseline names and numbers"),
    "target": (lambda v: isinstance(v, dict), "an object"),
    "test": (lambda v: isinstance(v, dict), "an object"),
}
TARGET_FIELDS: dict[str, tuple[Any, str]] = {
    "goal": (lambda v: v in ("max", "min"), "'max' or 'min'"),
    "threshold": (lambda v: v is None or is_number(v), "a number or null"),
    "published": (lambda v: isinstance(v, str), "a string"),
    "met": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "first_met_step": (lambda v: v is None or is_int(v), "an int or null"),
    "sequences_to_target": (lambda v: v is None or is_int(v), "an int or null"),
}
TEST_FIELDS: dict[str, tuple[Any, str]] = {
    "value": (lambda v: v is None or is_number(v), "a number or null"),
    "met": (lambda v: isinstance(v, bool), "true or false"),
    "metrics": (lambda v: isinstance(v, dict) and all(is_number(m) or m is None for m in v.values()),
                "an object of metric names and numbers"),
}


#: What each field of a study's ``result.json`` holds (:mod:`lstmkit.app.study`): a test of the
#: value, and its words; every run's record has the first four (``test`` an object of metric
#: names and numbers, empty for a run that diverged), a run that did not diverge the others,
#: copied from its summary.json.
STUDY_RESULT_FIELDS: dict[str, tuple[Any, str]] = {
    "config": (lambda v: isinstance(v, dict), "an object"),
    "diverged": (lambda v: isinstance(v, bool), "true or false"),
    "select": TEST_FIELDS["value"],
    "test": (lambda v: isinstance(v, dict), "an object"),
    "steps": SUMMARY_FIELDS["steps"],
    "wall_time_s": SUMMARY_FIELDS["wall_time_s"],
    "parameters": SUMMARY_FIELDS["parameters"],
    "target_step": TARGET_FIELDS["first_met_step"],
}
_STUDY_RESULT_REQUIRED = ("config", "diverged", "select", "test")


def _shown(v: Any) -> str:
    return repr(str(v)[:60])


def _fields_problem(obj: dict[str, Any], fields: dict[str, tuple[Any, str]], where: str = "") -> str | None:
    """The first field of ``obj`` that ``fields`` describes and that is not what it says, or None."""
    for key, (ok, words) in fields.items():
        if key in obj and not ok(obj[key]):
            return f"{where}{key}: expected {words}, got {_shown(obj[key])}"
    return None


def numbers_problem(obj: dict[str, Any], where: str = "") -> str | None:
    """The first value of ``obj`` that is neither a number nor null (``where``: the words before
    its key), or None."""
    for key, v in obj.items():
        if not (is_number(v) or v is None):
            return f"{where}{key}: expected a number or null, got {_shown(v)}"
    return None


def _not_an_object(v: Any) -> str | None:
    return None if isinstance(v, dict) else f"expected a JSON object, got {'null' if v is None else type(v).__name__}"


def record_problem(rec: Any) -> str | None:
    """What is wrong with ``rec`` as an evaluation's record (a line of ``metrics.jsonl``, an
    entry of a checkpoint's history): an object with a ``step``, an int >= 1, and numbers or
    null, or None."""
    problem = _not_an_object(rec)
    if problem is not None:
        return problem
    if "step" not in rec:
        return "no 'step'"
    if not is_int(rec["step"]) or rec["step"] < 1:
        return f"step: expected an int >= 1, got {_shown(rec['step'])}"
    return numbers_problem(rec)


def summary_problem(s: Any) -> str | None:
    """What is wrong with ``s`` as a parsed ``summary.json`` (the fields the readers use, with
    their types: :data:`SUMMARY_FIELDS`, its ``target`` and ``test`` objects), or None."""
    problem = _not_an_object(s)
    if problem is not None:
        return problem
    for fields, where, obj in ((SUMMARY_FIELDS, "", s), (TARGET_FIELDS, "target.", s.get("target") or {}),
                               (TEST_FIELDS, "test.", s.get("test") or {})):
        problem = _fields_problem(obj, fields, where)
        if problem is not None:
            return problem
    return None


def study_result_problem(r: Any, metric: str | None = None) -> str | None:
    """What is wrong with ``r`` as a parsed ``result.json`` of a study's run (every field the
    study reads, with its type: :data:`STUDY_RESULT_FIELDS`; with ``metric``, the study's
    metric, its test value, a number, where the run did not diverge), or None."""
    problem = _not_an_object(r)
    if problem is not None:
        return problem
    missing = next((key for key in _STUDY_RESULT_REQUIRED if key not in r), None)
    if missing is not None:
        return f"no {missing!r}"
    problem = _fields_problem(r, STUDY_RESULT_FIELDS) or numbers_problem(r["test"], "test.")
    if problem is not None or metric is None or r["diverged"]:
        return problem
    if metric not in r["test"]:
        return f"test: no {metric!r} (the study's metric), for a run that did not diverge"
    if r["test"][metric] is None:
        return f"test.{metric}: expected a number, for a run that did not diverge, got None"
    return None


# ---------------------------------------------------------------------------- checkpoints

_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.uint8: "U8", torch.int64: "I64"}


def expected_tensors(cfg: TrainConfig, task: Task) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name -> (shape, dtype)`` of every tensor a checkpoint of ``cfg`` may hold (the carried
    state holds every stream, ``batch_size``, whatever the number of processes)."""
    model = SequenceModel(cfg, task.input_size, task.output_size, device="meta")
    want = {f"model.{k}": (tuple(v.shape), _DTYPES[v.dtype]) for k, v in model.state_dict().items()}
    want.update({f"selected.{k[len('model.'):]}": v for k, v in want.items()})
    keys = ("step", "exp_avg", "exp_avg_sq") if cfg.optimizer == "adam" else \
        (("momentum_buffer",) if cfg.momentum else ())
    for idx, p in enumerate(model.parameters()):
        for key in keys:
            want[f"optim.{idx}.{key}"] = ((), "F32") if key == "step" else (tuple(p.shape), _DTYPES[p.dtype])
    want["rng.torch"] = (tuple(torch.get_rng_state().shape), "U8")
    if task.stream:
        rnn = model.rnn
        lead, batch = rnn.num_layers * rnn.num_directions, cfg.batch_size
        want["carry.0"] = ((lead, batch, rnn.output_size), "F32")  # h, then the cell's states (c; the sLSTM's c, n, m)
        for i, _ in enumerate(cell_states(rnn.spec), start=1):
            want[f"carry.{i}"] = ((lead, batch, rnn.hidden_size), "F32")
    return want


def check_tensors(p: Path, shapes: dict[str, tuple[tuple[int, ...], str]], cfg: TrainConfig, task: Task,
                   world: int | None) -> None:
    """A checkpoint's tensors (``shapes``: name -> (shape, dtype), from its header) against those
    :func:`expected_tensors` of its config (``world``: the processes a run resumes on, None to
    read it whatever the number it was trained on). Raises CheckpointError naming the first
    that differs."""
    want = expected_tensors(cfg, task)
    if world is None:  # reading, not resuming: also one process's streams (an older version kept those)
        for k in [k for k in want if k.startswith("carry.") and k in shapes]:
            shape = shapes[k][0]
            if len(shape) == 3 and shape[1] >= 1 and cfg.batch_size % shape[1] == 0:
                want[k] = ((want[k][0][0], shape[1], want[k][0][2]), want[k][1])
    optional = {k for k in want if k.startswith(("optim.", "carry.", "selected."))}
    missing = sorted(k for k in want if k not in shapes and k not in optional)
    unexpected = sorted(k for k in shapes if k not in want)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint: {p} does not match its own config (missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]})")
    for k in want:  # in the model's order: the first layer's mismatch is the one reported
        got = shapes.get(k, want[k])
        if got != want[k]:
            raise CheckpointError(f"checkpoint: {p}: {k} is {got[1]} {list(got[0])}, expected {want[k][1]} "
                                  f"{list(want[k][0])} for its config ({cfg.model} {cfg.cell_name}, hidden_size="
                                  f"{cfg.hidden_size}, num_layers={cfg.num_layers}, task {cfg.task!r})")
    params = {k.split(".")[1] for k in shapes if k.startswith("optim.")}
    for idx in params:  # a parameter's optimiser state is all there or absent
        have = sorted(k for k in shapes if k.startswith(f"optim.{idx}."))
        full = sorted(k for k in want if k.startswith(f"optim.{idx}."))
        if have != full:
            raise CheckpointError(f"checkpoint: {p}: optimiser state of parameter {idx} is incomplete ({have})")
    carry = sorted(k for k in shapes if k.startswith("carry."))
    if carry and carry != sorted(k for k in want if k.startswith("carry.")):
        raise CheckpointError(f"checkpoint: {p}: incomplete carried state ({carry})")
    selected = sorted(k for k in shapes if k.startswith("selected."))
    if selected and selected != sorted(k for k in want if k.startswith("selected.")):
        raise CheckpointError(f"checkpoint: {p}: incomplete selected weights ({selected[:4]})")


def check_trainer_state(p: Path, st: Any, cfg: TrainConfig) -> None:
    """The trainer's state against the checkpoint's own config (it is written right after
    an evaluation: ``history[-1]["step"] == step <= steps``)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint: {p}: trainer state: {what}")

    if not isinstance(st, dict):
        raise bad(f"expected a JSON object, got {type(st).__name__}")
    for key in ("step", "best", "bad_evals", "elapsed", "param_groups", "history"):
        if key not in st:
            raise bad(f"no {key!r}")
    step, history = st["step"], st["history"]
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= cfg.steps:
        raise bad(f"step: expected an int in [1, {cfg.steps}] (its config's steps), got {step!r}")
    if not isinstance(history, list) or not history or len(history) > step:
        raise bad(f"history: expected a list of 1 to {step} evaluations, got {type(history).__name__} "
                  f"of length {len(history) if isinstance(history, list) else '-'}")
    last = 0
    for n, rec in enumerate(history):
        problem = record_problem(rec)
        if problem is not None:
            raise bad(f"history[{n}]: {problem}")
        if not last < rec["step"] <= step:
            raise bad(f"history[{n}]: expected an evaluation record with a step in ({last}, {step}], got "
                      f"{str(rec)[:60]}")
        last = rec["step"]
    if last != step:
        raise bad(f"history ends at step {last}, but the checkpoint is of step {step}")
    if st["best"] is not None and not is_number(st["best"]):
        raise bad(f"best: expected a number or null, got {st['best']!r}")
    if isinstance(st["bad_evals"], bool) or not isinstance(st["bad_evals"], int) \
            or not 0 <= st["bad_evals"] <= len(history):
        raise bad(f"bad_evals: expected an int in [0, {len(history)}], got {st['bad_evals']!r}")
    if not is_number(st["elapsed"]) or not math.isfinite(st["elapsed"]) or st["elapsed"] < 0:
        raise bad(f"elapsed: expected seconds >= 0, got {st['elapsed']!r}")
    if not isinstance(st.get("stopped", ""), str):
        raise bad(f"stopped: expected a string, got {st['stopped']!r}")
    best_step = st.get("best_step")
    if best_step is not None and best_step not in {rec["step"] for rec in history}:
        raise bad(f"best_step: expected the step of an evaluation in its history or null, got {best_step!r}")
    groups = st["param_groups"]
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
        raise bad(f"param_groups: expected a list of one group, got {str(groups)[:60]}")
    for key in ("lr", "weight_decay"):
        v = groups[0].get(key)
        if not is_number(v) or not math.isfinite(v) or v < 0:
            raise bad(f"param_groups[0].{key}: expected a finite number >= 0, got {v!r}")
