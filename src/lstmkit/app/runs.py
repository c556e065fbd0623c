"""Run directories: the one module that reads and writes them.

A run directory holds::

    config.json               the run's TrainConfig (written when the run starts)
    metrics.jsonl             one JSON object per evaluation, exactly one per evaluation
    checkpoint.safetensors    model + optimiser + RNG + carried state; the trainer's state
                              and the config in its JSON metadata (one file, replaced atomically)
    summary.json              the final result, against the target and the baselines
    model.safetensors         the final weights alone
    result.json               a study's record of the run (lstmkit.app.study), once finished

Everything here is validated before it is used: a checkpoint's config goes through
:meth:`TrainConfig.validate` (types, bounds), its tensors' names, shapes and dtypes are
checked against the model and optimiser the config describes (built on the ``meta``
device, so a hostile or damaged file cannot make lstmkit allocate anything) and its
trainer state against the config — all before a tensor is read. Every file is written
through :mod:`lstmkit._atomic`. Nothing is ever read with pickle.

A run directory is never stuck: one that holds only what a run writes before its first
checkpoint (an lstmkit ``config.json``, its ``metrics.jsonl``, temporary files) is an
*unstarted* run, and ``train`` — with or without ``--resume`` — starts it afresh. Files of
the same names that lstmkit did not write (a ``config.json`` that is not a run's config)
are never taken for one: such a directory is refused, nothing overwritten.

One run at a time: a training run holds an exclusive lock on its directory
(:mod:`lstmkit.app.runlock`; :func:`start` takes it) from its start to its end; a second run
of the same directory is refused with the holder's process id.

The commands (:mod:`lstmkit.app.cli`, plots, report, study, eval) and the trainer read and
write runs only through this module.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lstmkit import _atomic
from lstmkit._validate import loads_json
from lstmkit.app.config import RNN_MODELS, TrainConfig
from lstmkit.app.model import SequenceModel
from lstmkit.app.run_schema import (
    CheckpointError,
    check_tensors,
    check_trainer_state,
    is_number,
    record_problem,
    study_result_problem,
    summary_problem,
)
from lstmkit.app.runlock import InUseError, RunLock, lock
from lstmkit.app.tasks.base import Task, check_metric_name
from lstmkit.app.tasks.registry import get_task

__all__ = ["CheckpointError", "InUseError", "RunLock", "lock", "checkpoint_step", "Checkpoint", "FORMAT",
           "WEIGHTS_FORMAT", "CHECKPOINT", "CONFIG", "METRICS", "SUMMARY", "MODEL", "plan", "start",
           "read_checkpoint", "write_checkpoint", "checkpoint_tensors", "restore", "selected_weights",
           "append_metrics", "write_metrics", "read_metrics", "check_run_dir", "write_summary", "read_summary",
           "read_config", "write_model", "load_run", "variant_of", "eval_split_of", "metric_of", "final_values",
           "criterion_of", "STUDY_RESULT", "read_study_result", "write_study_result"]

#: Identifies lstmkit checkpoints (metadata key "format").
FORMAT = "lstmkit-checkpoint-1"
#: Identifies a run's final ``model.safetensors``.
WEIGHTS_FORMAT = "lstmkit-weights-1"
CONFIG, METRICS, CHECKPOINT, SUMMARY, MODEL, STUDY_RESULT = (
    "config.json", "metrics.jsonl", "checkpoint.safetensors", "summary.json", "model.safetensors", "result.json")
_BEFORE_FIRST_CHECKPOINT = {CONFIG, METRICS}


def is_run_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names one of a training run's files in a run's directory (one holding
    the config.json or checkpoint lstmkit wrote; another tool's config.json beside a
    model.safetensors is not one): files that only a run writes."""
    p = Path(path)
    if p.name not in (CONFIG, METRICS, CHECKPOINT, SUMMARY, MODEL, STUDY_RESULT):
        return False
    if _is_run_config(p.parent / CONFIG):
        return True
    try:
        return _header(p.parent / CHECKPOINT)[0].get("format") == FORMAT
    except (ValueError, OSError):  # none, or not a checkpoint lstmkit wrote
        return False


@dataclass
class Checkpoint:
    """A validated checkpoint: its config, its task, its tensors and the trainer's state
    (``stamp``: the file's inode, modification time and size when it was read)."""

    path: Path
    config: TrainConfig
    task: Task
    tensors: dict[str, Tensor]
    state: dict[str, Any]
    stamp: tuple[int, int, int] | None = None


