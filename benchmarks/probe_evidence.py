"""The probe tables of docs/results.md from run folders made by benchmarks/evidence.sh: per seed, held-out
accuracy with C, with C removed and with probe-oracle's features from another question, the oracle
control's conditional interval, the first step at 50% held-out accuracy and the share of groups whose
rewards were all equal (no GRPO gradient); pooled, the seed-and-question intervals of with C - shuffled
oracle (paired seeds), of each method against the prefix control of the same recipe, and of each
accuracy against chance 1/k (a fixed row). Reads saved per-sample records only (no model is loaded).

    python benchmarks/probe_evidence.py RUNS_DIR... [--chance 0.25] [--eval final-val-ablations]
        [--control shuffle:probe-oracle]

--control names the content control (a `musk eval --ablate` condition): the oracle shuffled on a probe
team, shuffle:all (every expert from another question of the task) on a real team.

Prints Markdown. A run without the eval folder is skipped and named.
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
from analyze.runs import discover, load_run  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--chance", type=float, default=None, help="1/k of a label probe: accuracies against it")
    ap.add_argument("--eval", default="final-val-ablations", help="the musk eval folder under each RUN/eval/")
    ap.add_argument("--control", default=ORACLE, help="the content control: a musk eval --ablate condition")
    args = ap.parse_args()
    ctl, name = args.control, args.control.replace("shuffle:", "") + " shuffled"
    runs = [load_run(p) for p in discover(args.runs)]
    groups = defaultdict(list)
    for r in runs:
        if records(r, args.eval):
            groups[r.label].append(r)
        else:
            print(f"(skipped {r.name}: no eval/{args.eval})")
    by_label = {}
    for label, rs in sorted(groups.items()):
        rs.sort(key=lambda r: r.config.get("seed", 0))
        print(f"\n**{label}** ({rs[0].family}, {rs[0].config.get('dtype_resolved')}, {len(rs)} seeds, eval/{args.eval})\n")
        print(f"| seed | with C % | C removed % | {name} % | with C − {name} (conditional) "
              "| first step at 50% | share of groups with equal rewards |\n|---|---|---|---|---|---|---|")
        per_seed = []
        for r in rs:
            line, conds = seed_row(r, args.eval, ctl)
            print(line)
            per_seed.append(conds)
        by_label[label] = per_seed
        if all(c[ctl] for c in per_seed):
            pooled = seeds_cell([c["with"] for c in per_seed], [c[ctl] for c in per_seed], paired_seeds=True)[0]
            print(f"\npooled with C − {name}: {pooled}")
        if args.chance is not None:
            for cond in ("with", "without"):
                qs = sorted(per_seed[0][cond])
                if qs:
                    chance = {q: args.chance for q in qs}
                    print(f"{cond} − chance {100 * args.chance:.0f}%: {seeds_cell([c[cond] for c in per_seed], [chance], fixed_b=True)[0]}")
    for label, per_seed in by_label.items():
        method, _, recipe = label.partition(" + ")
        control = "prefix" + (f" + {recipe}" if recipe else "")
        if method != "prefix" and control in by_label:
            cell = seeds_cell([c["with"] for c in per_seed], [c["with"] for c in by_label[control]])[0]
            print(f"\n{label} − {control}: {cell}")


if __name__ == "__main__":
    main()
