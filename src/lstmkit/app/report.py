"""``lstmkit report RUN_DIR``: one self-contained HTML page about a training run.

The page opens with a table of contents, then: the result (solved or not, against the
task's criterion; the validation value that selected the kept weights; every baseline,
what it is, and whether the run is worse than it), what "solved" means for the task, a
few test inputs with the predicted and the true output, the training curves (with the
criterion and the baselines as lines), the gate activations and cell states on a test
input (the inputs to remember marked; for a task that says what must be held, the cell
that holds it drawn thick, :func:`lstmkit.app.plots.memory_highlight`), each gate's
weights, the gradient flow on a test batch, the configuration, the table of every gate
(:func:`lstmkit.inspect.describe`) and the versions, kernel, machine and date of the run
and of the report. The pictures are
embedded as ``data:image/png;base64`` URIs and the style sheet is inline: the file opens
from disk in any browser, with no server and nothing fetched from the network. Every text
is escaped with :func:`html.escape`.

``lstmkit report DIR`` on a directory of runs (``lstmkit demo``'s; a study's, whose runs lie two levels down) writes a
report into each of them.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from lstmkit._optional import require
from lstmkit.app import plots, runs
from lstmkit.app.gradflow import task_gradient_flow

__all__ = ["build_report", "write_report", "add_arguments", "run"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure { margin: 1em 0; }
figcaption, .note { color: #555; font-size: 0.9em; }
.met { color: #17702a; font-weight: 600; } .unmet { color: #a33; font-weight: 600; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[tuple[Any, Any]], header: tuple[str, str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append(f"<tr><th>{_e(header[0])}</th><th>{_e(header[1])}</th></tr>")
    for key, value in rows:
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        out.append(f"<tr><th>{_e(key)}</th><td>{_e(shown)}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _image(fig: Any, alt: str, caption: str) -> str:
    data = base64.b64encode(plots.figure_png(fig)).decode("ascii")
    return (f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.6g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def _better(goal: str | None, a: float, b: float) -> bool:
    """``a`` strictly better than ``b`` for a metric whose goal is ``goal``."""
    return a > b if goal == "max" else a < b


def _verdict(summary: dict[str, Any]) -> str:
    """The result in one paragraph: solved or not, against the criterion and the baselines."""
    t = summary.get("target") or {}
    test = (summary.get("test") or {}).get("value")
    metric, goal, thr = summary.get("metric"), t.get("goal"), t.get("threshold")
    value, split = (test, "test") if test is not None else (summary.get("value"), summary.get("split", "test"))
    if value is None:
        return '<p class="unmet">No evaluation was recorded.</p>'
    sign = "≥" if goal == "max" else "≤"
    if thr is None:
        head = f'<p>{_e(split)} {_e(metric)} = <b>{value:.6g}</b>; this task has no published threshold.</p>'
    elif t.get("met") is not None and test is not None:
        ok = bool((summary.get("test") or {}).get("met"))
        head = (f'<p class="{"met" if ok else "unmet"}">{"Solved" if ok else "Not solved"}: the test split\'s '
                f'{_e(metric)} of the kept weights is {value:.6g}; the criterion is {sign} {thr:.6g}.</p>')
    else:
        head = f'<p>{_e(split)} {_e(metric)} = {value:.6g} (criterion {sign} {thr:.6g}); the run has not finished.</p>'
    worse = [name for name, b in (summary.get("baselines") or {}).items()
             if isinstance(b, (int, float)) and _better(goal, b, value)]
    if worse:
        head += (f'<p class="unmet">Worse than the trivial baseline{"s" if len(worse) > 1 else ""} '
                 f'{", ".join(_e(w) for w in worse)}: the model has not learned what the task asks for.</p>')
    return head


def _summary_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    t = summary.get("target") or {}
    test = summary.get("test") or {}
    goal = "≥" if t.get("goal") == "max" else "≤"
    thr = t.get("threshold")
    rows: list[tuple[str, Any]] = [
        ("task", f"{summary.get('task')} {json.dumps(summary.get('task_options') or {})}"),
        ("model", f"{summary.get('model')} {summary.get('cell')}"),
        ("parameters", _fmt(summary.get("parameters"))), ("steps", _fmt(summary.get("steps"))),
        ("training sequences", _fmt(summary.get("sequences"))), ("wall time (s)", summary.get("wall_time_s")),
        ("stopped", summary.get("stopped")),
        (f"test {summary.get('metric')} (kept weights)", _fmt(test.get("value"))),
        (f"{summary.get('split')} {summary.get('metric')} that selected them",
         f"{_fmt(summary.get('value'))} at step {_fmt(summary.get('selected_step'))}"),
        ("criterion", "none published" if thr is None else f"{goal} {thr:.6g}"),
        ("solved", "n/a" if thr is None or not test else "yes" if test.get("met") else "no"),
    ]
    if t.get("first_met_step") is not None:  # (its sequences may be null: the schema allows either alone)
        sequences = t.get("sequences_to_target")
        rows.append(("first met on the validation split", f"step {t['first_met_step']:,}"
                     + (f" ({sequences:,} sequences)" if sequences is not None else "")))
    return rows


def _baseline_table(summary: dict[str, Any], notes: dict[str, str]) -> str:
    t = summary.get("target") or {}
    value = (summary.get("test") or {}).get("value")
    if value is None:
        value = summary.get("value")
    rows = ["<table>", "<tr><th>baseline</th><th>value</th><th>what it is</th><th>this run</th></tr>"]
    for name, b in (summary.get("baselines") or {}).items():
        if not isinstance(b, (int, float)):
            continue
        cmp = "n/a" if value is None else ("better" if _better(t.get("goal"), value, b) else
                                          "WORSE" if _better(t.get("goal"), b, value) else "equal")
        rows.append(f"<tr><th>{_e(name)}</th><td>{b:.6g}</td><td>{_e(notes.get(name, ''))}</td>"
                    f'<td class="{"unmet" if cmp == "WORSE" else ""}">{cmp}</td></tr>')
    rows.append("</table>")
    return "\n".join(rows) if len(rows) > 3 else '<p class="note">This task has no baselines.</p>'


def _solved_text(summary: dict[str, Any] | None, task: Any) -> str:
    target = task.target
    sign = "≥" if target.goal == "max" else "≤"
    crit = ("it has no published threshold" if target.threshold is None else
            f"{target.metric} {sign} {target.threshold:.6g}")
    split = (summary or {}).get("split", "valid")
    return (f"<p><b>Solved</b> means that the test split's {_e(target.metric)} of the weights the run kept meets the "
            f"task's criterion: {_e(crit)}. The criterion and what was published: {_e(target.published)}</p>"
            f"<p>The run evaluated its <b>{_e(split)}</b> split during training: that decided when to stop (the "
            f"criterion met there) and which weights to keep (those of the best evaluation). The test split was "
            f"evaluated once, at the end, on the kept weights. <i>Sequences to the criterion</i> counts the "
            f"training sequences seen before the first {_e(split)} evaluation that met it.</p>")


def _examples(task: Any, model: Any, n: int = 3) -> str:
    import torch

    batch = next(iter(task.eval_batches("test", 16)))
    with torch.no_grad():
        out, _ = model(batch.x, None, batch.lengths)
    text = task.show(out, batch, n=n)
    if not text:
        return '<p class="note">This task shows no examples.</p>'
    return (f'<p class="note">The first {n} test inputs, what the kept weights predicted, and the true output '
            f"(lstmkit sample prints the same).</p><pre>{_e(text)}</pre>")


def _environment(summary: dict[str, Any] | None, model: Any) -> str:
    import torch

    from lstmkit import kernels
    from lstmkit.app.train import environment

    now = environment()
    run = (summary or {}).get("environment") or {}
    rec = model.rnn
    kernel = kernels.select(rec.spec, torch.device("cpu"), torch.float32, rec.backend).name
    keys = ["lstmkit", "torch", "python", "kernel", "cpu", "cores", "cpu_capability", "threads", "platform", "date"]
    rows = ["<table>", "<tr><th></th><th>the run (training)</th><th>this report</th></tr>"]
    for k in keys:
        mine = now.get(k, "")
        if k == "kernel":
            mine = kernel or ""
        rows.append(f"<tr><th>{_e(k)}</th><td>{_e(run.get(k, '—'))}</td><td>{_e(mine)}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _run_dir(run_dir: str | os.PathLike[str]) -> Path:
    d = Path(run_dir)
    if d.is_file():
        raise ValueError(f"run_dir: {str(d)!r} is a file; lstmkit report reads a training run's directory (the "
                         f"--out of lstmkit train), which holds its {runs.CHECKPOINT}")
    if not d.is_dir():
        raise ValueError(f"run_dir: no run directory at {str(d)!r}")
    return d


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def build_report(run_dir: str | os.PathLike[str], *, text: str | None = None, gradflow: bool = True,
                 max_steps: int | None = None, batch_size: int = 16) -> str:
    """The HTML of the report of ``run_dir`` (see the module docstring).

    Args:
        run_dir: a training run directory (with ``checkpoint.safetensors``).
        text: input for the gate and cell pictures (charlm runs); default: the first test sequence.
        gradflow: include the gradient flow (one forward and backward on the reference equations).
        max_steps: draw at most this many time steps of the input.
        batch_size: test sequences the gradient flow is measured on.

    Raises:
        ValueError: no such directory, or no loadable checkpoint in it.
    """
    d = _run_dir(run_dir)
    cfg, task, model = runs.load_run(d)
    runs.check_one_run(d, cfg)
    from dataclasses import asdict

    from lstmkit.inspect import describe

    name = d.resolve().name
    summary = runs.read_summary(d)
    sections: list[tuple[str, str]] = []
    if summary:
        body = _verdict(summary) + _table(_summary_rows(summary)) + "<h3>Baselines</h3>" + \
            _baseline_table(summary, task.baseline_notes)
    else:
        body = ('<p class="note">no summary.json: the run has not finished (the pictures below use the best '
                "weights of its last checkpoint)</p>")
    sections.append(("Result", body))
    sections.append(("What solved means", _solved_text(summary, task)))
    sections.append(("Examples", _examples(task, model)))
    if (d / runs.METRICS).is_file():
        split = runs.eval_split_of(d)
        body = _image(plots.plot_curves([d]), "training curves",
                      f"Training loss (mean over the steps since the previous evaluation) and the task's target "
                      f"metric on the {split} split, from metrics.jsonl; the dashed line is the criterion, the "
                      f"dotted ones the baselines.")
    else:
        body = '<p class="note">no metrics.jsonl: no evaluation was recorded</p>'
    sections.append(("Training curves", body))

    x, labels, marks = plots.shown_input(task, text, max_steps)
    what = "the given text" if text is not None else "the first sequence of the test set"
    marked = f"; red dotted lines mark the inputs to remember ({', '.join(m for _, m in marks)})" if marks else ""
    lstm = model.rnn.spec.is_lstm  # (the plain RNN: no gates, no cell state; its pictures say so)
    sections.append(("Gate activations", _image(
        plots.plot_gates(model, x, labels=labels, marks=marks), "gate activation heatmaps",
        (f"Every gate of layer 0 (forward) at every step of {what} ({x.shape[0]} steps)" if lstm else
         f"The plain RNN has no gates; {what} ({x.shape[0]} steps)")
        + f"; recorded by the layer's kernel (lstmkit.trace){marked}.")))
    highlight = plots.memory_highlight(model, task)
    held = (f" The thick line is the cell whose state follows what must be held most closely ("
            f"{highlight[0][1]}), measured by lstmkit.app.plots.memory_units." if highlight else "")
    sections.append(("Cell states", _image(
        plots.plot_cells(model, x, labels=labels, marks=marks, highlight=highlight), "cell-state trajectories",
        f"{'c_t and h_t' if lstm else 'h_t (the plain RNN has no cell state)'} of layer 0 (forward) over "
        f"{what}{marked}.{held}")))
    sections.append(("Weights", _image(
        plots.plot_weights(model), "gate weight matrices",
        ("Each gate's W" if lstm else "The plain RNN's one layer W")
        + " = [W_x | W_h] over [x_t, h_(t-1)], layer 0 (forward); the dashed line is the split.")))

    if gradflow:
        batch = next(iter(task.eval_batches("test", batch_size)))
        if batch.size > batch_size:
            batch = batch.take(0, batch_size)
        flow = task_gradient_flow(model, task, batch)
        s = flow.summary()
        q = s["quantity"]
        rows = [("loss", f"{flow.loss:.6g}"), ("sequences", batch.size), ("steps T", s["T"]),
                (f"‖∂L/∂{q}_t‖ at t=1", f"{s['t1']:.4g}"),
                (f"‖∂L/∂{q}_t‖ at t={max(s['T'] // 2, 1)}", f"{s['t_mid']:.4g}"),
                (f"‖∂L/∂{q}_t‖ at t={s['T']}", f"{s['t_last']:.4g}"),
                ("first / last", "— (no gradient reaches the last state)" if s["ratio_first_last"] is None
                 else f"{s['ratio_first_last']:.4g}")]
        if s["f_mean"] is not None:
            rows.append(("mean forget gate f", f"{s['f_mean']:.4g}"))
        body = _image(plots.plot_gradient_flow(flow), "gradient flow",
                      "Norms of the loss's gradient with respect to each step's state (lstmkit.gradient_flow, "
                      "float64) on test sequences, with the task's loss.") + _table(rows)
        sections.append(("Gradient flow", body))
    settings = asdict(cfg)
    if cfg.model != "lstm":  # the task's recipe cell stays in the config; the plain RNN has no gates to vary
        settings["cell"] = f"— (unused by model {cfg.model}: {settings['cell']})"
    sections.append(("Configuration", _table(list(settings.items()), ("setting", "value"))))
    table = describe(model, file=io.StringIO())
    sections.append(("Gates (lstmkit.describe)", f"<pre>{_e(table)}</pre>"))
    sections.append(("Versions, kernel, machine and date", _environment(summary, model)))

    toc = "".join(f'<li><a href="#{_slug(t)}">{_e(t)}</a></li>' for t, _ in sections)
    parts = [f"<h1>lstmkit report: {_e(name)}</h1>", f'<p class="note">{_e(str(d.resolve()))}</p>',
             f'<nav><h2 id="contents">Contents</h2><ol>{toc}</ol></nav>']
    parts += [f'<h2 id="{_slug(t)}">{_e(t)}</h2>\n{body}' for t, body in sections]
    doc = "\n".join(parts)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>lstmkit report: {_e(name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"{doc}\n</body>\n</html>\n")


def write_report(run_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
                 overwrite: bool = False, **kw: Any) -> Path:
    """Write :func:`build_report` to ``output`` (default ``RUN_DIR/report.html``), atomically;
    an existing file is replaced only with ``overwrite=True``.

    Raises:
        FileExistsError: the output exists and ``overwrite`` is False (checked before any work).
        ValueError: see :func:`build_report`; an output directory that does not exist.
    """
    d = _run_dir(run_dir)
    out = plots.check_output(Path(output) if output is not None else d / "report.html", overwrite, ".html")
    return plots.write_output(out, build_report(d, **kw).encode("utf-8"), overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``lstmkit report RUN_DIR [-o FILE] [--overwrite] [--text TEXT] [--no-gradflow]``."""
    from lstmkit.app._argparse import path_arg

    parser.add_argument("run_dir", type=path_arg, metavar="RUN_DIR")
    parser.add_argument("-o", "--output", type=path_arg, default=None,
                        help="HTML file to write (default RUN_DIR/report.html)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    parser.add_argument("--text", default=None, help="input text for the gate pictures (charlm runs)")
    parser.add_argument("--max-steps", type=int, default=None, help="draw at most this many time steps")
    parser.add_argument("--no-gradflow", dest="gradflow", action="store_false",
                        help="leave out the gradient flow section")


def _runs_below(d: Path, depth: int = 3) -> list[Path]:
    """The run directories (with a checkpoint) inside ``d``, up to ``depth`` levels down (a study's
    are ``runs/<variant>/lr<k>-s<seed>``), sorted; none if ``d`` is a run itself."""
    if not d.is_dir() or (d / runs.CHECKPOINT).is_file() or depth == 0:
        return []
    found = []
    for p in sorted(q for q in d.iterdir() if q.is_dir() and not q.is_symlink()):
        found += [p] if (p / runs.CHECKPOINT).is_file() else _runs_below(p, depth - 1)
    return found


def run(args: argparse.Namespace) -> int:
    """Write the report (one per run for a directory of runs); returns the exit code."""
    require("lstmkit report", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    below = _runs_below(Path(args.run_dir))
    if below and args.output is not None:
        raise ValueError(f"--output: {args.run_dir} holds {len(below)} runs; each gets its own report.html "
                         f"(leave --output out)")
    taken = [str(d / "report.html") for d in below if (d / "report.html").exists()]
    if taken and not args.overwrite:
        raise FileExistsError(f"output: {', '.join(taken[:3])} exist{'s' if len(taken) == 1 else ''}; nothing was "
                              f"overwritten (use --overwrite to replace them)")
    if not below:
        out = write_report(args.run_dir, args.output, overwrite=args.overwrite, text=args.text,
                           gradflow=args.gradflow, max_steps=args.max_steps)
        print(f"wrote {out}")
        return 0
    # every output checked and every run's report made before any is written: a damaged run or an
    # unwritable output refuses them all, leaving no report half the runs have (which a second call
    # would then refuse as existing)
    outs = [plots.check_output(d / "report.html", args.overwrite, ".html") for d in below]
    pages = [build_report(d, text=args.text, gradflow=args.gradflow, max_steps=args.max_steps) for d in below]
    for out, page in zip(outs, pages):
        plots.write_output(out, page.encode("utf-8"), args.overwrite)
        print(f"wrote {out}")
    return 0
