"""The layering of docs/architecture.md, checked on the real import graph of src/oodtune.

The layers are read from the doc's table (one row per layer, its components in backticks), so the doc is the one
description of the layout. Every ``import`` (module level or inside a function) of an oodtune module is resolved;
a module may import only modules of its own component or of components on lower layers, and the module graph has
no cycles.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "oodtune"
DOC = ROOT / "docs" / "architecture.md"


def _doc_layers() -> list[list[str]]:
    """The doc's table, bottom (layer 0) to top: the components of each layer (packages without their slash)."""
    rows: dict[int, list[str]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            layer = int(match.group(1))
            assert layer not in rows, f"layer {layer} has two rows in {DOC.name}"
            rows[layer] = [c.rstrip("/") for c in re.findall(r"`([^`]+)`", match.group(2))]
    assert sorted(rows) == list(range(len(rows))), f"the layers of {DOC.name} are not numbered 0..n: {sorted(rows)}"
    return [rows[i] for i in range(len(rows))]


def _headline_layers() -> list[list[str]]:
    """The doc's headline (its first bold run): the layers, bottom-up, separated by arrows."""
    headline = re.search(r"\*\*(.+?)\*\*", DOC.read_text(encoding="utf-8"), re.S)
    assert headline, f"{DOC.name} has no bold headline listing the layers"
    return [[c.rstrip("/") for c in re.findall(r"`([^`]+)`", part)] for part in headline.group(1).split("→")]


#: component (first path element below oodtune) -> layer, bottom (0) to top, as docs/architecture.md says.
LAYERS: dict[str, int] = {c: i for i, layer in enumerate(_doc_layers()) for c in layer}


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


@functools.cache
def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def test_every_component_has_a_layer() -> None:
    components = {_component(m) for m in _graph()}
    assert components <= set(LAYERS), sorted(components - set(LAYERS))
    stale = sorted(set(LAYERS) - components)
    assert not stale, f"{DOC.name} names components that do not exist: {stale}"


def test_the_headline_lists_the_layers_of_the_table() -> None:
    assert _headline_layers() == _doc_layers()


def test_modules_import_only_their_component_or_lower_layers() -> None:
    bad = []
    for module, targets in _graph().items():
        here = _component(module)
        for target in targets:
            there = _component(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                bad.append(f"{module} ({here}, layer {LAYERS[here]}) imports {target} ({there}, layer {LAYERS[there]})")
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


def test_the_doc_table_is_read() -> None:
    """The table parses into the layers the checks rely on (a parser that found nothing would allow nothing, or
    everything)."""
    assert LAYERS["errors"] == 0 and LAYERS["cli"] == max(LAYERS.values())
    assert LAYERS["data"] < LAYERS["models"] < LAYERS["losses"] < LAYERS["training"] < LAYERS["pipeline"]
    assert LAYERS["scores"] == LAYERS["losses"] and LAYERS["training"] == LAYERS["evaluation"]
    assert len(LAYERS) >= 15


def test_packages_reexport_their_public_names() -> None:
    """``oodtune.losses.BalancedEnergy`` and the like: every name a module of these packages exports is also a name
    of its package, the same object."""
    for package_name in ("deploy", "evaluation", "losses", "utils"):
        package = importlib.import_module(f"oodtune.{package_name}")
        modules = sorted((SRC / package_name).glob("[!_]*.py"))
        assert modules, package_name
        for module_path in modules:
            module = importlib.import_module(_module_name(module_path))
            missing = [n for n in module.__all__ if getattr(package, n, None) is not getattr(module, n)]
            assert not missing, f"{package.__name__} does not re-export {missing} of {module.__name__}"
            assert set(module.__all__) <= set(package.__all__)
    assert importlib.import_module("oodtune.losses").BalancedEnergy.__module__ == "oodtune.losses.terms"
    assert importlib.import_module("oodtune.deploy").Detector.__module__ == "oodtune.deploy.detector"
