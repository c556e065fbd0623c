"""Pictures of a layer and of a run, as PNG files (matplotlib, headless); ``lstmkit plot`` draws them
from the command line (:mod:`lstmkit.app.plot_cmd`).

Every picture is a function that returns the matplotlib ``Figure`` and, given ``path``,
also writes it as a PNG::

    plot_gates(model, x, labels=…)      heatmaps of i, f, g, o over time (units × steps)
    plot_cells(model, x, labels=…)      trajectories of c_t and h_t (``highlight=``: the cells
                                        that hold what must be remembered, :func:`memory_units`)
    plot_weights(model)                 each gate's W (H × (I + H)) with the [x | h] split
    plot_curves(run_dirs)               training loss and the evaluated split's metric from metrics.jsonl
    plot_compare(run_dirs)              the test metric per cell variant (box + strip)
    plot_gradient_flow(flow)            ‖∂L/∂c_t‖, ‖∂L/∂h_t‖ and the forget gate of one model
    plot_gradflow(result)               RNN vs LSTM vs no-forget-gate LSTM on the adding problem
                                        (the experiment: :mod:`lstmkit.app.gradflow`)

Runs are read through :mod:`lstmkit.app.runs`. Files are written through
:mod:`lstmkit._atomic` (in memory, then a temporary file renamed into place) and an
existing file is never replaced unless ``overwrite=True`` (``--overwrite``). matplotlib is
imported only when a picture is drawn (``pip install 'lstmkit[plot]'``).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lstmkit import _atomic
from lstmkit.app import runs
from lstmkit.gates import activation_of
from lstmkit.layout import GATE_NAMES, GATES
from lstmkit.tracing import GradientFlow, recurrent_layer, trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lstmkit.app.tasks.base import Task

__all__ = ["plot_gates", "plot_cells", "plot_weights", "plot_curves", "plot_compare",
           "plot_gradient_flow", "plot_gradflow", "sample_input", "shown_input", "input_marks", "memory_units",
           "memory_highlight",
           "reference_lines", "figure_png", "save_png", "save_json", "check_output", "write_output"]

_DPI = 100


# ----------------------------------------------------------------------------- files


def _figure(**kw: Any) -> Figure:
    """A new Figure, not registered with pyplot (no global state, no GUI)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("lstmkit's plots need matplotlib: pip install 'lstmkit[plot]'") from None
    return Figure(layout="constrained", **kw)


def figure_png(fig: Figure, dpi: int = _DPI) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _literal(text: str) -> str:
    """``text`` drawn as written: names read from run directories and their files (a directory
    ``lr$\\frac$``) may hold '$', which matplotlib would parse as maths (and fail, or draw it)."""
    return text.replace("$", r"\$")


def _exists(p: Path) -> str:
    return f"output: {p} exists; nothing was overwritten (use --overwrite to replace it)"


def check_output(path: str | os.PathLike[str], overwrite: bool, suffix: str) -> Path:
    """``path`` as an output file of ``suffix`` that may be written (an existing one only with
    ``overwrite``), checked before anything is drawn or computed."""
    p = Path(path)
    return _atomic.check_writable(p, overwrite=overwrite, what="output", suffix=suffix, exists_error=_exists(p))


def save_png(fig: Figure, path: str | os.PathLike[str], overwrite: bool = False, dpi: int = _DPI) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically; an existing file is replaced only
    with ``overwrite``.

    Raises:
        ValueError: not a ``.png`` name, no such directory; FileExistsError;
            lstmkit._atomic.WriteError (full disk, read-only): nothing was changed.
    """
    p = check_output(path, overwrite, ".png")
    return write_output(p, figure_png(fig, dpi), overwrite)


def write_output(path: Path, data: bytes, overwrite: bool) -> Path:
    """Write ``data`` at the output ``path`` (checked by :func:`check_output`), atomically."""
    return _atomic.write_bytes(path, data, overwrite=overwrite, exists_error=_exists(path))


def _finish(fig: Figure, path: str | os.PathLike[str] | None, overwrite: bool) -> Figure:
    if path is not None:
        save_png(fig, path, overwrite)
    return fig


def save_json(obj: Any, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``obj`` as strict JSON (infinite or NaN floats as null) at ``path``, atomically; an
    existing file is replaced only with ``overwrite``."""
    p = check_output(path, overwrite, ".json")
    data = (json.dumps(_json_safe(obj), indent=1, allow_nan=False) + "\n").encode()
    return write_output(p, data, overwrite)


