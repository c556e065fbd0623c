"""The cell that holds what a task must remember (issue 23, item 6): ``memory_units`` finds a
cell wired by hand to hold the relevant symbol of task 2c, ``plot cells`` draws it thick
and labelled, and a task without a memory signal gets no highlight."""

from __future__ import annotations

import pytest
import torch

import lstmkit
from lstmkit.app import plots
from lstmkit.app.tasks.registry import get_task

H = 5
HOLDER = 3  # the cell wired to hold x (+) or y (-)


def wired_layer(task) -> lstmkit.LSTM:
    """An LSTM whose cell ``HOLDER`` writes +1 at x, -1 at y and keeps it (f ≈ 1), the
    other cells small random noise; weights set through the gate views."""
    torch.manual_seed(0)
    layer = lstmkit.LSTM(task.input_size, H)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(0.1)
    gates = layer.gates(layer=0)
    x_col, y_col = task.input_size - 2, task.input_size - 1
    for name, row in (("input", {x_col: 20.0, y_col: 20.0}), ("candidate", {x_col: 3.0, y_col: -3.0})):
        W = gates[name].W.clone()
        W[HOLDER] = 0.0
        for col, value in row.items():
            W[HOLDER, col] = value
        gates[name].W = W
    for name, bias in (("input", -10.0), ("forget", 10.0), ("output", 10.0), ("candidate", 0.0)):
        b = gates[name].b.clone()
        b[HOLDER] = bias
        gates[name].b = b
    W = gates["forget"].W.clone()
    W[HOLDER] = 0.0
    gates["forget"].W = W
    return layer


def test_memory_units_finds_the_wired_cell():
    task = get_task("long_lag", variant="2c", p=6, q=15, eval_size=40)
    layer = wired_layer(task)
    (batch,) = list(task.eval_batches("test", 64))
    ranked, what = plots.memory_units(layer, task, batch.x, batch.lengths)
    assert [cell for cell, _ in ranked][0] == HOLDER and ranked[0][1] > 0.99
    assert sorted(cell for cell, _ in ranked) == list(range(H)) and "relevant symbol" in what
    assert all(abs(r) < 0.9 for cell, r in ranked[1:])
    highlight = plots.memory_highlight(layer, task, sequences=32)
    assert highlight == [(HOLDER, highlight[0][1])] and highlight[0][1].startswith(f"cell {HOLDER}: r = +")


def test_plot_cells_draws_the_highlighted_cell():
    task = get_task("long_lag", variant="2c", p=6, q=15, eval_size=8)
    layer = wired_layer(task)
    x, _ = plots.sample_input(task)
    label = f"cell {HOLDER}: held"
    fig = plots.plot_cells(layer, x, max_units=2, marks=plots.input_marks(task, x), highlight=[(HOLDER, label)])
    ax = fig.axes[0]
    assert "the highlighted one in colour" in ax.get_title() and "3 of 5 units" in ax.get_title()
    thick = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(thick) == 1 and thick[0].get_linewidth() > 2
    held = thick[0].get_ydata()
    assert abs(float(held[-1])) > 0.9 and abs(float(held[-1]) - float(held[2])) < 0.05  # kept across the lag
    with pytest.raises(ValueError, match="highlight: unit 7"):
        plots.plot_cells(layer, x, highlight=[(7, "nope")])


def test_no_memory_signal_no_highlight():
    task = get_task("adding", length=22, eval_size=8)
    layer = lstmkit.LSTM(2, 4)
    assert plots.memory_highlight(layer, task) == []
    assert plots.memory_units(layer, task, torch.zeros(22, 2, 2)) == ([], "")
