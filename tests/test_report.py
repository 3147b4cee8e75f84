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
        points = [s for s in range(1, cfg.optim.total_training_steps + 1) if cfg.eval.curve_freq and s % cfg.eval.curve_freq == 0]
        assert len(points) >= 5 and cfg.eval.curve_prompts >= 32, name
        assert cfg.eval.eval_without_context


def test_cost_table(runs_dir):
    t = cost_table(load_runs([runs_dir]))
    rows = dict(t.rows)
    # 12 passes / 4 prompts = 3; 400 / 4 = 100 tokens; 3200 / (4 prompts * G 8) = 100 per rollout
    assert rows["perceiver"] == ["3.0", "100.0", "0.0", "100.0"]


def test_cell_missing_is_not_zero():
    assert cell([]).fmt() == "missing"
    assert cell([None]).n == 0


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# Crash-safe run folders, unfinished runs, Table 1 across lengths, ablations left out of Spearman.


def _report(*args):
    res = CliRunner().invoke(app, ["report", *map(str, args)])
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


@pytest.mark.slow
def test_torn_last_line_is_dropped_with_a_warning(runs_dir, tmp_path):
    for log in ("metrics.jsonl", "eval.jsonl"):
        with open(runs_dir / "p-ar-0" / log, "a") as f:
            f.write('{"step": 5, "reward/me')  # killed mid-write
    import subprocess
    import sys
    from pathlib import Path

    from cache.run_folder import TornLineWarning

    with pytest.warns(TornLineWarning, match="metrics.jsonl: dropped its last line"):
        code, out = _report(runs_dir, "--out", tmp_path / "rep")
    assert code == 0, out
    assert "70.00 ± 10.00 (n=3)" in (tmp_path / "rep" / "table1.md").read_text()  # the run still counts
    res = subprocess.run([sys.executable, "cli.py", "report", str(runs_dir), "--out", str(tmp_path / "rep2")],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("musk: warning:") == 2 and "eval.jsonl: dropped its last line" in res.stderr
    run = load_runs([runs_dir / "p-ar-0"])[0]
    assert run.metrics["step"].to_list() == [1, 2, 3, 4]


def test_broken_line_inside_a_log_is_a_clear_error(runs_dir, tmp_path):
    p = runs_dir / "p-ar-0" / "metrics.jsonl"
    lines = p.read_text().splitlines()
    p.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    code, out = _report(runs_dir, "--out", tmp_path / "rep")
    assert code == 2 and "metrics.jsonl" in out and "line 2 is not valid JSON" in out and "Traceback" not in out


@pytest.mark.slow
def test_report_on_finished_running_killed_and_resumed_runs(runs_dir, tmp_path):
    """An unfinished run (no summary.json: still training or killed) and one killed before its first
    step are named with the step they reached and left out of the tables; nothing crashes."""
    d = make_run(runs_dir, "p-running", seed=7, rewards=(0.1, 0.2))
    (d / "summary.json").unlink()
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "total_training_steps": 4}))
    k = make_run(runs_dir, "s-killed", method="single", seed=8)
    (k / "summary.json").unlink()
    (k / "metrics.jsonl").write_text("")
    make_run(runs_dir, "p-m4", seed=9, m=4)  # a finished m-sweep run beside them (Figure 6)
    code, out = _report(runs_dir, "--out", tmp_path / "rep")
    assert code == 0, out
    t1 = (tmp_path / "rep" / "table1.md").read_text()
    assert "p-running (step 2 of 4)" in t1 and "s-killed (step 0 of ?)" in t1
    assert "70.00 ± 10.00 (n=3)" in t1  # the unfinished perceiver run does not enter the cell
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "unfinished: step 2 of 4" in html and "finished" in html
    for f in ("figure4.png", "figure5.png", "figure6.png"):
        assert (tmp_path / "rep" / f).exists()


def _with(d, **cfg_extra):
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    (d / "config.yaml").write_text(yaml.safe_dump({**cfg, **cfg_extra}))
    return d


