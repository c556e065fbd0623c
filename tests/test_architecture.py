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
                if "(buf" in code:  # serialised into memory, then written through _atomic
                    continue
                offences.append(f"{_name(path)}:{n}: {line.strip()}")
    assert not offences, offences


def test_no_module_is_several():
    for path in MODULES:
        assert len(path.read_text().splitlines()) < 800, f"{_name(path)} has grown into several modules"


# ---------------------------------------------------------------------------- layers

#: The library's layers, lowest first; a module may import only from its own layer or
#: below. The experiment application (lstmkit.app) sits on top; nothing below imports it.
LAYERS: list[tuple[str, ...]] = [
    ("lstmkit._validate", "lstmkit._suggest", "lstmkit._atomic", "lstmkit._cache", "lstmkit._optional", "lstmkit.layout",
     "lstmkit._transforms"),
    ("lstmkit.variants",),
    ("lstmkit.spec",),
    ("lstmkit.cell",),
    ("lstmkit.kernels",),
    ("lstmkit.loop", "lstmkit.checks", "lstmkit._param_writes"),
    ("lstmkit.gates", "lstmkit._prepared", "lstmkit._initial"),
    ("lstmkit.nn",),
    ("lstmkit.inspect", "lstmkit.tracing", "lstmkit.freeze"),
    ("lstmkit.convert",),
    ("lstmkit",),  # the package's re-exports
    ("lstmkit.app", "lstmkit.__main__"),
]


def _layer_of(module: str) -> int:
    best, found = -1, -1
    for k, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), k
    assert found >= 0, f"{module} belongs to no layer of LAYERS: add it"
    return found


def _import_graph() -> dict[str, set[str]]:
    """module -> the lstmkit modules it imports, anywhere in its file (a lazy import inside a
    function counts as much as one at the top: it is a dependency all the same)."""
    names = {_name(p) for p in MODULES}

    def resolve(name: str) -> str:
        while name not in names and "." in name:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for path in MODULES:
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lstmkit"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in names else resolve(node.module))
            elif isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names if a.name.startswith("lstmkit"))
        deps.discard(_name(path))
        graph[_name(path)] = deps
    return graph


def test_imports_point_down_the_layers():
    offences = []
    for module, deps in _import_graph().items():
        for dep in deps:
            if _layer_of(dep) > _layer_of(module):
                offences.append(f"{module} (layer {_layer_of(module)}) imports {dep} (layer {_layer_of(dep)})")
    assert not offences, offences


def test_no_import_circles():
    graph = _import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                circles.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)
    assert not circles, circles


def test_the_layer_test_sees_lazy_imports():
    """An import inside a function is in the graph like one at the top: the layer and circle
    checks cannot be evaded by importing lazily."""
    graph = _import_graph()
    lazy = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("lstmkit"):
                        lazy.append((_name(path), inner.module))
    assert len(lazy) > 10, lazy  # the code base does import lazily (e.g. optional frameworks' users)
    for module, target in lazy:
        assert any(d == target or d.startswith(target + ".") or target.startswith(d) for d in graph[module]), \
            (module, target)
