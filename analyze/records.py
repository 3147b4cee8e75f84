"""Tables from per-prompt evaluation records: paired differences with bootstrap intervals (method vs
single, with C vs without C, per family and per dataset), expert ablations from `musk eval` folders,
and routing on the evaluation prompts per dataset.

Records come from a run's eval_records.jsonl (its last full evaluation) and from its eval/*/
folders (`musk eval`). Prompts are paired by the question's digest (question_sha), so two runs are
compared only on questions both evaluated. Seeds of one condition are pooled per prompt (the mean of
their scores on it) before the bootstrap resamples prompts.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from analyze.runs import SCHEDULE, Run, dtype_of, unmatched_keys
from analyze.stats import cell, seed_question_interval
from analyze.tables import (FAMILY_ORDER, METHOD_ORDER, ROW_FREE, Table, differing_keys, method_label, order_key, run_prompt_set,
                            ablation_names)
from cache.reader import Cache
from cache.run_folder import EVAL_DIR, EVAL_RECORDS, read_jsonl
from core.errors import MuskError
from core.heldout import problem_key

UNIT = "distinct questions"  # records pair on question_sha: n counts distinct questions, not prompts
CI_NOTE = (f"Differences in accuracy points over {UNIT} (records pair on the question's digest), 95% interval "
           "diff ± sqrt(t² V_seed + z² V_question) from the seeds x questions tables (docs/evaluation.md): the seed "
           "part is the spread of per-seed means (Student's t, Welch-Satterthwaite df), the question part the "
           "spread over questions of the seed-averaged difference less the seed x question noise the seed part "
           "already holds. Questions that are one problem (the held-out split's problem key, e.g. 2 + 9 and "
           "9 + 2) are one cluster: the question part sums over clusters, and n counts them. With C − without "
           "C: the same runs under two conditions, the per-seed differences. † one seed on a side: the interval is "
           "conditional on the trained weights (questions only, z), it says nothing about another training run. "
           "Two seeds: one conditional interval a seed, no pooled one (t with 1 df is useless). 'n too small': "
           "one question (cluster) or nothing varies. Bounds are never clipped; a cell says when one is past "
           "what the scores allow.")


def question_clusters(runs: list[Run]) -> dict[str, str]:
    """{question digest (question_sha): problem key (`core.heldout.problem_key` of its text)} over the
    caches the runs read; a question of a cache that cannot be read is absent (its own cluster)."""
    out: dict[str, str] = {}
    for path in sorted({str(r.config["cache"]) for r in runs if r.config.get("cache")}):
        if not Path(path).is_file():
            continue
        try:
            with Cache(path) as c:
                texts = c.prompts()["text"]
        except (MuskError, OSError, KeyError):
            continue
        out.update({hashlib.sha256(t.encode()).hexdigest()[:16]: problem_key(t) for t in texts})
    return out


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
    """{distinct question: mean correct over the records of `condition` (its samples and repeats)}."""
    acc = defaultdict(list)
    for r in records:
        if r["condition"] == condition and (task is None or r["task"] == task):
            acc[_key(r)].append(float(r["correct"]))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def paired_cell(a: dict, b: dict, clusters: dict | None = None) -> tuple[str, dict]:
    """One run (or seed-pooled scores) against another on the questions both have: paired over questions
    (conditional on the weights); clusters: {question: problem key} (question_clusters)."""
    return seeds_cell([a], [b], clusters=clusters)


def seeds_cell(a: list[dict], b: list[dict], paired_seeds: bool = False, fixed_b: bool = False,
               clusters: dict | None = None) -> tuple[str, dict]:
    """Interval of mean(a) - mean(b) (analyze.stats.seed_question_interval): a, b are per-run {question:
    score} (one dict a seed), on the questions every run of both sides has. paired_seeds: a[i] and b[i]
    are one run's two conditions; fixed_b: b is one set of fixed answers (an expert's greedy ones), no
    seed; clusters: {question: problem key}, questions of one key count as one cluster."""
    common = sorted(set.intersection(*(set(x) for x in a + b))) if a and b else []
    if not common:
        return "—", {}
    ids = [(clusters or {}).get(k, k) for k in common] if clusters else None
    ci = seed_question_interval([[x[k] for k in common] for x in a], [[x[k] for k in common] for x in b],
                                paired_seeds=paired_seeds, fixed_b=fixed_b, clusters=ids)
    unit = "problems" if ci.clustered else UNIT
    return ci.fmt(unit=UNIT), {"diff": ci.diff, "lo": ci.lo, "hi": ci.hi, "n": ci.n, "unit": unit,
                               "questions": len(common), "seeds_a": ci.seeds_a, "seeds_b": ci.seeds_b,
                               "conditional": ci.conditional, "two_seeds": ci.two_seeds, "n_too_small": ci.too_small,
                               "v_seed": ci.v_seed, "v_question": ci.v_question, "df": ci.df,
                               "past_score_range": ci.beyond}


def shuffled_all_cell(rs: list[Run]) -> tuple[str, dict]:
    """"with C − all experts shuffled" for runs (seeds) of one setting: paired by question within each
    run, seeds resampled by the two-level bootstrap, from each run's first `musk eval` folder holding
    both conditions ("—" where none does)."""
    per_run = []
    for r in rs:
        folders = [recs for _, _, recs in eval_folders(r) if {"with", "shuffle:all"} <= {x["condition"] for x in recs}]
        per_run += folders[:1]
    if not per_run:
        return "—", {}
    return seeds_cell([per_prompt(x, "with") for x in per_run], [per_prompt(x, "shuffle:all") for x in per_run],
                      paired_seeds=True, clusters=question_clusters(rs))


def setting_rows(runs: list[Run]) -> dict[tuple, list[Run]]:
    """Finished main-setting runs, one row per method and condition as Table 1 keys them: the team and
    every setting but the seed, the cache, the family and the prompt set (those are the columns)."""
    rows: dict[tuple, list[Run]] = defaultdict(list)
    ablations = ablation_names(runs)
    for r in runs:
        if r.finished and r.name not in ablations:
            rows[(r.method, r.condition_without("cache_fingerprint", "prompt_set", "task_family", *SCHEDULE,
                                                steps=False))].append(r)
    return rows


def _columns(rows: dict[tuple, list[Run]]) -> list[tuple[str, str]]:
    """(family, prompt set) columns: runs evaluated on other prompts never share a cell."""
    cols = {(r.family, run_prompt_set(r)) for rs in rows.values() for r in rs}
    return sorted(cols, key=lambda c: (order_key(c[0], FAMILY_ORDER), c[1]))


def _col_name(col: tuple[str, str], cols: list[tuple[str, str]]) -> str:
    return col[0] if sum(c[0] == col[0] for c in cols) == 1 else f"{col[0]} [prompts {col[1][:8]}]"


def _control_of(rows: dict[tuple, list[Run]], col: tuple[str, str], like: Run, method: str = "single") -> list[Run]:
    """The family's own `method` runs (single, or prefix: m trainable tokens and no experts) on the
    column's prompt set, trained in like's dtype, whose settings match like's (unmatched_keys: m for
    prefix, and every other key both read); [] when no condition matches. Two matching conditions (a
    key only the control reads differs) are told apart by their run count, then by name."""
    cands = [[r for r in rs if (r.family, run_prompt_set(r)) == col and dtype_of(r) == dtype_of(like)]
             for k, rs in sorted(rows.items(), key=str) if k[0] == method]
    cands = [c for c in cands if c and not unmatched_keys(like, c[0])]
    return max(cands, key=len) if cands else []


def row_label(rows: dict[tuple, list[Run]], key: tuple, rs: list[Run]) -> str:
    others = [x[0].config for k, x in rows.items() if k[0] == key[0] and x is not rs]
    return method_label(key[0], rs[0].config, differing_keys([rs[0].config] + others, ROW_FREE | set(SCHEDULE)) if others else [])


def paired_tables(runs: list[Run]) -> list[Table]:
    """Method vs the family's own single, and with C vs without C, per (family, prompt set) column:
    two-level intervals (seeds, then questions); then the same per dataset."""
    recs = {r.name: last_full_records(r) for r in runs}
    rows = {k: [r for r in rs if recs[r.name]] for k, rs in setting_rows(runs).items()}
    rows = {k: rs for k, rs in rows.items() if rs}
    clusters = question_clusters([r for rs in rows.values() for r in rs])
    cols = _columns(rows)
    heads = [_col_name(c, cols) for c in cols]
    tasks = {c: sorted({x["task"] for rs in rows.values() for r in rs if (r.family, run_prompt_set(r)) == c
                        for x in recs[r.name]}) for c in cols}
    comparisons = []  # (label, a runs, a condition, b runs per column or None (same runs), b condition)
    for key, rs in sorted(rows.items(), key=lambda kv: (order_key(kv[0][0], METHOD_ORDER), kv[0][1])):
        label = row_label(rows, key, rs)
        if key[0] != "single":
            comparisons.append((f"{label} − single", rs, "with", "single", "with"))
        if key[0] in ("perceiver", "ffn", "hard-routing"):  # what the experts add beyond a soft prompt
            comparisons.append((f"{label} − prefix", rs, "with", "prefix", "with"))
        if any(x["condition"] == "without" for r in rs for x in recs[r.name]):
            comparisons.append((f"{label}: with C − without C", rs, "with", None, "without"))
    fam_rows, task_rows, raw = [], defaultdict(list), []
    for label, a_runs, a_cond, b_which, b_cond in comparisons:
        cells, seed_cells = [], []
        for col, head in zip(cols, heads):
            a = sorted((r for r in a_runs if (r.family, run_prompt_set(r)) == col), key=lambda r: r.name)
            b = (_control_of(rows, col, a[0], b_which) if a else []) if b_which else a
            for t in [None] + tasks[col]:
                pa = [per_prompt(recs[r.name], a_cond, t) for r in a]
                pb = [per_prompt(recs[r.name], b_cond, t) for r in b]
                txt, fields = seeds_cell(pa, pb, paired_seeds=b_which is None, clusters=clusters) if a and b else ("—", {})
                if a and not b:  # a comparison with no control of the same settings says so
                    txt = f"no {b_which} run with the same settings"
                    fields = {"unmatched": True}
                raw.append({"comparison": label, "family": head, "task": t or "", "seed": "all", **fields})
                if t is None:
                    cells.append(txt)
                else:
                    task_rows[(head, t)].append(txt)
            if b_which is None and len(a) > 1:  # with − without per seed, paired over questions
                per = []
                for r in a:
                    txt, fields = paired_cell(per_prompt(recs[r.name], a_cond), per_prompt(recs[r.name], b_cond),
                                               clusters)
                    per.append(f"seed {r.config.get('seed')}: {txt}")
                    raw.append({"comparison": label, "family": head, "task": "", "seed": r.config.get("seed"),
                                **fields})
                seed_cells.append("; ".join(per))
            else:
                seed_cells.append("")
        fam_rows.append((label, cells))
        if any(seed_cells):
            fam_rows.append((f"{label}, per seed", [c or "—" for c in seed_cells]))
    used = [r for rs in rows.values() for r in rs]
    note = CI_NOTE + " Read from each run's last full evaluation (eval_records.jsonl); each family's methods " \
        "against that family's own single (and prefix) runs on the same prompt set, trained in the same dtype and " \
        "with the same settings (every config key both methods read: m for prefix); a cell says when no control " \
        "run has them. Ablation runs (pooling variants, the m sweep) are left out."
    if not comparisons:
        note = "No finished run kept per-prompt evaluation records (eval_records.jsonl): nothing to pair."
    title = f"Paired differences in validation accuracy (points over {UNIT}, 95% interval; † conditional on the " \
        "trained weights)"
    t1 = Table(title, heads, fam_rows, [x for x in raw if not x["task"]], used, note)
    t2 = Table(f"Paired differences per dataset (points over {UNIT}, 95% interval; † conditional on the trained "
               "weights)", [c[0] for c in comparisons],
               [(f"{h} / {t}", cells) for (h, t), cells in task_rows.items()], [x for x in raw if x["task"]], used,
               note)
    return [t1, t2]


def table1_per_task(runs: list[Run]) -> Table:
    """Table 1's rows broken down per dataset: greedy accuracy (%) of each run's last full evaluation on
    the prompts of one dataset, mean ± std over seeds; one column per family / dataset."""
    recs = {r.name: last_full_records(r) for r in runs}
    rows = {k: [r for r in rs if recs[r.name]] for k, rs in setting_rows(runs).items()}
    rows = {k: rs for k, rs in rows.items() if rs}
    fam_cols = _columns(rows)  # (family, prompt set): runs on other prompts never share a cell
    cols = [(fc, t) for fc in fam_cols for t in sorted({x["task"] for rs in rows.values() for r in rs
                                                         if (r.family, run_prompt_set(r)) == fc for x in recs[r.name]})]
    out, raw, used = [], [], []
    for key, rs in sorted(rows.items(), key=lambda kv: (order_key(kv[0][0], METHOD_ORDER), kv[0][1])):
        label = row_label(rows, key, rs)
        cells = []
        for fc, task in cols:
            accs = [_mean(per_prompt(recs[r.name], "with", task)) for r in rs if (r.family, run_prompt_set(r)) == fc]
            c = cell([a for a in accs if a is not None])
            cells.append(c.fmt())
            raw.append({"row": label, "family": _col_name(fc, fam_cols), "task": task, "mean": c.mean, "std": c.std,
                        "n": c.n, "unit": UNIT})
        out.append((label, cells))
        used += rs
    note = (f"Greedy accuracy with C on each dataset's {UNIT} of the last full evaluation (eval_records.jsonl; a "
            "question asked twice counts once, so a cell can differ from Table 1, which counts prompts)."
            if out else "No finished run kept per-prompt evaluation records (eval_records.jsonl).")
    return Table(f"Table 1 per dataset: final validation accuracy (% of {UNIT}), mean ± std across seeds",
                 [f"{_col_name(fc, fam_cols)} / {t}" for fc, t in cols], out, raw, used, note)


# What makes two `musk eval` folders one setting (evaluate/run.SETTING_KEYS, read from summary.json;
# a folder made before a key was recorded has None there and is a setting of its own).
EVAL_SETTING = ("split", "checkpoint", "n_prompts", "limit", "samples", "temperature", "decoding", "seed", "dtype")


def _setting(summary: dict) -> tuple:
    return tuple(summary.get(k) for k in EVAL_SETTING)


def _setting_label(setting: tuple) -> str:
    s = dict(zip(EVAL_SETTING, setting))
    dec = "greedy" if s["decoding"] == "greedy" or (s["decoding"] is None and s["temperature"] is None) else \
        f"T={s['temperature']} x{s['samples']}"
    extra = (f", limit {s['limit']}" if s["limit"] is not None else "") + (f", seed {s['seed']}" if s["seed"] else "")
    return f"{s['split']}, {s['checkpoint']}, {s['dtype'] or 'dtype unrecorded'}, {dec}, {s['n_prompts']} prompts{extra}"


def _eval_runs(runs: list[Run]) -> tuple[dict[tuple, dict[str, dict[str, list[dict]]]], dict[tuple, list[str]]]:
    """({(family, method, team, condition, eval setting): {run name: {condition: records}}}, {same key:
    folders}): every folder of one run and setting merged (a condition is read from the first folder
    that has it)."""
    groups: dict[tuple, dict] = defaultdict(dict)
    folders: dict[tuple, list[str]] = defaultdict(list)
    for r in runs:
        for d, summary, recs in eval_folders(r):
            key = (r.family, r.method, r.team, r.condition_without(steps=False), _setting(summary))
            folders[key].append(f"{r.name}/{d.parent.name}/{d.name}")
            by_cond = groups[key].setdefault(r.name, {})
            for cond in dict.fromkeys(x["condition"] for x in recs):
                by_cond.setdefault(cond, [x for x in recs if x["condition"] == cond])
    return groups, folders


def ablation_table(runs: list[Run]) -> Table:
    """Each expert dropped, shuffled or kept alone (`musk eval` folders beside the runs): accuracy with
    all experts and under the ablation, the change (the same runs, seeds resampled together), and the
    difference to the family's single runs evaluated by `musk eval` with the same settings. One row per
    (family, method, team, condition, evaluation setting); folders of other settings are never pooled;
    "seeds" counts runs."""
    groups, folders = _eval_runs(runs)
    clusters = question_clusters(runs)
    singles = {(k[0], k[4]): v for k, v in groups.items() if k[1] == "single"}  # (family, setting) -> runs
    seed_of = {r.name: r.config.get("seed") for r in runs}
    rows, raw, used, missing_single = [], [], [], False
    for key in sorted(groups, key=lambda k: (order_key(k[0], FAMILY_ORDER), order_key(k[1], METHOD_ORDER), k[2], str(k))):
        family, method, team, _, setting = key
        members = groups[key]
        names = sorted(members)
        conds = list(dict.fromkeys(c for n in names for c in members[n] if ":" in c))
        single = singles.get((family, setting), {})
        for cond in conds:
            have = [n for n in names if cond in members[n] and "with" in members[n]]
            ab = [per_prompt(members[n][cond], cond) for n in have]
            with_c = [per_prompt(members[n]["with"], "with") for n in have]
            d_with, f_with = seeds_cell(ab, with_c, paired_seeds=True, clusters=clusters)
            per_seed = "; ".join(f"seed {seed_of.get(n)}: {paired_cell(a_, w_, clusters)[0]}"
                                 for n, a_, w_ in zip(have, ab, with_c)) if len(have) > 1 else "—"
            sg = [per_prompt(single[n]["with"], "with") for n in sorted(single) if "with" in single[n]]
            d_single, f_single = seeds_cell(ab, sg, clusters=clusters) if sg else ("—", {})
            missing_single |= not sg
            label = f"{family} / {method} / {', '.join(team)} / {cond} [{_setting_label(setting)}]"
            if any(lbl == label for lbl, _ in rows):  # settings that print alike (e.g. unrecorded): name folders
                label += f" ({', '.join(folders[key])})"
            rows.append((label, [str(len(have)), _pct_runs(with_c), _pct_runs(ab), d_with, d_single, per_seed]))
            raw.append({"setting": label, "runs": ";".join(have), "seeds": len(have), "folders": ";".join(folders[key]),
                        **dict(zip(EVAL_SETTING, setting)), "acc_with": _mean_runs(with_c),
                        "acc_ablated": _mean_runs(ab), "unit": UNIT,
                        **{f"vs_with_{k}": v for k, v in f_with.items()},
                        **{f"vs_single_{k}": v for k, v in f_single.items()}, "vs_with_per_seed": per_seed})
        used += [r for r in runs if r.name in names]
    note = (CI_NOTE + " From `musk eval --ablate` folders (RUN/eval/*): drop removes the expert's token before "
            "g_phi mixes them, shuffle gives it another evaluated question's features, only keeps it alone. A row "
            "is one evaluation setting (split, checkpoint, dtype, decoding, prompts); \"ablated − single\" reads "
            "single runs' `musk eval` folders of the same setting.")
    if missing_single:
        note += " —: no single run of the family has a `musk eval` folder of that setting (run `musk eval SINGLE_RUN`)."
    if not rows:
        note = "No `musk eval --ablate` folder beside the runs: run `musk eval RUN --ablate drop:NAME` to fill this."
    return Table(f"Expert ablations: accuracy (%, over {UNIT}) and paired change (points, 95% interval)",
                 ["seeds", "acc with all experts", "acc ablated", "ablated − with", "ablated − single",
                  "ablated − with, per seed (paired over questions; † conditional on that seed's weights)"], rows, raw,
                 used, note)


def _mean_runs(per_run: list[dict]) -> float | None:
    """Mean over runs of each run's mean over its questions."""
    means = [_mean(x) for x in per_run if x]
    return float(np.mean(means)) if means else None


def _pct_runs(per_run: list[dict]) -> str:
    m = _mean_runs(per_run)
    runs = f"{len(per_run)} run" + ("s" if len(per_run) > 1 else "")
    return "—" if m is None else f"{m * 100:.1f} ({runs}, {len(per_run[0])} {UNIT})"


def _mean(scores: dict) -> float | None:
    return float(np.mean(list(scores.values()))) if scores else None


def routing_table(runs: list[Run]) -> Table:
    """u_i per dataset on the evaluation prompts (with C, last full evaluation): mean over the prompts of
    each run, then mean ± std over seeds. One training batch is too few prompts to read routing from."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    ablations = ablation_names(runs)
    for r in runs:
        if r.finished and r.name not in ablations:
            groups[(r.family, r.method, r.team, r.condition)].append(r)
    rows, raw, used = [], [], []
    for key in sorted(groups, key=lambda k: (order_key(k[0], FAMILY_ORDER), order_key(k[1], METHOD_ORDER), k[2], k[3])):
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