def test_table1_one_row_per_method_across_lengths(tmp_path):
    """GSM8K runs (fewer steps, another curve_freq) share a row with Reasoning Gym runs; a cell pools
    runs of one length and says it."""
    root = tmp_path / "t1"
    for method in ("single", "perceiver"):
        for s, a in enumerate((0.4, 0.6)):
            _with(make_run(root, f"{method}-ar-{s}", method=method, seed=s, acc=a), curve_freq=50,
                  total_training_steps=4)
        _with(make_run(root, f"{method}-gsm-0", method=method, family="gsm8k", cache="g", acc=0.3, rewards=(0.1, 0.2),
                       entropy=(1.0, 0.9)), curve_freq=40, total_training_steps=2)
    t = table1(load_runs([root]))
    assert t.columns == ["arithmetic", "gsm8k"]
    assert dict(t.rows) == {"single": ["50.00 ± 14.14 (n=2)", "30.00 (n=1)"],
                            "perceiver": ["50.00 ± 14.14 (n=2)", "30.00 (n=1)"]}
    assert "Steps per run: arithmetic 4, gsm8k 2." in t.note
    # a run of another length in the same cell is not pooled: that family's row splits, labelled
    _with(make_run(root, "single-ar-short", method="single", seed=5, acc=0.9, rewards=(0.1, 0.2, 0.3)),
          curve_freq=50, total_training_steps=3)
    rows = dict(table1(load_runs([root])).rows)
    assert rows["single (cache c1, 3 steps)"][0] == "90.00 (n=1)" and rows["single (cache c1, 4 steps)"][0] == \
        "50.00 ± 14.14 (n=2)"


def test_table1_sets_side_by_side_only_runs_of_one_prompt_set(tmp_path):
    """Runs of a family evaluated on other prompts (another prompt set) never share a cell: the column
    splits by prompt set and the note names the set of every column."""
    root = tmp_path / "ps"
    for method in ("single", "perceiver"):
        _with(make_run(root, f"{method}-a", method=method, acc=0.4), prompt_set="aaaaaaaaaaaaaaaa")
        _with(make_run(root, f"{method}-g", method=method, family="gsm8k", cache="g", acc=0.2), prompt_set="gggggggg0000")
    _with(make_run(root, "single-b", method="single", seed=1, cache="c9", acc=0.8), prompt_set="bbbbbbbbbbbbbbbb")
    t = table1(load_runs([root]))
    assert t.columns == ["arithmetic [prompts aaaaaaaa]", "arithmetic [prompts bbbbbbbb]", "gsm8k"]
    assert dict(t.rows)["single"] == ["40.00 (n=1)", "80.00 (n=1)", "20.00 (n=1)"]
    assert dict(t.rows)["perceiver"][0] == "40.00 (n=1)" and dict(t.rows)["perceiver"][2] == "20.00 (n=1)"
    assert dict(t.rows)["perceiver"][1] != "80.00 (n=1)"  # no perceiver run saw prompt set b
    assert "arithmetic [prompts aaaaaaaa] aaaaaaaaaaaa" in t.note and "gsm8k gggggggg0000" in t.note


def test_spearman_and_figure4_leave_out_ablations_and_give_the_mean_over_settings(tmp_path):
    from analyze.plots import figure4

    root = tmp_path / "sp"
    make_run(root, "r1", seed=0, rewards=(0.1, 0.2, 0.3, 0.4), entropy=(1.0, 0.9, 0.8, 0.7))  # -1
    make_run(root, "lo", family="logic", cache="c2", rewards=(0.1, 0.2, 0.3, 0.4), entropy=(0.9, 0.6, 0.7, 0.8))  # -.2
    make_run(root, "m4", seed=1, m=4, rewards=(0.1, 0.2, 0.3, 0.4), entropy=(0.4, 0.6, 0.7, 0.9))  # m sweep: +1
    make_run(root, "m16", seed=2, m=16, rewards=(0.1, 0.2, 0.3, 0.4), entropy=(0.4, 0.6, 0.7, 0.9))
    runs = load_runs([root])
    t, means = spearman_table(runs)
    assert {r.name for r in t.sources} == {"r1", "lo"} and len(t.rows) == 2
    assert "Mean ρ over all 2 runs: -0.600 (paper: -0.48;" in t.note  # (-1 + -0.2) / 2
    assert "mean of the 2 setting means: -0.600" in t.note
    assert [x for x in t.raw if x["setting"] == "all runs"][0]["spearman"] == pytest.approx(-0.6)
    used = figure4(runs, tmp_path / "f4.png", rho=means)
    assert {r.name for r in used} == {"r1", "lo"}


