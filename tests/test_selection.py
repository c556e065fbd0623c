"""Stopping and model selection on the validation split, the test split read once at the
end, and per-task recipes (``TrainConfig.for_task``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file

from lstmkit.app import runs
from lstmkit.app.tasks.registry import TASKS, task_names
from lstmkit.app.tasks.synthetic import AddingTask
from lstmkit.app.train import CheckpointError, TrainConfig, Trainer, evaluate, train

#: Scripted validation accuracy by step (adding: goal "max", target 1 - 3/2560).
SCRIPT = {10: 0.2, 20: 0.6, 30: 0.4, 40: 0.5, 50: 0.6, 60: 0.3}


def _cfg(**kw: Any) -> TrainConfig:
    base = dict(task="adding", task_options={"length": 24, "eval_size": 64}, hidden_size=8, batch_size=8,
                steps=60, eval_every=10, threads=1, eval_batch_size=64)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def scripted(monkeypatch):
    """Trainer.evaluate answers the validation split from SCRIPT (real metrics otherwise);
    returns the list of (split, step) evaluations."""
    calls: list[tuple[str, int]] = []
    real = Trainer.evaluate

    def fake(self: Trainer, split: str = "test") -> dict[str, float]:
        calls.append((split, self.step))
        metrics = real(self, split)
        if split == "valid":
            metrics["accuracy"] = SCRIPT[self.step]
        return metrics

    monkeypatch.setattr(Trainer, "evaluate", fake)
    return calls


def _weights(run: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / name))


def test_best_validation_weights_are_kept_and_test_is_read_once(tmp_path, scripted):
    s = train(_cfg(), tmp_path / "run", progress=False)
    assert [split for split, _ in scripted] == ["valid"] * 6 + ["test"]
    assert scripted[-1] == ("test", 60)  # once, after training
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["valid_accuracy"] for r in records] == list(SCRIPT.values())
    assert not any(k.startswith("test_") for r in records for k in r)
    # the first evaluation with the best value (step 20, not the tie at 50) is selected
    assert (s["split"], s["selected_step"], s["value"], s["target"]["met"]) == ("valid", 20, 0.6, False)
    assert s["target"]["first_met_step"] is None and s["target"]["sequences_to_target"] is None
    # independent expectation: a run of the same seed stopped at step 20 has those weights
    short = Trainer(_cfg(steps=20), tmp_path / "short", progress=False)
    short.run()
    kept = _weights(tmp_path / "run")
    for k, v in _weights(tmp_path / "short").items():
        assert torch.equal(kept[k], v), k
    test = evaluate(short.model, short.task, "test", 64)
    assert s["test"] == {"value": test["accuracy"], "met": False, "metrics": test}
    assert s["steps"] == 60


def test_target_met_on_validation_stops_there(tmp_path, monkeypatch, scripted):
    monkeypatch.setitem(SCRIPT, 30, 1.0)
    s = train(_cfg(), tmp_path / "run", progress=False)
    assert s["steps"] == 30 and s["stopped"] == "target met at step 30"
    assert s["selected_step"] == 30 and s["value"] == 1.0 and s["target"]["met"] is True
    assert s["target"]["first_met_step"] == 30 and s["target"]["sequences_to_target"] == 30 * 8
    assert scripted == [("valid", 10), ("valid", 20), ("valid", 30), ("test", 30)]


def test_resumed_run_selects_the_same_weights(tmp_path, scripted):
    full = train(_cfg(), tmp_path / "full", progress=False)
    Trainer(_cfg(steps=40), tmp_path / "part", progress=False).run()
    rest = train(_cfg(), tmp_path / "part", resume=True, progress=False)
    assert rest["selected_step"] == full["selected_step"] == 20
    assert rest["value"] == full["value"] and rest["test"] == full["test"]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the selection after a resume comes from the checkpoint's selected weights; a checkpoint
    # whose trainer state names a kept evaluation but lacks its weights is refused
    Trainer(_cfg(steps=40), tmp_path / "lost", progress=False).run()
    ck = runs.read_checkpoint(tmp_path / "lost")
    assert ck.state["best_step"] == 20 and runs.selected_weights(ck) is not None
    for k, v in runs.selected_weights(ck).items():
        assert torch.equal(v, a[k]), k  # the checkpoint of step 40 carries step 20's weights
    kept = {k: v for k, v in ck.tensors.items() if not k.startswith("selected.")}
    runs.write_checkpoint(tmp_path / "lost", ck.config, kept, ck.state)
    with pytest.raises(CheckpointError, match="best_step 20 does not match the selected weights"):
        train(_cfg(), tmp_path / "lost", resume=True, progress=False)


def test_load_run_gives_the_selected_weights_unless_asked_for_the_last(tmp_path, scripted):
    Trainer(_cfg(steps=40), tmp_path / "run", progress=False).run()
    Trainer(_cfg(steps=20), tmp_path / "at20", progress=False).run()
    Trainer(_cfg(steps=40, eval_every=40), tmp_path / "at40", progress=False).run()  # one evaluation: step 40
    _, _, selected = runs.load_run(tmp_path / "run")
    _, _, last = runs.load_run(tmp_path / "run", weights="last")
    for name, want in (("at20", selected), ("at40", last)):
        ref = _weights(tmp_path / name)
        for k, v in want.state_dict().items():
            assert torch.equal(v, ref[k]), (name, k)


@dataclass
class _RecipeTask(AddingTask):
    name: ClassVar[str] = "_recipe_test"

    @classmethod
    def recipe(cls, options):
        length = cls.option(options, "length")  # the class default (100) when not given
        return {"hidden_size": 2 * length, "lr": 0.01, "cell": "fb=5"}


def test_for_task_layers_defaults_recipe_and_given(monkeypatch):
    monkeypatch.setitem(TASKS, "_recipe_test", _RecipeTask)
    cfg = TrainConfig.for_task("_recipe_test", {"length": 30}, lr=0.5, seed=3)
    assert (cfg.hidden_size, cfg.lr, cfg.cell, cfg.seed) == (60, 0.5, "fb=5", 3)  # recipe < given
    assert cfg.batch_size == TrainConfig.__dataclass_fields__["batch_size"].default  # defaults below
    assert cfg.task_options == {"length": 30}
    assert TrainConfig.for_task("_recipe_test", {}).hidden_size == 200  # the option's default
    assert TrainConfig.for_task("_recipe_test").hidden_size == 200
    with pytest.raises(ValueError, match="hidden: not a training setting"):
        TrainConfig.for_task("_recipe_test", hidden=3)
    with pytest.raises(ValueError, match="unknown task 'nosuch'"):
        TrainConfig.for_task("nosuch")


@pytest.mark.parametrize("task", [t for t in task_names() if not t.startswith("_")])
def test_every_task_recipe_is_a_valid_config(task):
    cfg = TrainConfig.for_task(task)
    cfg.validate()
    assert cfg.task == task and cfg.eval_split == "valid"
