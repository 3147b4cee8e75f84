"""Checks that reach every line: pyflakes (through ruff) over the whole tree finds no undefined
names, unused imports or unused variables, so code paths no test runs (GPU engines) still resolve."""

import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def test_pyflakes_clean():
    ruff = shutil.which("ruff", path=str(__import__("pathlib").Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra: pip install -e '.[test]')")
    res = subprocess.run([ruff, "check", "--output-format", "concise", str(ROOT)], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
