"""The dependency rules of docs/architecture.md, read from the source: no import circle among the
harness's modules, and the CLI reaches implementations only through the registry."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Modules of `known` that `path` imports at module level or inside functions (any import counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from harness import shapes` imports the module harness.shapes, not the package's own code
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in subs if n in known] or [node.module]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in (ROOT / "harness").rglob("*.py")}
    known = set(files)
    return {name: _imports(path, known) - {name} for name, path in files.items()}


def _top_level_graph() -> dict[str, set[str]]:
    """Only the imports that run when a module is imported (not those inside functions)."""
    files = {_module(p): p for p in (ROOT / "harness").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {n for n in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if n in files}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
        graph[name] = deps - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_circle_among_the_harness_modules_at_import_time():
    assert _cycle(_top_level_graph()) == []


def test_the_suite_package_has_no_import_circle_even_inside_functions():
    graph = {
        k: {d for d in v if d.startswith("harness.suite")} for k, v in _graph().items() if k.startswith("harness.suite")
    }
    assert _cycle(graph) == []


def test_the_cli_reaches_implementations_only_through_the_registry():
    tree = ast.parse((ROOT / "harness" / "cli.py").read_text())
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in getattr(n, "names", [])
    }
    assert not {m for m in imported if m and m.split(".")[0] == "implementations"}


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
