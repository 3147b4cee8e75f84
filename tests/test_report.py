"""`musk report` on run folders with known numbers, checked against hand-computed values."""

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from analyze.runs import load_runs
from analyze.stats import cell, spearman
from analyze.tables import table1, table2, spearman_table, cost_table
from cli import app


def make_run(root, name, method="perceiver", family="arithmetic", seed=0, acc=0.5, cache="c1", pooling="last_token",
             m=8, rewards=(0.1, 0.2, 0.3, 0.4), entropy=(1.0, 0.9, 0.8, 0.7), evals=True):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"method": method, "seed": seed, "pooling": pooling, "num_latents": m, "lr": 1e-4, "group_size": 8,
           "experts": ["math", "code", "general"], "cache": f"/x/{cache}.h5", "cache_fingerprint": cache,
           "task_family": family}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for i, (r, h) in enumerate(zip(rewards, entropy), start=1):
        rec = {"step": i, "reward/mean": r, "kl": 0.0, "cost/prompts": 4, "cost/expert_forward_passes": 12,
               "cost/expert_prompt_tokens": 400, "cost/expert_generated_tokens": 0, "cost/policy_prompt_tokens": 3200}
        if method in ("perceiver", "hard-routing"):
            rec.update({"routing/entropy": h, "routing/utilization": [0.5, 0.3, 0.2],
                        "routing/attention": [[0.5, 0.3, 0.2]]})
        lines.append(json.dumps(rec))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if evals:
        (d / "eval.jsonl").write_text(json.dumps({"step": len(rewards), "split": "val", "n": 100, "accuracy": acc,
                                                  "reward": acc, "accuracy_without_context": acc / 2,
                                                  "reward_without_context": acc / 2}) + "\n")
    (d / "summary.json").write_text(json.dumps({"method": method, "seed": seed, "final_val_accuracy": acc,
                                                "task_family": family}))
    return d


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    # perceiver on arithmetic: 3 seeds -> mean 0.70, sample std sqrt(((-.1)^2 + 0 + .1^2) / 2) = 0.1
    for s, a in enumerate((0.6, 0.7, 0.8)):
        make_run(root, f"p-ar-{s}", seed=s, acc=a)
    # single on arithmetic (2 seeds: mean .5, std sqrt(2 * .05^2 / 1) = .0707107) and logic (1 seed)
    make_run(root, "s-ar-0", method="single", seed=0, acc=0.45)
    make_run(root, "s-ar-1", method="single", seed=1, acc=0.55)
    make_run(root, "s-lo-0", method="single", family="logic", seed=0, acc=0.9, cache="c2")
    # pooling ablation (perceiver, arithmetic): first_token twice
    make_run(root, "p-first-0", seed=0, acc=0.2, pooling="first_token")
    make_run(root, "p-first-1", seed=1, acc=0.4, pooling="first_token")
    return root


def test_table1_numbers(runs_dir):
    t = table1(load_runs([runs_dir]))
    assert t.columns == ["arithmetic", "logic"]
    rows = dict(t.rows)
    assert rows["single"] == ["50.00 ± 7.07 (n=2)", "90.00 (n=1)"]
    assert rows["perceiver [pooling=last_token]"] == ["70.00 ± 10.00 (n=3)", "missing"]
    assert rows["perceiver [pooling=first_token]"] == ["30.00 ± 14.14 (n=2)", "missing"]
    raw = {(r["row"], r["family"]): r for r in t.raw}
    assert raw[("single", "arithmetic")]["mean"] == pytest.approx(0.5)
    assert raw[("single", "arithmetic")]["std"] == pytest.approx(math.sqrt(0.005))
    assert raw[("single", "logic")]["n"] == 1 and raw[("single", "logic")]["std"] is None


def test_table2_numbers(runs_dir):
    t = table2(load_runs([runs_dir]))
    assert t.columns == ["last_token", "first_token", "random_token", "first_layer", "random_layer"]
    assert t.rows[0][1] == ["70.00 ± 10.00 (n=3)", "30.00 ± 14.14 (n=2)", "missing", "missing", "missing"]


def test_runs_with_other_cache_are_not_pooled(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a", method="single", acc=0.2, cache="c1")
    make_run(root, "b", method="single", seed=1, acc=0.8, cache="c9")
    t = table1(load_runs([root]))
    assert sorted(c for _, cells in t.rows for c in cells) == ["20.00 (n=1)", "80.00 (n=1)"]
    assert len(t.rows) == 2


def test_spearman_numbers(runs_dir, tmp_path):
    # p-ar-*: reward increasing while entropy decreasing: rho = -1 exactly
    root = tmp_path / "sp"
    make_run(root, "r1", rewards=(0.1, 0.2, 0.3, 0.4), entropy=(1.0, 0.9, 0.8, 0.7))  # -1
    make_run(root, "r2", rewards=(0.1, 0.3, 0.2, 0.4), entropy=(0.5, 0.6, 0.7, 0.8))  # ranks 1,3,2,4 vs 1,2,3,4: 0.8
    make_run(root, "r3", rewards=(0.1, 0.1, 0.1, 0.1), entropy=(0.5, 0.6, 0.7, 0.8))  # constant: undefined
    t, mean = spearman_table(load_runs([root]))
    rows = dict(t.rows)
    assert rows["r1"][3] == "-1.000" and rows["r2"][3] == "+0.800" and rows["r3"][3] == "undefined"
    assert mean == pytest.approx((-1 + 0.8) / 2)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_cost_table(runs_dir):
    t = cost_table(load_runs([runs_dir]))
    rows = dict(t.rows)
    # 12 passes / 4 prompts = 3; 400 / 4 = 100 tokens; 3200 / (4 prompts * G 8) = 100 per rollout
    assert rows["perceiver"] == ["3.0", "100.0", "0.0", "100.0"]


def test_cell_missing_is_not_zero():
    assert cell([]).fmt() == "missing"
    assert cell([None]).n == 0


def test_report_files_and_figures(runs_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["report", str(runs_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = (out / "summary.md").read_text()
    assert "p-ar-0" in summary and "Mean Spearman" in summary and "c2" in summary
    for f in ("table1", "table2", "spearman", "cost"):
        assert (out / f"{f}.md").exists() and (out / f"{f}.csv").read_text().strip()
    for f in ("figure4.png", "figure5.png", "figure6.png"):
        img = Image.open(out / f)
        assert img.format == "PNG" and img.size[0] > 300
    assert "70.00 ± 10.00 (n=3)" in (out / "table1.md").read_text()


def test_report_bad_input(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no run folders" in res.output
