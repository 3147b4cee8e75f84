"""Tables from per-prompt evaluation records: paired differences with bootstrap intervals (method vs
single, with C vs without C, per family and per dataset), expert ablations from `musk eval` folders,
and routing on the evaluation prompts per dataset.

Records come from a run's eval_records.jsonl (its last full evaluation) and from its eval/*/
folders (`musk eval`). Prompts are paired by the question's digest (question_sha), so two runs are
compared only on questions both evaluated. Seeds of one condition are pooled per prompt (the mean of
their scores on it) before the bootstrap resamples prompts.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from analyze.runs import SCHEDULE, Run
from analyze.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, cell, paired_bootstrap
from analyze.tables import FAMILY_ORDER, METHOD_ORDER, ROW_FREE, Table, _differing, _label, _order, ablation_names
from cache.run_folder import EVAL_DIR, EVAL_RECORDS, read_jsonl

CI_NOTE = (f"Paired bootstrap over prompts: {BOOTSTRAP_RESAMPLES} resamples, numpy default_rng seed "
           f"{BOOTSTRAP_SEED}, 95% percentile interval, in accuracy points; seeds are averaged per prompt first. "
           "An interval that excludes 0 is a difference these prompts can tell apart.")


def last_full_records(run: Run) -> list[dict]:
    """The records of the run's last full evaluation (greedy), [] when it kept none."""
    recs = [r for r in read_jsonl(run.path / EVAL_RECORDS) if r.get("kind", "full") == "full"]
    last = max((r["step"] for r in recs), default=None)
    return [r for r in recs if r["step"] == last]


def eval_folders(run: Run) -> list[tuple[Path, dict, list[dict]]]:
    """(folder, summary, records) of each finished `musk eval` folder under RUN/eval/."""
    out = []
    for d in sorted((run.path / EVAL_DIR).glob("*/")) if (run.path / EVAL_DIR).is_dir() else []:
        if (d / "summary.json").is_file() and (d / "records.jsonl").is_file():
            out.append((d, json.loads((d / "summary.json").read_text()), read_jsonl(d / "records.jsonl")))
    return out


def _key(r: dict):
    return r.get("question_sha", r["prompt"])


def per_prompt(records: list[dict], condition: str, task: str | None = None) -> dict:
    """{prompt key: mean correct over the records of `condition` (samples, then seeds pooled)}."""
    acc = defaultdict(list)
    for r in records:
        if r["condition"] == condition and (task is None or r["task"] == task):
            acc[_key(r)].append(float(r["correct"]))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def pooled(per_run: list[list[dict]], condition: str, task: str | None = None) -> dict:
    """Per-prompt scores of several runs (seeds) of one condition: the mean over the runs that have it."""
    acc = defaultdict(list)
    for recs in per_run:
        for k, v in per_prompt(recs, condition, task).items():
            acc[k].append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def paired_cell(a: dict, b: dict) -> tuple[str, dict]:
    common = sorted(set(a) & set(b))
    if not common:
        return "—", {}
    ci = paired_bootstrap([a[k] for k in common], [b[k] for k in common])
    return ci.fmt(), {"diff": ci.diff, "lo": ci.lo, "hi": ci.hi, "n": ci.n}


def shuffled_all_cell(rs: list[Run]) -> tuple[str, dict]:
    """"with C − all experts shuffled" for runs (seeds) of one setting: paired by prompt, seeds pooled,
    from each run's first `musk eval` folder holding both conditions ("—" where none does)."""
    per_run = []
    for r in rs:
        folders = [recs for _, _, recs in eval_folders(r) if {"with", "shuffle:all"} <= {x["condition"] for x in recs}]
        per_run += folders[:1]
    return paired_cell(pooled(per_run, "with"), pooled(per_run, "shuffle:all")) if per_run else ("—", {})


def _rows(runs: list[Run]) -> dict[tuple, list[Run]]:
    """Finished main-setting runs that kept records, one row per method and settings (as Table 1)."""
    rows: dict[tuple, list[Run]] = defaultdict(list)
    ablations = ablation_names(runs)
    for r in runs:
        if r.finished and r.name not in ablations:
            rows[(r.method, r.condition_without("cache_fingerprint", "task_family", "experts", *SCHEDULE,
                                                steps=False))].append(r)
    return rows


