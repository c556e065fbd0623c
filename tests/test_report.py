"""``lstmkit report RUN_DIR``: one self-contained HTML file that embeds every picture as a
PNG data URI, references nothing outside itself, escapes every text, and never replaces
an existing file by accident."""

from __future__ import annotations

import base64
import datetime
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from lstmkit.app import report
from lstmkit.app.cli import main
from lstmkit.app.tasks.registry import get_task
from lstmkit.app.train import TrainConfig, train
from test_plots import assert_png

DATA_PNG = "data:image/png;base64,"
SECTIONS = ["Contents", "Result", "What solved means", "Examples", "Training curves", "Gate activations",
            "Cell states", "Weights", "Gradient flow", "Configuration", "Gates (lstmkit.describe)",
            "Versions, kernel, machine and date"]


class _Page(HTMLParser):
    """Collects tags, attributes and text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.text: list[str] = []
        self.h2: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend((tag, k, v or "") for k, v in attrs)
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def images(page: _Page) -> list[str]:
    return [v for tag, k, v in page.attrs if tag == "img" and k == "src"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(task="adding", task_options={"length": 22, "eval_size": 16}, cell="peephole",
                      hidden_size=6, batch_size=4, steps=4, eval_every=2, eval_batch_size=16)
    train(cfg, root / "run", progress=False)
    return root / "run"


def cli(argv: list[str]) -> int:
    """``lstmkit report …`` through lstmkit.app.cli.main: exit code, errors printed as one line."""
    return main(["report", *argv])


def test_report_is_self_contained_and_embeds_every_picture(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert cli([str(run)]) == 0
    out = run / "report.html"
    assert f"wrote {out}" in capsys.readouterr().out
    page = parse(out)
    assert page.h2 == SECTIONS
    srcs = images(page)
    assert len(srcs) == 5 and all(s.startswith(DATA_PNG) for s in srcs)
    for src in srcs:
        assert_png(base64.b64decode(src[len(DATA_PNG):], validate=True))
    # nothing outside the file: no script, style sheet, font or link to fetch
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    for tag, key, value in page.attrs:
        if key in ("src", "href"):
            assert value.startswith(("data:", "#")), (tag, key, value[:40])  # embedded, or within the page
    raw = out.read_text(encoding="utf-8")
    assert "http://" not in raw and "https://" not in raw and "@import" not in raw and "url(" not in raw
    text = "".join(page.text)
    assert "parameters:" in text and "peephole" in text  # the describe table
    assert "eval_batch_size" in text and "adding" in text  # the configuration
    assert "t=1" in text and "first / last" in text  # the gradient flow numbers
    # a table of contents: one link per section, each to the id of its heading
    links = [v for tag, k, v in page.attrs if tag == "a" and k == "href"]
    ids = [v for tag, k, v in page.attrs if tag == "h2" and k == "id"]
    assert links == ["#" + i for i in ids[1:]] and len(links) == len(SECTIONS) - 1


def test_report_says_what_the_numbers_mean(run_dir, tmp_path):
    """The verdict against the criterion, each baseline with its meaning, a warning when the
    result is worse than a trivial baseline, example predictions, versions, kernel and date."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    summary = json.loads((run / "summary.json").read_text())
    base = summary["baselines"]["constant_0.5"]
    task = get_task("adding", length=22, eval_size=16)
    for value, worse in ((base / 2, True), (min(1.0, base + 0.2), False)):
        summary["test"]["value"] = value
        summary["test"]["met"] = False
        (run / "summary.json").write_text(json.dumps(summary))
        text = " ".join("".join(parse(report.write_report(run, overwrite=True, gradflow=False)).text).split())
        assert f"Not solved: the test split's accuracy of the kept weights is {value:.6g}" in text
        assert ("Worse than the trivial baseline constant_0.5" in text) is worse
        assert "always answering 0.5, the mean target" in text  # what the baseline is
        assert ("WORSE" in text) is worse
    assert "Solved means that the test split's accuracy" in text and "|err| < 0.04" in text
    # examples: the first test sequences, with their true targets (independently read from the task)
    first = next(iter(task.eval_batches("test", 3)))
    for b in range(3):
        assert f"target {float(first.y[b]):.4f}, output" in text
    assert torch.__version__ in text and "cpu_fused" in text
    assert datetime.date.today().isoformat() in text


