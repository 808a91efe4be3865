"""The import graph of ``src/demopsd`` by stage package, read from the source (nothing is imported).

    python -m tests.import_graph        # each package, the packages it imports, and the layer check

Stages, lowest first; a package may import only packages listed before it (and itself). ``report`` reads
finished runs and sits beside ``training`` and ``evaluation`` only because the training run writes its report.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "demopsd"
LAYERS = ("config", "objectives", "runtime", "data", "rollout", "evaluation", "report", "training")


def module_imports(package_dir: Path = PACKAGE_DIR) -> dict[str, list[tuple[str, str | None, int]]]:
    """Module (``demopsd.x.y``) → every ``(imported module, imported name or None, line)`` of a demopsd import,
    at any depth of the file (imports inside functions count)."""
    found: dict[str, list[tuple[str, str | None, int]]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        entries = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("demopsd"):
                entries += [(node.module, alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.Import):
                entries += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("demopsd")]
        found[module] = entries
    return found


def stage(module: str) -> str:
    """The stage package of ``demopsd.<stage>.<module>`` (``""`` for the top-level ``demopsd``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Stage → the other stages it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, imports in module_imports(package_dir).items():
        graph[stage(module)]
        for target, _, _ in imports:
            if stage(target) != stage(module):
                graph[stage(module)].add(stage(target))
    return dict(graph)


def upward_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every import of a stage from a stage at its level or above, as ``module:line -> target``."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [
        f"{module}:{line} -> {target}"
        for module, imports in module_imports(package_dir).items()
        for target, _, line in imports
        if stage(target) != stage(module) and rank.get(stage(target), len(LAYERS)) >= rank.get(stage(module), -1)
    ]


def private_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every import of a ``_private`` name from another module, as ``module:line -> target.name``."""
    return [
        f"{module}:{line} -> {target}.{name}"
        for module, imports in module_imports(package_dir).items()
        for target, name, line in imports
        if name and name.startswith("_") and target != module
    ]


def module_cycles(package_dir: Path = PACKAGE_DIR) -> list[list[str]]:
    """The import cycles between modules (each as the modules along it), found by depth-first search."""
    edges = {module: {target for target, _, _ in imports} for module, imports in module_imports(package_dir).items()}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target in edges and target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def main() -> int:
    graph = package_graph()
    for name in LAYERS:
        print(f"{name:12} imports {', '.join(sorted(graph.get(name, ()), key=LAYERS.index)) or '-'}")
    problems = upward_imports() + private_imports() + [" -> ".join(c) for c in module_cycles()]
    print("\n".join(problems) if problems else "imports point only downward; no private names; no cycles")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
