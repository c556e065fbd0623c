"""SIGKILL at any point of a run — before its first checkpoint, between a metrics line and
its checkpoint, in the middle of a checkpoint write, at random — and the same command
(with ``--resume`` once a checkpoint exists) still finishes with bit-identical weights and
metrics, exactly one metrics line per evaluation, and no temporary files left."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lstmkit.app.cli import main

ARGS = ["train", "adding", "-o", "length=24", "--hidden", "8", "--layers", "2", "--batch-size", "8",
        "--eval-every", "10", "--steps", "60", "--threads", "1", "--quiet", "--no-stop-at-target"]

# Run in the child: optionally stop (and wait to be killed) at a chosen point, then lstmkit's main.
CHILD = r"""
import os, sys, time
from pathlib import Path
import lstmkit._atomic as atomic
import lstmkit.app.runs as runs
from lstmkit.app.cli import main

mode, marker, nth = os.environ["KILL_AT"], Path(os.environ["KILL_MARKER"]), int(os.environ.get("KILL_NTH", "1"))
calls = [0]

def hang():
    marker.touch()
    time.sleep(600)  # the test kills us here

if mode == "before-checkpoint":  # the metrics line of this evaluation is written, its checkpoint is not
    real_checkpoint = runs.write_checkpoint
    def write_checkpoint(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            hang()
        return real_checkpoint(*a, **k)
    runs.write_checkpoint = write_checkpoint
elif mode == "checkpoint-write":  # half of the new checkpoint is in its temporary file
    real_write = atomic.write_bytes
    def write_bytes(path, data, **k):
        if Path(path).name == "checkpoint.safetensors":
            calls[0] += 1
            if calls[0] == nth:
                with atomic.atomic_path(path) as tmp:
                    with open(tmp, "wb") as fh:
                        fh.write(data[: len(data) // 2])
                        fh.flush()
                    hang()
        return real_write(path, data, **k)
    atomic.write_bytes = write_bytes
sys.exit(main(sys.argv[1:]))
"""


def _launch(argv: list[str], mode: str, marker: Path, nth: int = 1) -> subprocess.Popen:
    env = {**os.environ, "KILL_AT": mode, "KILL_MARKER": str(marker), "KILL_NTH": str(nth), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_at_marker(proc: subprocess.Popen, marker: Path) -> None:
    deadline = time.time() + 600  # (a loaded 2-core machine took minutes to start a run)
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()}"
        assert time.time() < deadline, "the kill point was never reached"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marker.unlink()


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_killed_anywhere_the_same_command_finishes_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    assert main(ARGS + ["--out", str(ref)]) == 0
    run = tmp_path / "run"
    fresh, resume = ARGS + ["--out", str(run)], ARGS + ["--out", str(run), "--resume"]
    marker = tmp_path / "at-kill-point"
    temporaries = []

    # 1. Killed before the first checkpoint (its metrics line is written): no checkpoint yet.
    _kill_at_marker(_launch(fresh, "before-checkpoint", marker), marker)
    assert not (run / "checkpoint.safetensors").exists() and (run / "config.json").exists()
    # 2. The same command again; killed half way through writing its second checkpoint.
    _kill_at_marker(_launch(fresh, "checkpoint-write", marker, nth=2), marker)
    temporaries += [p.name for p in run.iterdir() if p.name.startswith(".checkpoint")]
    assert temporaries, "the killed write should have left its temporary file"
    assert [r["step"] for r in _metrics(run)] == [10, 20]  # the metrics of step 20 are there, its checkpoint not
    # 3. Resumed; killed between the metrics line of step 20 (again) and its checkpoint.
    _kill_at_marker(_launch(resume, "before-checkpoint", marker), marker)
    # 4. Resumed; killed in the middle of the next checkpoint write.
    _kill_at_marker(_launch(resume, "checkpoint-write", marker, nth=2), marker)
    # 5. Resumed, killed at random moments (from start-up to the end of training).
    rng = random.Random(13)
    for _ in range(2):
        proc = _launch(resume, "none", marker)
        time.sleep(rng.uniform(1.0, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # 6. The same command finishes the run.
    assert main(resume) == 0

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got, want = _metrics(run), _metrics(ref)
    assert [r["step"] for r in got] == [10, 20, 30, 40, 50, 60]  # one line per evaluation
    for r, w in zip(got, want):
        assert {k: v for k, v in r.items() if k != "time"} == {k: v for k, v in w.items() if k != "time"}
    ja, jb = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert ja["value"] == jb["value"] and ja["steps"] == jb["steps"] == 60
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temporary files
