"""The library's import graph has no cycle: launching sits above the stages, the stages above the rank helpers."""

from __future__ import annotations

import ast
from pathlib import Path


def _import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the mgdm_core modules it imports anywhere in its source (function-local imports too)."""
    modules = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mgdm_core"):
                for alias in node.names:  # `from mgdm_core.stages import evaluate` names a module
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("mgdm_core"))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_mgdm_core_has_no_import_cycle(repo_root):
    graph = _import_graph(repo_root / "mgdm_core")
    assert {"mgdm_core.launch", "mgdm_core.distributed", "mgdm_core.stages"} <= graph.keys()
    assert _cycles(graph) == []


def test_launching_sits_above_the_stages_and_the_rank_helpers_below(repo_root):
    graph = _import_graph(repo_root / "mgdm_core")
    assert {"mgdm_core.stages", "mgdm_core.distributed"} <= graph["mgdm_core.launch"]
    stage_modules = [m for m in graph if m.startswith("mgdm_core.stages")]
    assert not any("mgdm_core.launch" in graph[m] for m in stage_modules)
    assert not any(m.startswith("mgdm_core.stages") for m in graph["mgdm_core.distributed"])
