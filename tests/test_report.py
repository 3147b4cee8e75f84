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
    assert t.columns == ["last_token", "first_token", "random_token", "first_layer", "first_block", "random_layer"]
    assert t.rows[0][1] == ["70.00 ± 10.00 (n=3)", "30.00 ± 14.14 (n=2)", "missing", "missing", "missing", "missing"]
    assert "hidden_states[1]" in t.note and "draw seed % D" in t.note


def test_runs_with_other_cache_are_not_pooled(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a", method="single", acc=0.2, cache="c1")
    make_run(root, "b", method="single", seed=1, acc=0.8, cache="c9")
    t = table1(load_runs([root]))
    assert sorted(c for _, cells in t.rows for c in cells) == ["20.00 (n=1)", "80.00 (n=1)"]
    assert len(t.rows) == 2


def test_spearman_numbers(tmp_path):
    """rho per run of the method (perceiver, last-token pooling), averaged per setting; hard-routing's
    router entropy and the pooling ablations do not enter the number printed next to the paper's."""
    root = tmp_path / "sp"
    make_run(root, "r1", seed=0, rewards=(0.1, 0.2, 0.3, 0.4), entropy=(1.0, 0.9, 0.8, 0.7))  # -1
    make_run(root, "r2", seed=1, rewards=(0.1, 0.3, 0.2, 0.4), entropy=(0.5, 0.6, 0.7, 0.8))  # ranks 1,3,2,4: 0.8
    make_run(root, "r3", seed=2, rewards=(0.1, 0.1, 0.1, 0.1), entropy=(0.5, 0.6, 0.7, 0.8))  # constant: undefined
    make_run(root, "hr", method="hard-routing", rewards=(0.1, 0.2, 0.3, 0.4), entropy=(0.4, 0.6, 0.7, 0.9))  # +1
    make_run(root, "first", pooling="first_token", rewards=(0.1, 0.2, 0.3, 0.4), entropy=(0.4, 0.6, 0.7, 0.9))
    make_run(root, "lo", family="logic", cache="c2", rewards=(0.1, 0.2, 0.3, 0.4), entropy=(0.9, 0.6, 0.7, 0.8))
    t, means = spearman_table(load_runs([root]))
    assert {r.name for r in t.sources} == {"r1", "r2", "r3", "lo"}
    rows = dict(t.rows)
    ar, lo = "arithmetic / math, code, general", "logic / math, code, general"
    assert set(rows) == {ar, lo}
    assert rows[ar][0] == "3" and rows[ar][1] == "r1: -1.000, r2: +0.800, r3: undefined"
    assert means[ar] == pytest.approx((-1 + 0.8) / 2) and rows[ar][2] == "-0.100"
    assert means[lo] == pytest.approx(-0.2)  # ranks 1..4 vs 4,1,2,3: 1 - 6*12/(4*15)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_runs_of_different_lengths_are_different_conditions(tmp_path):
    root = tmp_path / "len"
    make_run(root, "long-0", method="single", seed=0, acc=0.6, rewards=(0.1, 0.2, 0.3, 0.4))
    make_run(root, "long-1", method="single", seed=1, acc=0.8, rewards=(0.1, 0.2, 0.3, 0.4))
    make_run(root, "short", method="single", seed=2, acc=0.1, rewards=(0.1, 0.2))  # --max-steps 2
    t = table1(load_runs([root]))
    cells = sorted(c for _, cs in t.rows for c in cs)
    assert cells == ["10.00 (n=1)", "70.00 ± 14.14 (n=2)"]
    # a resumed run that reached the same final step pools with the uninterrupted ones
    make_run(root, "resumed", method="single", seed=3, acc=0.7, rewards=(0.1, 0.2, 0.3, 0.4))
    (root / "resumed" / "summary.json").write_text(json.dumps({"method": "single", "seed": 3, "steps": 4,
                                                               "final_val_accuracy": 0.7}))
    t = table1(load_runs([root]))
    assert "70.00 ± 10.00 (n=3)" in [c for _, cs in t.rows for c in cs]


def test_figure5_reads_the_fixed_subset_curve(tmp_path):
    from analyze.plots import context_curve, figure5

    root = tmp_path / "f5"
    d = make_run(root, "p", evals=False)
    recs = [{"step": s, "split": "val", "n": 64, "kind": "curve", "accuracy": 0.1 * i, "reward": 0.1 * i,
             "accuracy_without_context": 0.05 * i, "reward_without_context": 0.05 * i}
            for i, s in enumerate((50, 100, 150, 200, 250, 300), start=1)]
    recs.append({"step": 300, "split": "val", "n": 4000, "kind": "full", "accuracy": 0.9, "reward": 0.9,
                 "accuracy_without_context": 0.2, "reward_without_context": 0.2})
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = load_runs([root])[0]
    curve = context_curve(run)
    assert curve["step"].to_list() == [50, 100, 150, 200, 250, 300] and curve["n"].to_list() == [64] * 6
    assert figure5([run], tmp_path / "f5.png") == [run] and (tmp_path / "f5.png").exists()


def test_paper_preset_draws_figure5_as_a_curve():
    """The paper preset's schedule gives Figure 5 at least 5 points per run (test_freq alone: 1)."""
    from pathlib import Path

    from train.config import load_train_config

    for name in ("paper.yaml", "paper-gsm8k.yaml"):
        cfg = load_train_config(str(Path(__file__).resolve().parents[1] / "configs" / "train" / name))
        points = [s for s in range(1, cfg.total_training_steps + 1) if cfg.curve_freq and s % cfg.curve_freq == 0]
        assert len(points) >= 5 and cfg.curve_prompts >= 32, name
        assert cfg.eval_without_context


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
    assert "p-ar-0" in summary and "Spearman ρ(reward, routing entropy), perceiver runs" in summary and "c2" in summary
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


def test_collaboration_table_hand_worked(tmp_path):
    from analyze.tables import collaboration_table

    root = tmp_path / "co"
    for s, (acc, wo, h) in enumerate(((0.6, 0.2, (1.0, 0.7)), (0.8, 0.4, (1.0, 0.5)))):
        d = make_run(root, f"p{s}", seed=s, acc=acc, rewards=(0.1, 0.2), entropy=h)
        summary = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**summary, "final_val_accuracy_without_context": wo}))
    make_run(root, "s0", method="single", acc=0.3, rewards=(0.1, 0.2))
    t = collaboration_table(load_runs([root]))
    rows = dict(t.rows)
    p = rows["arithmetic / perceiver / math, code, general"]
    # acc: mean .7, sample std .1414; without C: .3 ± .1414; H: mean first 1.0, mean last .6
    assert p[:4] == ["2", "70.0 ± 14.1", "30.0 ± 14.1", "1.000 → 0.600"]
    assert p[4] == "math: 0.500 ± 0.000, code: 0.300 ± 0.000, general: 0.200 ± 0.000"
    assert rows["arithmetic / single / math, code, general"][:4] == ["1", "30.0", "—", "—"]
    assert (tmp_path / "co").exists() and {r["method"] for r in t.raw} == {"perceiver", "single"}
    assert "val acc % (C's information removed)" not in t.columns  # no run evaluated it


