"""The import graph, read from the source (ast, no imports executed): layers point one way
(core < cache < pipeline < train < {analyze, evaluate} < sweep < cli; analyze and evaluate share a floor
and do not import each other) and no two files import each other, even through a third, TYPE_CHECKING
imports included (a circle there is still a circle for a reader). Training is handed its evaluator and
reward, so train/ reads neither analyze/ nor evaluate/. Sweeps launch training as a command line: of
train/ they read only the config types they check (train.config)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

# Floors, lowest first: a package may import itself and the packages on floors below its own.
FLOORS = [["core"], ["cache"], ["pipeline"], ["train"], ["analyze", "evaluate"], ["sweep"], ["cli"]]
LAYERS = [pkg for floor in FLOORS for pkg in floor]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: {project modules it imports}} over the layered packages and cli.py."""
    files = [ROOT / "cli.py"] + [p for pkg in LAYERS[:-1] if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _layer(module: str) -> int:
    pkg = module.split(".")[0]
    return next(i for i, floor in enumerate(FLOORS) if pkg in floor)


def _sideways_or_up(graph: dict[str, set[str]]) -> list[str]:
    """'m imports d' for each import into a higher floor, or into another package of the same floor."""
    return sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                  if _layer(d) > _layer(m) or (_layer(d) == _layer(m) and d.split(".")[0] != m.split(".")[0]))


def test_layers_point_one_way():
    bad = _sideways_or_up(import_graph())
    assert not bad, "imports that run back up the layers (or across a floor):\n" + "\n".join(bad)


def test_training_reads_neither_the_report_nor_the_evaluation():
    graph = import_graph()
    bad = _reaches_into(graph, "train", "analyze", set()) + _reaches_into(graph, "train", "evaluate", set())
    assert not bad, "train/ is handed its evaluator and reward; it imports no analyze/ or evaluate/ module:\n" + \
        "\n".join(bad)


# What sweep/ may read of train/: the config types a grid's cells are checked against.
SWEEP_READS_OF_TRAIN = {"train", "train.config"}


def _reaches_into(graph: dict[str, set[str]], pkg: str, target: str, allowed: set[str]) -> list[str]:
    """'m imports d' for each module m of `pkg` that imports a module d of `target` outside `allowed`."""
    return sorted(f"{m} imports {d}" for m, deps in graph.items() if m.split(".")[0] == pkg
                  for d in deps if d.split(".")[0] == target and d not in allowed)


def test_sweep_reads_only_the_train_config():
    bad = _reaches_into(import_graph(), "sweep", "train", SWEEP_READS_OF_TRAIN)
    assert not bad, "sweep/ launches `musk train` as a command; it may read only train.config:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_circle_among_files():
    graph = {m: {d for d in deps if not graph_is_package(d)} for m, deps in import_graph().items()}
    assert not _cycles(graph), f"files that import each other (through others): {_cycles(graph)}"


def graph_is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").exists()


def test_the_checks_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    graph = {"sweep.grid": {"train.config"}, "sweep.runner": {"train.loop", "core.errors"}, "train.loop": {"sweep.grid"}}
    assert _reaches_into(graph, "sweep", "train", SWEEP_READS_OF_TRAIN) == ["sweep.runner imports train.loop"]
    assert _reaches_into({"train.loop": {"evaluate.records", "train.grpo"}}, "train", "evaluate", set()) == \
        ["train.loop imports evaluate.records"]
    assert _sideways_or_up({"analyze.tables": {"evaluate.run", "analyze.stats", "train.config"},
                            "train.loop": {"cli"}, "evaluate.run": {"train.setup"}}) == \
        ["analyze.tables imports evaluate.run", "train.loop imports cli"]