def _json_safe(value: Any) -> Any:
    """Infinite or NaN floats as None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- inputs


def _symbols(task: Task) -> str | None:
    """The alphabet of a task's one-hot input, where it has one."""
    if getattr(task, "name", "") == "charlm":
        return task.vocab + "\ufffd"  # type: ignore[attr-defined]
    if getattr(task, "name", "") in ("reber", "continual_reber"):
        from lstmkit.app.tasks.reber import SYMBOLS
        return SYMBOLS
    return None


def _show_char(c: str) -> str:
    return {"\n": "\u21b5", "\t": "\u2192", " ": "\u2423", "$": r"\$"}.get(c, c)


def sample_input(task: Task, text: str | None = None) -> tuple[Tensor, list[str] | None]:
    """One input sequence for the pictures, whole: ``text`` (charlm only), else the first
    sequence of the task's test set (:func:`shown_input` cuts it).

    Returns:
        ``x`` (T, 1, input_size) and the symbol at each step (charlm, Reber), or None.
    Raises:
        ValueError: ``text`` for a task that does not read text, empty text.
    """
    import torch.nn.functional as F

    alphabet = _symbols(task)
    if text is not None:
        if getattr(task, "name", "") != "charlm":
            raise ValueError(f"text: only the charlm task reads text; this run's task is {task.name!r}")
        if not text:
            raise ValueError("text: expected at least one character, got ''")
        idx = task.encode(text)  # type: ignore[attr-defined]
        x = F.one_hot(idx, task.input_size).float().unsqueeze(1)  # (T, 1, V)
    else:
        batch = next(iter(task.eval_batches("test", 1)))
        n = batch.x.shape[0] if batch.lengths is None else int(batch.lengths[0])
        x = batch.x[:n, :1]
    labels = None
    if alphabet is not None and x.shape[-1] == len(alphabet):
        labels = [_show_char(alphabet[int(i)]) for i in x[:, 0].argmax(-1)]
    return x, labels