def test_spearman_overall_is_the_mean_over_runs(tmp_path):
    """Two arithmetic seeds at -1 and one logic run at -0.2: the paper's number is the mean over the
    three runs; the mean of setting means weighs the one logic run as much as both arithmetic runs."""
    root = tmp_path / "sp2"
    for s_ in range(2):
        make_run(root, f"a{s_}", seed=s_, rewards=(0.1, 0.2, 0.3, 0.4), entropy=(1.0, 0.9, 0.8, 0.7))
    make_run(root, "lo", family="logic", cache="c2", rewards=(0.1, 0.2, 0.3, 0.4), entropy=(0.9, 0.6, 0.7, 0.8))
    t, means = spearman_table(load_runs([root]))
    lo = spearman([0.1, 0.2, 0.3, 0.4], [0.9, 0.6, 0.7, 0.8])
    assert lo == pytest.approx(-0.2)
    assert [x for x in t.raw if x["setting"] == "all runs"][0]["spearman"] == pytest.approx((-1 - 1 + lo) / 3)
    assert f"Mean ρ over all 3 runs: {(-2 + lo) / 3:+.3f}" in t.note
    assert f"mean of the 2 setting means: {(-1 + lo) / 2:+.3f}" in t.note


@pytest.mark.slow
def test_report_sets_aside_copies_and_keeps_names_unique(tmp_path):
    """The main setting's run copied into two sweep folders is one run (named as set aside); two
    folders of one name under parents of one name stay two runs with two names."""
    from analyze.runs import distinct_runs

    root = tmp_path / "sweeps"
    make_run(root / "table1", "p-s0", acc=0.6)
    make_run(root / "table2", "p-s0", acc=0.6)  # the same condition and seed: a copy
    make_run(root / "x" / "deep", "s", method="single", acc=0.5)
    make_run(root / "y" / "deep", "s", method="single", seed=1, acc=0.7)
    runs = load_runs([root])
    assert sorted(r.name for r in runs) == ["table1/p-s0", "table2/p-s0", "x/deep/s", "y/deep/s"]
    kept, aside = distinct_runs(runs)
    assert aside == [("table2/p-s0", "table1/p-s0")] and len(kept) == 3
    code, out = _report(root, "--out", tmp_path / "rep")
    assert code == 0, out
    t1 = (tmp_path / "rep" / "table1.md").read_text()
    assert "| perceiver | 60.00 (n=1) |" in t1 and "| single | 60.00 ± 14.14 (n=2) |" in t1  # copy: not n=2
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "Copies set aside (the same condition and seed as a run kept): table2/p-s0 (= table1/p-s0)." in summary


