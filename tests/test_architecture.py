"""The layering of docs/architecture.md, checked on the real import graph of src/oodtune.

Every ``import`` (module level or inside a function) of an oodtune module is resolved; a module may import only
modules of its own layer or of layers below, and the module graph has no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "oodtune"

#: component (first path element below oodtune) -> layer, bottom (0) to top; kept in sync with the doc.
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "atomic": 0, "lock": 0, "progress": 0, "runtime": 0,
    "data": 1,
    "models": 2,
    "energy": 3, "margins": 3, "prior": 3, "losses": 3, "pixel_losses": 3, "scores": 3, "metrics": 3,
    "training": 4, "evaluation": 4, "pixel_evaluation": 4, "guarantee": 4, "detector": 4,
    "report": 5, "plots": 5, "export": 5, "onnx_export": 5,
    "pipeline": 6,
    "benchmark": 7,
    "cli": 8,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every oodtune module ``path`` imports (``from x import y`` counts y when it is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "oodtune"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "oodtune":
                continue
            found.add(target)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (SRC.parent / Path(*sub.split(".")) / "__init__.py").exists():
                    found.add(sub)
    found.discard(name)
    return found


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def test_every_component_has_a_layer() -> None:
    components = {_component(m) for m in _graph()}
    assert components <= set(LAYERS), sorted(components - set(LAYERS))


def test_modules_import_only_their_layer_or_below() -> None:
    bad = []
    for module, targets in _graph().items():
        for target in targets:
            if LAYERS[_component(target)] > LAYERS[_component(module)]:
                bad.append(f"{module} (layer {LAYERS[_component(module)]}) imports {target} "
                           f"(layer {LAYERS[_component(target)]})")
    assert not bad, "\n".join(sorted(bad))


def test_evaluation_and_training_are_independent() -> None:
    graph = _graph()
    for a, b in (("evaluation", "training"), ("training", "evaluation")):
        offenders = [m for m, t in graph.items() if _component(m) == a and any(_component(x) == b for x in t)]
        assert not offenders, f"{a} must not import {b}: {offenders}"


def test_no_import_cycles() -> None:
    graph = _graph()
    # a package's __init__ re-exports its modules; the edge package -> submodule is not a dependency of the
    # package on itself, so only edges that leave the importer's own package count for cycles
    def edges(module: str) -> set[str]:
        return {t for t in graph[module] if t in graph and not t.startswith(module + ".")}

    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in edges(module):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target] if target in stack else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    """The checker resolves relative imports (a checker that found nothing would pass every rule)."""
    graph = _graph()
    assert "oodtune.models.checkpoint" in graph["oodtune.training.trainer"] or \
        "oodtune.models" in graph["oodtune.training.trainer"]
    assert "oodtune.pipeline" in graph["oodtune.benchmark.grid"]
    assert sum(len(t) for t in graph.values()) > 100