def shown_input(task: Task, text: str | None = None, max_steps: int | None = None
                ) -> tuple[Tensor, list[str] | None, list[tuple[int, str]]]:
    """What the pictures show: :func:`sample_input`'s sequence ``x`` (T, 1, input_size) and its
    labels, cut at ``max_steps``, and the marks (:func:`input_marks`) of the whole sequence that
    fall within the steps shown — a task reads its marks from the whole sequence (the copy
    task's symbols, the recall at the last step), not from a cut one.

    Raises:
        ValueError: as :func:`sample_input`, and a ``max_steps`` below 1.
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps: expected an int >= 1, got {max_steps}")
    x, labels = sample_input(task, text)
    marks = input_marks(task, x)
    if max_steps is not None:
        x, labels = x[:max_steps], (labels[:max_steps] if labels is not None else None)
        marks = [(t, m) for t, m in marks if t < max_steps]
    return x, labels, marks


def input_marks(task: Task, x: Tensor) -> list[tuple[int, str]]:
    """The steps of the first sequence of ``x`` (T, B, I) or ``x`` (T, I) that carry what
    must be remembered (:meth:`Task.marked_steps`: the adding problem's two flagged
    values, the temporal order's X/Y, the copy task's symbols), as ``(step, label)``."""
    return task.marked_steps(x[:, 0] if x.dim() == 3 else x)


def memory_units(model: nn.Module, task: Task, x: Tensor, lengths: Tensor | None = None, *, layer: int = 0,
                 direction: int = 0) -> tuple[list[tuple[int, float]], str]:
    """The cells of one layer ranked by how closely their state follows what the task says
    must be remembered or counted.

    A task that defines ``memory_signal(x) -> (signal, what)`` (``signal`` (T, B), NaN
    where nothing is held; e.g. +1/-1 for the relevant symbol of the 1997 long-lag tasks,
    the steps since the last spike of the timing tasks, the count of a^n b^n) is traced on
    ``x`` (T, B, I) and each cell's ``c_t`` (``h_t`` for the plain RNN) is correlated with
    the signal over every step where both are defined.

    Returns:
        ``([(cell, r), …], what)``, by decreasing |r| (Pearson's r; 0 for a cell that never
        moves), or ``([], "")`` for a task without a memory signal.
    """
    signal_of = getattr(task, "memory_signal", None)
    if signal_of is None:
        return [], ""
    signal, what = signal_of(x)
    tr = trace(model, x, lengths=lengths)
    one = tr.layers[layer][direction]
    v = one["c" if "c" in one else "h"].float()  # (T, B, H)
    keep = torch.isfinite(signal) & torch.isfinite(v).all(-1)
    s, u = signal[keep].double(), v[keep].double()  # (N,), (N, H)
    if s.numel() < 2:
        return [], what
    s = s - s.mean()
    u = u - u.mean(0)
    den = (s.norm() * u.norm(dim=0)).clamp(min=1e-30)
    r = (s @ u) / den
    r = torch.where(u.norm(dim=0) > 0, r, torch.zeros_like(r))
    order = torch.argsort(r.abs(), descending=True)
    return [(int(j), float(r[j])) for j in order], what


def memory_highlight(model: nn.Module, task: Task, *, sequences: int = 64, layer: int = 0, direction: int = 0,
                     min_r: float = 0.5) -> list[tuple[int, str]]:
    """The cell that holds the task's memory signal best, as ``[(cell, label)]`` for
    :func:`plot_cells`'s ``highlight`` (measured on the first ``sequences`` test
    sequences with :func:`memory_units`); empty when the task has no signal or no cell
    follows it with |r| ≥ ``min_r``."""
    if getattr(task, "memory_signal", None) is None:
        return []
    batch = next(iter(task.eval_batches("test", sequences)))
    if batch.size > sequences:
        batch = batch.take(0, sequences)
    ranked, what = memory_units(model, task, batch.x, batch.lengths, layer=layer, direction=direction)
    if not ranked or abs(ranked[0][1]) < min_r:
        return []
    cell, r = ranked[0]
    return [(cell, f"cell {cell}: r = {r:+.2f} with {what} ({batch.size} test sequences)")]


def _mark(axes: Sequence[Any], marks: Sequence[tuple[int, str]] | None) -> None:
    """A vertical line through every axes at each marked step, labelled above the first."""
    for t, label in marks or ():
        for ax in axes:
            ax.axvline(t, color="red", lw=1.2, ls=":", alpha=0.9)
        axes[0].annotate(label, (t, 1.0), xycoords=("data", "axes fraction"), xytext=(2, 2),
                         textcoords="offset points", color="red", fontsize=8, rotation=30, ha="left", va="bottom")


def reference_lines(ax: Any, target: dict[str, Any] | None, baselines: dict[str, float],
                     values: Sequence[float]) -> None:
    """The target's threshold (dashed, green) and each baseline (dotted, grey) as labelled
    horizontal lines; the y axis spans them and the data, so that noise next to one of them
    is drawn at its true size, not zoomed into a gap."""
    ys = [float(v) for v in values if math.isfinite(v)]
    thr = (target or {}).get("threshold")
    if thr is not None:
        goal = "≥" if target and target.get("goal") == "max" else "≤"
        ax.axhline(thr, color="tab:green", ls="--", lw=1.3, label=f"target {goal} {thr:.4g}", zorder=1)
        ys.append(thr)
    for i, (name, v) in enumerate(baselines.items()):
        ax.axhline(v, color="0.4", ls=(0, (1, 1 + i)), lw=1.1, label=_literal(f"baseline {name}: {v:.4g}"), zorder=1)
        ys.append(v)
    if ys:
        lo, hi = min(ys), max(ys)
        pad = 0.06 * (hi - lo) if hi > lo else 0.06 * abs(hi) or 0.06
        ax.set_ylim(lo - pad, hi + pad)


def _common_criterion(run_dirs: Sequence[Path], metric: str) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """The target and baselines the runs share for ``metric`` (none if they differ)."""
    found = [runs.criterion_of(d) for d in run_dirs]
    if any(t["metric"] != metric for t, _ in found) or any(f != found[0] for f in found):
        return None, {}
    return found[0]


# ----------------------------------------------------------------------------- gates, cells, weights


def _direction_name(d: int) -> str:
    return "forward" if d == 0 else "reverse"


def _time_axis(ax: Any, T: int, labels: Sequence[str] | None) -> None:
    if labels is None:
        ax.set_xlabel("time step t")
        return
    ax.set_xlabel("input character")
    every = max(1, math.ceil(T / 80))
    ax.set_xticks(range(0, T, every), [labels[t] for t in range(0, T, every)], fontsize=7)


def _one_sequence(model: nn.Module, x: Tensor, layer: int, direction: int
                  ) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """(the recurrent layer, key -> (T, ·) NumPy array of the first sequence, absent notes)."""
    rec = recurrent_layer(model)
    rec.layer_params(layer, direction)  # validates layer and direction
    tr = trace(model, x)
    one = tr.layers[layer][direction]
    pick = (lambda v: v[:, 0]) if tr.batched else (lambda v: v)
    return rec, {k: pick(v).float().numpy() for k, v in one.items()}, one.absent


def plot_gates(model: nn.Module, x: Tensor, *, labels: Sequence[str] | None = None, layer: int = 0,
               direction: int = 0, title: str | None = None, path: str | os.PathLike[str] | None = None,
               overwrite: bool = False, marks: Sequence[tuple[int, str]] | None = None) -> Figure:
    """Heatmaps of every gate's activation over time, one row per gate (units × steps).

    Args:
        model: an lstmkit LSTM/RNN or a SequenceModel.
        x: one sequence ``(T, I)``, or a batch ``(T, B, I)`` (the first sequence is drawn).
        labels: the input symbol at each step (e.g. characters), drawn along the time axis.
        layer, direction: which layer and direction.
        path: also write the PNG there.
        marks: ``(step, label)`` of inputs to mark with a vertical line (:func:`input_marks`).

    Returns:
        The Figure: one axes per gate ``i, f, g, o`` (an absent gate's panel says why);
        the plain RNN has one panel, its ``h_t``.
    """
    rec, values, absent = _one_sequence(model, x, layer, direction)
    spec = rec.spec
    letters = GATES if spec.is_lstm else ("g",)
    T = next(iter(values.values())).shape[0]
    fig = _figure(figsize=(min(max(7.0, 0.12 * T + 3.0), 22.0), 1.7 * len(letters) + 1.2))
    axes = fig.subplots(len(letters), 1, sharex=True, squeeze=False)[:, 0]
    for ax, letter in zip(axes, letters):
        name = GATE_NAMES[GATES.index(letter)]
        if letter not in values:
            ax.set_title(f"{name} gate {letter}_t")
            ax.text(0.5, 0.5, absent.get(letter, "absent"), ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            continue
        v = values[letter].T  # (H, T)
        if letter == "g":
            act = spec.nonlinearity if not spec.is_lstm else spec.candidate_activation
            lim = max(1.0, float(abs(v).max())) if act != "tanh" else 1.0
            cmap, lo, hi = "RdBu_r", -lim, lim
            if act == "relu":
                cmap, lo = "viridis", 0.0
            what = (f"hidden state h_t = {act}(W [x_t, h_(t-1)] + b) (the plain RNN has no gates)"
                    if not spec.is_lstm else f"candidate g_t ({act})")
        else:
            cmap, lo, hi = "viridis", 0.0, 1.0
            act = activation_of(spec, letter) + (", stabilised" if spec.slstm and letter in "if" else "")
            what = f"{name} gate {letter}_t ({act})" + (" = 1 - i_t (cifg)" if letter == "f" and spec.coupled else "")
        im = ax.imshow(v, aspect="auto", interpolation="nearest", origin="lower", cmap=cmap, vmin=lo, vmax=hi)
        fig.colorbar(im, ax=ax, pad=0.01)
        ax.set_title(what)
        ax.set_ylabel("cell")
    _time_axis(axes[-1], T, labels)
    _mark(list(axes), marks)
    fig.suptitle(title or f"Gate activations: {spec.name}, layer {layer}, "
                          f"{_direction_name(direction)}")
    return _finish(fig, path, overwrite)


def plot_cells(model: nn.Module, x: Tensor, *, labels: Sequence[str] | None = None, layer: int = 0,
               direction: int = 0, max_units: int = 16, title: str | None = None,
               path: str | os.PathLike[str] | None = None, overwrite: bool = False,
               marks: Sequence[tuple[int, str]] | None = None,
               highlight: Sequence[tuple[int, str]] | None = None) -> Figure:
    """Trajectories of the cell state ``c_t`` (and of ``h_t``) over time, one line per unit.

    Args:
        x: one sequence ``(T, I)`` or a batch ``(T, B, I)`` (the first sequence is drawn).
        max_units: draw at most this many units.
        marks: ``(step, label)`` of inputs to mark with a vertical line (:func:`input_marks`).
        highlight: ``(unit, label)`` of units to draw thick, labelled, in front (drawn even
            beyond ``max_units``; the others then in grey): :func:`memory_highlight`.

    Returns:
        The Figure: axes "cell state c_t" and "hidden state h_t" (only the latter for the RNN).
    """
    if max_units < 1:
        raise ValueError(f"max_units: expected an int >= 1, got {max_units}")
    rec, values, _ = _one_sequence(model, x, layer, direction)
    keys = ("c", "h") if "c" in values else ("h",)
    T = values["h"].shape[0]
    H = values[keys[0]].shape[1]  # the cells (c's units; the RNN's h)
    highlighted = list(highlight or ())
    for unit, _ in highlighted:
        if not 0 <= unit < H:
            raise ValueError(f"highlight: unit {unit} is not one of the layer's {H} cells")
    fig = _figure(figsize=(min(max(7.0, 0.1 * T + 3.0), 22.0), 2.6 * len(keys) + 0.8))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    steps = range(T)
    for ax, key in zip(axes, keys):
        v = values[key]  # (T, H); a projection's h: (T, P), whose units are no cells to highlight
        chosen = highlighted if v.shape[1] == H else []
        bold = {unit for unit, _ in chosen}
        n = min(max_units, v.shape[1])
        for j in range(n):
            if j not in bold:
                ax.plot(steps, v[:, j], lw=1.0, **({"color": "0.7", "alpha": 0.8} if bold else {}))
        # the highlighted units on an axis of their own (right) when the others' range would flatten
        # them (a cell holding a sign for 1,000 steps beside cells that count distractors)
        spread = float(abs(v).max()) or 1.0
        own = float(abs(v[:, sorted(bold)]).max()) if bold else spread
        hax = ax.twinx() if bold and own < 0.25 * spread else ax
        for k, (unit, label) in enumerate(chosen):
            hax.plot(steps, v[:, unit], lw=2.4, color=f"C{k}", label=label, zorder=3)
        if hax is not ax:
            hax.set_ylabel(f"highlighted {'c_t' if key == 'c' else 'h_t'} (right axis)", color="C0")
            hax.axhline(0.0, color="C0", lw=0.4, ls="--")
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.set_title(("cell state c_t" if key == "c" else "hidden state h_t")
                     + f" ({len(set(range(n)) | bold)} of {v.shape[1]} units"
                     + (", the highlighted one in colour)" if bold else ")"))
        ax.set_ylabel("c_t" if key == "c" else "h_t")
        if bold:
            hax.legend(fontsize=8, loc="best")
    _time_axis(axes[-1], T, labels)
    _mark(list(axes), marks)
    spec = rec.spec
    fig.suptitle(title or f"Cell-state trajectories: {spec.name}, layer {layer}, "
                          f"{_direction_name(direction)}")
    return _finish(fig, path, overwrite)


def plot_weights(model: nn.Module, *, layer: int = 0, direction: int = 0, title: str | None = None,
                 path: str | os.PathLike[str] | None = None, overwrite: bool = False) -> Figure:
    """Each gate's weight matrix ``W_k = [W_x | W_h]`` (``n × (I + H_out)``) as an image.

    A dashed line marks the split between the input columns ``x_t`` and the recurrent
    columns ``h_{t-1}``; each axes' title gives the shape. Absent gates say why.
    """
    rec = recurrent_layer(model)
    views = rec.gates(layer, direction)  # validates layer / direction
    spec = rec.spec
    letters = GATES if spec.is_lstm else ("g",)
    shown = [views[GATE_NAMES[GATES.index(k)]] for k in letters]
    ncols = 2 if len(shown) > 1 else 1
    nrows = math.ceil(len(shown) / ncols)
    fig = _figure(figsize=(5.5 * ncols, 4.0 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, v in zip(axes, shown):
        if not v.present:
            ax.set_title(f"{v.name} gate: absent")
            ax.text(0.5, 0.5, v.note, ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        W = v.W.float().numpy()
        n, i_in = v.W_x.shape
        h_in = W.shape[1] - i_in  # all of h_{t-1} (with heads, W_h is one head's block; W is whole)
        lim = float(abs(W).max()) or 1.0
        im = ax.imshow(W, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=ax, pad=0.01)
        ax.axvline(i_in - 0.5, color="black", lw=1.5, ls="--")
        ax.set_xticks([(i_in - 1) / 2, i_in + (h_in - 1) / 2], ["x_t", "h_(t-1)"])
        deep = " (first layer of its MLP)" if v.mlp else ""
        if spec.is_lstm:
            ax.set_title(f"{v.name} gate W_{v.letter}: {n} × ({i_in} + {h_in}){deep}")
        else:
            ax.set_title(f"W: {n} × ({i_in} + {h_in}) (the plain RNN's only layer)")
        ax.set_xlabel(f"[x | h]: columns 0-{i_in - 1} input x_t, {i_in}-{i_in + h_in - 1} recurrent h_(t-1)")
        ax.set_ylabel("cell" if not v.mlp else "hidden unit")
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    fig.suptitle(title or f"Gate weights W = [W_x | W_h]: {spec.name}, "
                          f"layer {layer}, {_direction_name(direction)}")
    return _finish(fig, path, overwrite)


# ----------------------------------------------------------------------------- curves, compare


def plot_curves(run_dirs: Sequence[str | os.PathLike[str]], *, title: str | None = None,
                path: str | os.PathLike[str] | None = None, overwrite: bool = False) -> Figure:
    """Training loss and the evaluated metric against the step, from each run's metrics.jsonl.

    Returns:
        The Figure: axes "training loss" and "<split> <metric>" (the task's target metric on
        the split the run evaluated during training, one line per run, with the task's
        target and baselines as horizontal lines when the runs share them).
    """
    if isinstance(run_dirs, (str, os.PathLike)) or not run_dirs:
        raise ValueError(f"run_dirs: expected a non-empty list of run directories, got {run_dirs!r}")
    loaded = [(Path(d), runs.read_metrics(d)) for d in run_dirs]
    metrics = [f"{runs.eval_split_of(d)} {runs.metric_of(d, recs)}" for d, recs in loaded]
    fig = _figure(figsize=(11.0, 4.2))
    ax_loss, ax_metric = fig.subplots(1, 2)
    for (d, recs), metric in zip(loaded, metrics):
        label = _literal(f"{d.name} ({runs.variant_of(d)})")
        steps = [r["step"] for r in recs]
        loss = [r.get("train_loss", float("nan")) for r in recs]
        ax_loss.plot(steps, loss, marker="o", ms=3, label=label)
        key = metric.replace(" ", "_", 1)
        ax_metric.plot(steps, [r.get(key, float("nan")) for r in recs], marker="o", ms=3,
                       label=label if len(set(metrics)) == 1 else f"{label}: {_literal(metric)}")
    if all(r.get("train_loss", 0) > 0 for _, recs in loaded for r in recs):
        ax_loss.set_yscale("log")
    ax_loss.set_title("training loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss (mean since the previous evaluation)")
    shown = metrics[0] if len(set(metrics)) == 1 else ", ".join(sorted(set(metrics)))
    if len({m.split(" ", 1)[1] for m in metrics}) == 1:
        target, baselines = _common_criterion([d for d, _ in loaded], metrics[0].split(" ", 1)[1])
        drawn = [y for line in ax_metric.get_lines() for y in line.get_ydata()]
        reference_lines(ax_metric, target, baselines, drawn)
    ax_metric.set_title(_literal(shown))
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(_literal(shown.split(" ", 1)[1]) if len(set(metrics)) == 1 else "value")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or _literal(("Training curves: " + ", ".join(d.name for d, _ in loaded))[:120]))
    return _finish(fig, path, overwrite)


def plot_compare(run_dirs: Sequence[str | os.PathLike[str]], *, metric: str | None = None,
                 title: str | None = None, path: str | os.PathLike[str] | None = None,
                 overwrite: bool = False) -> Figure:
    """The final test metric of each run, grouped by cell variant: a box per variant and
    every run as a point on it, with the task's target and baselines as horizontal lines.

    Args:
        metric: the test metric to compare (default: the first run's task target metric).
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        raise ValueError(f"run_dirs: expected a non-empty list of run directories, got {run_dirs!r}")
    metric, rows = runs.final_values(list(run_dirs), metric)
    splits = sorted({split for *_, split in rows})
    what = f"{splits[0]} {metric}" if len(splits) == 1 else f"{metric} ({'/'.join(splits)})"
    variants = sorted({v for v, *_ in rows})
    fig = _figure(figsize=(max(5.0, 1.3 * len(variants) + 2.5), 4.5))
    ax = fig.subplots()
    groups = [[val for v, val, *_ in rows if v == name] for name in variants]
    ax.boxplot(groups, positions=range(len(variants)), widths=0.5, showfliers=False)
    gen = torch.Generator().manual_seed(0)
    for k, vals in enumerate(groups):
        jitter = (torch.rand(len(vals), generator=gen) - 0.5) * 0.25
        ax.scatter([k + float(j) for j in jitter], vals, s=22, zorder=3, alpha=0.8)
    target, baselines = _common_criterion([Path(d) for d in run_dirs], metric)
    reference_lines(ax, target, baselines, [val for _, val, *_ in rows])
    if target is not None:
        ax.legend(fontsize=8, loc="best")
    ax.set_xticks(range(len(variants)), [_literal(v) for v in variants], rotation=30 if len(variants) > 4 else 0)
    ax.set_xlabel("cell variant")
    ax.set_ylabel(_literal(what))
    ax.set_title(title or _literal(f"{what} by cell variant ({len(rows)} run{'s' if len(rows) != 1 else ''})"))
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, path, overwrite)


# ----------------------------------------------------------------------------- gradient flow


def _positive(values: Sequence[float]) -> list[float]:
    """Zeros (an underflowed gradient) are not drawn on a log axis."""
    return [v if v > 0 else float("nan") for v in values]


def plot_gradient_flow(flow: GradientFlow, *, title: str | None = None,
                       path: str | os.PathLike[str] | None = None, overwrite: bool = False) -> Figure:
    """``‖∂L/∂c_t‖`` and ``‖∂L/∂h_t‖`` against t (log scale) for every layer and direction
    of one model, and the mean forget gate per step below (LSTM)."""
    lstm = flow.spec.is_lstm
    fig = _figure(figsize=(9.0, 6.0 if lstm else 3.8))
    axes = fig.subplots(2 if lstm else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for row in flow.layers:
        for rec in row:
            where = f"layer {rec.layer}, {_direction_name(rec.direction)}"
            steps = range(1, rec.dh_norm.shape[0] + 1)
            if rec.dc_norm is not None:
                ax.plot(steps, _positive(rec.dc_norm.tolist()), label=f"‖∂L/∂c_t‖ {where}")
            ax.plot(steps, _positive(rec.dh_norm.tolist()), ls="--", label=f"‖∂L/∂h_t‖ {where}")
            if lstm and rec.f_mean is not None:
                axes[1].plot(steps, rec.f_mean.tolist(), label=where)
    ax.set_yscale("log")
    ax.set_title("gradient norm per step")
    ax.set_ylabel("‖∂L/∂c_t‖, ‖∂L/∂h_t‖")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if lstm:
        axes[1].set_title("mean forget gate f_t (∂c_t/∂c_(t-1) in the vanilla cell)")
        axes[1].set_ylabel("mean f_t")
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("time step t")
    fig.suptitle(title or f"Gradient flow: {flow.spec.name}, loss {flow.loss:.4g}")
    return _finish(fig, path, overwrite)


def plot_gradflow(result: dict[str, Any], *, title: str | None = None,
                  path: str | os.PathLike[str] | None = None, overwrite: bool = False) -> Figure:
    """The norms of :func:`lstmkit.app.gradflow.gradflow_experiment`, at initialisation and after training.

    Returns:
        The Figure: axes "at initialisation" and "after N training steps", log scale.
    """
    if not result.get("models"):
        raise ValueError("result: expected the dict of gradflow_experiment with at least one model")
    fig = _figure(figsize=(12.0, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
    steps = sorted({m["steps"] for m in result["models"]})
    for ax, stage in zip(axes, ("init", "trained")):
        for m in result["models"]:
            s = m[stage]
            ax.plot(range(1, len(s["norms"]) + 1), _positive(s["norms"]),
                    label=f"{m['name']}: ‖∂L/∂{s['quantity']}_t‖")
        ax.set_yscale("log")
        ax.set_xlabel("time step t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("at initialisation")
    axes[1].set_title("after " + "/".join(map(str, steps)) + " training steps")
    axes[0].set_ylabel("‖∂L/∂c_t‖ (‖∂L/∂h_t‖ for the RNN)")
    T = len(result["models"][0]["init"]["norms"])
    fig.suptitle(title or f"Gradient flow on the adding problem (T = {T}, loss at the last step)")
    return _finish(fig, path, overwrite)
