"""The package's shape, checked: no import cycle, dependencies one way, a stated purpose.

The import graph is read from the source (every ``import`` statement, at module level or
inside a function), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_checkpointless"
NAME = "nemo_checkpointless"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations, not dependencies)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its source, lazy imports
    inside functions included; ``if TYPE_CHECKING:`` imports are annotations only)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _typing_only(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle, or [] (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # a package's __init__ re-exporting its own modules is not a dependency of theirs
    graph = {m: {t for t in ts if not (t == m.rsplit(".", 1)[0])} for m, ts in graph.items()}
    assert _cycle(graph) == []


def test_recovery_and_train_do_not_import_each_other():
    """The recovery core drives any front-end through ``steps.StepDriver``; the lean loop
    knows nothing of recovery. Both depend on the contract (``steps``, ``state``)."""
    graph = import_graph()
    for module, targets in graph.items():
        sub = _subpackage(module)
        for target in targets:
            assert not (sub == "recovery" and _subpackage(target) == "train"), (module, target)
            assert not (sub == "train" and _subpackage(target) == "recovery"), (module, target)


def test_the_core_does_not_import_front_ends_or_the_lab():
    """Integrations depend on the core, never the reverse; the lab (baselines, calibration)
    is plugged in by the composition root only."""
    graph = import_graph()
    front_ends = {"nemo", "bridge"}
    for module, targets in graph.items():
        sub = _subpackage(module)
        for target in targets:
            tsub = _subpackage(target)
            if tsub in front_ends:
                assert sub in front_ends, (module, target)
            if tsub == "lab":
                assert sub in ("lab", "runtime"), (module, target)


def test_every_module_states_its_responsibility():
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip().splitlines()[0].strip(), f"{name} has no docstring"
