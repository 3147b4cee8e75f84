"""benchmarks/probe_evidence.py on run folders with known records: a table per condition, never per label
(two runs with the same method and recipe but another g_phi learning rate are two conditions), and
"− prefix" set against the prefix trained like the method (hand-worked intervals)."""

import subprocess
import sys

import yaml

from tests.helpers import ROOT
from tests.test_report import eval_folder, make_run, write_eval_records

SCRIPT = ROOT / "benchmarks" / "probe_evidence.py"


def probe_run(root, name, *, method, seed, router_lr, with_c, shuffled=None):
    d = make_run(root, name, method=method, seed=seed)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg.update(router_lr=router_lr, dtype_resolved="bfloat16")
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    ev = eval_folder(d, "final-val-ablations", dtype="bfloat16")
    write_eval_records(ev, with_c, name="records.jsonl")
    write_eval_records(ev, [0, 0, 0, 0], condition="without", name="records.jsonl")
    if shuffled is not None:
        write_eval_records(ev, shuffled, condition="shuffle:probe-oracle", name="records.jsonl")
    return d


def test_conditions_stay_apart_and_the_prefix_is_matched(tmp_path):
    root = tmp_path / "runs"
    for s in (0, 1):  # lr 0.003: with C [1,1,1,0], shuffled [0,0,1,0]: d = [1,1,0,0] on both seeds
        probe_run(root, f"fast-{s}", method="perceiver", seed=s, router_lr=0.003, with_c=[1, 1, 1, 0], shuffled=[0, 0, 1, 0])
    for s in (0, 1):  # lr 0.001: every question with its own oracle, none with another's
        probe_run(root, f"slow-{s}", method="perceiver", seed=s, router_lr=0.001, with_c=[1, 1, 1, 1], shuffled=[0, 0, 0, 0])
    # the prefix trained at lr 0.001 only: 1 of 4 right on seed 0, 2 of 4 on seed 1
    probe_run(root, "prefix-0", method="prefix", seed=0, router_lr=0.001, with_c=[0, 1, 0, 0])
    probe_run(root, "prefix-1", method="prefix", seed=1, router_lr=0.001, with_c=[0, 1, 1, 0])
    out = subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, check=True).stdout
    assert "**perceiver [router_lr=0.003]** (arithmetic, bfloat16, 2 seeds" in out
    assert "**perceiver [router_lr=0.001]** (arithmetic, bfloat16, 2 seeds" in out
    assert "**prefix** (arithmetic, bfloat16, 2 seeds" in out
    assert out.count("\n| 0 |") == 3 and out.count("\n| 1 |") == 3  # each seed in its own table, once
    # pooled per condition, never across: +50.0 for lr 0.003 (the same d on both seeds), +100.0 for lr 0.001
    assert "pooled with C − probe-oracle shuffled: +50.0" in out
    assert "pooled with C − probe-oracle shuffled: +100.0" in out
    # only the lr-0.001 perceiver has a matched prefix: 100% against (25 + 50) / 2 = 37.5%
    assert "perceiver [router_lr=0.001] − prefix: +62.5" in out
    assert "router_lr=0.003] − prefix" not in out


def test_a_folder_without_runs_is_a_message_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "probe_evidence: no run folders" in r.stderr and "Traceback" not in r.stderr