# ---------------------------------------------------------------------------- the directory


def _unstarted(d: Path) -> bool:
    """Holds only what a run writes before its first checkpoint (or nothing): temporary
    files, and an lstmkit ``config.json`` with, if any, its ``metrics.jsonl``. Files of
    those names that lstmkit did not write are someone's: not an unstarted run."""
    names = set()
    for p in d.iterdir():
        if _atomic.is_temporary(p.name):
            continue
        if p.name not in _BEFORE_FIRST_CHECKPOINT or not p.is_file():
            return False
        names.add(p.name)
    if not names:
        return True
    return CONFIG in names and _is_run_config(d / CONFIG) and (METRICS not in names or _is_run_metrics(d / METRICS))


def _run_without_checkpoint(d: Path) -> bool:
    """Holds the files a run writes at its end (``summary.json`` or ``model.safetensors``), an
    lstmkit ``config.json`` and nothing else of its own, but no checkpoint (deleted)."""
    names = {p.name for p in d.iterdir() if not _atomic.is_temporary(p.name)}
    return (names <= {CONFIG, METRICS, SUMMARY, MODEL} and bool(names & {SUMMARY, MODEL}) and CONFIG in names
            and _is_run_config(d / CONFIG))


_MAX_SMALL_FILE = 1 << 20  # a run's config.json, or the metrics.jsonl of a run before its first checkpoint


def _small_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_SMALL_FILE:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _is_run_config(path: Path) -> bool:
    """``path`` is a config.json lstmkit wrote: every field of TrainConfig, and valid."""
    text = _small_text(path)
    if text is None:
        return False
    try:
        d = loads_json(text, "config")
        if not isinstance(d, dict) or set(d) != {f for f in TrainConfig.__dataclass_fields__}:
            return False
        TrainConfig.from_dict(d)
    except (ValueError, TypeError):
        return False
    return True


def _is_run_metrics(path: Path) -> bool:
    """``path`` is a metrics.jsonl lstmkit wrote: evaluation records (objects with a step >= 1
    and numbers), one a line (:func:`_metrics_records`)."""
    text = _small_text(path)
    if text is None:
        return False
    try:
        _metrics_records(path, text)
    except ValueError:
        return False
    return True


def _metrics_records(path: Path, text: str) -> list[dict[str, Any]]:
    """The evaluation records of ``text``, the contents of the metrics.jsonl at ``path``: one
    JSON object a line (blank lines skipped), each checked by
    :func:`~lstmkit.app.run_schema.record_problem`.

    Raises:
        ValueError: naming ``path``, the line and what is wrong with it.
    """
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = loads_json(line, f"run_dirs: {path} line {n} is not JSON")
        problem = record_problem(rec)
        if problem is not None:
            raise ValueError(f"run_dirs: {path} line {n}: {problem}")
        records.append(rec)
    return records


def plan(run_dir: str | os.PathLike[str], resume: bool, *, check_in_use: bool = True) -> bool:
    """Check ``run_dir`` for a run and decide, touching nothing: True to resume from its
    checkpoint, False to start afresh (a new or empty directory, or an unstarted run).

    Args:
        check_in_use: first see whether another run holds the directory (False for a
            process that does not lock it itself: a torchrun rank other than 0).

    Raises:
        ValueError: ``run_dir`` is a file, or cannot be written.
        InUseError: another run is training in it (``check_in_use``).
        FileExistsError: not empty (a run, or other files) and not ``resume``.
        CheckpointError: ``resume`` of a directory that does not exist or holds other files.
    """
    d = Path(run_dir)
    if check_in_use and d.is_dir():
        lock(d).release()  # another run training in it is named first (start() takes the lock for the run)
    return _decide(d, resume)


