"""lstmkit.app.plots and ``lstmkit plot``: every picture is a valid, non-empty PNG with the
expected titles and axis labels; files are never overwritten by accident; bad input
fails with one clear line. Runs are tiny and trained in a temporary directory."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

import lstmkit.app.runs as rundir
from lstmkit.app import gradflow, plot_cmd, plots
from lstmkit.app.cli import main
from lstmkit.app.train import TrainConfig, train
from lstmkit.tracing import gradient_flow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
H = 6


def assert_png(data: bytes | Path, min_side: int = 100) -> None:
    """PNG signature, decodable, at least ``min_side`` pixels each way, not blank."""
    raw = data.read_bytes() if isinstance(data, Path) else data
    assert raw[:8] == PNG_SIGNATURE, "not a PNG"
    img = matplotlib.image.imread(io.BytesIO(raw), format="png")
    assert img.ndim == 3 and img.shape[0] >= min_side and img.shape[1] >= min_side, img.shape
    assert float(img[..., :3].std()) > 0.01, "blank image"


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def _run(root: Path, name: str, **kw) -> Path:
    cfg = TrainConfig(hidden_size=H, batch_size=4, steps=4, eval_every=2, eval_batch_size=16, **kw)
    train(cfg, root / name, progress=False)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    adding = dict(task="adding", task_options={"length": 22, "eval_size": 16})
    return {
        "vanilla": _run(root, "add-vanilla", cell="vanilla", **adding),
        "vanilla2": _run(root, "add-vanilla-s1", cell="vanilla", seed=1, **adding),
        "nfg": _run(root, "add-nfg", cell="nfg", **adding),
        "rnn": _run(root, "add-rnn", model="rnn", **adding),
        "charlm": _run(root, "char", task="charlm", task_options={"max_bytes": 30000, "bptt": 16,
                                                                   "eval_streams": 2}, cell="peephole"),
    }


def cli(argv: list[str], capsys=None) -> int:
    """``lstmkit plot …`` through lstmkit.app.cli.main: exit code, errors printed as one line."""
    return main(["plot", *argv])


# ----------------------------------------------------------------------------- pictures


def test_gates(runs, tmp_path):
    cfg, task, model = rundir.load_run(runs["vanilla"])
    x, labels = plots.sample_input(task)
    assert labels is None and x.shape[1:] == (1, 2)
    fig = plots.plot_gates(model, x, path=tmp_path / "g.png")
    assert titles(fig)[:4] == ["input gate i_t (sigmoid)", "forget gate f_t (sigmoid)", "candidate g_t (tanh)",
                               "output gate o_t (sigmoid)"]
    assert fig.get_suptitle() == "Gate activations: vanilla, layer 0, forward"
    heat = [ax for ax in fig.axes if ax.get_images()]
    assert len(heat) == 4 and all(ax.get_ylabel() == "cell" for ax in heat)
    assert heat[-1].get_xlabel() == "time step t"
    assert heat[0].get_images()[0].get_array().shape == (H, x.shape[0])  # units × steps
    assert_png(tmp_path / "g.png")


def _vlines(ax) -> list[float]:
    """x positions of the vertical lines of an axes."""
    return sorted(float(line.get_xdata()[0]) for line in ax.get_lines()
                  if len(set(line.get_xdata())) == 1 and line.get_transform() != ax.transData)


def test_gate_and_cell_pictures_mark_the_adding_problems_flagged_inputs(runs):
    _, task, model = rundir.load_run(runs["vanilla"])
    x, _ = plots.sample_input(task)
    flagged = [t for t in range(x.shape[0]) if float(x[t, 0, 1]) == 1.0]  # the marker input is 1 there
    assert len(flagged) == 2
    marks = plots.input_marks(task, x)
    assert [t for t, _ in marks] == flagged
    assert [label for _, label in marks] == [f"X{k + 1} = {float(x[t, 0, 0]):+.2f}" for k, t in enumerate(flagged)]
    for fig in (plots.plot_gates(model, x, marks=marks), plots.plot_cells(model, x, marks=marks)):
        panels = [a for a in fig.axes if a.get_images() or a.get_ylabel() in ("c_t", "h_t")]
        assert len(panels) in (4, 2)  # every gate's heatmap; c_t and h_t
        for ax in panels:
            assert _vlines(ax) == [float(t) for t in flagged], ax.get_title()
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert all(label in texts for _, label in marks)
    assert plots.input_marks(rundir.load_run(runs["charlm"])[1], x[:, :, :1]) == []  # nothing to mark there


@pytest.mark.parametrize(("task_name", "options"), [("copy", {"length": 24, "eval_size": 8}),
                                                    ("long_lag", {"variant": "2a", "p": 10, "q": 10, "eval_size": 8}),
                                                    ("adding", {"length": 24, "eval_size": 8})])
def test_the_marks_of_a_cut_sequence_are_the_whole_ones_within_it(task_name, options):
    """--max-steps cuts the picture, not the task's reading of the sequence: the marks are those
    of the whole sequence within the steps shown (the copy task's marks failed with an IndexError
    below 10 steps; long_lag labelled the last step shown 'recall')."""
    from lstmkit.app.tasks.registry import get_task

    task = get_task(task_name, **options)
    whole, labels, marks = plots.shown_input(task)
    assert marks == plots.input_marks(task, whole) and marks
    for n in (1, 3, marks[-1][0]):
        x, _, cut = plots.shown_input(task, max_steps=n)
        assert x.shape[0] == n and cut == [(t, m) for t, m in marks if t < n]
    with pytest.raises(ValueError, match="max_steps: expected an int >= 1, got 0"):
        plots.shown_input(task, max_steps=0)


def test_gates_charlm_characters_along_the_axis(runs, tmp_path):
    _, task, model = rundir.load_run(runs["charlm"])
    x, labels = plots.sample_input(task, text="def f(x):\n\treturn x")
    assert labels is not None and labels[:4] == ["d", "e", "f", "\u2423"] and labels[9] == "\u21b5"
    fig = plots.plot_gates(model, x, labels=labels, path=tmp_path / "c.png")
    bottom = [ax for ax in fig.axes if ax.get_images()][-1]
    assert bottom.get_xlabel() == "input character"
    assert [t.get_text() for t in bottom.get_xticklabels()] == labels
    assert_png(tmp_path / "c.png")
    _, labels = plots.sample_input(task)  # default: the start of the test text, decoded
    assert labels and len(labels) == 16


def test_gates_absent_gate_and_rnn(runs):
    _, task, model = rundir.load_run(runs["nfg"])
    fig = plots.plot_gates(model, plots.sample_input(task)[0])
    forget = [ax for ax in fig.axes if ax.get_title() == "forget gate f_t"][0]
    assert not forget.get_images() and [t.get_text() for t in forget.texts] == ["absent: f ≡ 1 (nfg)"]
    _, task, rnn = rundir.load_run(runs["rnn"])
    fig = plots.plot_gates(rnn, plots.sample_input(task)[0])
    assert len(titles(fig)) == 1 and titles(fig)[0].startswith("hidden state h_t = tanh")
    assert_png(plots.figure_png(fig))


def test_cells(runs, tmp_path):
    _, task, model = rundir.load_run(runs["vanilla"])
    fig = plots.plot_cells(model, plots.sample_input(task)[0], max_units=4, path=tmp_path / "cells.png")
    assert titles(fig) == ["cell state c_t (4 of 6 units)", "hidden state h_t (4 of 6 units)"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["c_t", "h_t"] and fig.axes[-1].get_xlabel() == "time step t"
    assert len(fig.axes[0].get_lines()) == 4 + 1  # 4 units and the zero line
    assert fig.get_suptitle().startswith("Cell-state trajectories")
    assert_png(tmp_path / "cells.png")
    _, task, rnn = rundir.load_run(runs["rnn"])
    fig = plots.plot_cells(rnn, plots.sample_input(task)[0])
    assert titles(fig) == ["hidden state h_t (6 of 6 units)"]


def test_weights(runs, tmp_path):
    _, _, model = rundir.load_run(runs["nfg"])
    fig = plots.plot_weights(model, path=tmp_path / "w.png")
    assert titles(fig) == ["input gate W_i: 6 × (2 + 6)", "forget gate: absent", "candidate gate W_g: 6 × (2 + 6)",
                           "output gate W_o: 6 × (2 + 6)"]
    for ax in fig.axes:
        if ax.get_images():
            assert ax.get_images()[0].get_array().shape == (6, 2 + 6)
            assert ax.get_xlabel() == "[x | h]: columns 0-1 input x_t, 2-7 recurrent h_(t-1)"
            assert [float(line.get_xdata()[0]) for line in ax.get_lines()] == [1.5]  # the [x | h] split
            assert [t.get_text() for t in ax.get_xticklabels()] == ["x_t", "h_(t-1)"]
    assert_png(tmp_path / "w.png")
    _, _, rnn = rundir.load_run(runs["rnn"])
    assert titles(plots.plot_weights(rnn)) == ["W: 6 × (2 + 6) (the plain RNN's only layer)"]
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 0\], got 2"):
        plots.plot_weights(model, layer=2)


def test_labels_say_what_each_panel_holds():
    """Found by a sweep of the inspection features: a layer with heads titled W_k with one head's
    block width (8 × (3 + 2) for an (8, 11) image); every gate panel said 'sigmoid' (a hard
    sigmoid's, the sLSTM's exponential gates); a highlighted cell of a projected layer was
    checked against h's P units (and drawn on h's unit j, no cell after the projection)."""
    import lstmkit

    ax = plots.plot_weights(lstmkit.LSTM(3, 8, heads=4)).axes[0]
    assert ax.get_title() == "input gate W_i: 8 × (3 + 8)"
    assert ax.get_xlabel() == "[x | h]: columns 0-2 input x_t, 3-10 recurrent h_(t-1)"
    x = torch.randn(6, 1, 3)
    for cell, want in (("gate_act=hard_sigmoid", ["hard_sigmoid", "hard_sigmoid", "tanh", "hard_sigmoid"]),
                       ("slstm", ["exp, stabilised", "sigmoid, stabilised", "tanh", "sigmoid"]),
                       ("slstm+forget_act=exp", ["exp, stabilised", "exp, stabilised", "tanh", "sigmoid"])):
        titles = [a.get_title() for a in plots.plot_gates(lstmkit.LSTM(3, 4, cell=cell), x).axes if a.get_title()]
        assert [t[t.index("(") + 1:t.index(")")] for t in titles] == want, (cell, titles)
    fig = plots.plot_cells(lstmkit.LSTM(3, 8, proj_size=2), x, highlight=[(5, "cell 5")])
    c_ax, h_ax = [a for a in fig.axes if a.get_title()]
    assert "highlighted" in c_ax.get_title() and "highlighted" not in h_ax.get_title()
    with pytest.raises(ValueError, match="highlight: unit 8 is not one of the layer's 8 cells"):
        plots.plot_cells(lstmkit.LSTM(3, 8, proj_size=2), x, highlight=[(8, "cell 8")])


def test_curves(runs, tmp_path):
    dirs = [runs["vanilla"], runs["nfg"], runs["rnn"]]
    fig = plots.plot_curves(dirs, path=tmp_path / "curves.png")
    assert titles(fig) == ["training loss", "valid accuracy"]  # the split evaluated during training
    assert [ax.get_xlabel() for ax in fig.axes] == ["step", "step"]
    assert fig.axes[1].get_ylabel() == "accuracy"
    assert len(fig.axes[0].get_lines()) == 3 and len(fig.axes[1].get_lines()) == 3 + 2  # + criterion, baseline
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "add-vanilla (vanilla)", "add-nfg (nfg)", "add-rnn (rnn)"]
    steps = fig.axes[0].get_lines()[0].get_xdata()
    assert list(steps) == [r["step"] for r in rundir.read_metrics(runs["vanilla"])] == [2, 4]
    assert_png(tmp_path / "curves.png")
    _assert_target_and_baseline(fig.axes[1])


def test_a_dollar_in_a_runs_name_is_drawn_as_written(runs, tmp_path):
    """A run directory named with '$' (matplotlib's maths) is drawn as written in the curves and
    the report; "lr$\\frac$" failed matplotlib's maths parser, "a$x$b" was drawn as maths."""
    dirs = []
    for name in ("lr$\\frac$", "a$x$b"):
        shutil.copytree(runs["vanilla"], tmp_path / name)
        dirs.append(tmp_path / name)
    fig = plots.plot_curves(dirs, path=tmp_path / "curves.png")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "lr\\$\\frac\\$ (vanilla)", "a\\$x\\$b (vanilla)"]  # escaped: drawn as the name
    assert fig._suptitle.get_text() == "Training curves: lr\\$\\frac\\$, a\\$x\\$b"
    assert_png(tmp_path / "curves.png")
    assert main(["report", str(dirs[0]), "-o", str(tmp_path / "r.html"), "--no-gradflow"]) == 0  # the same curves


