"""Steps to a held-out accuracy level, and recipe runs named as their own methods in the report."""

from pathlib import Path

import polars as pl

from analyze.curves import first_step_reaching, speed_table
from analyze.runs import Run
from analyze.tables import method_label


def _run(name, seed, evals, **config):
    cfg = {"method": "perceiver", "seed": seed, "task_family": "secret-label", **config}
    return Run(name, Path(name), cfg, {}, pl.DataFrame(), pl.DataFrame(evals))


def test_first_step_reaching_reads_the_first_evaluation_at_or_above_the_level():
    r = _run("a", 0, [{"step": 10, "accuracy": 0.25}, {"step": 20, "accuracy": 0.5}, {"step": 30, "accuracy": 0.9},
                      {"step": 25, "accuracy": 0.49}])
    assert first_step_reaching(r) == 20
    assert first_step_reaching(r, 0.6) == 30
    assert first_step_reaching(r, 0.95) is None
    assert first_step_reaching(_run("b", 0, [])) is None


def test_speed_table_one_cell_per_seed_and_recipe_rows_apart():
    runs = [_run("p0", 0, [{"step": 10, "accuracy": 0.6}]), _run("p1", 1, [{"step": 10, "accuracy": 0.1}]),
            _run("w0", 0, [{"step": 10, "accuracy": 0.7}], sft_warmup_steps=20, sft_warmup_train="context")]
    t = speed_table(runs)
    rows = dict(t.rows)
    assert rows["secret-label / perceiver"] == ["s0: 10; s1: —"]
    assert rows["secret-label / perceiver + sft-warmup 20 (context, KL to base)"] == ["s0: 10"]


def test_a_recipe_row_is_never_labelled_as_the_paper_method():
    assert method_label("perceiver", {"sft_warmup_steps": 0, "sft_mix_coef": 0.0}, []) == "perceiver"
    assert method_label("prefix", {"sft_mix_coef": 0.5, "sft_mix_steps": 30}, ["sft_mix_coef"]) == "prefix + sft-mix 0.5/30"
    assert method_label("prefix", {"sft_warmup_steps": 5, "num_latents": 4}, ["num_latents"]) == \
        "prefix + sft-warmup 5 (context, KL to base) [num_latents=4]"


def test_the_report_reads_a_recipe_run_whose_first_steps_are_warm_up(tmp_path):
    """Warm-up steps log no reward and no routing: the collaboration table and Figure 4 read the GRPO
    steps only (a report on recipe runs used to stop on the warm-up's missing values)."""
    from analyze.plots import figure4
    from analyze.tables import collaboration_table

    warm = [{"step": s, "stage": "sft-warmup", "sft/nll": 1.0} for s in (1, 2)]
    grpo = [{"step": s, "reward/mean": 0.5, "routing/entropy": 1.0 - 0.1 * s,
             "routing/utilization": [0.5, 0.5]} for s in (3, 4, 5, 6)]
    metrics = pl.DataFrame(warm + grpo, infer_schema_length=None)
    run = Run("w0", tmp_path, {"method": "perceiver", "seed": 0, "task_family": "secret-label",
                               "experts": ["a", "b"], "sft_warmup_steps": 2}, {"final_val_accuracy": 0.5},
              metrics, pl.DataFrame())
    t = collaboration_table([run])
    assert any("0.700 → 0.400" in c for _, cells in t.rows for c in cells)
    assert figure4([run], tmp_path / "f4.png", "perceiver") is not None