def paired_tables(runs: list[Run]) -> list[Table]:
    """Method vs single and with C vs without C: per family, then per dataset."""
    recs = {r.name: last_full_records(r) for r in runs}
    rows = {k: [r for r in rs if recs[r.name]] for k, rs in _rows(runs).items()}
    rows = {k: rs for k, rs in rows.items() if rs}
    families = sorted({r.family for rs in rows.values() for r in rs}, key=lambda f: _order(f, FAMILY_ORDER))
    singles = [rs for k, rs in rows.items() if k[0] == "single"]
    single = max(singles, key=len) if singles else []
    prefixes = [rs for k, rs in rows.items() if k[0] == "prefix"]  # m trainable tokens, no experts
    prefix = max(prefixes, key=len) if prefixes else []
    comparisons = []  # (label, [(runs, condition)], [(runs, condition)])
    keyed = sorted(rows.items(), key=lambda kv: (_order(kv[0][0], METHOD_ORDER), kv[0][1]))
    for (method, _), rs in keyed:
        others = [x[0].config for k, x in rows.items() if k[0] == method and x is not rs]
        label = _label(method, rs[0].config, _differing([rs[0].config] + others, ROW_FREE | set(SCHEDULE))
                       if others else [])
        if method != "single" and single:
            comparisons.append((f"{label} − single", rs, "with", single, "with"))
        if method in ("perceiver", "ffn", "hard-routing") and prefix:  # what the experts add beyond a soft prompt
            comparisons.append((f"{label} − prefix", rs, "with", prefix, "with"))
        if any(r2["condition"] == "without" for r in rs for r2 in recs[r.name]):
            comparisons.append((f"{label}: with C − without C", rs, "with", rs, "without"))
    fam_rows, task_rows, raw = [], defaultdict(list), []
    tasks = {f: sorted({x["task"] for rs in rows.values() for r in rs if r.family == f for x in recs[r.name]})
             for f in families}
    for label, a_runs, a_cond, b_runs, b_cond in comparisons:
        cells = []
        for f in families:
            a = [recs[r.name] for r in a_runs if r.family == f]
            b = [recs[r.name] for r in b_runs if r.family == f]
            txt, fields = paired_cell(pooled(a, a_cond), pooled(b, b_cond)) if a and b else ("—", {})
            cells.append(txt)
            raw.append({"comparison": label, "family": f, "task": "", **fields})
            for t in tasks[f]:
                txt_t, fields_t = paired_cell(pooled(a, a_cond, t), pooled(b, b_cond, t)) if a and b else ("—", {})
                task_rows[(f, t)].append(txt_t)
                raw.append({"comparison": label, "family": f, "task": t, **fields_t})
        fam_rows.append((label, cells))
    used = [r for rs in rows.values() for r in rs]
    note = CI_NOTE + " Read from each run's last full evaluation (eval_records.jsonl)."
    if not comparisons:
        note = "No finished run kept per-prompt evaluation records (eval_records.jsonl): nothing to pair."
    t1 = Table("Paired differences in validation accuracy (points, 95% bootstrap interval)", families, fam_rows,
               [x for x in raw if not x["task"]], used, note)
    labels = [c[0] for c in comparisons]
    t2 = Table("Paired differences per dataset (points, 95% bootstrap interval)", labels,
               [(f"{f} / {t}", cells) for (f, t), cells in task_rows.items()], [x for x in raw if x["task"]], used,
               note)
    return [t1, t2]


def table1_per_task(runs: list[Run]) -> Table:
    """Table 1's rows broken down per dataset: greedy accuracy (%) of each run's last full evaluation on
    the prompts of one dataset, mean ± std over seeds; one column per family / dataset."""
    recs = {r.name: last_full_records(r) for r in runs}
    rows = {k: [r for r in rs if recs[r.name]] for k, rs in _rows(runs).items()}
    rows = {k: rs for k, rs in rows.items() if rs}
    cols = sorted({(r.family, x["task"]) for rs in rows.values() for r in rs for x in recs[r.name]},
                  key=lambda c: (_order(c[0], FAMILY_ORDER), c[1]))
    out, raw, used = [], [], []
    for (method, _), rs in sorted(rows.items(), key=lambda kv: (_order(kv[0][0], METHOD_ORDER), kv[0][1])):
        others = [x[0].config for k, x in rows.items() if k[0] == method and x is not rs]
        label = _label(method, rs[0].config, _differing([rs[0].config] + others, ROW_FREE | set(SCHEDULE))
                       if others else [])
        cells = []
        for fam, task in cols:
            accs = [_mean(per_prompt(recs[r.name], "with", task)) for r in rs if r.family == fam]
            c = cell([a for a in accs if a is not None])
            cells.append(c.fmt())
            raw.append({"row": label, "family": fam, "task": task, "mean": c.mean, "std": c.std, "n": c.n})
        out.append((label, cells))
        used += rs
    note = ("Greedy accuracy with C on each dataset's prompts of the last full evaluation (eval_records.jsonl)."
            if out else "No finished run kept per-prompt evaluation records (eval_records.jsonl).")
    return Table("Table 1 per dataset: final validation accuracy (%), mean ± std across seeds",
                 [f"{f} / {t}" for f, t in cols], out, raw, used, note)


