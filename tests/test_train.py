"""Training from the command line: reproducible, resumable (kills: test_kill.py), clear errors,
checkpoints that never execute code, and the same result on 2 processes as on 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lstmkit.app import runs
from lstmkit.app.cli import main
from lstmkit.app.train import TrainConfig, Trainer, load_checkpoint, train

ADDING = ["train", "adding", "-o", "length=24", "--hidden", "8", "--batch-size", "8", "--eval-every", "10",
          "--threads", "1", "--quiet", "--no-stop-at-target"]


def _cfg(**kw) -> TrainConfig:
    base = dict(task="adding", task_options={"length": 24}, hidden_size=8, batch_size=8, steps=20,
                eval_every=10, threads=1, stop_at_target=False, eval_batch_size=512)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_same_seed_same_loss_curve(tmp_path):
    a = train(_cfg(), tmp_path / "a", progress=False)
    b = train(_cfg(), tmp_path / "b", progress=False)
    c = train(_cfg(seed=1), tmp_path / "c", progress=False)
    assert a["final"] == {**b["final"], "time": a["final"]["time"]}
    la = [r["train_loss"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())]
    lb = [r["train_loss"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())]
    assert la == lb and len(la) == 2
    assert a["final"]["train_loss"] != c["final"]["train_loss"]
    for k, v in _weights(tmp_path / "a").items():
        assert torch.equal(v, _weights(tmp_path / "b")[k])


def test_run_files_and_summary(tmp_path):
    s = train(_cfg(model="lstm", cell="peephole"), tmp_path / "r", progress=False)
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == ["checkpoint.safetensors", "config.json", "metrics.jsonl", "model.safetensors",
                     "summary.json"]
    assert s["cell"] == "peephole" and s["steps"] == 20 and f"valid_{s['metric']}" in s["final"]
    assert s["split"] == "valid" and s["test"]["value"] == s["test"]["metrics"][s["metric"]]
    assert s["solved"] == s["test"]["met"] and s["selected_step"] in (10, 20)
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["parameters"] == s["parameters"]
    cfg, tensors, state = load_checkpoint(tmp_path / "r")
    assert cfg.cell == "peephole" and state["step"] == 20 and any(k.startswith("optim.") for k in tensors)


@pytest.mark.parametrize("cell", ["vanilla", "slstm"])
def test_stream_task_resume_carries_state(tmp_path, cell):
    """The streams' carried state — (h, c), the sLSTM's (h, c, n, m), whose n and m a checkpoint
    held but its reader refused — is in the checkpoint, and a resumed run is bit-identical."""
    cfg = _cfg(task="continual_reber", task_options={"bptt": 10}, steps=30, eval_every=10, cell=cell)
    full = train(cfg, tmp_path / "full", progress=False)
    part = Trainer(_cfg(task="continual_reber", task_options={"bptt": 10}, steps=10, eval_every=10, cell=cell),
                   tmp_path / "part", progress=False)
    part.run()
    assert part.state is not None and len(part.state) == (4 if cell == "slstm" else 2)
    rest = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert rest["value"] == full["value"]
    for k, v in _weights(tmp_path / "full").items():
        assert torch.equal(v, _weights(tmp_path / "part")[k]), k


def test_a_checkpoint_with_damaged_values_is_one_line_and_its_flags_are_not_taken(tmp_path):
    """A checkpoint whose header and shapes are right but whose generator state is damaged: one
    line, exit 2 (a traceback before); optimiser flags changed in its trainer state (maximize,
    amsgrad) are not taken — the config sets the optimiser — so the resumed run equals a straight one."""
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save_file

    straight = train(_cfg(steps=20), tmp_path / "straight", progress=False)
    for damage in ("rng", "maximize", "amsgrad"):
        d = tmp_path / damage
        Trainer(_cfg(steps=10), d, progress=False).run()
        p = d / "checkpoint.safetensors"
        with safe_open(str(p), "pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(str(p))
        if damage == "rng":
            tensors["rng.torch"][:] = 255
        else:
            state = _json.loads(meta["trainer"])
            state["param_groups"][0][damage] = True
            meta["trainer"] = _json.dumps(state)
        save_file(tensors, str(p), metadata=meta)
        if damage == "rng":  # (the CLI prints a CheckpointError as one line, exit 2)
            with pytest.raises(runs.CheckpointError, match=r"random generator's state is damaged \(Invalid mt19937"):
                Trainer(_cfg(steps=20), d, resume=True, progress=False)
        else:
            rest = train(_cfg(steps=20), d, resume=True, progress=False)
            assert rest["value"] == straight["value"]
            for k, v in _weights(tmp_path / "straight").items():
                assert torch.equal(v, _weights(d)[k]), (damage, k)


def test_a_resumed_run_with_more_steps_records_its_new_budget_everywhere(tmp_path):
    """--steps may grow on --resume: config.json, summary.json and the weights' metadata then all
    say the new budget (config.json kept the first run's before)."""
    out = tmp_path / "run"
    assert main(ADDING + ["--steps", "10", "--out", str(out)]) == 0
    assert main(ADDING + ["--steps", "20", "--out", str(out), "--resume"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        weights_steps = json.loads(f.metadata()["config"])["steps"]
    assert json.loads((out / "config.json").read_text())["steps"] == 20
    assert json.loads((out / "summary.json").read_text())["steps"] == 20 == weights_steps
    assert load_checkpoint(out)[2]["step"] == 20


def test_resume_with_other_settings_is_refused_before_the_task_and_kernel(tmp_path, monkeypatch):
    """The checkpoint is read and compared first: a mismatch was refused only after the task's
    data were made and the kernel chosen, which may compile it (a minute; found by a CLI sweep)."""
    from lstmkit.app import train as train_module

    out = tmp_path / "run"
    assert main(ADDING + ["--steps", "10", "--out", str(out)]) == 0

    def not_yet(*args, **kwargs):
        raise AssertionError("the task was made before the checkpoint was compared")
    monkeypatch.setattr(train_module, "get_task", not_yet)
    cfg = TrainConfig.for_task("adding", {"length": 24})
    cfg = TrainConfig(**{**cfg.__dict__, "hidden_size": 16, "steps": 20})
    with pytest.raises(runs.CheckpointError, match="trained with other settings"):
        Trainer(cfg, out, resume=True, progress=False)


def test_a_run_whose_checkpoint_was_deleted_is_named_so(tmp_path, capsys):
    """Its summary, weights and config remain; it was called 'files that are not an lstmkit
    run's' (found by a CLI sweep). Nothing is overwritten, with or without --resume."""
    out = tmp_path / "run"
    assert main(ADDING + ["--steps", "10", "--out", str(out)]) == 0
    (out / "checkpoint.safetensors").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ([], ["--resume"]):
        capsys.readouterr()
        assert main(ADDING + ["--steps", "10", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "holds an lstmkit run's files but not its checkpoint.safetensors" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_errors_exit_2_and_overwrite_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(ADDING + ["--steps", "10", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fails(args, pattern):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert pattern in err and err.count("\n") == 1, err

    fails(ADDING + ["--out", str(out)], "is not empty; nothing was overwritten")
    fails(["train", "nosuchtask", "--out", str(tmp_path / "x")], "unknown task 'nosuchtask'")
    fails([*ADDING, "--cell", "nfg+cifg", "--out", str(tmp_path / "y")], "cannot also be removed")
    fails([*ADDING, "--hidden", "0", "--out", str(tmp_path / "z")], "hidden_size: expected an int >= 1")
    fails([*ADDING, "--proj-size", "9", "--out", str(tmp_path / "w")], "proj_size")
    fails([*ADDING, "-o", "nosuch=1", "--out", str(tmp_path / "v")], "task 'adding'")
    fails([*ADDING, "--steps", "20", "--hidden", "16", "--out", str(out), "--resume"],
          "trained with other settings (hidden_size: 8 there, 16 now); resume with the same settings")
    fails([*ADDING, "--steps", "5", "--out", str(out), "--resume"],
          "--steps 5: the checkpoint in")  # a budget below the steps trained (it was taken, and recorded)
    # Corrupt and foreign checkpoints.
    ck = out / "checkpoint.safetensors"
    good = ck.read_bytes()
    ck.write_bytes(good[: len(good) // 2])
    fails([*ADDING, "--steps", "20", "--out", str(out), "--resume"], "not a readable safetensors file")
    fails(["eval", str(out)], "not a readable safetensors file")
    save_file({"w": torch.zeros(2)}, str(ck), metadata={"format": "something-else"})
    fails(["eval", str(ck)], "is not an lstmkit checkpoint")
    ck.write_bytes(good)
    fails([*ADDING, "--out", str(tmp_path / "none"), "--resume"], "--resume: no checkpoint in")
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # every failure left the run directory as it was
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        fails([*ADDING, "--out", str(locked / "run")], "cannot write in")


def test_pickle_checkpoint_is_refused_without_executing(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(pickle.dumps(Evil()))
    assert main(["eval", str(bad)]) == 2
    assert not marker.exists()


def test_eval_and_sample_commands(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(ADDING + ["--steps", "10", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["task"] == "adding" and "mse" in line
    assert main(["sample", str(out)]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_processes_match_one_with_same_global_batch(tmp_path):
    args = ["-m", "lstmkit", *ADDING, "--steps", "20", "--batch-size", "16"]
    one = tmp_path / "one"
    subprocess.run([sys.executable, *args, "--out", str(one)], check=True)
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29517", *args, "--out", str(two)], check=True, env=env,
                          capture_output=True, text=True)
    assert done.stdout.count("run directory:") == 1, done.stdout  # only rank 0 prints
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ja = json.loads((one / "summary.json").read_text())
    jb = json.loads((two / "summary.json").read_text())
    assert abs(ja["value"] - jb["value"]) < 1e-5


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_processes_resume_a_stream_task_bit_identically(tmp_path):
    """A stream task under torchrun: each process carries its share of the streams; the checkpoint
    holds every stream's state (rank 0's alone before, which every rank then resumed from)."""
    args = ["-m", "lstmkit", "train", "continual_reber", "-o", "bptt=10", "-o", "eval_symbols=200", "--hidden", "8",
            "--eval-every", "5", "--batch-size", "4", "--eval-batch-size", "4", "--threads", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519"]
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    for extra in (["--steps", "10", "--out", str(straight)], ["--steps", "5", "--out", str(parted)],
                  ["--steps", "10", "--out", str(parted), "--resume"]):
        subprocess.run([*torchrun, *args, *extra], check=True, env=env, capture_output=True, text=True)
    a, b = _weights(straight), _weights(parted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, tensors, _ = load_checkpoint(parted)
    assert tensors["carry.0"].shape == (1, 4, 8)  # every stream (batch 4), not one process's 2


# ----------------------------------------------------------------------------- one run at a time, Ctrl-C


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until ``proc`` has written ``path``; fail (the process killed, its output shown) if it
    exits or takes ``timeout`` seconds (a loaded 2-core machine took two minutes to start a run;
    an assertion that read the output of a still running process waited for its 10**6 steps)."""
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"{path} was not written (exit {proc.returncode}): {err[-2000:]}")
        time.sleep(0.02)


def _launch(argv: list[str]) -> subprocess.Popen:
    """``python -m lstmkit ARGV`` in its own session, with Ctrl-C (SIGINT) at its default
    (a test runner started in the background may have it ignored)."""
    return subprocess.Popen([sys.executable, "-m", "lstmkit", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_a_second_run_of_a_directory_in_use_is_refused_and_a_killed_one_resumes(tmp_path, capsys):
    """Two runs of one directory at once would interleave metrics.jsonl and overwrite each
    other's checkpoints: the second one exits 2 naming the first's process; once the first
    is killed (the OS drops its lock), --resume continues."""
    out = tmp_path / "run"
    first = _launch(ADDING + ["--steps", "1000000", "--out", str(out)])
    try:
        _wait_for(out / "checkpoint.safetensors", first)
        for extra in ([], ["--resume"], ["--steps", "30", "--resume"]):
            capsys.readouterr()
            assert main(ADDING + ["--steps", "1000000", "--out", str(out), *extra]) == 2
            err = capsys.readouterr().err
            assert f"is in use by another run (pid {first.pid})" in err and err.count("\n") == 1, err
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.kill()
        first.communicate()
    step = runs.checkpoint_step(out)
    assert step is not None and step % 10 == 0
    assert main(ADDING + ["--steps", str(step + 20), "--out", str(out), "--resume"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(10, step + 21, 10))  # one line per evaluation


def test_the_run_lock_is_held_from_start_to_end_in_one_process_too(tmp_path, capsys):
    from lstmkit.app.cli import train_plan

    out = tmp_path / "run"
    cfg, _ = train_plan(ADDING[1:] + ["--steps", "20", "--out", str(out)])
    held = Trainer(cfg, out, progress=False)  # set up (config.json written): it holds the directory
    assert main(ADDING + ["--steps", "20", "--out", str(out)]) == 2
    assert f"is in use by another run (pid {os.getpid()})" in capsys.readouterr().err
    held.run()  # released at the end
    assert main(ADDING + ["--steps", "30", "--out", str(out), "--resume"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "config.json", "metrics.jsonl",
                                                    "model.safetensors", "summary.json"]  # the lock leaves no file


def test_ctrl_c_is_one_line_exit_130_and_the_run_resumes(tmp_path):
    """SIGINT (Ctrl-C) in the middle of training: no traceback, one line saying how to go on,
    exit code 130; the same command with --resume finishes the run."""
    out = tmp_path / "run"
    proc = _launch(ADDING + ["--steps", "1000000", "--out", str(out)])
    try:
        _wait_for(out / "checkpoint.safetensors", proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    step = runs.checkpoint_step(out)
    assert proc.returncode == 130 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"interrupted; the same command with --resume continues from step {step} (the last checkpoint in " in err
    assert main(ADDING + ["--steps", str(step + 10), "--out", str(out), "--resume"]) == 0


def test_ctrl_c_before_the_first_checkpoint_and_in_other_commands(tmp_path, capsys, monkeypatch):
    def interrupt(self):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", interrupt)
        assert main(ADDING + ["--steps", "20", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err == (f"lstmkit train: interrupted before the first checkpoint; the same command starts the run in {out} "
                   f"afresh (with or without --resume)\n")
    assert main(ADDING + ["--steps", "20", "--out", str(out)]) == 0  # and it does
    with monkeypatch.context() as m:
        m.setattr("lstmkit.app.train.evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        capsys.readouterr()
        assert main(["eval", str(out)]) == 130
    assert capsys.readouterr().err == "lstmkit eval: interrupted\n"


def test_a_diverged_run_is_one_line_exit_2_and_its_directory_can_be_reused(tmp_path, capsys):
    """Divergence comes of the settings (a learning rate too large): one line and exit 2 as for
    any bad input; the directory, which holds no checkpoint yet, takes a run with other settings."""
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(ADDING + ["--steps", "20", "--optimizer", "sgd", "--lr", "1e4", "--clip", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lstmkit train: error: training diverged: loss is") and err.count("\n") == 1, err
    assert f"{out} has no checkpoint: a run with other settings can start afresh in it" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert main(ADDING + ["--steps", "10", "--out", str(out)]) == 0
    assert (out / "summary.json").is_file()
