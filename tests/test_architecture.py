"""The layering the design promises, checked on the source: library modules never import
the command line or each other's private names, every user file is written through
``lstmkit._atomic``, and no module grows into several."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lstmkit

SRC = Path(lstmkit.__file__).parent
MODULES = sorted(p for p in SRC.rglob("*.py") if "csrc" not in p.parts)


def _name(path: Path) -> str:
    return ".".join(("lstmkit", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def test_nothing_below_the_command_line_imports_it():
    for path in MODULES:
        if _name(path) in ("lstmkit.app.cli", "lstmkit.__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "lstmkit.app.cli", f"{_name(path)} imports the command line"
            elif isinstance(node, ast.Import):
                assert all(a.name != "lstmkit.app.cli" for a in node.names), f"{_name(path)} imports the command line"


def test_no_module_uses_another_modules_private_names():
    offences = []
    for path in MODULES:
        tree = ast.parse(path.read_text())
        modules = set()  # names bound to lstmkit modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lstmkit"):
                for a in node.names:
                    if a.name.startswith("_") and not (SRC / Path(*node.module.split(".")[1:]) / f"{a.name}.py").exists():
                        offences.append(f"{_name(path)}: from {node.module} import {a.name}")
                    else:
                        modules.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                modules.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("lstmkit"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                target = SRC / f"{node.attr}.py"
                if not target.exists():
                    offences.append(f"{_name(path)}: {node.value.id}.{node.attr}")
    assert not offences, offences


WRITES = re.compile(r"os\.replace\(|\.write_bytes\(|\.write_text\(|save_file\(|savez|\.savefig\(\s*[^b]|"
                    r"open\([^)]*[\"'][wax]b?[\"']")


def test_every_file_is_written_through_atomic():
    offences = []
    for path in MODULES:
        if _name(path) == "lstmkit._atomic":  # the one place that opens, writes and renames
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if WRITES.search(code) and not code.strip().startswith(("\"", "'", "*", ":")) \
                    and not re.search(r"_atomic\.write_(bytes|text|json)\(", code):
                if _name(path) == "lstmkit.app.runs" and 'open(f, "a")' in code:  # one metrics line per evaluation
                    continue
                if "(buf" in code:  # serialised into memory, then written through _atomic
                    continue
                offences.append(f"{_name(path)}:{n}: {line.strip()}")
    assert not offences, offences


def test_no_module_is_several():
    for path in MODULES:
        assert len(path.read_text().splitlines()) < 800, f"{_name(path)} has grown into several modules"
