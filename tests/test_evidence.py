"""benchmarks/evidence.sh end to end on the tiny cache and policy: train, musk eval with every expert
dropped and shuffled, musk report with the paired and ablation tables."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, tiny_train_overrides, write_yaml


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_evidence_script_on_a_tiny_run(tiny_cache, tiny_policy, tmp_path):
    cfg = write_yaml(tmp_path / "t.yaml", tiny_train_overrides(tiny_policy, total_training_steps=1, test_freq=1))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "MUSK": f"{sys.executable} {ROOT / 'cli.py'}", "EVAL_ARGS": "--limit 3"}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "evidence.sh"), "tiny", str(tiny_cache), str(cfg),
                          str(tmp_path / "ev"), "0"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    runs = tmp_path / "ev" / "tiny-runs"
    assert sorted(p.name for p in runs.iterdir()) == ["perceiver-0", "prefix-0", "single-0"]
    summary = json.loads((runs / "perceiver-0" / "eval" / "final-val-ablations" / "summary.json").read_text())
    assert list(summary["conditions"]) == ["with", "without", "null", "drop:tiny-llama", "shuffle:tiny-llama",
                                           "drop:tiny-gpt2", "shuffle:tiny-gpt2", "shuffle:all"]
    prefix = json.loads((runs / "prefix-0" / "eval" / "final-val-ablations" / "summary.json").read_text())
    assert list(prefix["conditions"]) == ["with", "without", "null"]
    assert summary["n_prompts"] == 3
    single = json.loads((runs / "single-0" / "eval" / "final-val-ablations" / "summary.json").read_text())
    assert list(single["conditions"]) == ["with"]  # what "ablated − single" is computed against
    rep = tmp_path / "ev" / "tiny-report"
    ablations = (rep / "ablations.md").read_text()
    for cond in ("drop:tiny-llama", "shuffle:tiny-gpt2"):
        assert f"tiny / perceiver / tiny-llama, tiny-gpt2 / {cond}" in ablations.replace("easy-arithmetic", "tiny")
    row = next(ln for ln in ablations.splitlines() if "/ shuffle:tiny-gpt2" in ln)
    cells = [c.strip() for c in row.split("|")[1:-1]]  # label, seeds, acc with, acc ablated, − with, − single, ...
    assert cells[5] not in ("", "—") and "1 v 1 seed" in cells[5], row  # ablated − single has single's folder
    paired = (rep / "paired.md").read_text()
    assert "perceiver − single" in paired and "perceiver − prefix" in paired and "3 distinct questions)" in ablations
    assert "Expert ablations" in res.stdout and "Paired differences" in res.stdout
    # a rerun trains nothing and evaluates nothing again: no file of a run is written a second time
    written = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "evidence.sh"), "tiny", str(tiny_cache), str(cfg),
                          str(tmp_path / "ev"), "0"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == written
    assert "Paired differences" in res.stdout  # the report is made again from the same records
