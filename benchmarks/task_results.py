"""Train every built-in task with its own recipe, several seeds per task and model, and write
docs/results.md (and docs/results.json).

    python benchmarks/task_results.py --quick        # seed 0 of the fast rows, LSTM only
    python benchmarks/task_results.py                # every row x model x 3 seeds (hours)
    python benchmarks/task_results.py --rows adding100 copy100 --models lstm rnn --seeds 0 1 2
    python benchmarks/task_results.py --markdown-only   # rebuild the page from recorded runs

A run is ``lstmkit.train.train`` of ``TrainConfig.for_task(task, options, seed=…)``: the
task's recipe (``Task.recipe``), nothing else, so each LSTM row is what
``lstmkit train TASK -o …`` does with no other options. The comparison models change only
the model: ``nfg`` is the same recipe with the cell ``nfg`` (no forget gate, so no forget-
gate initialisation either), ``rnn`` the plain tanh RNN (``--model rnn``). Every run stops
when its *validation* split meets the task's criterion (or at the recipe's step budget);
"solved" is the single test-split evaluation of the selected weights meeting it.

Each finished run is appended to ``benchmarks/results/task_runs.jsonl`` with its full
configuration; a later invocation skips runs recorded with the same configuration (so the
table is built in pieces, and an interrupted invocation goes on where it stopped), and the
page is built from the recorded runs whose configuration is today's recipe. Budgets and
times: see the page (``--quick`` takes about 5 minutes on 2 cores; all rows about 4 hours
on one core).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lstmkit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "benchmarks" / "results" / "task_runs.jsonl"
LONG_LAG = ("nfg", "rnn")

#: row -> (task, task options, models, published number of training sequences (text)).
ROWS: dict[str, tuple[str, dict[str, Any], tuple[str, ...], str]] = {
    "reber": ("reber", {}, ("lstm", "rnn"), "LSTM 8,440 (3,800-24,100), 100 % of trials; Elman 0 %"),
    "continual_reber": ("continual_reber", {}, ("lstm", "nfg"),
                        "forget gate: 18 % perfect nets (62 % with lr decay); no forget gate: fails"),
    "adding100": ("adding", {"length": 100}, ("lstm", *LONG_LAG), "74,000 (1 of 2,560 wrong)"),
    "adding500": ("adding", {"length": 500}, ("lstm", *LONG_LAG), "209,000 (0 of 2,560 wrong)"),
    "adding_le100": ("adding", {"length": 100, "form": "le"}, ("lstm", *LONG_LAG),
                     "curves only; LSTM beats the 0.167 baseline at T = 100-750"),
    "temporal_order_6a": ("temporal_order", {"variant": "6a"}, ("lstm", *LONG_LAG), "31,390 (1 of 2,560 wrong)"),
    "temporal_order_6b": ("temporal_order", {"variant": "6b"}, ("lstm", *LONG_LAG), "571,100 (2 of 2,560 wrong)"),
    "copy100": ("copy", {"length": 100}, ("lstm", *LONG_LAG), "LSTM stalls at the baseline (curves only)"),
    "charlm": ("charlm", {}, ("lstm",), "no published number on this corpus; threshold xz -9e"),
    "chorales": ("chorales", {}, ("lstm",), "JSB Chorales LSTM ≈ 8.4-8.7 nats/frame (other data)"),
    "sunspots": ("sunspots", {}, ("lstm",), "no published LSTM number; AR baseline"),
    "co2": ("co2", {"difference": True}, ("lstm",), "no published LSTM number; AR baseline"),
}
#: Rows of --quick (seed 0, LSTM): the fast ones.
QUICK = ("reber", "continual_reber", "adding100", "temporal_order_6a", "temporal_order_6b", "sunspots")


def config_for(row: str, model: str, seed: int) -> TrainConfig:
    """The configuration of one run: the task's recipe, with the comparison model swapped in."""
    task, options, _, _ = ROWS[row]
    cfg = TrainConfig.for_task(task, options, seed=seed)
    if model == "nfg":
        cfg.cell = "nfg"
    elif model == "rnn":
        cfg.model, cfg.cell = "rnn", "vanilla"
    elif model != "lstm":
        raise ValueError(f"model: expected lstm, nfg or rnn, got {model!r}")
    return cfg


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_records() -> list[dict[str, Any]]:
    """Every recorded run."""
    if not RECORDS.is_file():
        return []
    return [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]


