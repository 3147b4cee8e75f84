"""How fast a run learns: the first training step at which its held-out accuracy reaches a level, read
from the evaluations it made while training (eval.jsonl: the Figure 5 curve and the full evaluations)."""

from __future__ import annotations

from collections import defaultdict

from analyze.runs import SCHEDULE, Run
from analyze.tables import Table, method_label

LEVEL = 0.5


def first_step_reaching(run: Run, level: float = LEVEL) -> int | None:
    """The first step whose held-out evaluation with C has accuracy >= level (curve or full evaluations,
    whichever came first), or None when no evaluation reached it. Units: optimizer steps (recipe warm-up
    steps included)."""
    if run.evals.is_empty() or "accuracy" not in run.evals.columns:
        return None
    rows = run.evals.drop_nulls("accuracy").sort("step")
    hit = rows.filter(rows["accuracy"] >= level)
    return int(hit["step"][0]) if len(hit) else None


def speed_table(runs: list[Run], level: float = LEVEL) -> Table:
    """One row per method and setting (as Table 1 keys them), one cell per seed: the first step at which
    held-out accuracy with C reached `level` ('—' never, within the run's steps), and the steps evaluated."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        if not r.evals.is_empty():
            groups[(r.family, r.method, r.condition_without("cache_fingerprint", "prompt_set", *SCHEDULE,
                                                            steps=False))].append(r)
    rows, raw = [], []
    for key in sorted(groups):
        rs = sorted(groups[key], key=lambda r: r.config.get("seed", 0))
        cells = []
        for r in rs:
            step = first_step_reaching(r, level)
            evaluated = sorted(set(int(s) for s in r.evals["step"].to_list()))
            cells.append(f"s{r.config.get('seed')}: {step if step is not None else '—'}")
            raw.append({"row": f"{key[0]} / {key[1]}", "seed": r.config.get("seed"), "first_step": step,
                        "steps_evaluated": ";".join(map(str, evaluated)), "run": r.name})
        rows.append((f"{key[0]} / {method_label(key[1], rs[0].config, [])}", ["; ".join(cells)]))
    note = (f"The first optimizer step (warm-up steps included) at which held-out accuracy with C reached "
            f"{100 * level:.0f}%, per seed, among the steps the run evaluated (curve_freq and test_freq); '—': never.")
    return Table(f"Steps to {100 * level:.0f}% held-out accuracy", ["first step, per seed"], rows, raw,
                 [r for rs in groups.values() for r in rs], note)