def test_report_of_a_directory_of_runs(run_dir, tmp_path, capsys):
    for name in ("a", "b"):
        shutil.copytree(run_dir, tmp_path / "demo" / name)
    assert cli([str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert all(f"wrote {tmp_path / 'demo' / n / 'report.html'}" in out for n in ("a", "b"))
    assert cli([str(tmp_path / "demo")]) == 2  # each exists now: nothing replaced without --overwrite
    assert "exist; nothing was overwritten" in capsys.readouterr().err
    # a study's runs lie two levels down (runs/<variant>/lr<k>-s<seed>): found there too
    for rel in ("runs/vanilla/lr0-s0", "runs/nfg/lr1-s0"):
        shutil.copytree(run_dir, tmp_path / "study" / rel)
    assert cli([str(tmp_path / "study"), "--no-gradflow"]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == 2 and str(tmp_path / "study" / "runs" / "nfg" / "lr1-s0" / "report.html") in out


def test_a_directory_of_runs_with_a_damaged_one_gets_no_report(run_dir, tmp_path, capsys):
    """Every run's report is made before any is written: one damaged run leaves no report (the
    runs before it got theirs, and the command run again refused them as existing)."""
    for name in ("1", "2", "3"):
        shutil.copytree(run_dir, tmp_path / "many" / name)
    ck = tmp_path / "many" / "2" / "checkpoint.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    assert cli([str(tmp_path / "many"), "--no-gradflow"]) == 2
    assert "2" in capsys.readouterr().err
    assert not list((tmp_path / "many").glob("*/report.html"))
    # an output that cannot be written is found before any report is: nothing written either
    ck.write_bytes((run_dir / "checkpoint.safetensors").read_bytes())
    (tmp_path / "many" / "3" / "report.html").mkdir()
    assert cli([str(tmp_path / "many"), "--no-gradflow", "--overwrite"]) == 2
    assert "report.html" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "many").glob("*/report.html") if p.is_file()]


def test_files_of_two_runs_in_one_directory_are_refused(run_dir, tmp_path, capsys):
    """A checkpoint copied into another run's directory: its summary, metrics and config say
    another run, so the report refuses them instead of mixing the two."""
    cfg = TrainConfig(task="adding", task_options={"length": 22, "eval_size": 16}, cell="nfg", hidden_size=4,
                      batch_size=4, steps=2, eval_every=2, eval_batch_size=16)
    train(cfg, tmp_path / "other", progress=False)
    shutil.copytree(run_dir, tmp_path / "mix")
    shutil.copy(tmp_path / "other" / "checkpoint.safetensors", tmp_path / "mix")
    assert cli([str(tmp_path / "mix"), "-o", str(tmp_path / "r.html"), "--no-gradflow"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds files of different runs" in err
    assert "cell: 'peephole' in config.json, 'nfg' in the checkpoint" in err
    assert "cell: 'peephole' in summary.json, 'nfg' in the checkpoint" in err
    assert not (tmp_path / "r.html").exists()
    # a variant's name from an older version (no longer read) is no evidence: the run is reported
    d = tmp_path / "older"
    shutil.copytree(run_dir, d)
    summary = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**summary, "cell": "peephole(i,f,o)"}))
    assert cli([str(d), "-o", str(tmp_path / "older.html"), "--no-gradflow"]) == 0


def test_a_first_met_step_without_its_sequences_is_shown(run_dir, tmp_path):
    """summary.json's schema lets sequences_to_target be null beside a first_met_step: the report
    shows the step alone (it failed on formatting None)."""
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    summary = json.loads((d / "summary.json").read_text())
    summary["target"].update(first_met_step=5, sequences_to_target=None)
    (d / "summary.json").write_text(json.dumps(summary))
    page = parse(report.write_report(d, tmp_path / "r.html", gradflow=False))
    assert "step 5" in "".join(page.text)