def _decide(d: Path, resume: bool) -> bool:
    """:func:`plan`'s decision, once the directory is not another run's."""
    if d.exists() and not d.is_dir():
        raise ValueError(f"--out {d}: is a file, expected a run directory (a new or empty directory, or a run "
                         f"to --resume)")
    if d.is_dir():
        if (d / CHECKPOINT).is_file():
            if resume:
                return True
            raise FileExistsError(f"output directory {d} is not empty; nothing was overwritten (it holds a run: use "
                                  f"--resume to continue it, or choose another directory)")
        if not _unstarted(d):
            what = (f"it holds an lstmkit run's files but not its {CHECKPOINT}, so the run cannot be continued"
                    if _run_without_checkpoint(d) else "it holds files that are not an lstmkit run's")
            raise (CheckpointError if resume else FileExistsError)(
                f"{'--resume: no checkpoint in' if resume else 'output directory'} {d}"
                f"{', and it' if resume else ''} is not empty; nothing was overwritten ({what}; choose another "
                f"directory)")
    elif resume:
        raise CheckpointError(f"--resume: no checkpoint in {d} (no such directory)")
    _check_creatable(d)
    return False


def _check_creatable(d: Path) -> None:
    existing = d
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {d}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _atomic.WriteError(13, f"--out {d}: cannot write in {existing} "
                                     f"({'read-only file system' if _read_only(existing) else 'permission denied'})")


