"""The variant study: settings checked, learning rates drawn as documented, statistics equal
to an independent implementation, outputs complete, reproducible from seeds, and a killed
study resumes without redoing (or losing) finished runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lstmkit.app.study import StudyConfig, run_study, welch

TRAIN = {"task_options": {"length": 24, "eval_size": 128}, "hidden_size": 6, "batch_size": 8, "steps": 12,
         "eval_every": 6, "eval_batch_size": 128}


def _cfg(**kw) -> StudyConfig:
    base = dict(task="adding", variants=["vanilla", "nfg"], seeds=2, lr_trials=2, lr_range=(1e-3, 1e-2),
                train=dict(TRAIN))
    base.update(kw)
    return StudyConfig(**base)


def _values(summary: dict) -> dict:
    return {e["variant"]: (e["lr"], e["values"]) for e in summary["variants"]}


@pytest.mark.parametrize("kw, pattern", [
    (dict(variants=[]), "variants: expected at least one"),
    (dict(variants=["vanilla", "vanilla"]), "distinct"),
    (dict(variants=["vanilla", "nosuch"]), "nosuch"),
    (dict(variants=["vanilla", "a/b"]), "cannot name a directory"),
    (dict(variants=["nfg+cifg"]), "cannot also be removed"),
    (dict(seeds=0), "seeds: expected an int >= 1, got 0"),
    (dict(lr_trials=1.5), "lr_trials: expected an int >= 1"),
    (dict(seeds=10**9), "seeds: expected an int <= 1000 (a sane bound)"),
    (dict(lr_range=(1e-2, 1e-3)), "lr_range: expected 0 < low <= high"),
    (dict(train={"lr": 0.1}), "unknown settings ['lr']"),
    (dict(baseline="peephole"), "baseline: expected one of the studied variants"),
    (dict(variants=["vanilla", "", "nfg"]), "variants: expected variant names, got an empty one"),
    (dict(seed=-1), "seed (--study-seed): expected an int in [0, 9223372036854775807], got -1"),
    (dict(lr_range=(1e-3, 1e300)), "lr_range: expected a high <= 10000 (a sane upper bound)"),
])
def test_settings_are_checked(kw, pattern):
    with pytest.raises(ValueError) as exc:
        _cfg(**kw).validate()
    assert pattern in str(exc.value)


def test_a_variant_named_by_its_cell_words_is_one_directory():
    """Variant names are directories: a cell's own words pass (per-gate deep widths, deep=f:3, too —
    the same characters the CLI's default run directory keeps), a '/' does not."""
    _cfg(variants=["vanilla", "deep=f:3+peephole", "zoneout=0.1"]).validate()
    with pytest.raises(ValueError, match="cannot name a directory"):
        _cfg(variants=["vanilla", "zoneout=0.1/0.2"]).validate()


def test_learning_rates_log_uniform_same_for_every_variant():
    cfg = _cfg(lr_trials=200, lr_range=(1e-4, 1e-1))
    lrs = cfg.learning_rates()
    assert lrs == sorted(lrs) and lrs == _cfg(lr_trials=200, lr_range=(1e-4, 1e-1), variants=["cifg"]).learning_rates()
    assert all(1e-4 <= x <= 1e-1 for x in lrs)
    logs = [math.log10(x) for x in lrs]  # log-uniform: each decade holds about a third of the draws
    for lo in (-4, -3, -2):
        share = sum(lo <= v < lo + 1 for v in logs) / len(logs)
        assert 0.2 < share < 0.47, (lo, share)
    assert _cfg(seed=1).learning_rates() != _cfg().learning_rates()


@pytest.mark.parametrize("a, b", [
    ([1.0, 2.0, 3.0, 4.5], [2.0, 2.5, 4.0, 5.0, 6.5]),
    ([0.91, 0.93, 0.92], [0.80, 0.95, 0.70, 0.99]),
])
def test_welch_equals_statsmodels(a, b):
    from statsmodels.stats.weightstats import ttest_ind as sm_ttest_ind  # here: seconds to import

    t, p = welch(a, b)
    t_ref, p_ref, _ = sm_ttest_ind(a, b, usevar="unequal")
    assert t == pytest.approx(t_ref, rel=1e-12) and p == pytest.approx(p_ref, rel=1e-9)