def test_collaboration_table_null_context_column(tmp_path):
    """Runs that evaluated C's information removed (eval_null_context) get a column of their own."""
    from analyze.tables import collaboration_table

    root = tmp_path / "co"
    for s, (acc, wo, nu) in enumerate(((0.6, 0.2, 0.5), (0.8, 0.4, 0.7))):
        d = make_run(root, f"p{s}", seed=s, acc=acc, rewards=(0.1, 0.2), entropy=(1.0, 0.9))
        summary = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**summary, "final_val_accuracy_without_context": wo,
                                                    "final_val_accuracy_null_context": nu}))
    make_run(root, "s0", method="single", acc=0.3, rewards=(0.1, 0.2))
    t = collaboration_table(load_runs([root]))
    assert t.columns[3] == "val acc % (C's information removed)"
    rows = dict(t.rows)
    assert rows["arithmetic / perceiver / math, code, general"][:5] == ["2", "70.0 ± 14.1", "30.0 ± 14.1",
                                                                         "60.0 ± 14.1", "1.000 → 0.900"]
    assert rows["arithmetic / single / math, code, general"][:4] == ["1", "30.0", "—", "—"]
    raw = {r["method"]: r for r in t.raw}
    assert raw["perceiver"]["acc_null_c_mean"] == pytest.approx(0.6)  # CSV keeps fractions


