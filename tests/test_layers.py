"""The package's shape: io < kernels < engine < flows, no import cycles, no argparse below flows.

Walks the AST of every module (imports inside functions included), so a lazy import cannot hide
a layer violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"io": 1, "kernels": 2, "engine": 3, "flows": 4}


def _modules() -> dict[str, Path]:
    out = {}
    for folder in FLOORS:
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["pdacscreen." + ".".join(parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 and parts[0] == "pdacscreen" else None


def test_no_import_from_a_higher_floor():
    bad = []
    for mod, path in _modules().items():
        own = _floor(mod)
        for name in _imports(path):
            other = _floor(name)
            if other is not None and other > own:
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "layer violations (io < kernels < engine < flows):\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    mods = _modules()
    graph = {
        m: {n for n in _imports(p) if n in mods and n != m and not m.startswith(n + ".")}
        for m, p in mods.items()
    }
    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for n in sorted(graph[m]):
            if seen.get(n) == 1:
                cycles.append(" -> ".join([*stack[stack.index(n) :], n]))
            elif n not in seen:
                visit(n, [*stack, n])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_command_line_code_lives_in_flows():
    """argparse only in flows/ (and the two GPU-machine scripts, which have no flows/ there)."""
    allowed = {"pdacscreen.kernels.gpucheck", "pdacscreen.engine.gpucheck"}
    bad = [
        str(p.relative_to(REPO))
        for m, p in _modules().items()
        if _floor(m) < 4 and m not in allowed and "argparse" in _imports(p)
    ]
    assert not bad, f"argparse below flows/: {bad}"
