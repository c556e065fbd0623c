"""``lstmkit report RUN_DIR``: one self-contained HTML page about a training run.

The page holds the run's result and configuration, the table of every gate
(:func:`lstmkit.inspect.describe`), the training curves, the gate activations and cell
states on a test input, each gate's weights and the gradient flow on a test batch. The
pictures are embedded as ``data:image/png;base64`` URIs and the style sheet is inline:
the file opens from disk in any browser, with no server and nothing fetched from the
network. Every text is escaped with :func:`html.escape`.
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

from lstmkit import _atomic, plots, runs
from lstmkit.gradflow import task_gradient_flow

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


def _section(title: str, body: str) -> str:
    return f"<h2>{_e(title)}</h2>\n{body}"


def _summary_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    t = summary.get("target") or {}
    value = summary.get("value")
    rows: list[tuple[str, Any]] = [
        ("task", summary.get("task")), ("model", summary.get("model")), ("cell", summary.get("cell")),
        ("parameters", f"{summary.get('parameters', 0):,}"), ("steps", summary.get("steps")),
        ("sequences", summary.get("sequences")), ("wall time (s)", summary.get("wall_time_s")),
        ("stopped", summary.get("stopped")),
        (f"test {summary.get('metric')}", "n/a" if value is None else f"{value:.6g}"),
    ]
    if t:
        goal = "≥" if t.get("goal") == "max" else "≤"
        thr = t.get("threshold")
        rows.append(("target", "none published" if thr is None else
                     f"{goal} {thr:g}: {'met' if t.get('met') else 'not met'}"))
        rows.append(("published", t.get("published")))
    for name, v in (summary.get("baselines") or {}).items():
        rows.append((f"baseline {name}", f"{v:.6g}" if isinstance(v, (int, float)) else v))
    return rows


def _run_dir(run_dir: str | os.PathLike[str]) -> Path:
    d = Path(run_dir)
    if d.is_file():
        raise ValueError(f"run_dir: {str(d)!r} is a file; lstmkit report reads a training run's directory (the "
                         f"--out of lstmkit train), which holds its {runs.CHECKPOINT}")
    if not d.is_dir():
        raise ValueError(f"run_dir: no run directory at {str(d)!r}")
    return d


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
    from dataclasses import asdict

    from lstmkit.inspect import describe

    name = d.resolve().name
    summary = runs.read_summary(d)
    parts = [f"<h1>lstmkit report: {_e(name)}</h1>",
             f'<p class="note">{_e(str(d.resolve()))}</p>']
    if summary:
        met = (summary.get("target") or {}).get("met")
        badge = "" if met is None else (f' <span class="{"met" if met else "unmet"}">'
                                        f'{"target met" if met else "target not met"}</span>')
        parts.append(_section("Result", _table(_summary_rows(summary)) + badge))
    else:
        parts.append(_section("Result", '<p class="note">no summary.json: the run has not finished '
                                        "(the pictures below use its last checkpoint)</p>"))
    parts.append(_section("Configuration", _table(list(asdict(cfg).items()), ("setting", "value"))))
    table = describe(model, file=io.StringIO())
    parts.append(_section("Gates (lstmkit.describe)", f"<pre>{_e(table)}</pre>"))

    if (d / runs.METRICS).is_file():
        body = _image(plots.plot_curves([d]), "training curves",
                      "Training loss (mean over the steps since the previous evaluation) and the task's "
                      "target metric on the test set, from metrics.jsonl.")
    else:
        body = '<p class="note">no metrics.jsonl: no evaluation was recorded</p>'
    parts.append(_section("Training curves", body))

    x, labels = plots.sample_input(task, text, max_steps)
    what = "the given text" if text is not None else "the first sequence of the test set"
    parts.append(_section("Gate activations", _image(
        plots.plot_gates(model, x, labels=labels), "gate activation heatmaps",
        f"Every gate of layer 0 (forward) at every step of {what} ({x.shape[0]} steps); "
        "recorded by the layer's kernel (lstmkit.trace).")))
    parts.append(_section("Cell states", _image(
        plots.plot_cells(model, x, labels=labels), "cell-state trajectories",
        f"c_t and h_t of layer 0 (forward) over {what}.")))
    parts.append(_section("Weights", _image(
        plots.plot_weights(model), "gate weight matrices",
        "Each gate's W = [W_x | W_h] over [x_t, h_(t-1)], layer 0 (forward); the dashed line is the split.")))

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
                ("first / last", f"{s['ratio_first_last']:.4g}")]
        if s["f_mean"] is not None:
            rows.append(("mean forget gate f", f"{s['f_mean']:.4g}"))
        body = _image(plots.plot_gradient_flow(flow), "gradient flow",
                      "Norms of the loss's gradient with respect to each step's state (lstmkit.gradient_flow, "
                      "float64) on test sequences, with the task's loss.") + _table(rows)
        parts.append(_section("Gradient flow", body))

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
    out = Path(output) if output is not None else d / "report.html"
    exists = f"output: {out} exists; nothing was overwritten (use --overwrite to replace it)"
    _atomic.check_writable(out, overwrite=overwrite, what="output", suffix=".html", exists_error=exists)
    return _atomic.write_bytes(out, build_report(d, **kw).encode("utf-8"), overwrite=overwrite, exists_error=exists)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``lstmkit report RUN_DIR [-o FILE] [--overwrite] [--text TEXT] [--no-gradflow]``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="HTML file to write (default RUN_DIR/report.html)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    parser.add_argument("--text", default=None, help="input text for the gate pictures (charlm runs)")
    parser.add_argument("--max-steps", type=int, default=None, help="draw at most this many time steps")
    parser.add_argument("--no-gradflow", dest="gradflow", action="store_false",
                        help="leave out the gradient flow section")


def run(args: argparse.Namespace) -> int:
    """Write the report; returns the exit code."""
    import matplotlib

    matplotlib.use("Agg")
    out = write_report(args.run_dir, args.output, overwrite=args.overwrite, text=args.text,
                       gradflow=args.gradflow, max_steps=args.max_steps)
    print(f"wrote {out}")
    return 0