def _parse_page(text):
    from html.parser import HTMLParser

    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.h2, self.imgs, self.links, self.tables, self._in_h2 = [], [], [], 0, False

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self._in_h2 = tag == "h2"
            self.tables += tag == "table"
            if tag == "img":
                self.imgs.append(a.get("src", ""))
            if tag in ("a", "link", "script") and (a.get("href") or a.get("src")):
                self.links.append(a.get("href") or a.get("src"))

        def handle_data(self, data):
            if self._in_h2:
                self.h2.append(data)

        def handle_endtag(self, tag):
            self._in_h2 = False if tag == "h2" else self._in_h2

    p = P()
    p.feed(text)
    return p


def test_report_html_is_one_self_contained_page(runs_dir, tmp_path):
    """Every table and figure of the report is in report.html, every image loads from the page itself,
    nothing points outside it, and the last evaluation's completions with and without C are shown."""
    import base64
    import io

    from PIL import Image

    run = runs_dir / "p-ar-0"
    rec = {"step": 4, "kind": "eval", "prompt": "1 + <2>?", "answer": "3", "completion": "3", "reward": 1.0,
           "completion_without_context": "4", "reward_without_context": 0.0}
    (run / "completions.jsonl").write_text(json.dumps({**rec, "step": 2, "completion": "STALE-COMPLETION"}) + "\n"
                                           + json.dumps(rec) + "\n")
    out = tmp_path / "rep"
    assert CliRunner().invoke(app, ["report", str(runs_dir), "--out", str(out)]).exit_code == 0
    text = (out / "report.html").read_text()
    page = _parse_page(text)
    md_titles = [line[4:] for line in (out / "summary.md").read_text().splitlines() if line.startswith("### ")]
    assert md_titles and all(t in page.h2 for t in md_titles)  # every table and figure of summary.md
    assert len(page.imgs) == 3 and not page.links
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).format == "PNG"
    assert "1 + &lt;2&gt;?" in text and "STALE-COMPLETION" not in text  # escaped; only the last evaluation's
    assert "Sampled completions" in text and text.count("<h3>") == 1  # one method has completions


def test_report_html_opens_in_a_headless_browser(runs_dir, tmp_path):
    import shutil
    import subprocess

    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium on this machine (apt-get install chromium to run this check)")
    out = tmp_path / "rep"
    assert CliRunner().invoke(app, ["report", str(runs_dir), "--out", str(out)]).exit_code == 0
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Sampled completions" not in res.stdout  # no completions in these runs
    assert res.stdout.count("<img") == 3 and "musk report" in res.stdout


def test_cost_table_skips_runs_without_expert_token_counts(tmp_path):
    """A cache without per-expert token counts (probe teams) gives a 'missing' cost cell, not a crash."""
    from analyze.tables import cost_table

    d = make_run(tmp_path / "r", "probe-single", method="single")
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    (d / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "cost/expert_prompt_tokens"})
                                             + "\n" for r in lines))
    t = cost_table(load_runs([tmp_path / "r"]))
    assert t.rows == [("single", ["missing"] * 4)] and not t.sources
