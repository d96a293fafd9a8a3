"""The nevers of the map in STYLE.md: layers import only downwards, and nothing circles.

Read from the source (every import, also those inside functions), plus two fresh
interpreters: one that imports every module under agent/ and must not have torch,
one that imports the coordinator client and must not have the daemon or execution.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "commands": {"daemon", "execution", "coordinator", "reference", "node", "core"},
    "daemon": {"execution", "coordinator", "node", "core"},
    "execution": {"core"},
    "coordinator": {"core"},
    "reference": {"core"},
    "node": {"core"},
    "core": set(),
}
# The registry is a table of strings (no runtime, no torch): the daemon advertises its
# names and the executor resolves them.
# runtimes.fetch: the agent prefetches a job's inputs outside its sandbox (no torch there).
OUTSIDE_ALLOWED = {"daemon": {"runtimes.registry"},
                   "execution": {"runtimes.registry", "runtimes.fetch"}}
# `python -m agent.coordinator.reference` keeps working (DECISIONS.md): a thin alias.
EXCEPTIONS = {("agent.coordinator.reference", "agent.reference.coordinator")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, known: Mapping[str, Path]) -> set[str]:
    """Every project module ``path`` imports (``from a import b`` names a.b if a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if n in known else node.module for n in names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in ("agent", "runtimes"))
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    if module in ("agent.cli", "agent.__main__") or parts[:2] == ["agent", "commands"]:
        return "commands"
    if len(parts) >= 2 and parts[1] in ALLOWED:
        return parts[1]
    return "core"


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def project_graph() -> dict[str, set[str]]:
    known = {**modules("agent"), **modules("runtimes")}
    return {name: imports_of(path, known) & set(known) - {name} for name, path in known.items()}


def edges(graph: Mapping[str, set[str]], prefix: str) -> Iterator[tuple[str, str]]:
    for source, targets in graph.items():
        if source.startswith(prefix):
            for target in sorted(targets):
                yield source, target


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_anywhere() -> None:
    assert cycles(project_graph()) == []


def test_every_agent_import_points_down_a_layer() -> None:
    wrong = []
    for source, target in edges(project_graph(), "agent"):
        here = layer(source)
        if target.startswith("runtimes"):
            ok = target in OUTSIDE_ALLOWED.get(here, set()) or here == "commands"
        else:
            there = layer(target)
            ok = there == here or there in ALLOWED[here]
        if not ok and (source, target) not in EXCEPTIONS:
            wrong.append(f"{source} ({here}) imports {target}")
    assert wrong == []


def test_runtimes_never_import_agent() -> None:
    assert [f"{s} imports {t}" for s, t in edges(project_graph(), "runtimes")
            if t.startswith("agent")] == []


def test_at_most_twelve_modules_directly_under_agent() -> None:
    assert len(list((ROOT / "agent").glob("*.py"))) <= 12


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True).stdout


@pytest.mark.slow
def test_importing_every_agent_module_never_imports_torch() -> None:
    names = sorted(n for n in modules("agent") if not n.endswith("__main__"))
    out = _fresh("import importlib, sys\n"
                 f"for name in {names!r}:\n"
                 "    importlib.import_module(name)\n"
                 "print(len(sys.modules), 'torch' in sys.modules)")
    count, torch = out.split()
    assert int(count) > len(names) and torch == "False"


def test_the_coordinator_client_imports_neither_execution_nor_the_daemon() -> None:
    out = _fresh("import sys\n"
                 "import agent.coordinator, agent.coordinator.client, "
                 "agent.coordinator.jobs_api, agent.coordinator.capabilities\n"
                 "print(sorted({m.split('.')[1] for m in sys.modules "
                 "if m.startswith('agent.') and m.count('.') > 1}))")
    assert out.strip() == "['coordinator']"
