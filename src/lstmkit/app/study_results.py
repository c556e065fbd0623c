"""A variant study's statistics and its outputs (:mod:`lstmkit.app.study`): per variant the median,
quartiles, mean and Welch's t-test against the baseline (:func:`summarize`), written as
``results.json``, ``results.md``, ``summary.md`` and ``boxplot.png`` (:func:`write_outputs`)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lstmkit import _atomic
from lstmkit.app.config import TrainConfig, option_of
from lstmkit.app.study_config import TRAIN_KEYS, Run, StudyConfig, setting

__all__ = ["better", "welch", "summarize", "results_table", "summary_markdown", "command_line", "boxplot",
           "write_outputs"]


def better(goal: str) -> Callable[[float | None], float]:
    """Sort key of a metric whose ``goal`` is "max" or "min": smaller is better; a missing
    (diverged) value is worst."""
    def key(v: float | None) -> float:
        if v is None or not math.isfinite(v):
            return math.inf
        return -v if goal == "max" else v
    return key


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value of ``mean(a) - mean(b)``: NaN where undefined
    (fewer than two values, or no variance in either sample with different means); (0, 1) for
    two samples of one and the same constant (no difference)."""
    from scipy import stats
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return (math.nan, math.nan) if statistics.mean(a) != statistics.mean(b) else (0.0, 1.0)
    t, p = stats.ttest_ind(a, b, equal_var=False)
    return float(t), float(p)