def test_welch_degenerate_cases():
    assert math.isnan(welch([1.0], [1.0, 2.0])[1])
    assert welch([1.0, 1.0], [1.0, 1.0]) == (0.0, 1.0)
    assert math.isnan(welch([1.0, 1.0], [2.0, 2.0])[1])


def test_study_outputs_and_reproducible(tmp_path):
    a = run_study(_cfg(), tmp_path / "a", jobs=1, progress=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["boxplot.png", "results.json", "results.md", "runs", "study.json", "summary.md"]
    # 2 variants x (2 learning rates + 1 more seed at the chosen one)
    assert a["runs"] == 6 and len(a["rows"]) == 6
    for e in a["variants"]:
        assert e["n"] == 2 and e["lr"] in a["learning_rates"]
        tuning = {r["lr"]: r["select"] for r in a["rows"] if r["variant"] == e["variant"] and r["seed"] == 0}
        sign = -1 if a["goal"] == "max" else 1  # adding: accuracy, higher is better
        assert e["lr"] == min(tuning, key=lambda lr: (sign * tuning[lr], lr))
        assert e["median"] == pytest.approx(sorted(e["values"])[0] / 2 + sorted(e["values"])[1] / 2)
    nfg = next(e for e in a["variants"] if e["variant"] == "nfg")
    base = next(e for e in a["variants"] if e["variant"] == "vanilla")
    t, p = welch(nfg["values"], base["values"])
    assert (nfg["t"], nfg["p"]) == (t, p)
    png = (tmp_path / "a" / "boxplot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    # the box plot carries the task's criterion and baseline, and its y axis spans them
    from lstmkit.app.study import boxplot
    from lstmkit.app.tasks.synthetic import hochreiter_adding_baselines

    threshold, baseline = 1 - 3 / 2560, hochreiter_adding_baselines(24)["accuracy"]
    assert a["target"]["threshold"] == threshold and a["baselines"] == {"constant_0.5": baseline}
    ax = boxplot(a).axes[0]
    labels = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert labels[f"target ≥ {threshold:.4g}"] == [threshold] * 2
    assert labels[f"baseline constant_0.5: {baseline:.4g}"] == [baseline] * 2
    assert ax.get_ylim()[0] < baseline and ax.get_ylim()[1] > threshold
    md = (tmp_path / "a" / "summary.md").read_text()
    assert "| nfg |" in md and "Welch" in md and "lstmkit study --task adding --variants vanilla,nfg" in md
    assert json.loads((tmp_path / "a" / "results.json").read_text())["variants"][0]["variant"] == "vanilla"
    # Same settings, new directory, both cores: the same numbers.
    b = run_study(_cfg(), tmp_path / "b", jobs=2, progress=False)
    assert _values(a) == _values(b)


def test_another_metric_takes_its_own_direction_and_no_target(tmp_path):
    """--metric mse on adding (whose target is accuracy, higher better): the rate is chosen by the
    lowest validation MSE, and the accuracy threshold is applied to no MSE value (the study took the
    target's goal and threshold for any metric)."""
    a = run_study(_cfg(metric="mse", variants=["vanilla"]), tmp_path / "a", jobs=1, progress=False)
    assert a["goal"] == "min"
    (e,) = a["variants"]
    tuning = {r["lr"]: r["select"] for r in a["rows"] if r["seed"] == 0}
    assert e["lr"] == min(tuning, key=lambda lr: (tuning[lr], lr))
    assert e["met"] is None and all(r["target_step"] is None for r in a["rows"])
    md = (tmp_path / "a" / "summary.md").read_text()
    assert "(lower is better)" in md and "Target: none on `mse`" in md


def test_a_targets_goal_agrees_with_its_metrics_direction():
    """Target.goal is each task's; metric_goal reads a metric's direction from its name (the study's
    --metric): a Target whose goal contradicts it is refused where it is made."""
    from lstmkit.app.tasks.base import Target, metric_goal

    assert (metric_goal("symbol_accuracy"), metric_goal("max_error"), metric_goal("bpc"), metric_goal("mean")) == \
        ("max", "min", "min", None)
    assert Target("accuracy", "max", 0.9, "").goal == "max" and Target("mean", "min", None, "").goal == "min"
    with pytest.raises(ValueError, match="contradicts"):
        Target("mse", "max", 0.1, "")


def _summary_of(values: dict[str, list[float | None]], metric: str = "mse", goal: str = "min") -> dict:
    """summarize() of made-up final runs (one rate, seeds in order, the last run of each variant
    ending first), without training."""
    from lstmkit.app.study_config import Run
    from lstmkit.app.study_results import summarize
    from lstmkit.app.tasks.registry import get_task

    cfg = _cfg(variants=list(values), seeds=max(len(v) for v in values.values()), lr_trials=1)
    results = {}
    for variant, xs in values.items():
        for seed in reversed(range(len(xs))):  # (results: in the order runs ended)
            results[Run(variant, 0, 1e-3, seed)] = {"diverged": False, "select": 0.5, "test": {metric: xs[seed]}}
    return summarize(cfg, results, metric, goal, "valid", get_task("adding", length=24).target, 1.0)


def test_the_verdict_follows_the_means_the_test_is_about():
    """Welch's test compares means: better or worse is the sign of t, not of the medians'
    difference (here the medians say better, the means and the test say worse), and the table,
    the summary and the box plot say the same."""
    from lstmkit.app.study_results import boxplot, results_table, summary_markdown, verdict

    base = [.049, .0495, .05, .0505, .051] * 2 + [.049, .0495]
    other = [.049, .0492, .0494] * 2 + [.049, .08, .081, .082, .083, .084]
    s = _summary_of({"vanilla": base, "nfg": other})
    (_, e) = s["variants"]
    assert e["delta"] < 0 and e["t"] > 0 and e["p"] < 0.05 and verdict(e, "min") == "worse"
    assert "(worse)" in results_table(s).splitlines()[-1]
    assert "Significantly worse than vanilla (p < 0.05, by the means): nfg." in summary_markdown(s)
    ax = boxplot(s).axes[0]
    assert [c.get_facecolor()[0][:3] for c in ax.collections][1] == pytest.approx((0.839, 0.153, 0.157), abs=1e-3)


def test_what_cannot_be_tested_is_said_and_nothing_is_dropped_silently():
    """One value, or no variance, is 'not tested' (it was listed as no significant difference);
    a run without a finite value is counted beside n; a single value has no sd; the values are
    in seed order whatever order the runs ended in."""
    from lstmkit.app.study_results import results_table, summary_markdown

    s = _summary_of({"vanilla": [0.1, 0.2, 0.3], "nfg": [0.25, 0.2, float("nan")], "peephole": [0.4]})
    vanilla, nfg, peephole = s["variants"]
    assert vanilla["values"] == [0.1, 0.2, 0.3]
    assert nfg["n"] == 2 and nfg["missing"] == 1 and peephole["std"] is None
    text = summary_markdown(s)
    assert "Not tested (fewer than two values, or no variance): peephole." in text
    assert "No significant difference: nfg." in text
    assert "| 2 (+1 without a finite mse) |" in results_table(s)
    empty = _summary_of({"vanilla": [0.1, 0.2], "nfg": [float("nan")] * 2})
    assert "| nfg | 0.001 | 0 (+2 without a finite mse) | — |" in results_table(empty)


def test_rates_that_coincide_count_each_run_once(tmp_path):
    """Learning-rate draws that coincide (a range of one value): each variant's statistics hold its
    seeds once each (the seed-0 run was counted once per coinciding draw)."""
    a = run_study(_cfg(lr_range=(0.01, 0.01), lr_trials=3, variants=["vanilla"]), tmp_path / "a", jobs=1,
                  progress=False)
    (e,) = a["variants"]
    assert e["n"] == 2 and len(e["values"]) == 2


def test_the_plain_rnns_are_variants(tmp_path):
    """'rnn' and 'rnn_relu' (the variant table's words) train the plain tanh and ReLU RNNs."""
    from lstmkit.app.runs import load_run

    s = run_study(_cfg(variants=["rnn", "rnn_relu"], seeds=1, lr_trials=1), tmp_path / "s", jobs=1, progress=False)
    assert [e["variant"] for e in s["variants"]] == ["rnn", "rnn_relu"]
    for word, nonlinearity in (("rnn", "tanh"), ("rnn_relu", "relu")):
        (run,) = (tmp_path / "s" / "runs" / word).iterdir()
        cfg, _, model = load_run(run)
        assert cfg.model == word and model.rnn.spec.nonlinearity == nonlinearity


@pytest.mark.parametrize("kw, pattern", [
    (dict(variants=["vanilla", "rnn_relu+fb=1"]), "plain RNN"),
    (dict(variants=["vanilla", "peephole"], train={**TRAIN, "backend": "torch"}), "peephole"),
])
def test_every_variant_is_checked_before_anything_is_written(tmp_path, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        run_study(_cfg(**kw), tmp_path / "s", jobs=1, progress=False)
    assert not (tmp_path / "s").exists()


def test_a_second_study_in_the_same_directory_is_refused_before_any_run(tmp_path):
    """A study holds its directory's lock from its start to its results: a second one with the same
    settings is refused at once (it trained runs beside the first until it met one in use)."""
    from lstmkit.app import runs

    cfg = _cfg(seeds=1, lr_trials=1, variants=["vanilla"])
    run_study(cfg, tmp_path / "s", jobs=1, progress=False)
    before = sorted(str(p) for p in (tmp_path / "s").rglob("*"))
    held = runs.lock(tmp_path / "s")  # as the first study holds it while it runs
    try:
        with pytest.raises(runs.InUseError, match="another lstmkit study is running in it; nothing was changed"):
            run_study(cfg, tmp_path / "s", jobs=1, progress=False)
    finally:
        held.release()
    assert sorted(str(p) for p in (tmp_path / "s").rglob("*")) == before


def test_refuses_foreign_or_different_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no study.json"):
        run_study(_cfg(), tmp_path / "x", jobs=1, progress=False)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"
    run_study(_cfg(seeds=1, lr_trials=1, variants=["vanilla"]), tmp_path / "s", jobs=1, progress=False)
    with pytest.raises(ValueError, match="other settings .*seeds: 1 there, 2 now"):
        run_study(_cfg(seeds=2, lr_trials=1, variants=["vanilla"]), tmp_path / "s", jobs=1, progress=False)
    # A finished run whose settings are not the study's is never silently reused.
    result = next((tmp_path / "s").glob("runs/*/*/result.json"))
    data = json.loads(result.read_text())
    data["config"]["lr"] *= 2
    result.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="holds a finished run with other settings"):
        run_study(_cfg(seeds=1, lr_trials=1, variants=["vanilla"]), tmp_path / "s", jobs=1, progress=False)
    with pytest.raises(ValueError, match="metric: expected one of task 'adding'"):
        run_study(_cfg(metric="bpc"), tmp_path / "m", jobs=1, progress=False)
    assert not (tmp_path / "m").exists()


def test_a_setting_spelled_out_at_its_default_resumes_the_same_study(tmp_path):
    """--clip 1 (the default) typed when the study started and left out when it resumed, or the
    other way round, trains alike: the study resumes and reuses its finished runs (both
    comparisons — study.json's settings and each run's recorded config — refused it)."""
    small = dict(seeds=1, lr_trials=1, variants=["vanilla"])
    out = tmp_path / "s"
    first = run_study(_cfg(**small, train={**TRAIN, "clip": 1.0}), out, jobs=1, progress=False)
    done = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}
    again = run_study(_cfg(**small), out, jobs=1, progress=False)
    assert _values(again) == _values(first) and all(p.stat().st_mtime_ns == t for p, t in done.items())
    assert run_study(_cfg(**small, train={**TRAIN, "clip": 1, "task_options": {**TRAIN["task_options"]}}), out,
                     jobs=1, progress=False)["runs"] == 1
    with pytest.raises(ValueError, match=r"other settings .*'clip': 2\.0"):
        run_study(_cfg(**small, train={**TRAIN, "clip": 2.0}), out, jobs=1, progress=False)


@pytest.mark.parametrize("text", ["[]", "null", "[1, 2]", "3"])
def test_a_study_json_that_is_not_an_object_is_refused(tmp_path, text):
    out = tmp_path / "s"
    out.mkdir()
    (out / "study.json").write_text(text)
    with pytest.raises(ValueError, match="study.json: expected a JSON object .* not an lstmkit study"):
        run_study(_cfg(seeds=1, lr_trials=1, variants=["vanilla"]), out, jobs=1, progress=False)
    assert [p.name for p in out.iterdir()] == ["study.json"]


def test_killed_study_resumes_without_redoing_runs(tmp_path):
    out = tmp_path / "killed"
    cfg = _cfg(train={**TRAIN, "steps": 24})
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({**cfg.__dict__, "lr_range": list(cfg.lr_range)}))
    code = ("import json, sys; from lstmkit.app.study import StudyConfig, run_study; "
            "run_study(StudyConfig.from_dict(json.load(open(sys.argv[1]))), sys.argv[2], jobs=1, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(settings), str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # (a loaded 2-core machine took minutes to start a run)
    while time.time() < deadline and len(list(out.glob("runs/*/*/result.json"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}
    assert 2 <= len(finished) < 6, "the study should have been killed mid-way"
    assert not (out / "results.json").exists()
    resumed = run_study(cfg, out, jobs=1, progress=False)
    for p, mtime in finished.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was redone"
    full = run_study(cfg, tmp_path / "full", jobs=1, progress=False)
    assert _values(resumed) == _values(full) and resumed["runs"] == 6


def test_cli(tmp_path, capsys):
    from lstmkit.app.cli import main
    args = ["study", "--task", "adding", "--variants", "vanilla", "--seeds", "1", "--lr-trials", "1",
            "-o", "length=24", "-o", "eval_size=64", "--hidden", "4", "--steps", "4", "--eval-every", "2",
            "--jobs", "1", "--quiet", "--out", str(tmp_path / "c")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "# Variant study: adding" in out and "| vanilla |" in out
    settings = json.loads((tmp_path / "c" / "study.json").read_text())
    assert settings["train"]["task_options"] == {"length": 24, "eval_size": 64}
    assert main(args[:-1] + [str(tmp_path / "c2"), "--seeds", "0"]) == 2
    assert "seeds: expected an int >= 1, got 0" in capsys.readouterr().err
    assert not Path(tmp_path / "c2").exists()


STUDY_ARGS = ["study", "--task", "adding", "--variants", "vanilla", "--seeds", "2", "--lr-trials", "1", "-o", "length=24",
              "-o", "eval_size=64", "--hidden", "4", "--steps", "4", "--eval-every", "2", "--jobs", "1", "--quiet"]


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory) -> Path:
    from lstmkit.app.cli import main
    out = tmp_path_factory.mktemp("study") / "s"
    assert main([*STUDY_ARGS, "--out", str(out)]) == 0
    return out


def _without(key):
    return lambda r: {k: v for k, v in r.items() if k != key}


@pytest.mark.parametrize("seed, damage, message", [
    (1, _without("test"), "no 'test'"),
    (1, lambda r: {**r, "test": [1]}, "test: expected an object, got '[1]'"),
    (1, _without("diverged"), "no 'diverged'"),
    (1, lambda r: {"config": r["config"]}, "no 'diverged'"),
    (1, lambda r: {**r, "diverged": "no"}, "diverged: expected true or false, got 'no'"),
    (0, lambda r: {**r, "select": "abc"}, "select: expected a number or null, got 'abc'"),
    (1, lambda r: {**r, "test": {**r["test"], "accuracy": "abc"}}, "test.accuracy: expected a number or null, got 'abc'"),
    (1, lambda r: {**r, "test": {**r["test"], "loss": [1]}}, "test.loss: expected a number or null, got '[1]'"),
    (1, lambda r: {**r, "test": {"loss": 1.0}}, "test: no 'accuracy' (the study's metric), for a run that did not "
                                                "diverge"),
    (1, lambda r: {**r, "test": {**r["test"], "accuracy": None}}, "test.accuracy: expected a number, for a run "
                                                                  "that did not diverge, got None"),
    (1, lambda r: {**r, "wall_time_s": "1s"}, "wall_time_s: expected a number, got '1s'"),
    (1, lambda r: {**r, "parameters": 1.5}, "parameters: expected an int, got '1.5'"),
    (1, lambda r: {**r, "target_step": "x"}, "target_step: expected an int or null, got 'x'"),
    (1, lambda r: {**r, "config": "x"}, "config: expected an object, got 'x'"),
    (1, lambda r: [r], "expected a JSON object, got list"),
])
def test_a_damaged_result_json_is_one_line_naming_it(finished_study, tmp_path, capsys, seed, damage, message):
    """A finished run's result.json is read back on resume: each field the study reads is checked
    (lstmkit.app.runs.read_study_result). A missing or mistyped one was a KeyError or an
    AttributeError traceback, or a line that named no file ("must be real number, not str")."""
    from lstmkit.app.cli import main
    out = tmp_path / "s"
    shutil.copytree(finished_study, out)
    path = out / "runs" / "vanilla" / f"lr0-s{seed}" / "result.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*STUDY_ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"lstmkit study: error: damaged result.json: {path}: {message}" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_diverged_runs_result_json_reads_back(finished_study, tmp_path):
    """What a diverged run records (no test metrics, no selection value) is not damage."""
    from lstmkit.app import runs
    run = tmp_path / "run"
    shutil.copytree(finished_study / "runs" / "vanilla" / "lr0-s1", run)
    diverged = {"config": {}, "diverged": True, "error": "loss is nan", "select": None, "test": {}}
    (run / "result.json").write_text(json.dumps(diverged))
    assert runs.read_study_result(run, "accuracy") == diverged


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


def test_workers_end_with_a_killed_study(tmp_path):
    settings = tmp_path / "settings.json"
    cfg = _cfg(train={**TRAIN, "steps": 400})
    settings.write_text(json.dumps({**cfg.__dict__, "lr_range": list(cfg.lr_range)}))
    code = ("import json, sys; from lstmkit.app.study import StudyConfig, run_study; "
            "run_study(StudyConfig.from_dict(json.load(open(sys.argv[1]))), sys.argv[2], jobs=2, progress=False)")
    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", code, str(settings), str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("runs/*/*/metrics.jsonl")):
        time.sleep(0.05)  # a worker is training
    children = [int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    assert children
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(c) for c in children):
        time.sleep(0.1)
    assert not any(_alive(c) for c in children), "workers outlived the killed study"


def test_ctrl_c_ends_the_study_and_its_workers_in_one_line(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group: the study and its workers) ends the
    study at once with one line and exit code 130; the workers ignore it and are ended by the
    study (no traceback of theirs, no leaked-semaphore warning), and none outlives it."""
    out = tmp_path / "s"
    argv = [sys.executable, "-m", "lstmkit", "study", "--task", "adding", "--variants", "vanilla,nfg", "--seeds", "1",
            "--lr-trials", "1", "--jobs", "2", "--quiet", "--out", str(out), "-o", "length=24", "-o", "eval_size=128",
            "--hidden", "6", "--batch-size", "8", "--steps", "100000", "--eval-every", "6", "--eval-batch-size", "128"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("runs/*/*/checkpoint.safetensors"))) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    children = [int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("lstmkit study: interrupted; the same command continues the study"), err
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(c) for c in children):
        time.sleep(0.1)
    assert not any(_alive(c) for c in children), "workers outlived the interrupted study"