def test_report_never_overwrites_unless_asked(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    out.write_text("my notes")
    assert cli([str(run_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; nothing was overwritten" in err
    assert out.read_text() == "my notes"
    assert cli([str(run_dir), "-o", str(out), "--overwrite", "--no-gradflow"]) == 0
    page = parse(out)
    assert len(images(page)) == 4 and "Gradient flow" not in page.h2 and "Result" in page.h2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # no temporary file left


def test_report_escapes_text(run_dir, tmp_path):
    run = tmp_path / 'run <b>&"x"'
    shutil.copytree(run_dir, run)
    out = report.write_report(run, tmp_path / "r.html", gradflow=False)
    raw = out.read_text(encoding="utf-8")
    assert '<b>&"x"' not in raw and "run &lt;b&gt;&amp;&quot;x&quot;" in raw
    assert 'run <b>&"x"' in "".join(parse(out).text)


def test_report_of_an_unfinished_run_and_charlm_text(tmp_path):
    cfg = TrainConfig(task="charlm", task_options={"max_bytes": 30000, "bptt": 12, "eval_streams": 2},
                      hidden_size=6, batch_size=2, steps=2, eval_every=2, eval_batch_size=16)
    train(cfg, tmp_path / "char", progress=False)
    (tmp_path / "char" / "summary.json").unlink()
    (tmp_path / "char" / "metrics.jsonl").unlink()
    out = report.write_report(tmp_path / "char", text="for i in range(3):")
    page = parse(out)
    text = "".join(page.text)
    assert "no summary.json" in text and "no metrics.jsonl" in text and "the given text" in text
    assert len(images(page)) == 4  # no curves without metrics
    for src in images(page):
        assert_png(base64.b64decode(src[len(DATA_PNG):]))


def test_the_report_of_a_plain_rnn_run_shows_no_cell_variant(tmp_path):
    """A plain-RNN run keeps its task's recipe cell in config.json (adding's chrono=T), which the
    model never read; its Configuration table said cell chrono=22 as if it had."""
    cfg = TrainConfig.for_task("adding", {"length": 22, "eval_size": 16}, model="rnn", hidden_size=4, batch_size=4,
                               steps=2, eval_every=2, eval_batch_size=16)
    assert cfg.cell != "vanilla"  # the recipe's
    train(cfg, tmp_path / "rnn", progress=False)
    text = "".join(parse(report.write_report(tmp_path / "rnn")).text)
    assert f"— (unused by model rnn: {cfg.cell})" in text
    # the captions say what the pictures show of a plain RNN (they spoke of its gates and cell state)
    assert "Every gate" not in text and "c_t and h_t" not in text and "Each gate's W" not in text
    assert "The plain RNN has no gates" in text and "h_t (the plain RNN has no cell state)" in text


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing"], "run_dir: no run directory at '{tmp}/missing'"),
    (["{tmp}"], "checkpoint: no checkpoint.safetensors in {tmp} (not a training run"),
    (["{run}", "-o", "{tmp}/r.txt"], "output: expected a file name ending in .html, got '{tmp}/r.txt'"),
    (["{run}", "-o", "{tmp}/r.html", "--text", "abc"], "text: only the charlm task reads text; this run's task is 'adding'"),
])
def test_report_errors(run_dir, tmp_path, capsys, argv, message):
    fill = {"tmp": str(tmp_path), "run": str(run_dir)}
    assert cli([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lstmkit report: error: ") and err.count("\n") == 1
    assert message.format(**fill) in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("change, message", [
    ({"target": "nope"}, "target: expected an object, got 'nope'"),
    ({"baselines": "x"}, "baselines: expected an object of baseline names and numbers, got 'x'"),
    ({"test": "x"}, "test: expected an object, got 'x'"),
    ({"test": {"value": 0.5, "met": False, "metrics": [1]}}, "test.metrics: expected an object of metric names"),
    ({"target": {"goal": "up"}}, "target.goal: expected 'max' or 'min', got 'up'"),
    ({"value": "high"}, "value: expected a number or null, got 'high'"),
    ([1, 2], "expected a JSON object, got list"),
])
def test_a_damaged_summary_is_one_line_for_report_and_plot_compare(run_dir, tmp_path, capsys, change, message):
    """summary.json's fields are checked when it is read (lstmkit.app.runs): a wrong type was an
    AttributeError traceback in report and in plot compare."""
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    summary = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**summary, **change} if isinstance(change, dict) else change))
    for argv in (["report", str(d), "-o", str(tmp_path / "r.html")],
                 ["plot", "compare", str(d), str(run_dir), "-o", str(tmp_path / "c.png")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: damaged summary.json: {d / 'summary.json'}: {message}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("lines, message", [
    ([b"\xff"], "line 1 is not UTF-8 text"),
    ([None, b'{"step": 4, "train_loss": "x"}'], "line 2: train_loss: expected a number or null, got 'x'"),
    ([b'{"step": "abc", "train_loss": 1.0, "valid_accuracy": 0.5}'], "line 1: step: expected an int >= 1, got 'abc'"),
    ([b'{"step": 2, "train_loss": {"a": 1}}'], "line 1: train_loss: expected a number or null, got \"{'a': 1}\""),
    ([None, b'{"step": 4, "train_loss": 1.0, "valid_accuracy": "0.5"}'],
     "line 2: valid_accuracy: expected a number or null, got '0.5'"),
    ([b'{"step": 0, "train_loss": 1.0}'], "line 1: step: expected an int >= 1, got '0'"),
    ([b'{"step": true, "train_loss": 1.0}'], "line 1: step: expected an int >= 1, got 'True'"),
    ([b'{"train_loss": 1.0}'], "line 1: no 'step'"),
    ([b"[1, 2]"], "line 1: expected a JSON object, got list"),
    ([None, b'{"step": 4, "train_lo'], "line 2 is not JSON"),  # a last line a killed writer cut short
])
def test_a_damaged_metrics_file_is_one_line_naming_it(run_dir, tmp_path, capsys, lines, message):
    """metrics.jsonl's records are checked when read (lstmkit.app.runs.read_metrics), as a run's
    unstarted directory's are: a wrong type was an error naming no file ("'>' not supported
    between instances of 'str' and 'int'", "unhashable type: 'dict'"), a step that is not a
    number a plot of garbage (exit 0), bytes that are not UTF-8 a codec's message."""
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    metrics = d / "metrics.jsonl"
    good = metrics.read_bytes().splitlines()
    metrics.write_bytes(b"".join((good[n] if line is None else line) + b"\n" for n, line in enumerate(lines)))
    for argv in (["report", str(d), "-o", str(tmp_path / "r.html"), "--no-gradflow"],
                 ["plot", "curves", str(d), "-o", str(tmp_path / "c.png")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: run_dirs: {metrics} {message}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