def run_one(row: str, model: str, seed: int, workdir: Path, progress: bool = True) -> dict[str, Any]:
    """Train one run and return its record."""
    cfg = config_for(row, model, seed)
    out = workdir / f"{row}-{model}-s{seed}"
    start = time.perf_counter()
    s = train(cfg, out, progress=progress)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {
        "row": row, "model": model, "seed": seed, "config": dataclasses.asdict(cfg),
        "metric": s["metric"], "goal": s["target"]["goal"], "threshold": s["target"]["threshold"],
        "published": s["target"]["published"], "baselines": s["baselines"],
        "test": s["test"]["value"], "solved": s["test"]["met"], "valid": s["value"],
        "valid_met": s["target"]["met"], "selected_step": s["selected_step"],
        "sequences_to_target": s["target"]["sequences_to_target"], "steps": s["steps"],
        "sequences": s["sequences"], "stopped": s["stopped"], "wall_s": round(wall, 1),
        "threads": torch.get_num_threads(), "machine": _machine(), "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }


def _current(records: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The latest record of each (row, model, seed) whose configuration is today's recipe."""
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in records:
        if r["row"] in ROWS and r["config"] == dataclasses.asdict(config_for(r["row"], r["model"], r["seed"])):
            out[(r["row"], r["model"], r["seed"])] = r
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _recipe_text(cfg: dict[str, Any]) -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    keep = {k: v for k, v in cfg.items()
            if k not in ("task", "task_options", "seed") and defaults.get(k, object()) != v}
    return ", ".join(f"{k}={v}" for k, v in keep.items()) or "defaults"


def markdown(records: list[dict[str, Any]]) -> str:
    """docs/results.md from the recorded runs of today's recipes."""
    runs = _current(records)
    lines = [
        "# lstmkit on the classic LSTM tasks",
        "",
        "Regenerate with `python benchmarks/task_results.py` (all rows, 3 seeds; it records each "
        "run in `benchmarks/results/task_runs.jsonl` and skips recorded ones) or `--quick`. Every "
        "LSTM row is `lstmkit train TASK` with only the task's own options (`-o …`): the task's "
        "recipe. The `nfg` and `rnn` rows change only the model (no forget gate; the plain tanh "
        "RNN) and keep the recipe's budget. Training stops when the **validation** split meets "
        "the criterion; **solved** means the single test-split evaluation of the selected weights "
        "meets it. *Sequences to criterion*: training sequences at the first validation "
        "evaluation that met it, over the seeds that met it. Wall time: per run, on the "
        "machine and threads listed.",
        "",
        "| task | model | solved (test) | sequences to criterion, median (range) | test metric per seed | "
        "target | wall time per run | published (sequences) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    details: list[str] = []
    for row, (task, options, models, published) in ROWS.items():
        for model in models:
            rs = sorted((r for (rw, m, _), r in runs.items() if rw == row and m == model), key=lambda r: r["seed"])
            if not rs:
                continue
            goal = "≥" if rs[0]["goal"] == "max" else "≤"
            seqs = [r["sequences_to_target"] for r in rs if r["sequences_to_target"] is not None]
            seq_text = "—" if not seqs else (f"{statistics.median(seqs):,.0f} "
                                             f"({min(seqs):,}-{max(seqs):,})" if len(seqs) > 1 else f"{seqs[0]:,}")
            walls = [r["wall_s"] for r in rs]
            label = f"{task} {json.dumps(options)}" if options else task
            lines.append(
                f"| {label} | {model} | {sum(r['solved'] for r in rs)}/{len(rs)} | {seq_text} | "
                f"{rs[0]['metric']} {', '.join(_fmt(r['test']) for r in rs)} | {goal} {_fmt(rs[0]['threshold'])} | "
                f"{statistics.median(walls):.0f} s (max {max(walls):.0f} s) | {published if model == 'lstm' else ''} |")
            if model == "lstm":
                r0 = rs[0]
                base = "; ".join(f"{k} {_fmt(v)}" for k, v in (r0["baselines"] or {}).items())
                details.append(f"- **{label}**: `{_recipe_text(r0['config'])}`. Baselines: {base or 'none'}. "
                               f"{r0['published']}")
    machines = sorted({f"{r['machine']}, {r['threads']} thread(s), torch {r['torch']}, {r['date']}"
                       for r in runs.values()})
    lines += ["", "Measured on: " + "; ".join(machines) if machines else "", "",
              "## Recipes, baselines and published results", "", *details]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), help="rows to run (default: all, or the quick ones)")
    ap.add_argument("--models", nargs="+", choices=["lstm", "nfg", "rnn"], help="default: each row's models")
    ap.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (0 with --quick)")
    ap.add_argument("--quick", action="store_true", help="seed 0 of the fast rows, LSTM only")
    ap.add_argument("--markdown-only", action="store_true", help="only rebuild the page from recorded runs")
    ap.add_argument("--threads", type=int, help="torch threads for every run (default: torch's choice)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args()
    rows = args.rows or (list(QUICK) if args.quick else list(ROWS))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.markdown_only:
        done = _current(read_records())
        workdir = Path(tempfile.mkdtemp(prefix="lstmkit-results-"))
        RECORDS.parent.mkdir(parents=True, exist_ok=True)
        try:
            for row in rows:
                models = args.models or (["lstm"] if args.quick else list(ROWS[row][2]))
                for model in (m for m in models if m in ROWS[row][2]):
                    for seed in seeds:
                        if (row, model, seed) in done:
                            continue
                        record = run_one(row, model, seed, workdir, progress=not args.quiet)
                        with open(RECORDS, "a") as fh:
                            fh.write(json.dumps(record) + "\n")
                        print(f"{row} {model} seed {seed}: solved={record['solved']} "
                              f"{record['metric']}={_fmt(record['test'])} in {record['wall_s']} s", flush=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    records = read_records()
    text = markdown(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(list(_current(records).values()), indent=1))
    print(text)


if __name__ == "__main__":
    main()
