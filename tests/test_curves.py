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
    assert rows["secret-label / perceiver + sft-warmup 20 (context)"] == ["s0: 10"]


def test_a_recipe_row_is_never_labelled_as_the_paper_method():
    assert method_label("perceiver", {"sft_warmup_steps": 0, "sft_mix_coef": 0.0}, []) == "perceiver"
    assert method_label("prefix", {"sft_mix_coef": 0.5, "sft_mix_steps": 30}, ["sft_mix_coef"]) == "prefix + sft-mix 0.5/30"
    assert method_label("prefix", {"sft_warmup_steps": 5, "num_latents": 4}, ["num_latents"]) == \
        "prefix + sft-warmup 5 (context) [num_latents=4]"