@pytest.mark.slow
def test_runs_of_other_dtypes_never_share_a_cell_and_tables_name_their_dtype(tmp_path):
    root = tmp_path / "dt"
    _with(make_run(root, "p-bf", acc=0.8), dtype="auto", dtype_resolved="bfloat16")
    _with(make_run(root, "p-f32", seed=1, acc=0.2), dtype="auto", dtype_resolved="float32")
    rows = dict(table1(load_runs([root])).rows)
    assert rows["perceiver [dtype_resolved=bfloat16]"] == ["80.00 (n=1)"]
    assert rows["perceiver [dtype_resolved=float32]"] == ["20.00 (n=1)"]
    code, out = _report(root, "--out", tmp_path / "rep")
    assert code == 0, out
    assert "Dtypes (never pooled in one cell): bfloat16 (p-bf); float32 (p-f32)." in \
        (tmp_path / "rep" / "table1.md").read_text()
    # `auto` that resolved to float32 and float32 asked by name trained alike: one cell
    _with(make_run(root, "p-f32-named", seed=2, acc=0.4), dtype="float32", dtype_resolved="float32")
    rows = dict(table1(load_runs([root])).rows)
    assert rows["perceiver [dtype_resolved=float32]"] == ["30.00 ± 14.14 (n=2)"]


# ---------------------------------------------------------------------------------------------
# Per-prompt records: paired intervals, expert ablations, routing per dataset (hand-worked).


def write_eval_records(d, rows, condition="with", step=4, name="eval_records.jsonl", tasks=("t1", "t1", "t2", "t2"),
             util=None):
    recs = [{"step": step, "kind": "full", "prompt": i, "question_sha": f"q{i}", "task": tasks[i], "split": "val",
             "condition": condition, "sample": 0, "correct": bool(c), "reward": float(c), "completion_tokens": 3,
             "truncated": False, "completion": "x", **({"utilization": util[i], "entropy": 0.5} if util else {})}
            for i, c in enumerate(rows)]
    with open(d / name, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))


def test_paired_tables_hand_worked(tmp_path):
    """One seed a side: diff ± z sd(d)/sqrt(n). perceiver [1,1,1,0] vs single [0,1,1,0]: d = [1,0,0,0],
    var 1/4, half-width 1.96 * 0.25 = 0.49: [-24.0, +74.0] (inside [-1, 1], what unpaired seeds allow). With C [1,1,1,0] vs without [0,0,1,0]:
    d = [1,1,0,0], var 1/3, half-width 1.96 * sqrt(1/12) = 0.566: [-6.6, +106.6], past both ends the
    per-question differences allow ([0, 1]), which the cell says. t2: d = [0, 0], nothing varies."""
    from analyze.records import paired_tables

    root = tmp_path / "pr"
    p = make_run(root, "p", acc=0.75)
    write_eval_records(p, [1, 1, 1, 0])
    write_eval_records(p, [0, 0, 1, 0], condition="without")
    write_eval_records(p, [0, 0, 0, 0], step=2)  # an earlier evaluation: not read
    s = make_run(root, "s", method="single", acc=0.5)
    write_eval_records(s, [0, 1, 1, 0])
    fam, per_task = paired_tables(load_runs([root]))
    rows = dict(fam.rows)
    assert rows["perceiver − single"] == ["+25.0 [-24.0, +74.0]† (1 v 1 seed, 4 distinct questions)"]
    assert rows["perceiver: with C − without C"] == ["+50.0 [-6.6, +106.6]† (1 seed, 4 distinct questions; a bound is "
                                                     "past what the scores allow, [+0.0, +100.0])"]
    assert "t² V_seed" in fam.note and "one cluster" in fam.note and "conditional on the trained" in fam.note
    tasks = dict(per_task.rows)
    assert tasks["arithmetic / t1"][0].startswith("+50.0 [-48.0, +148.0]† (1 v 1 seed, 2 distinct questions")  # d = [1, 0]
    assert tasks["arithmetic / t2"][0] == "+0.0, n too small for an interval (1 v 1 seed, 2 distinct questions)"