def _read_only(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _stamp(p: Path) -> tuple[int, int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def start(run_dir: str | os.PathLike[str], cfg: TrainConfig, resumed: bool,
          history: list[dict[str, Any]] | None = None, *, checkpoint: Checkpoint | None = None) -> RunLock:
    """Set the directory up for the run :func:`plan` decided on (call after every check);
    returns the directory's lock, which the run holds until it ends (:meth:`RunLock.release`).

    Takes the lock (:func:`lock`), then checks that the directory is still as :func:`plan`
    found it (and, resuming, that ``checkpoint`` is still its checkpoint file): another run
    may have started or finished in between. Removes temporary files of killed writers; a
    fresh run replaces an unstarted run's files and writes ``config.json``; a resumed run
    rewrites ``metrics.jsonl`` from the checkpoint's ``history``, so that it holds exactly
    one line per evaluation however the previous process ended, and ``config.json`` where its
    budget of steps changed (the one setting a resumed run may change), so that it says what
    ``summary.json`` and the weights' metadata will.

    Raises:
        InUseError: another run holds the directory.
        FileExistsError, CheckpointError: the directory changed since :func:`plan`.
        WriteError: it cannot be created or written.
    """
    d = Path(run_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _atomic.WriteError(exc.errno or 5, f"--out {d}: cannot create the directory "
                                                 f"({exc.strerror or exc})") from None
    held = lock(d)
    try:
        if _decide(d, resumed) != resumed:  # a checkpoint appeared or went since plan(): another run
            raise CheckpointError(f"--out {d}: another run changed the directory while this one started; nothing "
                                  f"was changed (run the command again)")
        if resumed and checkpoint is not None and checkpoint.stamp != _stamp(d / CHECKPOINT):
            raise CheckpointError(f"--resume: the checkpoint in {d} was replaced while this run started (another "
                                  f"run wrote it); nothing was changed (run the command again)")
        _atomic.clean_stale(d, exclusive=True)
        if resumed:
            write_metrics(d, history or [])
            try:
                same = read_config(d) == json.loads(json.dumps(asdict(cfg)))
            except (ValueError, OSError):  # damaged: the checkpoint's settings replace it
                same = False
            if not same:  # a budget of steps grown on resume
                _atomic.write_json(d / CONFIG, asdict(cfg), what="config")
        else:
            (d / METRICS).unlink(missing_ok=True)
            _atomic.write_json(d / CONFIG, asdict(cfg), what="config")
    except BaseException:
        held.release()
        raise
    return held


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, carry: Any,
                       selected: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The tensors of a checkpoint: ``model.*``, ``optim.<param index>.<key>``, ``rng.torch``
    (the global generator: dropout masks), ``carry.<i>`` (a stream's state) and
    ``selected.*`` (the weights of the best evaluation so far, a state dict of ``model``)."""
    t = {f"model.{k}": v for k, v in model.state_dict().items()}
    if selected is not None:
        t.update({f"selected.{k}": v for k, v in selected.items()})
    for idx, st in optimizer.state_dict()["state"].items():
        for key, v in st.items():
            t[f"optim.{idx}.{key}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    t["rng.torch"] = torch.get_rng_state()
    if carry is not None:
        for i, s in enumerate(carry if isinstance(carry, tuple) else (carry,)):
            t[f"carry.{i}"] = s
    return t


def write_checkpoint(run_dir: str | os.PathLike[str], cfg: TrainConfig, tensors: dict[str, Tensor],
                     trainer: dict[str, Any]) -> None:
    """Replace ``run_dir``'s checkpoint atomically (made in memory, then one rename)."""
    from safetensors.torch import save

    meta = {"format": FORMAT, "config": json.dumps(asdict(cfg)), "trainer": json.dumps(trainer)}
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    _atomic.write_bytes(Path(run_dir) / CHECKPOINT, data, what="checkpoint")


def _checkpoint_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
        if not p.is_file():
            raise CheckpointError(f"checkpoint: no {CHECKPOINT} in {p.parent} (not a training run, or killed before "
                                  f"its first checkpoint)")
    elif not p.is_file():
        raise CheckpointError(f"checkpoint: no file at {p}")
    return p


def _header(p: Path) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """The metadata and ``name -> (shape, dtype)`` of a safetensors file, reading no tensor."""
    from safetensors import SafetensorError, safe_open

    try:  # the system's reason first (safetensors says "No such file or directory" for any)
        os.close(os.open(p, os.O_RDONLY))
    except OSError as exc:
        raise CheckpointError(f"checkpoint: cannot read {p} ({exc.strerror or exc})") from None
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
            shapes = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint: {p} is not a readable safetensors file ({text}); lstmkit reads a "
                              f"training run directory or its {CHECKPOINT} (a layer's weights file, .pt or "
                              f".onnx, converts with lstmkit convert)") from None
    return meta, shapes


def read_checkpoint(path: str | os.PathLike[str], *, world: int | None = None) -> Checkpoint:
    """Read and validate a checkpoint (the file or its run directory). Never executes code.

    The config, the trainer state and every tensor's name, shape and dtype are checked
    against the model the config defines before any tensor is read.

    Args:
        world: processes the run resumes on (the carried state is split over them);
            None to read it whatever the number of processes it was trained on.

    Raises:
        CheckpointError: missing, unreadable, corrupt, foreign or inconsistent; the
            message names the file and what is wrong.
    """
    p = _checkpoint_file(path)
    stamp = _stamp(p)  # before reading: a file replaced meanwhile does not match it
    meta, shapes = _header(p)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {p} is not an lstmkit checkpoint (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        cfg = TrainConfig.from_dict(loads_json(meta["config"], "config"))
        state = loads_json(meta["trainer"], "trainer")
    except KeyError as exc:
        raise CheckpointError(f"checkpoint: {p} has damaged metadata (no readable {exc})") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint: {p}: its config is damaged ({exc})") from None
    check_trainer_state(p, state, cfg)
    try:
        task = get_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint: {p}: its task cannot be made ({exc})") from None
    check_tensors(p, shapes, cfg, task, world)
    if (state.get("best_step") is None) != (not any(k.startswith("selected.") for k in shapes)):
        raise CheckpointError(f"checkpoint: {p}: trainer state: best_step {state.get('best_step')!r} does not match "
                              f"the selected weights it holds")
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(p), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint: {p} is damaged ({str(exc).strip()[:120]})") from None
    return Checkpoint(p, cfg, task, tensors, state, stamp)


def checkpoint_step(run_dir: str | os.PathLike[str]) -> int | None:
    """The step of ``run_dir``'s checkpoint (read from its header, no tensor), or None if
    it has no readable one: where ``--resume`` would continue from."""
    p = Path(run_dir) / CHECKPOINT
    if not p.is_file():
        return None
    try:
        meta, _ = _header(p)
        step = loads_json(meta["trainer"], "trainer")["step"]
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def restore(ck: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """Load a validated checkpoint into ``model`` (and ``optimizer`` and the global RNG);
    returns the carried stream state (None, a tensor, or a tuple)."""
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in ck.tensors.items() if k.startswith(prefix)})
    if optimizer is None:
        return None
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in ck.tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    # the optimiser's settings are its config's (the trainer sets the rate every step); a checkpoint's
    # param_groups were taken before, so a changed flag (maximize, amsgrad) ran or failed inside torch
    groups = optimizer.state_dict()["param_groups"]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(ck.tensors["rng.torch"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint: {ck.path}: the optimiser state or the random generator's state is "
                              f"damaged ({str(exc).splitlines()[0][:120]})") from None
    carry = [ck.tensors[f"carry.{i}"] for i in range(len(ck.tensors)) if f"carry.{i}" in ck.tensors]
    return None if not carry else (carry[0] if len(carry) == 1 else tuple(carry))


def selected_weights(ck: Checkpoint) -> dict[str, Tensor] | None:
    """The weights of the best evaluation so far (model selection), a state dict, or None
    (no evaluation has improved yet, or a checkpoint written before lstmkit kept them)."""
    prefix = "selected."
    weights = {k[len(prefix):]: v for k, v in ck.tensors.items() if k.startswith(prefix)}
    return weights or None


# ---------------------------------------------------------------------------- metrics, summary, model


def append_metrics(run_dir: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Add one evaluation's record to ``metrics.jsonl`` (flushed to disk)."""
    f = Path(run_dir) / METRICS
    line = memoryview((json.dumps(record) + "\n").encode("utf-8"))
    try:
        fd = os.open(f, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            try:
                while line:
                    line = line[os.write(fd, line):]
                os.fsync(fd)
            except OSError:  # a short write (a full disk, a file size limit): no half line is left
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    except OSError as exc:
        raise _atomic.WriteError(exc.errno or 5, f"metrics: cannot write {f} ({exc.strerror or exc})") from None


def write_metrics(run_dir: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` with ``records`` (one line each), atomically."""
    _atomic.write_text(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in records), what="metrics")


def check_run_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory of runs that exists (else one ValueError naming it)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"run_dirs: {str(p)!r} is a file, expected a run directory")
    if not p.is_dir():
        raise ValueError(f"run_dirs: no run directory at {str(p)!r}")
    return p


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (one per evaluation), each checked as the
    records of an unstarted run's directory are (a step, an int >= 1, and numbers or null).

    Raises:
        ValueError: no such directory or file, no record, or a line that is not UTF-8, not
            JSON (a last line cut short included) or not such a record; naming the file and
            the line.
    """
    d = check_run_dir(run_dir)
    f = d / METRICS
    if not f.is_file():
        raise ValueError(f"run_dirs: {str(d)!r} has no {METRICS} (not a training run, or no evaluation yet)")
    data = f.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"run_dirs: {f} line {line} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records = _metrics_records(f, text)
    if not records:
        raise ValueError(f"run_dirs: {f} is empty")
    return records


def write_summary(run_dir: str | os.PathLike[str], summary: dict[str, Any]) -> None:
    """Write ``summary.json`` atomically."""
    _atomic.write_json(Path(run_dir) / SUMMARY, summary, what="summary")


def _read_json(path: Path, damaged: str) -> Any:
    """The parsed JSON of ``path`` (None if there is no such file); ``damaged`` begins the message
    when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return loads_json(path.read_text(encoding="utf-8"), "JSON")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{damaged}: {path} is not JSON ({exc})") from None


def read_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``summary.json`` of a finished run (None while the run has not finished), its fields'
    types checked.

    Raises:
        ValueError: "damaged summary.json: …" — not JSON, not an object, or a field of the
            wrong type.
    """
    path = Path(run_dir) / SUMMARY
    value = _read_json(path, "damaged summary.json")
    if value is None and not path.is_file():
        return None
    problem = summary_problem(value)  # the fields the readers use, with their types
    if problem is not None:
        raise ValueError(f"damaged summary.json: {path}: {problem}")
    return value  # type: ignore[no-any-return]


def write_study_result(run_dir: str | os.PathLike[str], result: dict[str, Any]) -> None:
    """Write a study's record of a finished run, ``result.json``, atomically."""
    _atomic.write_json(Path(run_dir) / STUDY_RESULT, result, what="study")


def read_study_result(run_dir: str | os.PathLike[str], metric: str | None = None) -> dict[str, Any] | None:
    """A study's record of a finished run (None while there is none), every field the study
    reads checked, with its type (:func:`~lstmkit.app.run_schema.study_result_problem`).

    Args:
        metric: the study's metric: a run that did not diverge must hold its test value.

    Raises:
        ValueError: "damaged result.json: …" — not JSON, not an object, a field missing or
            of the wrong type.
    """
    path = Path(run_dir) / STUDY_RESULT
    value = _read_json(path, "damaged result.json")
    if value is None and not path.is_file():
        return None
    problem = study_result_problem(value, metric)
    if problem is not None:
        raise ValueError(f"damaged result.json: {path}: {problem}")
    return value  # type: ignore[no-any-return]


def read_config(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``config.json`` as written (a mapping), or None if there is none."""
    value = _read_json(Path(run_dir) / CONFIG, "run_dirs")
    return value if isinstance(value, dict) else None


def write_model(run_dir: str | os.PathLike[str], cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Write the final ``model.safetensors`` (``model``'s weights — the trainer passes the
    selected ones — and the config in its metadata), atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                metadata={"format": WEIGHTS_FORMAT, "config": json.dumps(asdict(cfg))})
    _atomic.write_bytes(Path(run_dir) / MODEL, data, what="model")


def load_run(path: str | os.PathLike[str], weights: str = "selected") -> tuple[TrainConfig, Task, SequenceModel]:
    """(config, task, model in eval mode) of a run directory or its checkpoint file.

    Args:
        weights: ``"selected"``: those of the best evaluation so far (what a finished run
            keeps in ``model.safetensors``; the last ones if no evaluation improved yet);
            ``"last"``: the weights training continues from.

    Raises:
        ValueError: nothing at ``path``; CheckpointError (a ValueError) for a corrupt,
            foreign or incompatible checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"run: no run directory or checkpoint at {str(p)!r}")
    if weights not in ("selected", "last"):
        raise ValueError(f"weights: expected 'selected' or 'last', got {weights!r}")
    ck = read_checkpoint(p)
    model = SequenceModel(ck.config, ck.task.input_size, ck.task.output_size)
    restore(ck, model)
    best = selected_weights(ck) if weights == "selected" else None
    if best is not None:
        model.load_state_dict(best)
    return ck.config, ck.task, model.eval()


def check_one_run(run_dir: str | os.PathLike[str], cfg: TrainConfig) -> None:
    """Refuse a directory whose ``config.json`` or ``summary.json`` describe another run than its
    checkpoint (trained with ``cfg``): files copied together from two runs would be read as one.
    The budget of steps may differ (a resumed run writes its grown budget first).

    Raises:
        CheckpointError: the settings that differ, and in which file.
    """
    d = Path(run_dir)
    mine = json.loads(json.dumps(asdict(cfg)))  # as config.json holds it
    found: list[tuple[str, str, Any, Any]] = []  # (file, setting, there, in the checkpoint)
    written = read_config(d)
    if written is not None:
        found += [(CONFIG, k, written.get(k), v) for k, v in mine.items() if k != "steps" and written.get(k) != v]
    summary = read_summary(d)
    if summary is not None:  # the fields it has (an older summary may lack some)
        said = {"task": mine["task"], "task_options": mine["task_options"], "model": cfg.model, "seed": cfg.seed}
        found += [(SUMMARY, k, summary[k], v) for k, v in said.items() if k in summary and summary[k] != v]
        if "cell" in summary and not _same_cell(summary["cell"], cfg):
            found.append((SUMMARY, "cell", summary["cell"], cfg.cell_name))
    if found:
        diff = "; ".join(f"{k}: {there!r} in {name}, {ours!r} in the checkpoint" for name, k, there, ours in found)
        raise CheckpointError(f"run_dir: {d} holds files of different runs ({diff}); its {CHECKPOINT} was not "
                              f"trained with the settings its other files record")


def _same_cell(name: Any, cfg: TrainConfig) -> bool:
    """Whether a summary's variant ``name`` is ``cfg``'s cell. Compared as specs: the names of a
    variant have changed between versions (``deep(i=3,f=3,g=3,o=3)`` is now ``deep=3``); a name
    that no longer reads is no evidence either way."""
    from lstmkit.spec import resolve

    if name == cfg.cell_name:
        return True
    try:
        return resolve(str(name)) == cfg.spec
    except (ValueError, TypeError):
        return True


# ---------------------------------------------------------------------------- facts of a run


def variant_of(run_dir: str | os.PathLike[str]) -> str:
    """The cell variant's name of a run: summary.json's, else from config.json."""
    d = Path(run_dir)
    summary = read_summary(d)
    if summary and "cell" in summary:
        return str(summary["cell"])
    cfg = read_config(d) or {}
    if cfg.get("model") in RNN_MODELS:
        return str(cfg["model"])
    from lstmkit.spec import resolve
    try:
        return resolve(cfg.get("cell", "vanilla")).name
    except (ValueError, TypeError) as exc:
        raise ValueError(f"run_dirs: {d / CONFIG}: {exc}") from None


def eval_split_of(run_dir: str | os.PathLike[str]) -> str:
    """The split a run evaluated during training (``eval_split``): its metrics are logged
    as ``<split>_<metric>``."""
    d = Path(run_dir)
    summary = read_summary(d)
    if summary and summary.get("split"):
        return str(summary["split"])
    cfg = read_config(d) or {}
    return str(cfg.get("eval_split") or TrainConfig.__dataclass_fields__["eval_split"].default)


def metric_of(run_dir: str | os.PathLike[str], records: list[dict[str, Any]]) -> str:
    """The task's target metric: summary.json's, else the task's, else the first logged one."""
    d = Path(run_dir)
    summary = read_summary(d)
    if summary and summary.get("metric"):
        return str(summary["metric"])
    cfg = read_config(d)
    if cfg and isinstance(cfg.get("task"), str) and isinstance(cfg.get("task_options", {}), dict):
        try:
            return get_task(cfg["task"], **cfg.get("task_options", {})).target.metric
        except (ValueError, TypeError):
            pass
    prefix = eval_split_of(d) + "_"
    keys = [k[len(prefix):] for k in records[-1] if k.startswith(prefix)]
    if not keys:
        raise ValueError(f"run_dirs: {d} records no {prefix[:-1]} metric")
    return keys[0]


def criterion_of(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """(target, baselines) of a run: ``target`` has ``metric``, ``goal`` ("max"/"min"),
    ``threshold`` (None: none published) and ``published``; ``baselines`` maps names to
    values of the target metric. From summary.json, else from the task config.json names.

    Raises:
        ValueError: neither file says which task the run trained.
    """
    d = Path(run_dir)
    summary = read_summary(d)
    if summary and isinstance(summary.get("target"), dict) and summary.get("metric"):
        t = summary["target"]
        return ({"metric": summary["metric"], "goal": t.get("goal"), "threshold": t.get("threshold"),
                 "published": t.get("published", "")},
                {k: float(v) for k, v in (summary.get("baselines") or {}).items() if is_number(v)})
    cfg = read_config(d)
    if not cfg or not isinstance(cfg.get("task"), str) or not isinstance(cfg.get("task_options", {}), dict):
        raise ValueError(f"run_dirs: {d} has neither a summary.json nor a config.json naming its task")
    task = get_task(cfg["task"], **cfg.get("task_options", {}))
    t = task.target
    return ({"metric": t.metric, "goal": t.goal, "threshold": t.threshold, "published": t.published},
            dict(task.baselines))


def final_values(run_dirs: list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...],
                 metric: str | None = None) -> tuple[str, list[tuple[str, float, str, str]]]:
    """(metric, [(variant, value, run name, split), …]) of a set of runs: a finished run's
    test-split value of its kept weights (summary.json), else — a run still going, or a
    metric the summary does not hold — the metric in the last evaluation of metrics.jsonl,
    on the split the run evaluated during training.

    Raises:
        ValueError: a run without the metric, or no runs.
    """
    if isinstance(run_dirs, (str, os.PathLike)) or not run_dirs:
        raise ValueError(f"run_dirs: expected a non-empty list of run directories, got {run_dirs!r}")
    check_metric_name(metric)
    rows = []
    chosen = metric
    tasks: dict[str, list[str]] = {}  # the task and its options, as written -> its runs
    for d in map(Path, run_dirs):
        cfg = read_config(d) or {}
        tasks.setdefault(f"{cfg.get('task')} {json.dumps(cfg.get('task_options') or {}, sort_keys=True)}",
                         []).append(d.name)
    if len(tasks) > 1:
        raise ValueError("run_dirs: the runs are of different tasks or task options (" + "; ".join(
            f"{k}: {', '.join(v[:3])}{', …' if len(v) > 3 else ''}" for k, v in tasks.items())
            + "); compare runs of one task")
    for d in map(Path, run_dirs):
        recs = read_metrics(d)
        m = chosen or metric_of(d, recs)
        chosen = chosen or m
        tested = ((read_summary(d) or {}).get("test") or {}).get("metrics") or {}
        if is_number(tested.get(m)):
            rows.append((variant_of(d), float(tested[m]), d.name, "test"))
            continue
        split = eval_split_of(d)
        value = recs[-1].get(f"{split}_{m}")
        if value is None:
            have = sorted(k[len(split) + 1:] for k in recs[-1] if k.startswith(split + "_"))
            raise ValueError(f"metric: run {str(d)!r} has no {split} metric {m!r}; it has {have}")
        rows.append((variant_of(d), float(value), d.name, split))
    assert chosen is not None
    return chosen, rows