def ablation_table(runs: list[Run]) -> Table:
    """Each expert dropped, shuffled or kept alone (`musk eval` folders beside the runs): accuracy
    with all experts, under the ablation, and the paired change (and against single, where single
    runs have records on the same prompts)."""
    groups: dict[tuple, list[tuple[Run, list[dict]]]] = defaultdict(list)
    for r in runs:
        for _, summary, recs in eval_folders(r):
            settings = (summary.get("split"), summary.get("checkpoint"), summary.get("samples"))
            groups[(r.family, r.method, r.team, r.condition_without(steps=False), settings)].append((r, recs))
    single = defaultdict(list)  # the single runs' last full evaluation, per family
    ablations = ablation_names(runs)
    for r in runs:
        if r.method == "single" and r.finished and r.name not in ablations:
            single[r.family].append(last_full_records(r))
    rows, raw, used = [], [], []
    for key in sorted(groups, key=lambda k: (_order(k[0], FAMILY_ORDER), _order(k[1], METHOD_ORDER), k[2], str(k))):
        family, method, team = key[:3]
        members = groups[key]
        per_run = [recs for _, recs in members]
        conds = list(dict.fromkeys(x["condition"] for recs in per_run for x in recs if ":" in x["condition"]))
        with_c = pooled(per_run, "with")
        for cond in conds:
            ab = pooled(per_run, cond)
            d_with, f_with = paired_cell(ab, with_c)
            d_single, f_single = paired_cell(ab, pooled(single[family], "with")) if single[family] else ("—", {})
            label = f"{family} / {method} / {', '.join(team)} / {cond}"
            rows.append((label, [str(len(members)), _pct(with_c), _pct(ab), d_with, d_single]))
            raw.append({"setting": label, "runs": ";".join(r.name for r, _ in members),
                        "acc_with": _mean(with_c), "acc_ablated": _mean(ab),
                        **{f"vs_with_{k}": v for k, v in f_with.items()},
                        **{f"vs_single_{k}": v for k, v in f_single.items()}})
        used += [r for r, _ in members]
    note = (CI_NOTE + " From `musk eval --ablate` folders (RUN/eval/*): drop removes the expert's token before "
            "g_phi mixes them, shuffle gives it another evaluated prompt's features, only keeps it alone.")
    if not rows:
        note = "No `musk eval --ablate` folder beside the runs: run `musk eval RUN --ablate drop:NAME` to fill this."
    return Table("Expert ablations: accuracy (%) and paired change (points, 95% bootstrap interval)",
                 ["seeds", "acc with all experts", "acc ablated", "ablated − with", "ablated − single"], rows, raw,
                 used, note)


def _mean(scores: dict) -> float | None:
    return float(np.mean(list(scores.values()))) if scores else None


def _pct(scores: dict) -> str:
    return f"{_mean(scores) * 100:.1f} (n={len(scores)})" if scores else "—"


def routing_table(runs: list[Run]) -> Table:
    """u_i per dataset on the evaluation prompts (with C, last full evaluation): mean over the prompts of
    each run, then mean ± std over seeds. One training batch is too few prompts to read routing from."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    ablations = ablation_names(runs)
    for r in runs:
        if r.finished and r.name not in ablations:
            groups[(r.family, r.method, r.team, r.condition)].append(r)
    rows, raw, used = [], [], []
    for key in sorted(groups, key=lambda k: (_order(k[0], FAMILY_ORDER), _order(k[1], METHOD_ORDER), k[2], k[3])):
        family, method, team = key[:3]
        per_task = defaultdict(list)  # task -> [seeds x n]
        for r in groups[key]:
            recs = [x for x in last_full_records(r) if x["condition"] == "with" and "utilization" in x]
            if recs:
                used.append(r)
            for t in sorted({x["task"] for x in recs} | {"all"}):
                sub = [x["utilization"] for x in recs if t in ("all", x["task"])]
                if sub:
                    per_task[t].append(np.mean(sub, axis=0))
        for t, us in sorted(per_task.items(), key=lambda kv: (kv[0] != "all", kv[0])):
            u = np.array(us)  # [seeds, n]
            txt = ", ".join(f"{n}: {u[:, i].mean():.3f}" + (f" ± {u[:, i].std(ddof=1):.3f}" if len(u) > 1 else "")
                            for i, n in enumerate(team))
            rows.append((f"{family} / {method} / {t}", [str(len(u)), txt]))
            raw.append({"family": family, "method": method, "task": t, "seeds": len(u),
                        **{f"u[{n}]": float(u[:, i].mean()) for i, n in enumerate(team)}})
    note = ("u_i = 1/m sum_j A_ji (Eq. 15) per evaluation prompt, averaged over the prompts of a dataset, then "
            "mean ± std over seeds.") if rows else "No run kept routing on its evaluation prompts (eval_records.jsonl)."
    return Table("Routing on the evaluation prompts: utilisation u_i per dataset", ["seeds", "u_i"], rows, raw,
                 used, note)