def test_paired_rows_are_one_setting_and_each_family_has_its_single(tmp_path):
    """Two perceiver teams on one family's prompts never share a row; a second family's methods are
    compared with that family's own single runs (today only one family got a difference)."""
    from analyze.records import paired_tables

    root = tmp_path / "teams"
    write_eval_records(_with(make_run(root, "p-a", acc=1.0), experts=["a", "b"]), [1, 1, 1, 1])
    write_eval_records(_with(make_run(root, "p-b", acc=0.0), experts=["c", "d"]), [0, 0, 0, 0])
    write_eval_records(make_run(root, "s", method="single", acc=0.5), [1, 0, 1, 0])
    write_eval_records(make_run(root, "p-lo", family="logic", cache="c2", acc=1.0), [1, 1, 1, 1])
    write_eval_records(make_run(root, "s-lo", method="single", family="logic", cache="c2", acc=0.0), [0, 0, 0, 0])
    fam, _ = paired_tables(load_runs([root]))
    assert fam.columns == ["arithmetic", "logic"]
    rows = dict(fam.rows)
    a = rows["perceiver [experts=['a', 'b']] − single"]
    b = rows["perceiver [experts=['c', 'd']] − single"]
    assert a[0].startswith("+50.0 ") and b[0].startswith("-50.0 ")  # not pooled into +0.0
    main = rows["perceiver [experts=['math', 'code', 'general']] − single"]
    assert main == ["—", "+100.0, n too small for an interval (1 v 1 seed, 4 distinct questions)"]
    # a single run of another dtype is no comparison for a bf16 perceiver: the cell says so
    _with(root / "p-lo", dtype_resolved="bfloat16")
    _with(root / "s-lo", dtype_resolved="float32")
    fam, _ = paired_tables(load_runs([root]))
    rows = dict(fam.rows)
    bf = [k for k in rows if "dtype_resolved=bfloat16" in k and k.endswith("− single")]
    assert len(bf) == 1 and rows[bf[0]] == ["—", "no single run with the same settings"], rows


def test_paired_tables_carry_seed_variance(tmp_path):
    """3 seeds a side whose accuracies spread: the interval carries the seeds (counted, no †), and
    with − without C is given per seed and pooled over the seeds."""
    from analyze.records import paired_tables

    root = tmp_path / "seeds"
    rows_p = ([1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0])
    rows_s = ([1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0])
    for s in range(3):
        p = make_run(root, f"p{s}", seed=s)
        write_eval_records(p, rows_p[s], tasks=("t1",) * 8)
        write_eval_records(p, [0] * 8, condition="without", tasks=("t1",) * 8)
        write_eval_records(make_run(root, f"s{s}", method="single", seed=s), rows_s[s], tasks=("t1",) * 8)
    fam, _ = paired_tables(load_runs([root]))
    rows = dict(fam.rows)
    cell_ = rows["perceiver − single"][0]
    assert cell_.startswith("+33.3 [") and cell_.endswith("] (3 v 3 seeds, 8 distinct questions)")
    lo, hi = (float(x) for x in cell_.split("[")[1].split("]")[0].split(", "))
    assert hi - lo > 30  # seeds 25 points apart: wide
    assert "(3 seeds, 8 distinct questions" in rows["perceiver: with C − without C"][0]
    per_seed = rows["perceiver: with C − without C, per seed"][0]
    assert per_seed.startswith("seed 0: +75.0 [") and "seed 1: +50.0 [" in per_seed and "seed 2: +87.5 [" in per_seed


def eval_folder(run, name, **settings):
    ev = run / "eval" / name
    ev.mkdir(parents=True)
    base = {"split": "val", "checkpoint": "final", "n_prompts": 4, "limit": None, "samples": 1, "temperature": None,
            "decoding": "greedy", "seed": 0, "dtype": "float32"}
    (ev / "summary.json").write_text(json.dumps({**base, **settings}))
    return ev


