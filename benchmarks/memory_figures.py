"""The figures of docs/results.md's "Seeing the memory": one run of the 1997 long-lag task 2c and
one of the spike-delay timing task, trained and drawn with the command line as a user would.

    python benchmarks/memory_figures.py      # writes docs/figures/{long_lag_2c,spike_delays}_cells.png
    python benchmarks/memory_figures.py --out DIR   # or into DIR

Each run is ``lstmkit train TASK`` with the task's recipe (seconds on one thread), then
``lstmkit plot cells RUN``: every cell's ``c_t`` and ``h_t`` on the first test sequence, the
inputs that carry what must be remembered marked, and the cell whose state follows the task's
memory signal best (over 64 test sequences) drawn in colour.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
#: figure name -> (train arguments, plot arguments)
RUNS = {
    "long_lag_2c_cells": (["long_lag", "-o", "variant=2c", "-o", "q=100", "-o", "p=100", "--seed", "1"], []),
    "spike_delays_cells": (["spike_delays", "-o", "interval=10", "-o", "jitter=1", "--seed", "0"],
                           ["--max-steps", "60"]),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=FIGURES, help="folder of the figures (default docs/figures)")
    out = ap.parse_args(argv).out  # (an argument it does not know is refused before anything is trained)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "lstmkit"]
    with tempfile.TemporaryDirectory(prefix="lstmkit-figures-") as tmp:
        for name, (train, plot) in RUNS.items():
            run = Path(tmp) / name
            subprocess.run([*cli, "train", *train, "--out", str(run), "--quiet", "--threads", "1"], check=True)
            subprocess.run([*cli, "plot", "cells", str(run), *plot, "-o", str(out / f"{name}.png"),
                            "--overwrite"], check=True)


if __name__ == "__main__":
    main()
