"""Train every built-in task with a fixed recipe and write docs/results.md.

    python benchmarks/task_results.py                  # all tasks (~20 min on 2 cores)
    python benchmarks/task_results.py --tasks reber adding
    python benchmarks/task_results.py --scale 4        # 4x the step budgets

Each task runs :func:`lstmkit.train.train` with the recipe below (same seed: same
numbers); the table puts lstmkit's test metric next to the task's published criterion
and its baselines. Budgets are small so that the whole table regenerates on a 2-core
CPU in minutes; a row whose target is not met says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lstmkit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent

#: task -> (task options, config overrides). Step budgets are multiplied by --scale.
RECIPES: dict[str, tuple[dict, dict]] = {
    "reber": ({}, dict(hidden_size=16, batch_size=4, lr=5e-3, steps=10_000, eval_every=64, clip=None)),
    "continual_reber": ({"bptt": 50}, dict(hidden_size=32, batch_size=16, lr=1e-2, steps=1500,
                                           eval_every=250)),
    "adding": ({"length": 100}, dict(hidden_size=64, batch_size=32, lr=2e-3, steps=3000, eval_every=250,
                                     cell="vanilla+fb=3")),
    "temporal_order": ({"variant": "6a"}, dict(hidden_size=32, batch_size=32, lr=3e-3, steps=2000,
                                                eval_every=250, cell="vanilla+fb=3")),
    "copy": ({"length": 20}, dict(hidden_size=128, batch_size=32, lr=2e-3, steps=3000, eval_every=250)),
    "charlm": ({}, dict(hidden_size=256, batch_size=32, lr=3e-3, steps=1500, eval_every=250,
                        schedule="cosine")),
    "chorales": ({}, dict(hidden_size=128, batch_size=16, lr=3e-3, steps=1000, eval_every=100)),
    "sunspots": ({}, dict(hidden_size=32, batch_size=16, lr=3e-3, steps=1000, eval_every=100, patience=4)),
    "co2": ({"difference": True}, dict(hidden_size=32, batch_size=16, lr=3e-3, steps=1000, eval_every=100,
                                       patience=4)),
}


def run(task: str, scale: float, workdir: Path) -> dict:
    options, overrides = RECIPES[task]
    cfg = TrainConfig(task=task, task_options=dict(options), seed=0, threads=torch.get_num_threads(),
                      **overrides)
    cfg.steps = max(1, int(cfg.steps * scale))
    out = workdir / task
    start = time.perf_counter()
    summary = train(cfg, out, progress=True)
    summary["recipe"] = {k: v for k, v in vars(cfg).items() if k in overrides or k == "steps"}
    summary["wall_total_s"] = round(time.perf_counter() - start, 1)
    return summary


def markdown(results: list[dict], scale: float) -> str:
    lines = [
        "# lstmkit on the classic LSTM tasks",
        "",
        f"Regenerate with `python benchmarks/task_results.py{'' if scale == 1 else f' --scale {scale:g}'}` "
        f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, seed 0). "
        "Small budgets, one seed: a first measurement, not a tuned result. Wall times include "
        "whatever else the shared machine ran meanwhile.",
        "",
        "| task | model | steps (sequences) | time | test metric | lstmkit | target | met | baselines |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results:
        t = s["target"]
        goal = "≥" if t["goal"] == "max" else "≤"
        thr = "—" if t["threshold"] is None else f"{goal} {t['threshold']:.4g}"
        base = "; ".join(f"{k} {v:.4g}" for k, v in (s.get("baselines") or {}).items())
        value = "n/a" if s["value"] is None else f"{s['value']:.4g}"
        lines.append(f"| {s['task']} {json.dumps(s['task_options']) if s['task_options'] else ''} | "
                     f"{s['cell']} H={s['recipe'].get('hidden_size')} | {s['steps']:,} ({s['sequences']:,}) | "
                     f"{s['wall_total_s']:.0f} s | {s['metric']} | {value} | {thr} | "
                     f"{'yes' if t['met'] else 'no'} | {base} |")
    lines += ["", "## Published results these compare with", ""]
    for s in results:
        lines.append(f"- **{s['task']}**: {s['target']['published']}")
    lines += ["", "## Recipes", ""]
    for s in results:
        lines.append(f"- **{s['task']}**: `{json.dumps(s['recipe'])}`, stopped: {s['stopped']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step budget")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="lstmkit-results-"))
    try:
        results = [run(task, args.scale, workdir) for task in args.tasks]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(results, args.scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
