"""The gradient-flow experiment: how ‖∂L/∂c_t‖ (‖∂L/∂h_t‖ for the RNN) decays over time in a
plain RNN, a vanilla LSTM and an LSTM without forget gate, at initialisation and after
training, on the adding problem (``lstmkit plot gradflow`` draws it with
:func:`lstmkit.app.plots.plot_gradflow`).

    result = gradflow_experiment(("rnn", "vanilla", "nfg"), length=100, steps=3000)
    print(gradflow_table(result))
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lstmkit import _atomic
from lstmkit.app.config import model_and_cell
from lstmkit.app.runs import load_run, read_checkpoint
from lstmkit.app.tasks.base import Task
from lstmkit.tracing import GradientFlow, gradient_flow

__all__ = ["gradflow_experiment", "gradflow_table", "task_gradient_flow"]


def task_gradient_flow(model: nn.Module, task: Task, batch: Any) -> GradientFlow:
    """:func:`lstmkit.gradient_flow` of a training model on one of its task's batches,
    with the task's loss, measured on a float64 copy (so that a gradient of 1e-40 is
    measured, not underflowed to 0 as in float32); ``model`` itself is not changed."""
    m = copy.deepcopy(model).double()
    return gradient_flow(m, batch.x.double(), lambda out: task.loss(out, batch), lengths=batch.lengths)


def _measure(model: nn.Module, task: Task, batch: Any) -> dict[str, Any]:
    flow = task_gradient_flow(model, task, batch)
    s = flow.summary()
    rec = flow.layers[0][0]
    s["norms"] = rec.norm().tolist()
    s["dh_norms"] = rec.dh_norm.tolist()
    s["loss"] = flow.loss
    return s


def gradflow_experiment(cells: Sequence[str] = ("rnn", "vanilla", "nfg"), *, length: int = 100,
                        hidden: int = 32, batch_size: int = 32, steps: int = 3000, lr: float = 1e-2,
                        seed: int = 0, probe_size: int = 64, threads: int | None = 1,
                        runs: Sequence[str | os.PathLike[str]] | None = None,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ‖∂L/∂c_t‖ (‖∂L/∂h_t‖ for the RNN) on the adding problem at initialisation
    and after training.

    The task is ``adding`` in the ``le`` form (fixed length ``length``; the loss is the
    squared error of the output at the last step). Each model is trained for ``steps``
    steps with :class:`lstmkit.app.train.Trainer` (Adam, ``lr``, gradient clipping 1) in a
    temporary directory, or taken from ``runs`` (trained run directories of the adding
    task; "init" is then the same config's initialisation, from its seed). The gradients
    are measured in float64 on ``probe_size`` test sequences.

    Args:
        cells: ``"rnn"`` / ``"rnn_relu"`` for a plain RNN, else an LSTM variant (``"vanilla"``, ``"nfg"``, …).
        threads: torch threads while training (1 is fastest at these sizes on shared cores).

    Returns:
        A JSON-ready dict: ``settings`` and ``models``, a list of ``{"name", "model",
        "cell", "steps", "init": {...}, "trained": {...}}`` where each stage has
        ``t1``, ``t_mid``, ``t_last``, ``ratio_first_last``, ``f_mean``, ``loss``,
        ``norms`` (T values) and ``dh_norms``.
    """
    from lstmkit.app.model import SequenceModel
    from lstmkit.app.tasks.registry import get_task
    from lstmkit.app.train import TrainConfig, Trainer

    say = log or (lambda s: None)
    start = time.perf_counter()
    for name, value in (("length", length), ("hidden", hidden), ("batch_size", batch_size),
                        ("probe_size", probe_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    models = []
    if runs:
        loaded = [(d, *load_run(d)) for d in runs]
        for d, cfg, _, _ in loaded:
            if cfg.task != "adding":
                raise ValueError(f"runs: {str(d)!r} is a run of task {cfg.task!r}, expected 'adding'")
        options = {str(d): cfg.task_options for d, cfg, _, _ in loaded}
        if len({repr(sorted(o.items())) for o in options.values()}) > 1:  # one T: the table's steps are shared
            raise ValueError(f"runs: the runs are of the adding problem with different options ({options}); the "
                             f"gradients are compared at the same steps, so give runs of one length")
        for d, cfg, task, trained in loaded:
            torch.manual_seed(cfg.seed)  # the Trainer's initialisation, from the run's seed
            init = SequenceModel(cfg, task.input_size, task.output_size).eval()
            batch = next(iter(task.eval_batches("test", probe_size)))
            n_steps = int(read_checkpoint(d).state["step"])
            label = cfg.model if cfg.model != "lstm" else cfg.cell
            say(f"{label}: measuring {d}")
            models.append({"name": label, "model": cfg.model, "cell": cfg.cell, "run": str(d), "steps": n_steps,
                           "init": _measure(init, task, batch), "trained": _measure(trained, task, batch)})
        settings = {"runs": [str(d) for d in runs], "probe_size": probe_size}
    else:
        if isinstance(cells, str) or not cells:
            raise ValueError(f"cells: expected a non-empty list of variants (e.g. ['rnn', 'vanilla']), got {cells!r}")
        options = {"length": length, "form": "le", "eval_size": max(probe_size, 1)}
        task = get_task("adding", seed=seed, **options)  # bad options fail before any training
        configs = []
        for cell in cells:  # every model made once first: a bad cell fails before any training
            cfg = TrainConfig(task="adding", task_options=options, **model_and_cell(cell), hidden_size=hidden,
                              batch_size=batch_size, steps=max(steps, 1), eval_every=max(steps, 1),
                              lr=lr, seed=seed, threads=threads)
            cfg.validate()
            SequenceModel(cfg, task.input_size, task.output_size, device="meta")
            configs.append((cell, cfg))
        old_threads = torch.get_num_threads()
        try:
            for cell, cfg in configs:
                with _atomic.scratch_directory("gradflow") as tmp:
                    trainer = Trainer(cfg, tmp / "run", progress=False)
                    batch = next(iter(trainer.task.eval_batches("test", probe_size)))
                    t0 = time.perf_counter()
                    init = _measure(trainer.model, trainer.task, batch)
                    for _ in range(steps):
                        trainer.train_step()
                    say(f"{cell}: {steps} training steps in {time.perf_counter() - t0:.1f} s")
                    models.append({"name": cell, "model": cfg.model, "cell": cfg.cell, "steps": steps,
                                   "init": init, "trained": _measure(trainer.model, trainer.task, batch)})
        finally:
            torch.set_num_threads(old_threads)
        settings = {"task": "adding", "task_options": options, "hidden": hidden, "batch_size": batch_size,
                    "steps": steps, "lr": lr, "seed": seed, "probe_size": probe_size}
    return {"settings": settings, "models": models, "elapsed_s": round(time.perf_counter() - start, 2)}


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def gradflow_table(result: dict[str, Any]) -> str:
    """The measured table of :func:`gradflow_experiment` as text."""
    T = result["models"][0]["init"]["T"] if result["models"] else 0
    head = ["model", "stage", "norm of", "t=1", f"t={max(T // 2, 1)}", f"t={T}", "t=1 / t=T", "mean f", "loss"]
    rows = []
    for m in result["models"]:
        for stage in ("init", "trained"):
            s = m[stage]
            rows.append([m["name"], "init" if stage == "init" else f"{m['steps']} steps",
                         f"dL/d{s['quantity']}_t", _fmt(s["t1"]), _fmt(s["t_mid"]), _fmt(s["t_last"]),
                         _fmt(s["ratio_first_last"]), _fmt(s["f_mean"]), _fmt(s["loss"])])
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*head), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    return "\n".join(out)
