"""Public faces, read from the source (ast, like tests/test_layers.py): no file imports another project
module's private (underscore) names. A name used across modules is public: it is renamed without its
underscore where it is defined. Dunder names (__version__) are not private."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

# Where project modules live: the packages, cli.py, and the tests and benchmarks that import them.
PACKAGES = ["core", "cache", "pipeline", "train", "analyze", "evaluate", "sweep", "tests", "benchmarks"]


def _project_files() -> list[Path]:
    return [ROOT / "cli.py"] + sorted(p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py"))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(sources: dict[str, str], project: set[str]) -> list[str]:
    """'file: from module import _name' for each import of a private name from a project module.
    sources: {file label: source text}; project: the top-level names of project modules and packages."""
    bad = []
    for label, text in sources.items():
        for node in ast.walk(ast.parse(text, label)):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in project:
                bad += [f"{label}: from {node.module} import {a.name}" for a in node.names if _is_private(a.name)]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative: always the project's own
                bad += [f"{label}: from {'.' * node.level}{node.module or ''} import {a.name}"
                        for a in node.names if _is_private(a.name)]
    return sorted(bad)


def test_no_module_imports_another_modules_private_names():
    files = _project_files()
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in files}
    bad = private_imports(sources, set(PACKAGES) | {"cli"})
    assert not bad, "private names imported across modules (make them public where defined):\n" + "\n".join(bad)


def test_the_check_can_fail():
    src = {"a.py": "from train.loop import _x, y\nfrom numpy import _private\nfrom core import __version__\n",
           "b.py": "def f():\n    from cache.reader import _open\n", "c.py": "from .sib import _h\n"}
    assert private_imports(src, {"train", "cache", "core"}) == [
        "a.py: from train.loop import _x", "b.py: from cache.reader import _open", "c.py: from .sib import _h"]