def test_ablation_rows_are_one_evaluation_setting_and_seeds_count_runs(tmp_path):
    """A run's bf16 and float32 folders are two rows, never averaged; two folders of one run and setting
    are one seed; without a single run evaluated in that setting, "ablated − single" is —."""
    from analyze.records import ablation_table

    root = tmp_path / "ab2"
    p = make_run(root, "p", acc=0.75)
    for name, dtype, rows in (("f32", "float32", [1, 1, 1, 1]), ("bf16", "bfloat16", [0, 0, 0, 0])):
        ev = eval_folder(p, name, dtype=dtype)
        write_eval_records(ev, [1, 1, 1, 1], name="records.jsonl")
        write_eval_records(ev, rows, condition="drop:math", name="records.jsonl")
    ev = eval_folder(p, "f32-again")  # the same setting again: the same run, not a second seed
    write_eval_records(ev, [1, 1, 1, 1], name="records.jsonl")
    write_eval_records(ev, [1, 1, 1, 1], condition="shuffle:math", name="records.jsonl")
    s = make_run(root, "s", method="single", acc=0.5)
    write_eval_records(eval_folder(s, "final-val", dtype="bfloat16"), [0, 1, 1, 0], name="records.jsonl")
    rows = dict(ablation_table(load_runs([root])).rows)
    f32 = rows["arithmetic / perceiver / math, code, general / drop:math [val, final, float32, greedy, 4 prompts]"]
    bf16 = rows["arithmetic / perceiver / math, code, general / drop:math [val, final, bfloat16, greedy, 4 prompts]"]
    assert f32[0] == "1" and f32[2].startswith("100.0 ") and f32[4] == "—"
    assert bf16[2].startswith("0.0 ") and bf16[4].startswith("-50.0 ")
    sh = rows["arithmetic / perceiver / math, code, general / shuffle:math [val, final, float32, greedy, 4 prompts]"]
    assert sh[0] == "1"


def test_ablation_table_reads_musk_eval_folders(tmp_path):
    from analyze.records import ablation_table, routing_table

    root = tmp_path / "ab"
    p = make_run(root, "p", acc=0.75)
    write_eval_records(p, [1, 1, 1, 0], util=[[0.6, 0.3, 0.1], [0.4, 0.4, 0.2], [0.2, 0.2, 0.6], [0.2, 0.4, 0.4]])
    ev = eval_folder(p, "final-val-drop_math")
    write_eval_records(ev, [1, 1, 1, 0], name="records.jsonl")
    write_eval_records(ev, [0, 1, 1, 0], condition="drop:math", name="records.jsonl")
    s = make_run(root, "s", method="single", acc=0.5)
    write_eval_records(s, [1, 1, 1, 1])  # single's training-time evaluation: not what the ablation is set against
    write_eval_records(eval_folder(s, "final-val"), [0, 1, 1, 0], name="records.jsonl")
    runs = load_runs([root])
    t = ablation_table(runs)
    label = "arithmetic / perceiver / math, code, general / drop:math [val, final, float32, greedy, 4 prompts]"
    assert dict(t.rows)[label] == [
        "1", "75.0 (1 run, 4 distinct questions)", "50.0 (1 run, 4 distinct questions)",
        "-25.0 [-74.0, +24.0]† (1 seed, 4 distinct questions; a bound is past what the scores allow, [-100.0, +0.0])",
        "+0.0, n too small for an interval (1 v 1 seed, 4 distinct questions)",
        "—"]  # one seed: its interval is the pooled one
    r = dict(routing_table(runs).rows)
    assert r["arithmetic / perceiver / all"] == ["1", "math: 0.350, code: 0.325, general: 0.325"]
    assert r["arithmetic / perceiver / t1"] == ["1", "math: 0.500, code: 0.350, general: 0.150"]


