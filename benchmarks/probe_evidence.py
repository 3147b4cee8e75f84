"""The probe tables of docs/results.md from run folders made by benchmarks/evidence.sh: per seed, held-out
accuracy with C, with C removed and with probe-oracle's features from another question, the oracle
control's conditional interval, the first step at 50% held-out accuracy and the share of groups whose
rewards were all equal (no GRPO gradient); pooled, the seed-and-question intervals of with C - shuffled
oracle (paired seeds), of each method against the prefix control trained like it (the same recipe and
every other key both read), and of each accuracy against chance 1/k (a fixed row). A table holds one
condition (every config key but the seed): runs that share a method and recipe but differ in another
key are two tables, named by the keys that differ. Reads saved per-sample records only (no model is
loaded).

    python benchmarks/probe_evidence.py RUNS_DIR... [--chance 0.25] [--eval final-val-ablations]
        [--control shuffle:probe-oracle]

--control names the content control (a `musk eval --ablate` condition): the oracle shuffled on a probe
team, shuffle:all (every expert from another question of the task) on a real team.

Prints Markdown. A run without the eval folder is skipped and named; a folder with no runs exits 1 with a
message.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyze.curves import first_step_reaching  # noqa: E402
from analyze.records import per_prompt, seeds_cell  # noqa: E402
from analyze.runs import NOT_A_CONDITION, discover, load_run, unmatched_keys  # noqa: E402
from analyze.tables import differing_keys, method_label  # noqa: E402
from core.errors import MuskError  # noqa: E402

ORACLE = "shuffle:probe-oracle"  # the default control; --control names another


def records(run, folder: str) -> list[dict]:
    path = run.path / "eval" / folder / "records.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def pct(scores: dict) -> str:
    return f"{100 * np.mean(list(scores.values())):.1f}" if scores else "—"


def seed_row(run, folder: str, control: str = ORACLE) -> tuple[str, dict]:
    recs = records(run, folder)
    conds = {c: per_prompt(recs, c) for c in ("with", "without", control)}
    oracle = seeds_cell([conds["with"]], [conds[control]])[0] if conds[control] else "—"
    zero = run.metrics["frac_reward_zero_std"].drop_nulls().mean() if "frac_reward_zero_std" in run.metrics.columns else None
    step = first_step_reaching(run)
    cells = [str(run.config.get("seed")), pct(conds["with"]), pct(conds["without"]), pct(conds[control]), oracle,
             str(step) if step is not None else "—", f"{zero:.2f}" if zero is not None else "—"]
    return "| " + " | ".join(cells) + " |", conds


def group_names(groups: dict) -> dict:
    """Each condition's name: its label (method and recipe), with the config keys on which runs of the same
    label differ ('perceiver + sft-warmup 600 (context, KL to warm-up end) [router_lr=0.001]'), so two
    conditions never print, or pool, as one."""
    by_label = defaultdict(list)
    for key, rs in groups.items():
        by_label[rs[0].label].append(key)
    names = {}
    for label, keys in by_label.items():
        configs = [groups[k][0].config for k in keys]
        differ = differing_keys(configs, set(NOT_A_CONDITION)) if len(keys) > 1 else []
        for k, config in zip(keys, configs):
            names[k] = method_label(groups[k][0].method, config, differ)
    return names


def matched_prefix(run, groups: dict):
    """The condition of the prefix control trained like `run`: every key both methods read equal, the seed
    apart (analyze.runs.unmatched_keys), on the same cache, in the same dtype, to the same step. None for a
    prefix run or when no prefix group matches."""
    if run.method == "prefix":
        return None
    same = ("cache_fingerprint", "dtype_resolved")
    for key, rs in groups.items():
        c = rs[0]
        if (c.method == "prefix" and c.recipe == run.recipe and c.steps == run.steps and not unmatched_keys(run, c)
                and all(c.config.get(k) == run.config.get(k) for k in same)):
            return key
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--chance", type=float, default=None, help="1/k of a label probe: accuracies against it")
    ap.add_argument("--eval", default="final-val-ablations", help="the musk eval folder under each RUN/eval/")
    ap.add_argument("--control", default=ORACLE, help="the content control: a musk eval --ablate condition")
    args = ap.parse_args()
    ctl, name = args.control, args.control.replace("shuffle:", "") + " shuffled"
    runs = [load_run(p) for p in discover(args.runs)]
    groups = defaultdict(list)  # one group per condition (every config key but the seed), never per label
    for r in runs:
        if records(r, args.eval):
            groups[r.condition].append(r)
        else:
            print(f"(skipped {r.name}: no eval/{args.eval})")
    names = group_names(groups)
    by_condition = {}
    for key, rs in sorted(groups.items(), key=lambda kv: names[kv[0]]):
        rs.sort(key=lambda r: r.config.get("seed", 0))
        print(f"\n**{names[key]}** ({rs[0].family}, {rs[0].config.get('dtype_resolved')}, {len(rs)} seeds, eval/{args.eval})\n")
        print(f"| seed | with C % | C removed % | {name} % | with C − {name} (conditional) "
              "| first step at 50% | share of groups with equal rewards |\n|---|---|---|---|---|---|---|")
        per_seed = []
        for r in rs:
            line, conds = seed_row(r, args.eval, ctl)
            print(line)
            per_seed.append(conds)
        by_condition[key] = per_seed
        if all(c[ctl] for c in per_seed):
            pooled = seeds_cell([c["with"] for c in per_seed], [c[ctl] for c in per_seed], paired_seeds=True)[0]
            print(f"\npooled with C − {name}: {pooled}")
        if args.chance is not None:
            for cond in ("with", "without"):
                qs = sorted(per_seed[0][cond])
                if qs:
                    chance = {q: args.chance for q in qs}
                    print(f"{cond} − chance {100 * args.chance:.0f}%: {seeds_cell([c[cond] for c in per_seed], [chance], fixed_b=True)[0]}")
    for key, per_seed in by_condition.items():
        control = matched_prefix(groups[key][0], groups)
        if control is not None:
            cell = seeds_cell([c["with"] for c in per_seed], [c["with"] for c in by_condition[control]])[0]
            print(f"\n{names[key]} − {names[control]}: {cell}")

if __name__ == "__main__":
    try:
        main()
    except MuskError as e:  # a folder with no runs, a run folder that does not load: a message, not a traceback
        sys.exit(f"probe_evidence: {e}")