def _assert_target_and_baseline(ax) -> None:
    """The adding task's criterion (≥ 1 - 3/2560) and its constant-0.5 baseline are labelled
    horizontal lines, and the y axis spans both (no zoom that hides how far the runs are)."""
    from lstmkit.app.tasks.synthetic import hochreiter_adding_baselines

    threshold, baseline = 1 - 3 / 2560, hochreiter_adding_baselines(22)["accuracy"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    target = lines[f"target ≥ {threshold:.4g}"]
    base = lines[f"baseline constant_0.5: {baseline:.4g}"]
    assert list(target.get_ydata()) == [threshold, threshold] and list(base.get_ydata()) == [baseline, baseline]
    lo, hi = ax.get_ylim()
    assert lo < baseline and hi > threshold


def test_compare(runs, tmp_path):
    dirs = [runs["vanilla"], runs["vanilla2"], runs["nfg"], runs["rnn"]]
    metric, rows = rundir.final_values(dirs)
    assert metric == "accuracy" and [r[0] for r in rows] == ["vanilla", "vanilla", "nfg", "rnn"]
    summary = json.loads((runs["nfg"] / "summary.json").read_text())
    assert rows[2][1] == summary["test"]["value"] and rows[2][3] == "test"  # the kept weights' one test value
    fig = plots.plot_compare(dirs, path=tmp_path / "compare.png")
    ax = fig.axes[0]
    assert ax.get_title() == "test accuracy by cell variant (4 runs)"
    assert ax.get_xlabel() == "cell variant" and ax.get_ylabel() == "test accuracy"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["nfg", "rnn", "vanilla"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 4  # every run is a point
    assert_png(tmp_path / "compare.png")
    _assert_target_and_baseline(ax)
    fig = plots.plot_compare(dirs, metric="mse")
    assert fig.axes[0].get_ylabel() == "test mse"
    with pytest.raises(ValueError, match=r"metric: run .* has no valid metric 'bpc'; it has \['accuracy', 'loss', 'mse'\]"):
        rundir.final_values(dirs, metric="bpc")
    # runs of another task (or other options) are not pooled into one box: refused, naming them
    other = tmp_path / "other"
    shutil.copytree(runs["nfg"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "task": "multiplication"}))
    with pytest.raises(ValueError, match=r"different tasks or task options \(adding .*multiplication .*: other\)"):
        plots.plot_compare([*dirs, other])


def test_gradient_flow_picture(runs):
    _, task, model = rundir.load_run(runs["vanilla"])
    batch = next(iter(task.eval_batches("test", 4)))
    flow = gradflow.task_gradient_flow(model, task, batch)
    assert next(model.parameters()).dtype == torch.float32  # measured on a float64 copy
    fig = plots.plot_gradient_flow(flow)
    assert titles(fig) == ["gradient norm per step", "mean forget gate f_t (∂c_t/∂c_(t-1) in the vanilla cell)"]
    assert fig.axes[0].get_yscale() == "log" and fig.axes[-1].get_xlabel() == "time step t"
    assert_png(plots.figure_png(fig))


# ----------------------------------------------------------------------------- gradflow


def test_gradflow_experiment_measures_the_models(tmp_path):
    result = gradflow.gradflow_experiment(("rnn", "vanilla", "nfg"), length=20, hidden=H, batch_size=4, steps=2,
                                       probe_size=8, seed=0)
    names = [m["name"] for m in result["models"]]
    assert names == ["rnn", "vanilla", "nfg"]
    for m in result["models"]:
        for stage in ("init", "trained"):
            s = m[stage]
            assert s["T"] == 20 and len(s["norms"]) == 20 and s["quantity"] == ("h" if m["name"] == "rnn" else "c")
            assert s["ratio_first_last"] == pytest.approx(s["norms"][0] / s["norms"][-1])
            assert s["t_mid"] == s["norms"][9]
    assert result["models"][2]["init"]["f_mean"] == 1.0 and result["models"][0]["init"]["f_mean"] is None
    # the init numbers are gradient_flow on the same initialisation, in float64
    from lstmkit.app.model import SequenceModel
    from lstmkit.app.tasks.registry import get_task

    torch.manual_seed(0)
    model = SequenceModel(TrainConfig(task="adding", cell="vanilla", hidden_size=H), 2, 1).double()
    task = get_task("adding", **result["settings"]["task_options"])
    batch = next(iter(task.eval_batches("test", 8)))
    flow = gradient_flow(model, batch.x.double(), lambda out: task.loss(out, batch))
    torch.testing.assert_close(torch.tensor(result["models"][1]["init"]["norms"], dtype=torch.float64),
                               flow[0][0].dc_norm, rtol=1e-12, atol=0)
    table = gradflow.gradflow_table(result)
    assert table.splitlines()[0].split() == ["model", "stage", "norm", "of", "t=1", "t=10", "t=20", "t=1", "/",
                                             "t=T", "mean", "f", "loss"]
    assert len(table.splitlines()) == 2 + 6
    fig = plots.plot_gradflow(result, path=tmp_path / "gf.png")
    assert titles(fig) == ["at initialisation", "after 2 training steps"]
    assert fig.axes[0].get_ylabel() == "‖∂L/∂c_t‖ (‖∂L/∂h_t‖ for the RNN)"
    assert [ax.get_xlabel() for ax in fig.axes] == ["time step t"] * 2 and fig.axes[0].get_yscale() == "log"
    assert all(len(ax.get_lines()) == 3 for ax in fig.axes)
    assert_png(tmp_path / "gf.png")


def test_gradflow_of_runs_of_different_lengths_is_refused(runs, tmp_path):
    """The table and the picture compare the gradients at shared steps (t = 1, T/2, T): runs of
    the adding problem at other lengths were labelled with the first run's T."""
    other = _run(tmp_path, "add-26", cell="vanilla", task="adding", task_options={"length": 26, "eval_size": 16})
    with pytest.raises(ValueError, match="different options"):
        gradflow.gradflow_experiment(runs=[runs["vanilla"], other])


@pytest.mark.parametrize(("cells", "says"), [(("vanilla", "heads=3"), "not divisible by 3"),
                                             (("vanilla", "vanilla+rnn"), "the plain RNNs are models of their own")])
def test_gradflow_refuses_a_bad_cell_before_training_any(cells, says):
    """Every model is made before the first trains: a cell that reads but cannot be built failed
    only after the cells before it had trained (minutes at the default 3,000 steps)."""
    logs: list[str] = []
    with pytest.raises(ValueError, match=says):
        gradflow.gradflow_experiment(cells, length=20, hidden=4, batch_size=4, steps=1, probe_size=4, log=logs.append)
    assert logs == []


def test_gradflow_command_writes_png_and_json(runs, tmp_path, capsys):
    out = tmp_path / "flow.png"
    argv = ["gradflow", "--length", "20", "--hidden", "4", "--batch-size", "4", "--steps", "1",
            "--probe-size", "4", "--cells", "rnn,rnn_relu,nfg", "-o", str(out)]
    assert cli(argv) == 0
    text = capsys.readouterr().out
    assert "dL/dh_t" in text and "dL/dc_t" in text and "t=1 / t=T" in text
    assert_png(out)
    data = json.loads(out.with_suffix(".json").read_text())
    assert [m["name"] for m in data["models"]] == ["rnn", "rnn_relu", "nfg"] and data["settings"]["steps"] == 1
    assert [m["model"] for m in data["models"]] == ["rnn", "rnn_relu", "lstm"]
    # trained run directories instead of training
    out2 = tmp_path / "runs.png"
    assert cli(["gradflow", "--runs", str(runs["vanilla"]), str(runs["rnn"]), "--probe-size", "4",
                "-o", str(out2)]) == 0
    data = json.loads(out2.with_suffix(".json").read_text())
    assert [(m["name"], m["steps"]) for m in data["models"]] == [("vanilla", 4), ("rnn", 4)]
    assert_png(out2)
    capsys.readouterr()
    assert cli(["gradflow", "--runs", str(runs["charlm"]), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lstmkit plot: error: runs: ") and "is a run of task 'charlm', expected 'adding'" in err
    with pytest.raises(ValueError, match=r"runs: .* is a run of task 'charlm', expected 'adding'"):
        gradflow.gradflow_experiment(runs=[runs["charlm"]])
    assert cli(["gradflow", "--cells", "rnn,bogus", "-o", str(tmp_path / "y.png")]) == 2
    assert "unknown variant 'bogus'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- command line and files


def test_command_default_outputs_and_no_overwrite(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["vanilla"], run)
    for kind in ("gates", "cells", "weights"):
        assert cli([kind, str(run)]) == 0
        assert_png(run / f"{kind}.png")
    before = (run / "gates.png").read_bytes()
    capsys.readouterr()
    assert cli(["gates", str(run)]) == 2  # exists: refused, file unchanged
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; nothing was overwritten (use --overwrite" in err
    assert (run / "gates.png").read_bytes() == before
    assert cli(["gates", str(run), "--max-steps", "5", "--overwrite"]) == 0
    assert (run / "gates.png").read_bytes() != before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no temporary files left
    assert cli(["curves", str(run), "-o", str(tmp_path / "c.png")]) == 0
    assert cli(["compare", str(run), str(runs["nfg"]), "-o", str(tmp_path / "cmp.png")]) == 0
    assert "nfg" in capsys.readouterr().out
    for kind, out in (("curves", "c.png"), ("compare", "cmp.png")):  # a mistyped run, the output there:
        assert cli([kind, str(run), str(tmp_path / "nosuch"), "-o", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err  # the input named first (it said the output exists)
        assert err.count("\n") == 1 and "no run directory at" in err and "nosuch" in err, err
    assert_png(tmp_path / "cmp.png")
    # a checkpoint file works as well as its run directory
    assert cli(["weights", str(run / "checkpoint.safetensors"), "-o", str(tmp_path / "w.png")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["gates", "{tmp}/missing"], "run: no run directory or checkpoint at '{tmp}/missing'"),
    (["gates", "{vanilla}", "--text", "abc", "-o", "{tmp}/t.png"],
     "text: only the charlm task reads text; this run's task is 'adding'"),
    (["gates", "{vanilla}", "-o", "{tmp}/t.jpg"], "output: expected a file name ending in .png, got '{tmp}/t.jpg'"),
    (["gates", "{vanilla}", "-o", "{tmp}/nodir/t.png"], "output: directory '{tmp}/nodir' does not exist"),
    (["cells", "{vanilla}", "--layer", "1", "-o", "{tmp}/t.png"], "layer: expected an int in [0, 0], got 1"),
    (["curves", "{tmp}", "-o", "{tmp}/t.png"], "has no metrics.jsonl"),
    (["compare", "{tmp}/missing", "-o", "{tmp}/t.png"], "run_dirs: no run directory at '{tmp}/missing'"),
    (["gradflow", "--length", "0", "-o", "{tmp}/t.png"], "length: expected an int >= 1, got 0"),
])
def test_command_errors_are_one_line(runs, tmp_path, capsys, argv, message):
    fill = {"tmp": str(tmp_path), "vanilla": str(runs["vanilla"])}
    assert cli([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lstmkit plot: error: ") and err.count("\n") == 1
    assert message.format(**fill) in err
    assert not list(tmp_path.glob("*.png"))


def test_unknown_plot_kind(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["heatmap", "x"])
    assert exc.value.code == 2
    assert "invalid choice: 'heatmap'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"kind: unknown plot kind 'heatmap'; expected one of \['gates'"):
        plot_cmd.run(argparse.Namespace(kind="heatmap"))


def test_main_dispatches_plot(runs, tmp_path, capsys):
    """Through lstmkit.app.cli.main (whose parser imports every subcommand module)."""
    from lstmkit.app import cli as cli_module

    assert cli_module.main(["plot", "weights", str(runs["vanilla"]), "-o", str(tmp_path / "w.png")]) == 0
    assert_png(tmp_path / "w.png")
    assert cli_module.main(["plot", "weights", str(tmp_path / "missing")]) == 2
    assert "lstmkit plot: error: run: no run directory" in capsys.readouterr().err


def test_save_png_is_atomic_and_refuses_existing(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"mine")
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    with pytest.raises(FileExistsError, match="a.png exists; nothing was overwritten"):
        plots.save_png(fig, target)
    assert target.read_bytes() == b"mine"
    plots.save_png(fig, target, overwrite=True)
    assert_png(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_importing_plots_does_not_import_matplotlib():
    """``lstmkit train`` builds the parser of every subcommand: it must work without matplotlib."""
    code = "import sys, lstmkit.app.plots, lstmkit.app.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runs_that_evaluate_another_split(tmp_path):
    """A run with ``eval_split="train"`` logs ``train_<metric>``: curves read that; compare reads
    a finished run's test value, and an unfinished run's last evaluation."""
    run = _run(tmp_path, "train", task="adding", task_options={"length": 22, "eval_size": 16}, eval_split="train")
    fig = plots.plot_curves([run])
    assert titles(fig) == ["training loss", "train accuracy"]
    assert fig.axes[1].get_ylabel() == "accuracy"
    assert fig.axes[1].get_lines()[0].get_ydata()[-1] == rundir.read_metrics(run)[-1]["train_accuracy"]
    fig = plots.plot_compare([run], metric="mse")
    assert fig.axes[0].get_title() == "test mse by cell variant (1 run)"
    (run / "summary.json").unlink()  # as if the run were still going
    fig = plots.plot_compare([run], metric="mse")
    assert fig.axes[0].get_title() == "train mse by cell variant (1 run)"
