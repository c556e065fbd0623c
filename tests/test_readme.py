"""The README's Python blocks run as written; its shell commands train what they say and
point at the directories they write."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

from lstmkit.app.cli import train_plan

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python blocks"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write files, as a user's would, in the current directory
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


# ----------------------------------------------------------------------------- shell commands

RESULTS = json.loads((README.parent / "docs" / "results.json").read_text(encoding="utf-8"))


def _lstmkit_lines() -> list[tuple[list[str], str]]:
    """(argv after ``lstmkit``, comment) of every ``.venv/bin/lstmkit`` line of the README's bash blocks."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.splitlines():
            command, _, comment = line.partition("#")
            words = shlex.split(command)
            if words[:1] == [".venv/bin/lstmkit"]:
                lines.append((words[1:], comment.strip()))
    return lines


TRAIN = [(argv[1:], comment) for argv, comment in _lstmkit_lines() if argv[:1] == ["train"] and "--help" not in argv]


def test_readme_train_commands_solve_what_they_say():
    """A train line whose comment says it solves its task is a configuration that
    docs/results.json (benchmarks/task_results.py) recorded as solved on every seed; every
    other train line says in its comment what it shows."""
    assert len(TRAIN) >= 5
    for argv, comment in TRAIN:
        cfg, _ = train_plan(argv)
        assert comment, f"README: `lstmkit train {' '.join(argv)}` says nothing of what it shows"
        if comment.startswith("solves"):
            runs = [r for r in RESULTS if r["config"] == dataclasses.asdict(dataclasses.replace(cfg, seed=r["seed"]))]
            assert len(runs) >= 3 and all(r["solved"] for r in runs), \
                f"README: `lstmkit train {' '.join(argv)}` claims to solve its task; docs/results.json: " \
                f"{[(r['seed'], r['solved']) for r in runs]}"


def test_readme_run_directories_are_those_its_train_commands_write():
    """Every ``runs/…`` path given to eval, sample, plot or report is (or matches, for a
    glob) a run directory that one of the README's train lines writes."""
    written = {str(train_plan(argv)[1]) for argv, _ in TRAIN}
    used = [word for argv, _ in _lstmkit_lines() if argv[:1] != ["train"] for word in argv
            if word.startswith("runs/")]
    assert used
    for path in used:
        assert any(fnmatch.fnmatch(w, path) for w in written), \
            f"README: {path} is not written by any of its train commands ({sorted(written)})"


DOCS = README.parent / "docs"


@pytest.mark.parametrize("path,pattern,value", [
    ("README.md", r"sequences of at least (\d+) steps", "lstmkit.kernels.torch_native.ONEDNN_MIN_STEPS"),
    ("README.md", r"Up to (\d+) signatures are\s+kept", "lstmkit.kernels.fused.KEPT_SIGNATURES"),
    ("docs/gpu.md", r"exceed (\d+) MiB run eagerly", "lstmkit.kernels.cuda_graphs.MAX_GRAPH_BYTES"),
    ("docs/gpu.md", r"at most (\d+)\s+graphs are kept", "lstmkit.kernels.cuda_graphs.MAX_GRAPHS"),
    ("docs/gpu.md", r"training calls above (\d+) MiB run", "lstmkit.kernels.cuda_graphs.MAX_GRAPH_BYTES"),
])
def test_docs_state_the_constants_the_code_uses(path, pattern, value):
    """Where the docs give a number the code holds as a constant, the two agree."""
    import importlib

    module, _, name = value.rpartition(".")
    constant = getattr(importlib.import_module(module), name)
    if name.endswith("_BYTES"):
        constant //= 2**20  # the docs say MiB
    found = re.findall(pattern, (README.parent / path).read_text(encoding="utf-8"))
    assert found, f"{path} no longer says {pattern!r}: update this test with the docs"
    assert {int(n) for n in found} == {constant}, (path, pattern, found, constant)


@pytest.mark.parametrize("study", ["chorales", "continual_reber"])
def test_study_doc_tables_are_the_studies_results(study):
    """docs/study.md says its tables are the studies' own ``results.md``: every row of
    ``docs/study/STUDY-results.md`` stands in docs/study.md as written (three "steps to target"
    cells of the continual Reber table had been from an earlier summary)."""
    docs = README.parent / "docs"
    rows = [line for line in (docs / "study" / f"{study}-results.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| ")]
    text = (docs / "study.md").read_text(encoding="utf-8").splitlines()
    assert len(rows) > 2 and [r for r in rows if r not in text] == []
