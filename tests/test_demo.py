"""make demo's trials: a short one of each model leaves a run directory that ``lstmkit
report`` reads, and the printed table says what solved means and what was published."""

from __future__ import annotations

from lstmkit.app import demo
from lstmkit.app.cli import main


def test_demo_trials_are_reported_and_compared_with_the_paper(tmp_path, capsys):
    trials = [demo.run_trial("adding", model, 0, tmp_path / f"adding-{model}-s0", max_sequences=320, progress=False)
              for model in ("lstm", "rnn")]
    assert [(t.model, t.solved, t.sequences, t.metric) for t in trials] == [
        ("lstm", False, 320, "accuracy"), ("rnn", False, 320, "accuracy")]
    text = "\n".join(demo._report(demo.EXPERIMENTS["adding"], trials))
    assert demo.EXPERIMENTS["adding"].solved in text and "74,000 sequences" in text
    assert "LSTM  lstmkit: 0/1 trials solved within 320 sequences each." in text
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    assert all((tmp_path / f"adding-{m}-s0" / "report.html").is_file() for m in ("lstm", "rnn"))