def _median_or_none(values: list[Any]) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def summarize(cfg: StudyConfig, results: dict[Run, dict[str, Any]], metric: str, goal: str, split: str,
              target: Any, wall_time: float, baselines: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-variant statistics and per-run rows, as written to ``results.json`` (``baselines``:
    the task's baselines of ``metric``, drawn with the target in the box plot)."""
    rows = [{"variant": r.variant, "lr": r.lr, "lr_index": r.lr_index, "seed": r.seed,
             "diverged": res["diverged"], "select": res.get("select"), "test": res["test"].get(metric),
             "target_step": res.get("target_step"), "wall_time_s": res.get("wall_time_s"),
             "parameters": res.get("parameters")}
            for r, res in sorted(results.items(), key=lambda kv: (cfg.variants.index(kv[0].variant),
                                                                  kv[0].lr_index, kv[0].seed))]
    chosen: dict[str, Run] = {}  # variant -> a run at the chosen rate (its index: draws may coincide)
    for v in cfg.variants:
        finals = [r for r in results if r.variant == v and r.seed > 0]
        tuning = [r for r in results if r.variant == v and r.seed == 0]
        if finals:
            chosen[v] = finals[0]
        elif tuning:  # seeds == 1: the best of the search
            chosen[v] = min(tuning, key=lambda x: (better(goal)(results[x]["select"]), x.lr_index))

    def at_chosen_rate(v: str) -> list[Run]:
        return [r for r in results if r.variant == v and v in chosen and r.lr_index == chosen[v].lr_index]

    def final_values(v: str) -> tuple[list[float], int, int]:
        """The finite test values at the chosen rate in seed order, the diverged runs, and the
        runs that did not diverge but have no finite value."""
        runs = sorted(at_chosen_rate(v), key=lambda r: r.seed)  # (results: in the order runs ended)
        kept = [results[r]["test"].get(metric) for r in runs if not results[r]["diverged"]]
        vals = [x for x in kept if x is not None and math.isfinite(x)]
        return vals, len(runs) - len(kept), len(kept) - len(vals)

    base = cfg.baseline_variant
    base_vals = final_values(base)[0]
    variants = []
    for v in cfg.variants:
        vals, diverged, missing = final_values(v)
        runs = at_chosen_rate(v)
        entry: dict[str, Any] = {"variant": v, "lr": chosen[v].lr if v in chosen else None, "n": len(vals),
                                 "diverged": diverged, "missing": missing,
                                 "parameters": next((results[r].get("parameters") for r in runs
                                                     if results[r].get("parameters")), None),
                                 "values": vals}
        if vals:
            q1, med, q3 = _quartiles(vals)
            entry.update(median=med, q1=q1, q3=q3, mean=statistics.mean(vals),
                         std=statistics.stdev(vals) if len(vals) > 1 else None,
                         met=sum(bool(target.met(x)) for x in vals) if metric == target.metric else None,
                         target_step=_median_or_none([results[r].get("target_step") for r in runs]),
                         time_s=statistics.mean(results[r].get("wall_time_s") or 0.0 for r in runs))
        if v != base and vals and base_vals:
            t, p = welch(vals, base_vals)
            entry.update(t=t, p=p, delta=entry["median"] - statistics.median(base_vals))
        variants.append(entry)
    return {"task": cfg.task, "task_options": cfg.train.get("task_options", {}), "metric": metric, "goal": goal,
            "selection_split": split, "baseline": base, "learning_rates": cfg.learning_rates(),
            "settings": {**asdict(cfg), "lr_range": list(cfg.lr_range)},
            "target": {"metric": target.metric, "threshold": target.threshold if metric == target.metric else None,
                       "published": target.published},
            "baselines": dict(baselines or {}),
            "runs": len(results), "cpu_time_s": round(sum(r.get("wall_time_s") or 0 for r in rows), 1),
            "wall_time_s": round(wall_time, 1), "variants": variants, "rows": rows}


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, spec)


def verdict(entry: dict[str, Any], goal: str) -> str | None:
    """A variant's result against the baseline: ``"worse"`` or ``"better"`` (p < 0.05, by the
    sign of Welch's t: the difference of the means the test is about), ``"same"`` (p ≥ 0.05),
    ``"untested"`` (no p-value: fewer than two values, or no variance), or None for the baseline
    itself and variants without values."""
    if "t" not in entry or not entry["n"]:
        return None
    t, p = entry["t"], entry["p"]
    if p is None or math.isnan(p):
        return "untested"
    if p >= 0.05:
        return "same"
    return "worse" if (t < 0) == (goal == "max") else "better"


def _n(e: dict[str, Any], metric: str) -> str:
    """A variant's run count, with the runs left out and why."""
    return (f"{e['n']}" + (f" (+{e['diverged']} diverged)" if e["diverged"] else "")
            + (f" (+{e['missing']} without a finite {metric})" if e.get("missing") else ""))


def results_table(summary: dict[str, Any]) -> str:
    """The markdown table of per-variant statistics."""
    goal, split = summary["goal"], summary["selection_split"]
    lines = [f"| variant | lr | n | median {summary['metric']} | IQR | mean ± sd | Δ median vs {summary['baseline']} "
             f"| Welch t | p | target met (test) | steps to target ({split}) | parameters |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary["variants"]:
        if not e["n"]:
            lines.append(f"| {e['variant']} | {_fmt(e['lr'], 'g')} | {_n(e, summary['metric'])} "
                         f"| — | — | — | — | — | — | — | — | — |")
            continue
        p = e.get("p")
        sig = {"worse": " (worse)", "better": " (better)", "untested": " (untested)"}.get(
            verdict(e, goal) or "", "")
        n = _n(e, summary["metric"])
        lines.append(
            f"| {e['variant']} | {_fmt(e['lr'], 'g')} | {n} | {_fmt(e['median'])} | {_fmt(e['q1'])}–{_fmt(e['q3'])} "
            f"| {_fmt(e['mean'])} ± {_fmt(e['std'], '.2g')} | {_fmt(e.get('delta'), '+.3g')} "
            f"| {_fmt(e.get('t'), '.2f')} "
            f"| {_fmt(p, '.2g')}{sig} | {_fmt(e['met'])}{'' if e['met'] is None else '/' + str(e['n'])} "
            f"| {_fmt(e['target_step'], 'g')} "
            f"| {_fmt(e['parameters'], ',')} |")
    return "\n".join(lines)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The study's markdown summary: settings, budget, the table and the significant differences."""
    s = summary["settings"]
    train = s["train"]
    goal = "higher" if summary["goal"] == "max" else "lower"
    opts = json.dumps(summary["task_options"]) if summary["task_options"] else "defaults"
    lines = [
        f"# Variant study: {summary['task']} ({opts})", "",
        f"Metric: test `{summary['metric']}` ({goal} is better) of the weights of each run's best "
        f"`{summary['selection_split']}` evaluation of the task's target metric "
        f"(`{summary['target'].get('metric', summary['metric'])}`) within a fixed budget of "
        f"{setting(train, 'steps')} steps × batch {setting(train, 'batch_size')}; "
        f"H = {setting(train, 'hidden_size')}, {setting(train, 'num_layers')} layer(s). "
        f"Learning rate: best of {s['lr_trials']} log-uniform draws from "
        f"[{s['lr_range'][0]:g}, {s['lr_range'][1]:g}] ({', '.join(f'{x:g}' for x in summary['learning_rates'])}; "
        f"the same for every variant), chosen on the `{summary['selection_split']}` split with seed 0; "
        f"then {s['seeds']} seeds at that rate. Welch's t-test against `{summary['baseline']}`. "
        + (f"Target: the task's criterion ({'≥' if summary['goal'] == 'max' else '≤'} "
         f"{_fmt(summary['target']['threshold'])}); steps to target: the median, over the runs that met it, of "
         f"the first evaluation (every {setting(train, 'eval_every')} steps) on the `{summary['selection_split']}` "
         f"split that met it." if summary["target"].get("metric", summary["metric"]) == summary["metric"] else
         f"Target: none on `{summary['metric']}` (the task's criterion is on another metric)."), "",
        f"Budget: {summary['runs']} runs, {summary['cpu_time_s'] / 60:.1f} CPU-minutes of training "
        f"(one thread per run).", "",
        results_table(summary), "",
    ]
    found: dict[str, list[str]] = {"worse": [], "better": [], "same": [], "untested": []}
    for e in summary["variants"]:
        v = verdict(e, summary["goal"]) if e["variant"] != summary["baseline"] else None
        if v is not None:
            found[v].append(e["variant"])
    named = {k: ", ".join(v) or "none" for k, v in found.items()}
    lines.append(f"Significantly worse than {summary['baseline']} (p < 0.05, by the means): {named['worse']}. "
                 f"Significantly better: {named['better']}. No significant difference: {named['same']}."
                 + (f" Not tested (fewer than two values, or no variance): {', '.join(found['untested'])}."
                    if found["untested"] else ""))
    lines.append("")
    lines.append(f"Regenerate: `{command_line(summary['settings'])}`")
    return "\n".join(lines) + "\n"


def command_line(settings: dict[str, Any]) -> str:
    """The ``lstmkit study`` command that reproduces ``settings``."""
    t = settings["train"]
    parts = ["lstmkit study", f"--task {settings['task']}", f"--variants {','.join(settings['variants'])}",
             f"--seeds {settings['seeds']}", f"--lr-trials {settings['lr_trials']}",
             f"--lr-range {settings['lr_range'][0]:g} {settings['lr_range'][1]:g}"]
    if settings["seed"]:
        parts.append(f"--study-seed {settings['seed']}")
    if settings.get("baseline"):
        parts.append(f"--baseline {settings['baseline']}")
    if settings.get("metric"):
        parts.append(f"--metric {settings['metric']}")
    for k, v in sorted(t.get("task_options", {}).items()):
        parts.append(f"-o {k}={json.dumps(v)}")
    options = {f.name: option_of(f) for f in dataclasses.fields(TrainConfig)}
    for k in TRAIN_KEYS[1:]:
        if k in t:
            parts.append(f"--{k.replace('_', '-')} {options[k].none_word if t[k] is None else t[k]}")
    return " ".join(parts)


def boxplot(summary: dict[str, Any]) -> Any:
    """A box plot (with the points) of the test metric per variant; returns the Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in summary["variants"] if e["n"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(entries) + 2), 4.5))
    if entries:
        ax.boxplot([e["values"] for e in entries], tick_labels=[e["variant"] for e in entries], showfliers=False)
        for k, e in enumerate(entries, start=1):
            jitter = [k + 0.08 * ((j % 5) - 2) for j in range(len(e["values"]))]
            color = "tab:red" if verdict(e, summary["goal"]) in ("worse", "better") else "tab:blue"
            ax.scatter(jitter, e["values"], s=14, color=color, alpha=0.8, zorder=3)
        base = next((e for e in entries if e["variant"] == summary["baseline"]), None)
        if base:
            ax.axhline(base["median"], color="tab:blue", lw=0.8, ls="-.", label=f"{summary['baseline']} median")
    # the task's target and trivial baselines, and a y axis that spans them (no zoom into noise)
    from lstmkit.app.plots import reference_lines

    reference_lines(ax, {**summary["target"], "goal": summary["goal"]}, summary.get("baselines") or {},
                    [v for e in entries for v in e["values"]])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel("variant")
    ax.set_ylabel(f"test {summary['metric']}")
    ax.set_title(f"{summary['task']}: test {summary['metric']} per variant (red: p < 0.05 vs {summary['baseline']})")
    fig.tight_layout()
    return fig


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    """``results.json``, ``results.md``, ``boxplot.png`` and ``summary.md`` in ``out`` (each atomically)."""
    import matplotlib.pyplot as plt

    _atomic.write_json(out / "results.json", summary, what="study")
    _atomic.write_text(out / "results.md", results_table(summary) + "\n", what="study")
    _atomic.write_text(out / "summary.md", summary_markdown(summary), what="study")
    fig = boxplot(summary)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic.write_bytes(out / "boxplot.png", buf.getvalue(), what="study")
