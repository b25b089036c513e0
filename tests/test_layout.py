"""The package's layout: no import circle anywhere in moe/ (function-level imports included),
and every import points down the layers that docs/architecture.md draws."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moe"

# Bottom up; a module may import its own layer or a lower one, never a higher one. Within a
# layer, the packages' own graph must be acyclic too (checked below).
LAYERS = (
    ("moe", "moe.config", "moe.platform", "moe.progress", "moe.storage"),
    ("moe.parallel",),
    ("moe.model",),
    ("moe.checkpoint",),
    ("moe.data",),
    ("moe.convert",),
    ("moe.quant",),
    ("moe.training",),
    ("moe.infer",),
    ("moe.tune",),
    ("moe.serve",),
    ("moe.plan", "moe.study", "moe.bench"),
    ("moe.cli", "moe.__main__"),
)
# Where a function-level import of our own code is allowed: the CLI assembly and each
# subpackage's commands.py import a command's code when it runs, so `moe --help` does not
# load JAX; moe/infer/__init__.py loads its names on first use for the same reason.
LAZY_OK = ("moe.cli", "moe.infer")


def lazy_ok(module: str) -> bool:
    return module in LAZY_OK or module.endswith(".commands")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module an imported dotted name lives in (a name inside a module maps to it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(root: Path) -> dict[str, list[tuple[str, int, bool]]]:
    """{module: [(imported module, line, at function level)]} for every import of the
    package's own modules."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules, package = set(files), root.name
    found: dict[str, list] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = found.setdefault(mod, [])
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] != package:
                    continue
                target = _resolve(name, modules)
                if target and target != mod:
                    edges.append((target, node.lineno, node.col_offset > 0))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def unit_of(module: str) -> str:
    """The layer unit of a module: its top-level subpackage, or the top-level module itself."""
    return ".".join(module.split(".")[:2])


def layer_violations(found: dict) -> list[str]:
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    bad = []
    for mod, edges in found.items():
        for target, line, _ in edges:
            src, dst = unit_of(mod), unit_of(target)
            if src not in rank or dst not in rank:
                bad.append(f"{mod}: {src if src not in rank else dst} is in no layer of LAYERS")
            elif rank[dst] > rank[src]:
                bad.append(f"{mod}:{line} imports {target}, a higher layer")
    return bad


def module_graph(found: dict) -> dict[str, set[str]]:
    return {mod: {t for t, _, _ in edges} for mod, edges in found.items()}


def unit_graph(found: dict) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod, edges in found.items():
        graph.setdefault(unit_of(mod), set()).update(unit_of(t) for t, _, _ in edges if unit_of(t) != unit_of(mod))
    return graph


@pytest.fixture(scope="module")
def found():
    return imports_of(ROOT)


def test_no_import_cycle_between_modules(found):
    assert cycles(module_graph(found)) == []


def test_no_import_cycle_between_subpackages(found):
    assert cycles(unit_graph(found)) == []


def test_imports_point_down_the_layers(found):
    assert layer_violations(found) == []


def test_function_level_imports_of_our_code_only_where_startup_time_needs_them(found):
    lazy = [
        f"{mod}:{line} imports {target}"
        for mod, edges in found.items()
        for target, line, nested in edges
        if nested and not lazy_ok(mod)
    ]
    assert lazy == []


def test_top_level_holds_only_the_shared_modules():
    """Everything else lives in a capability's subpackage."""
    shared = {"__init__", "__main__", "cli", "config", "platform", "progress", "storage"}
    assert {p.stem for p in ROOT.glob("*.py")} <= shared


def test_a_planted_cycle_is_found(tmp_path):
    pkg = tmp_path / "moe"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from moe.b import y\n")
    (pkg / "b.py").write_text("def f():\n    from moe.a.x import z\n")  # function-level: still a circle
    planted = imports_of(pkg)
    assert cycles(module_graph(planted)) == [["moe.a.x", "moe.b"]]
    assert cycles(unit_graph(planted)) == [["moe.a", "moe.b"]]