def test_ablation_table_gives_each_seed_its_own_paired_change(tmp_path):
    """Content controls per seed: seed 0 loses question 0 under the shuffle (-25 points), seed 1 loses
    nothing ('n too small': a zero-width interval); with two seeds the pooled cell gives one interval a
    seed and no pooled one."""
    from analyze.records import ablation_table

    root = tmp_path / "ab3"
    for s, (with_c, shuffled) in enumerate((([1, 1, 1, 0], [0, 1, 1, 0]), ([1, 1, 0, 0], [1, 1, 0, 0]))):
        ev = eval_folder(make_run(root, f"p{s}", seed=s), "final-val")
        write_eval_records(ev, with_c, name="records.jsonl")
        write_eval_records(ev, shuffled, condition="shuffle:math", name="records.jsonl")
    row = dict(ablation_table(load_runs([root])).rows)[
        "arithmetic / perceiver / math, code, general / shuffle:math [val, final, float32, greedy, 4 prompts]"]
    assert row[0] == "2" and row[3].endswith("(2 seeds, 4 distinct questions)")
    assert row[3].startswith("-12.5, two seeds: no pooled interval; first seed: -25.0 [-74.0, +24.0]†; second seed: +0.0, n too small")
    assert row[5] == ("seed 0: -25.0 [-74.0, +24.0]† (1 v 1 seed, 4 distinct questions); seed 1: +0.0, n too small "
                      "for an interval (1 v 1 seed, 4 distinct questions)")


def test_table1_per_dataset_from_records(tmp_path):
    from analyze.records import table1_per_task

    root = tmp_path / "pt"
    for s, rows in enumerate(([1, 1, 1, 0], [1, 0, 0, 0])):
        write_eval_records(make_run(root, f"p{s}", seed=s), rows)
    t = table1_per_task(load_runs([root]))
    assert t.columns == ["arithmetic / t1", "arithmetic / t2"]
    # t1: seeds 1.0 and 0.5 -> 75 ± 35.36; t2: 0.5 and 0 -> 25 ± 35.36
    assert dict(t.rows)["perceiver"] == ["75.00 ± 35.36 (n=2)", "25.00 ± 35.36 (n=2)"]
    assert "(% of distinct questions)" in t.title and "counts prompts" in t.note
    assert "(% of prompts)" in table1(load_runs([root])).title


def test_figure4_baseline_is_the_mean_of_the_first_window():
    """Step 1 alone is one noisy batch: the change is measured from the mean of the first w steps."""
    from analyze.plots import change_from_start

    u = [[0.9, 0.1], [0.5, 0.5], [0.4, 0.6], [0.6, 0.4]]
    d = change_from_start(u, 2)  # baseline (0.7, 0.3)
    assert d.ravel().tolist() == pytest.approx([0.2, -0.2, -0.2, 0.2, -0.3, 0.3, -0.1, 0.1])
    assert change_from_start([1.0, 2.0, 3.0], 1).tolist() == [0.0, 1.0, 2.0]


def test_prefix_control_matches_m_not_the_most_runs(tmp_path):
    """perceiver (m = 8, 3 seeds) − prefix: the prefix condition with m = 8 (1 run), not the one with
    m = 4 (4 runs); without an m = 8 prefix the cell says that no control has the same settings."""
    from analyze.records import paired_tables

    root = tmp_path / "pm"
    for s in range(3):
        write_eval_records(make_run(root, f"p{s}", seed=s), [1, 1, 1, 0])
    write_eval_records(make_run(root, "x8", method="prefix", m=8), [1, 0, 0, 0])
    for s in range(4):
        write_eval_records(make_run(root, f"x4-{s}", method="prefix", m=4, seed=s), [1, 1, 1, 1])
    fam, _ = paired_tables(load_runs([root]))
    raw = [x for x in fam.raw if x["comparison"] == "perceiver − prefix"]
    assert raw[0]["seeds_b"] == 1 and raw[0]["diff"] == pytest.approx(0.5)  # 75% v the m = 8 prefix's 25%
    import shutil

    shutil.rmtree(root / "x8")
    fam, _ = paired_tables(load_runs([root]))
    assert dict(fam.rows)["perceiver − prefix"] == ["no prefix run with the same settings"]
    assert "m for prefix" in fam.note


def test_report_knows_which_keys_each_method_reads():
    """The report's copy of the keys a method reads is train.config's (analyze sits below train/)."""
    from analyze.runs import METHOD_KEYS
    from train.config import METHOD_KEYS as TRAIN_KEYS

    assert METHOD_KEYS == TRAIN_KEYS
