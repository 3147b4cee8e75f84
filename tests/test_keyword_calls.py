"""Keyword calls, read from the source (ast, like tests/test_private_imports.py): no function of the
project packages takes more than MAX_POSITIONAL positional-or-keyword parameters (self and cls not
counted); the rest are keyword-only (`*`), so a call names what it passes. The few exceptions are
listed with their reason."""

from __future__ import annotations

import ast

from tests.helpers import ROOT

PACKAGES = ["core", "cache", "pipeline", "train", "evaluate", "analyze", "sweep"]
MAX_POSITIONAL = 6

# "file:function": why its parameters stay positional.
ALLOWED = {
    "pipeline/decode_step.py:_lin": "a compiled kernel's matmul: its weights arrive as a packed tuple (`_lin(x, *qkv)`)",
    "pipeline/decode_step.py:_layer_t1": "the torch.compile'd layer: its weights arrive as a packed tuple "
                                         "(`_layer_t1(h, *args)`)",
    "pipeline/generation.py:_static_step": "bound by functools.partial and replayed with the step's tensors positionally",
}


def long_signatures(sources: dict[str, str]) -> list[str]:
    """'file:function (n positional)' for every function with more than MAX_POSITIONAL
    positional-or-keyword parameters. sources: {file label: source text}."""
    bad = []
    for label, text in sources.items():
        for node in ast.walk(ast.parse(text, label)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                pos = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(pos) > MAX_POSITIONAL:
                    bad.append(f"{label}:{node.name} ({len(pos)} positional)")
    return sorted(bad)


def test_functions_with_many_parameters_take_keywords():
    files = [ROOT / "cli.py"] + sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    found = long_signatures({str(p.relative_to(ROOT)): p.read_text() for p in files})
    bad = [b for b in found if b.split(" (")[0] not in ALLOWED]
    assert not bad, f"more than {MAX_POSITIONAL} positional parameters (add `*` before the rest):\n" + "\n".join(bad)
    stale = sorted(set(ALLOWED) - {b.split(" (")[0] for b in found})
    assert not stale, f"allowed but no longer long (take them off ALLOWED): {stale}"


def test_the_check_can_fail():
    src = {"a.py": "def f(a, b, c, d, e, f, g):\n    pass\n\ndef ok(a, b, c, d, e, f, *, g):\n    pass\n",
           "b.py": "class C:\n    def m(self, a, b, c, d, e, f):\n        pass\n\n    def n(self, a, b, c, d, e, f, g):\n"
                   "        pass\n"}
    assert long_signatures(src) == ["a.py:f (7 positional)", "b.py:n (7 positional)"]
