"""The command line explains itself and never fails badly: every mistake a newcomer or an
adversary makes is one line naming what is wrong, exit code 2, and no file created or
changed; checkpoints are checked against the model they describe before anything is read
or allocated; a run directory is never stuck. Everything goes through ``lstmkit.app.cli.main``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lstmkit.app.cli import main, train_plan
from lstmkit.app.config import TrainConfig, option_of
from lstmkit.app.tasks.registry import task_names

ADDING = ["train", "adding", "-o", "length=24", "--hidden", "8", "--batch-size", "8", "--eval-every", "10",
          "--threads", "1", "--quiet", "--no-stop-at-target", "--steps", "20"]


def run(argv: list[str]) -> int:
    """``main(argv)``'s exit code, also when argparse exits."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def fails(capsys, argv: list, *messages: str) -> str:
    """Exit code 2 and one line on stderr holding every message."""
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, err
    for m in messages:
        assert m in err, err
    return err


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "run"
    assert run(ADDING + ["--out", out]) == 0
    return out


# ----------------------------------------------------------------------------- explains itself


def test_train_help_shows_every_setting_with_its_default_and_the_tasks(capsys):
    assert run(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("task", "task_options"):
            continue
        flag = (option_of(f).flags or (f"--{f.name.replace('_', '-')}",))[0]
        assert flag in text, f.name
    assert "cells per layer and direction (H) (default: 64)" in text
    assert "--stop-at-target, --no-stop-at-target" in text and "(default: on)" in text
    for name in task_names():
        assert name in text
    assert "length=100, form='hochreiter', eval_size=2560" in text


def test_tasks_command_lists_tasks_and_options(capsys):
    assert run(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in task_names():
        assert f"\n{name} " in "\n" + out
    # each task's summary whole, however its docstring wraps (it was cut at the first line break)
    assert 'Continual embedded Reber grammar, Gers, Schmidhuber & Cummins 2000 ("Learning to forget", §4).\n' in out
    assert "Hochreiter & Schmidhuber 1997 §5.4 (Experiment 4) and Le, Jaitly & Hinton 2015" in out
    assert run(["tasks", "copy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("copy: Copy memory") and "  length = 100" in out
    cfg = TrainConfig.for_task("copy", {})  # what `lstmkit train copy` runs: the recipe is printed
    assert f"  cell={cfg.cell}, hidden_size={cfg.hidden_size}, lr={cfg.lr}," in out
    assert f"steps={cfg.steps}," in out and "stop_at_target=False" in out
    assert "  seed = " not in out  # the seed is --seed, not a task option (-o seed=N is refused)
    fails(capsys, ["tasks", "addng"], "unknown task 'addng' (did you mean 'adding'?)")


def test_the_cli_passes_only_the_settings_given(monkeypatch, capsys):
    """``TrainConfig.for_task`` receives exactly what was typed (a recipe layer slots in there)."""
    seen = {}

    def capture(task, task_options, **given):
        seen.update(task=task, task_options=task_options, given=given)
        raise ValueError("captured")

    monkeypatch.setattr(TrainConfig, "for_task", staticmethod(capture))
    fails(capsys, ["train", "copy", "-o", "length=5", "--hidden", "8", "--clip", "0", "--no-bidirectional"], "captured")
    assert seen == {"task": "copy", "task_options": {"length": 5},
                    "given": {"hidden_size": 8, "clip": None, "bidirectional": False}}


def test_for_task_defaults_then_given():
    cfg = TrainConfig.for_task("adding", {"length": 30}, hidden_size=8, lr=0.01)
    assert (cfg.task, cfg.task_options, cfg.hidden_size, cfg.lr) == ("adding", {"length": 30}, 8, 0.01)
    assert cfg.num_layers == TrainConfig.__dataclass_fields__["num_layers"].default
    with pytest.raises(ValueError, match=r"hiden_size: not a training setting \(did you mean 'hidden_size'\?\)"):
        TrainConfig.for_task("adding", {}, hiden_size=8)
    with pytest.raises(ValueError, match=r"lr: expected a number > 0, got -1"):
        TrainConfig.for_task("adding", {}, lr=-1)


def test_the_default_run_directory_is_one_directory():
    """A cell word with '/' (zoneout=<z_c>/<z_h>) named two nested directories, which plot compare
    runs/* then read as a run."""
    from lstmkit.app.cli import default_run_dir

    cfg = TrainConfig.for_task("adding", {"length": 30}, cell="zoneout=0.1/0.2+deep=f:3")
    d = default_run_dir(cfg, cell_given=True)
    assert d.parent == Path("runs") and d.name == "adding-length30-zoneout=0.1_0.2+deep=f:3-s0"


def test_the_plain_relu_rnn_is_a_model(tmp_path):
    """--model rnn_relu trains the plain ReLU RNN (the variant table's word), in a directory of its name."""
    import lstmkit
    from lstmkit.app.cli import default_run_dir
    from lstmkit.app.runs import load_run, variant_of
    from lstmkit.app.train import train

    cfg = TrainConfig.for_task("adding", {"length": 24, "eval_size": 8}, model="rnn_relu", hidden_size=4,
                               batch_size=4, steps=2, eval_every=2)
    assert default_run_dir(cfg, cell_given=False).name == "adding-length24-eval_size8-rnn_relu-s0"
    assert cfg.cell_name == "rnn_relu"
    train(cfg, tmp_path / "r", progress=False)
    _, _, model = load_run(tmp_path / "r")
    assert model.rnn.spec == lstmkit.resolve("rnn_relu")
    (tmp_path / "r" / "summary.json").unlink()  # an unfinished run's variant, from its config.json
    assert variant_of(tmp_path / "r") == "rnn_relu"
    from lstmkit.app import plots

    assert "rnn_relu" in plots.plot_weights(model.rnn)._suptitle.get_text()  # (it was titled 'rnn')


def test_a_run_saved_with_settings_now_refused_at_the_start_still_reads_and_resumes(tmp_path, capsys):
    """Settings refused when a run starts (a warm-up beyond the budget, --momentum with adam, --cell
    with a plain RNN, a counting train_max at the criterion) are not part of a saved run's
    validity: such a run (older versions started them) evaluates, reports and resumes with the
    command that started it."""
    from lstmkit.app.train import train

    base = ["-o", "length=24", "-o", "eval_size=16", "--hidden", "4", "--batch-size", "4", "--eval-every", "2"]
    cases = {"w": (dict(warmup=10), ["--warmup", "10"]),
             "m": (dict(momentum=0.5), ["--momentum", "0.5"]),
             "r": (dict(model="rnn", cell="peephole"), ["--model", "rnn", "--cell", "peephole"])}
    for name, (kw, flags) in cases.items():
        cfg = TrainConfig.for_task("adding", {"length": 24, "eval_size": 16}, hidden_size=4, batch_size=4, steps=2,
                                   eval_every=2, **kw)
        train(cfg, tmp_path / name, progress=False)  # (the library trains what it is given)
        assert run(["eval", str(tmp_path / name)]) == 0, name
        capsys.readouterr()
        argv = ["train", "adding", *base, "--steps", "4", *flags, "--out", str(tmp_path / name), "--quiet"]
        assert run([*argv, "--resume"]) == 0, (name, capsys.readouterr().err)
        fresh = tmp_path / f"{name}-new"  # the same settings for a new run: refused, nothing made
        assert run(["train", "adding", *base, "--steps", "4", *flags, "--out", str(fresh), "--quiet"]) == 2
        # --resume where no checkpoint is yet starts a new run: refused as well
        assert run(["train", "adding", *base, "--steps", "4", *flags, "--out", str(fresh), "--resume"]) == 2
        assert not fresh.exists()
    capsys.readouterr()
    fails(capsys, ["train", "counting", "-o", "train_max=100", "--out", tmp_path / "c"],
          "train_max must be below the criterion 100")
    fails(capsys, ["train", "counting", "-o", 'language=["x"]', "--out", tmp_path / "c"],
          "task 'counting': language must be 'anbn' or 'anbncn'")


def test_the_none_words_the_help_names_are_read(tmp_path):
    """--backend none (the help's default) was an unknown kernel, and --clip 0.0 was refused as
    'expected a number > 0 or 0'; both mean off, as --clip 0 and --threads none do."""
    from lstmkit.app._argparse import add_config_options, config_values

    parser = argparse.ArgumentParser()
    add_config_options(parser)
    got = config_values(parser.parse_args(["--backend", "none", "--clip", "0.0", "--threads", "None"]))
    assert got == {"backend": None, "clip": None, "threads": None}
    assert config_values(parser.parse_args(["--backend", "reference", "--clip", "0.5"])) == \
        {"backend": "reference", "clip": 0.5}
    with pytest.raises(ValueError, match=r"clip: expected a number > 0 or None, got -1"):
        TrainConfig(task="adding", clip=-1).validate()


def test_the_chorales_parse_announces_itself(monkeypatch, tmp_path, capsys):
    pytest.importorskip("music21")
    from lstmkit.app.tasks import _chorales

    monkeypatch.setenv("LSTMKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(_chorales, "_parse", lambda limit: (["a"], [torch.zeros(2, 128).numpy().astype("uint8")],
                                                            1, "x", 0.1))
    _chorales._load_cached.cache_clear()
    try:
        _chorales._load_cached(str(tmp_path), 3)
    finally:
        _chorales._load_cached.cache_clear()
    assert "chorales: parsing music21's Bach scores until 3 chorales once (all of them usually take 5-10 minutes" \
        in capsys.readouterr().err


# ----------------------------------------------------------------------------- mistakes


MISTAKES = [
    (["--out", "{file}"], "--out {file}: is a file, expected a run directory"),
    (["--threads", "-1"], "threads: expected an int >= 1 or none, got -1"),
    (["--backend", "bogus"], "backend: unknown kernel 'bogus'"),
    (["--backend", "fused"], "backend: unknown kernel 'fused' (did you mean 'cpu_fused'?)"),
    (["--backend", "torch", "--cell", "deep=4"], "backend: kernel 'torch' cannot run this layer: torch's LSTM computes the vanilla cell"),
    (["--weight-decay", "-1"], "weight_decay: expected a number >= 0, got -1.0"),
    (["--momentum", "nan"], "momentum: expected a finite number, got nan"),
    (["--cell", "peepole"], "cell: unknown variant 'peepole' in 'peepole' (did you mean 'peephole'?)"),
    (["--cell", "nfg+cifg"], "cannot also be removed"),
    (["--cell", "rnn_relu"], "cell: 'rnn_relu' is the plain RNN, not an LSTM variant; the plain RNNs are models of "
                             "their own: rnn, rnn_relu"),
    (["-o", "length=100", "--steps", "10", "--warmup", "11"], "warmup: 11 steps of warm-up is more than the budget"),
    (["--model", "rnn", "--cell", "nosuch"], "--cell: the plain RNN (--model rnn) has no cell variant; leave --cell "
                                             "out"),
    (["--momentum", "0.5"], "--momentum: applies to --optimizer sgd, not adam"),
    (["--warmup", "99999999"], "warmup: 99999999 steps of warm-up is more than the budget of "),
    (["--model", "rnn_relu", "--proj-size", "2"], "proj_size: only the LSTM has a projection, not the plain RNN "
                                                  "(--model rnn_relu)"),
    (["--hidden", "0"], "hidden_size: expected an int >= 1, got 0"),
    (["--hidden", "100000"], "hidden_size: expected an int <= 65536, got 100000 (a sane upper bound)"),
    (["--layers", "1000000"], "num_layers: expected an int <= 1024"),
    (["--hidden", "4096", "--layers", "8"], "hidden_size, num_layers: the model would have ",
     "parameters, more than the bound of 268,435,456"),
    (["--batch-size", "1048576", "--hidden", "512"], "GiB of activations, more than the bound of 8 GiB"),
    (["-o", "lenght=100"], "task 'adding': unknown option 'lenght' (did you mean 'length'?); its options (with "
                           "defaults) are seed=0, length=100, form='hochreiter', eval_size=2560"),
    (["-o", "length=1e9"], "task 'adding': length must be a positive int, got 1000000000.0"),
    (["-o", "length=1000000000"], "task 'adding': length must be at most 100,000 (a sane bound)"),
    (["-o", "eval_size=10000000", "-o", "length=100000"], "an evaluation set of eval_size=10000000 sequences"),
    (["--length", "100"], "unrecognized arguments: --length 100 (task options are given as -o KEY=VALUE: did you "
                          "mean -o length=...?)"),
    (["--optimizer", "adm"], "invalid choice: 'adm'", "(did you mean 'adam'?)"),
    (["--hiden", "3"], "unrecognized arguments: --hiden 3 (did you mean '--hidden'?)"),
    (["--eval-split", "valid", "-o", "eval_size=0"], "eval_size must be a positive int, got 0"),
    # float32 optimiser arithmetic overflowed with a traceback beyond these
    (["--lr", "1e40"], "lr: expected a number <= 10000, got 1e+40 (a sane upper bound)"),
    (["--lr", "1e300", "--optimizer", "sgd"], "lr: expected a number <= 10000, got 1e+300"),
    (["--weight-decay", "1e308"], "weight_decay: expected a number <= 10000, got 1e+308"),
    # the seed is --seed's; a bad option is named, not the recipe's cell made from it (chrono=T)
    (["-o", "seed=3"], "-o seed: the run's seed is set with --seed", "got -o seed=3"),
    (["-o", "length=-5"], "task 'adding': length must be a positive int, got -5"),
    (["-o", "length=NaN"], "task 'adding': length must be a positive int, got nan"),
    (["--out", ""], "argument --out: expected a path, got an empty one"),
]


@pytest.mark.parametrize("case", MISTAKES, ids=[" ".join(m[0])[:40] for m in MISTAKES])
def test_train_mistakes_are_one_line_and_create_nothing(tmp_path, capsys, case):
    extra, messages = case[0], case[1:]
    (tmp_path / "README.md").write_text("mine")
    before = snapshot(tmp_path)
    fill = {"file": str(tmp_path / "README.md")}
    argv = ADDING + [a.format(**fill) for a in extra]
    if "--out" not in extra:
        argv += ["--out", tmp_path / "run"]
    fails(capsys, argv, *[m.format(**fill) for m in messages])
    assert snapshot(tmp_path) == before


def test_other_commands_mistakes(tmp_path, capsys, good_run):
    (tmp_path / "file").write_text("mine")
    torch.save(torch.nn.LSTM(3, 4).state_dict(), tmp_path / "lstm.pt")
    before = snapshot(tmp_path)
    fails(capsys, ["train", "reberr"], "unknown task 'reberr' (did you mean 'reber'?)")
    fails(capsys, ["study", "--task", "adding", "--variants", "vanilla", "--out", tmp_path / "file"],
          "is a file, expected a study directory")
    fails(capsys, ["study", "--task", "adding", "--variants", "vanilla", "--hidden", "-3", "--out", tmp_path / "s"],
          "hidden_size: expected an int >= 1, got -3")
    fails(capsys, ["eval", tmp_path / "lstm.pt"], "lstm.pt is not a readable safetensors file",
          "lstmkit reads a training run directory or its checkpoint.safetensors",
          "converts with lstmkit convert")
    fails(capsys, ["report", tmp_path / "lstm.pt"], "lstm.pt' is a file; lstmkit report reads a training run's "
                                                    "directory")
    fails(capsys, ["sample", good_run, "-n", "0"], "-n: expected an int in [1, 10000000], got 0")
    fails(capsys, ["sample", good_run, "--temperature", "inf"], "--temperature: expected a finite number > 0, got inf")
    fails(capsys, ["study", "--task", "adding", "--variants", "vanilla", "--metric", "", "--out", tmp_path / "s"],
          "metric: expected a metric's name, got ''")
    fails(capsys, ["plot", "compare", good_run, "--metric", "", "-o", tmp_path / "c.png"],
          "metric: expected a metric's name, got ''")
    fails(capsys, ["plot", "gradflow", "--runs", good_run, "--cells", "rnn", "-o", tmp_path / "g.png"],
          "--cells: --runs measures the models of the runs given; leave --cells out")
    fails(capsys, ["plot", "gradflow", "--cells", " , ", "-o", tmp_path / "g.png"],
          "--cells: expected comma-separated models, got ' , '")
    fails(capsys, ["plot", "gradflow", "--cells", "vanilla,heads=3", "--hidden", "4", "-o", tmp_path / "g.png"],
          "hidden_size=4 is not divisible by 3")
    fails(capsys, ["study", "--task", "adding", "--variants", "vanilla", "--momentum", "0.5", "--out", tmp_path / "s"],
          "--momentum: applies to --optimizer sgd, not adam")
    fails(capsys, ["study", "--task", "adding", "--variants", "vanilla,rnn+heads=2", "--out", tmp_path / "s"],
          "the plain RNNs are models of their own: rnn, rnn_relu")
    fails(capsys, ["trian"], "invalid choice: 'trian'", "(did you mean 'train'?)")
    fails(capsys, ["plot", "gates", good_run, "--layr", "1"], "(did you mean '--layer'?)")
    fails(capsys, ["demo", "--seeds", "0"], "--seeds: expected an int in [1, 1000], got 0")
    fails(capsys, ["sample", good_run, "--seed", "99999999999999999999999"],
          "--seed: expected an int in [0, 9223372036854775807], got 99999999999999999999999")
    fails(capsys, ["sample", good_run, "--seed", "-1"], "--seed: expected an int in [0, 9223372036854775807], got -1")
    for argv in (["eval", ""], ["report", ""], ["report", good_run, "-o", ""], ["plot", "weights", good_run, "-o", ""],
                 ["study", "--task", "adding", "--variants", "vanilla", "--out", ""], ["demo", "--out", ""]):
        fails(capsys, argv, "expected a path, got an empty one")  # '' is not the current directory
    fails(capsys, ["study", "--task", "adding", "--variants", "vanilla,,peephole", "--out", tmp_path / "s"],
          "variants: expected variant names, got an empty one in ['vanilla', '', 'peephole']")
    fails(capsys, ["study", "--task", "adding", "--variants", "vanilla", "--study-seed", "-1", "--out", tmp_path / "s"],
          "seed (--study-seed): expected an int in [0, 9223372036854775807], got -1")
    fails(capsys, ["study", "--task", "adding", "--variants", "vanilla", "--lr-range", "1e-3", "1e300",
                   "--out", tmp_path / "s"], "lr_range: expected a high <= 10000 (a sane upper bound)")
    fails(capsys, ["study", "--task", "adding", "--variants", "vanilla", "-o", "seed=3", "--out", tmp_path / "s"],
          "task_options: the seed is not a task option")
    fails(capsys, ["plot", "gradflow", "--lr", "1e40", "-o", tmp_path / "g.png"], "lr: expected a number <= 10000")
    assert snapshot(tmp_path) == before


def test_eval_prints_json_even_when_a_metric_is_nan(good_run, capsys, monkeypatch):
    """JSON has no NaN: a metric without a value (no sequences to count) is null."""
    monkeypatch.setattr("lstmkit.app.train.evaluate", lambda *a, **k: {"mse": float("nan"), "accuracy": 0.5})
    assert run(["eval", good_run]) == 0
    line = capsys.readouterr().out.strip()
    assert json.loads(line) == {"task": "adding", "split": "test", "mse": None, "accuracy": 0.5}
    assert "NaN" not in line


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 1e-31])
def test_sampling_at_a_tiny_temperature_is_greedy_not_a_crash(temperature):
    """Dividing the logits by 1e-40 gave inf - inf = NaN probabilities (a traceback): below 1e-30
    sampling is the argmax, which is what such a temperature means."""
    from lstmkit.app.tasks._charlm import sample

    def step(x, state):
        return torch.tensor([0.0, 1.0, 5.0, 2.0]), state

    gen = torch.Generator().manual_seed(0)
    assert sample(step, "a", 20, temperature, gen, vocab="abc") == "c" * 20
    assert sample(step, "a", 20, 0.0, gen, vocab="abc") == "c" * 20
    hot = sample(step, "a", 200, 1e6, torch.Generator().manual_seed(0), vocab="abc")
    assert len(set(hot)) == 4  # a huge temperature: every character, none NaN


# ----------------------------------------------------------------------------- checkpoints


def _tamper(src: Path, dst: Path, config=None, state=None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    ck = dst / "checkpoint.safetensors"
    with safe_open(str(ck), "pt") as fh:
        meta = fh.metadata()
    t = load_file(str(ck))
    cfg, st = json.loads(meta["config"]), json.loads(meta["trainer"])
    for change, obj in ((config, cfg), (state, st), (tensors, t)):
        if change:
            change(obj)
    meta.update(config=json.dumps(cfg), trainer=json.dumps(st))
    save_file(t, str(ck), metadata=meta)
    return dst


CHECKPOINTS = {
    "hidden_size": (dict(config=lambda c: c.update(hidden_size=30000)),
                    "model.rnn.weight_ih_l0 is F32 [32, 2], expected F32 [120000, 2] for its config (lstm chrono=36, "
                    "hidden_size=30000"),  # adding's recipe: chrono initialisation for lags up to 1.5 T
    "length": (dict(config=lambda c: c["task_options"].update(length=10**9)),
               "its task cannot be made (task 'adding': length must be at most 100,000"),
    "length_float": (dict(config=lambda c: c["task_options"].update(length=1e9)),
                     "length must be a positive int, got 1000000000.0"),
    "num_layers": (dict(config=lambda c: c.update(num_layers=10**6)),
                   "its config is damaged (num_layers: expected an int <= 1024, got 1000000"),
    "unknown_key": (dict(config=lambda c: c.update(colour="red")), "unknown keys ['colour']"),
    "step_huge": (dict(state=lambda s: s.update(step=10**12)),
                  "trainer state: step: expected an int in [1, 20] (its config's steps), got 1000000000000"),
    "step_negative": (dict(state=lambda s: s.update(step=-5)), "step: expected an int in [1, 20]"),
    "no_best": (dict(state=lambda s: s.pop("best")), "trainer state: no 'best'"),
    "no_history": (dict(state=lambda s: s.pop("history")), "trainer state: no 'history'"),
    "history_steps": (dict(state=lambda s: s["history"].reverse()), "history[1]: expected an evaluation record with a step in (20, 20]"),
    "groups": (dict(state=lambda s: s.update(param_groups={"lr": 1})), "param_groups: expected a list of one group"),
    "optimiser_shape": (dict(tensors=lambda t: t.update({"optim.0.exp_avg": torch.zeros(3, 3)})),
                        "optim.0.exp_avg is F32 [3, 3], expected F32 [32, 2]"),
    "int64_weights": (dict(tensors=lambda t: t.update({"model.rnn.weight_ih_l0": t["model.rnn.weight_ih_l0"].long()})),
                      "model.rnn.weight_ih_l0 is I64 [32, 2], expected F32 [32, 2]"),
    "rng": (dict(tensors=lambda t: t.update({"rng.torch": torch.zeros(10)})), "rng.torch is F32 [10], expected U8"),
    "missing_tensor": (dict(tensors=lambda t: t.pop("model.head.bias")), "missing ['model.head.bias']"),
    "partial_optimiser": (dict(tensors=lambda t: t.pop("optim.1.exp_avg_sq")),
                          "optimiser state of parameter 1 is incomplete"),
    "partial_selection": (dict(tensors=lambda t: t.pop("selected.head.bias")), "incomplete selected weights"),
    "selection_shape": (dict(tensors=lambda t: t.update({"selected.head.bias": torch.zeros(5)})),
                        "selected.head.bias is F32 [5], expected F32 [1]"),
    "best_step": (dict(state=lambda s: s.update(best_step=7)), "best_step: expected the step of an evaluation"),
    "no_selection": (dict(tensors=lambda t: [t.pop(k) for k in [k for k in t if k.startswith("selected.")]]),
                     "does not match the selected weights it holds"),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_checkpoint_metadata_is_checked_before_it_is_trusted(good_run, tmp_path, capsys, case):
    changes, message = CHECKPOINTS[case]
    d = _tamper(good_run, tmp_path / case, **changes)
    before = snapshot(tmp_path)
    fails(capsys, ["eval", d], message)
    fails(capsys, ADDING + ["--steps", "30", "--out", d, "--resume"], message)
    fails(capsys, ["plot", "weights", d, "-o", tmp_path / "w.png"], message)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- never stuck


def test_a_run_without_a_checkpoint_restarts_with_the_same_command(good_run, tmp_path, capsys):
    """What a run leaves when it fails or is killed before its first checkpoint: the same
    command (with or without --resume) starts it afresh; leftovers of killed writers go."""
    for resume in ([], ["--resume"]):
        d = tmp_path / f"run{len(resume)}"
        d.mkdir()
        killed = dataclasses.asdict(TrainConfig.for_task("adding", {"length": 24}, hidden_size=99))
        (d / "config.json").write_text(json.dumps(killed))  # what a killed run wrote
        (d / "metrics.jsonl").write_text('{"step": 10, "train_loss": 0.5, "valid_accuracy": NaN}\n')
        (d / ".checkpoint.safetensors.otherhost-123-abcd1234.tmp").write_bytes(b"half")  # another machine's
        (d / ".checkpoint.safetensors.k2j4h5l6.tmp").write_bytes(b"half")  # an older version's name
        capsys.readouterr()
        assert run(ADDING + ["--out", d, *resume]) == 0
        if resume:
            assert "has no checkpoint yet" in capsys.readouterr().err
        assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in good_run.iterdir())
        assert json.loads((d / "config.json").read_text())["hidden_size"] == 8
        assert [json.loads(r)["step"] for r in (d / "metrics.jsonl").read_text().splitlines()] == [10, 20]
        a, b = load_file(str(good_run / "model.safetensors")), load_file(str(d / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    fails(capsys, ADDING + ["--out", other], "is not empty; nothing was overwritten")
    fails(capsys, ADDING + ["--out", other, "--resume"], "--resume: no checkpoint in", "is not empty")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    fails(capsys, ADDING + ["--out", good_run], "is not empty; nothing was overwritten (it holds a run: use --resume")


USERS_FILES = {
    "a user's config.json": {"config.json": '{"name": "my precious settings"}'},
    "a user's metrics.jsonl": {"metrics.jsonl": '{"step": 1}\n'},
    "a run's config, a user's metrics": {"config.json": None, "metrics.jsonl": "hello\n"},
    "a partial run config": {"config.json": '{"task": "adding", "hidden_size": 99}'},
    "a config with a bad value": {"config.json": "bad"},
    "a config that is a list": {"config.json": "[1, 2]"},
}


@pytest.mark.parametrize("case", list(USERS_FILES))
def test_files_of_a_runs_names_that_lstmkit_did_not_write_are_never_overwritten(tmp_path, capsys, case):
    """Only what lstmkit wrote before a first checkpoint makes an unstarted run: a user's
    config.json or metrics.jsonl in the directory is refused, with or without --resume."""
    d = tmp_path / "mine"
    d.mkdir()
    real = dataclasses.asdict(TrainConfig.for_task("adding", {"length": 24}))
    for name, text in USERS_FILES[case].items():
        if text is None:
            text = json.dumps(real)
        elif text == "bad":
            text = json.dumps({**real, "hidden_size": -1})
        (d / name).write_text(text)
    before = snapshot(tmp_path)
    fails(capsys, ADDING + ["--out", d], "is not empty; nothing was overwritten", "not an lstmkit run's")
    fails(capsys, ADDING + ["--out", d, "--resume"], "--resume: no checkpoint in", "nothing was overwritten")
    assert snapshot(tmp_path) == before


def test_python_entry_point_has_no_traceback(tmp_path):
    """In a fresh process: exit code 2 and one line, the path a user sees."""
    import subprocess

    (tmp_path / "README.md").write_text("x")
    p = subprocess.run([sys.executable, "-m", "lstmkit", "train", "reber", "--out", str(tmp_path / "README.md")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr


def test_task_options_repeated_the_last_value_counts():
    """``-o KEY=VALUE`` is repeatable; a later value of a key replaces an earlier one (dashes and
    underscores spell one key), and the run directory is named after the values that count."""
    cfg, out = train_plan(["adding", "-o", "length=24", "-o", "eval-size=64", "-o", "length=30", "-o", "eval_size=96"])
    assert cfg.task_options == {"length": 30, "eval_size": 96}
    assert out == train_plan(["adding", "-o", "length=30", "-o", "eval_size=96"])[1]


def test_task_options_in_the_spelling_lstmkit_tasks_shows():
    """``lstmkit tasks co2`` shows ``difference = False``; ``-o difference=True`` was refused
    ("must be true or false, got 'True'"): Python's True / False / None read as JSON's."""
    assert train_plan(["co2", "-o", "difference=True"])[0].task_options == {"difference": True}
    assert train_plan(["co2", "-o", "difference=false"])[0].task_options == {"difference": False}
    assert train_plan(["adding", "-o", "form=hochreiter"])[0].task_options == {"form": "hochreiter"}
