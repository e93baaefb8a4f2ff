"""The rules the package layout must keep (issue 11): no import cycles inside
``daemon/`` (imports under TYPE_CHECKING and inside functions count), no SQL text
outside ``daemon/queue/``, generators pure, the queue at the bottom."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "daemon"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The daemon module an import names (a package's submodule wins over the package)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str) -> set[str]:
    """Every daemon module ``module`` imports, anywhere in the file (functions and
    ``if TYPE_CHECKING:`` blocks included)."""
    tree = ast.parse(MODULES[module].read_text())
    pkg = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for n in names:
            if n.startswith("daemon") and (target := _resolve(n)) and target != module:
                out.add(target)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles_inside_daemon() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    """The checker itself: a graph with a cycle is reported."""
    saved = dict(GRAPH)
    try:
        GRAPH["daemon.queue.db"] = GRAPH["daemon.queue.db"] | {"daemon.worker"}
        assert _cycle() is not None
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


_SQL = re.compile(
    r"""["'](?:\s*)(SELECT\s|INSERT\s|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX|TRIGGER)|PRAGMA\s|BEGIN\b|COMMIT\b|ALTER\s+TABLE)""",
    re.IGNORECASE,
)


def test_no_sql_outside_the_queue_package() -> None:
    offenders = []
    for m, path in MODULES.items():
        if m.startswith("daemon.queue"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if _SQL.search(line):
                offenders.append(f"{path.relative_to(PKG.parent)}:{i}: {line.strip()}")
    assert offenders == []


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in GRAPH[m]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("daemon.generators")))
def test_generators_import_nothing_of_the_daemon_around_them(module: str) -> None:
    forbidden = ("daemon.queue", "daemon.worker", "daemon.watch", "daemon.api", "daemon.cli",
                 "daemon.config", "daemon.scanning", "daemon.pipeline", "daemon.app",
                 "daemon.residency", "daemon.client", "daemon.oneshot")  # fmt: skip
    bad = sorted(n for n in _closure(module) if n.startswith(forbidden))
    assert bad == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("daemon.queue")))
def test_the_queue_imports_nothing_above_it(module: str) -> None:
    allowed = ("daemon.queue", "daemon.errors")
    bad = sorted(n for n in _closure(module) if not n.startswith(allowed) and n != "daemon")
    assert bad == []
