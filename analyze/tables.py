"""The paper's tables from loaded runs. A cell pools seeds of one condition only: runs that differ
in anything but the seed (config, cache) are never pooled; missing data is 'missing', never 0."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from train.recipes import recipe_name
from analyze.runs import NOT_A_CONDITION, SCHEDULE, Run
from analyze.stats import Cell, cell, spearman
from pipeline.pooling import VARIANTS

METHOD_ORDER = ["single", "prefix", "hard-routing", "output-collab", "ffn", "perceiver"]
FAMILY_ORDER = ["algorithmic", "arithmetic", "logic", "gsm8k", "easy-arithmetic"]
ROW_FREE = set(NOT_A_CONDITION) | {"cache_fingerprint", "task_family"}


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[tuple[str, list[str]]]  # (label, formatted cells)
    raw: list[dict] = field(default_factory=list)  # one dict per cell for the CSV
    sources: list[Run] = field(default_factory=list)
    note: str = ""

    def markdown(self) -> str:
        head = "| | " + " | ".join(self.columns) + " |\n|---|" + "---|" * len(self.columns) + "\n"
        body = "".join(f"| {label} | " + " | ".join(cells) + " |\n" for label, cells in self.rows)
        return f"### {self.title}\n\n{head}{body}" + (f"\n{self.note}\n" if self.note else "")


def differing_keys(configs: list[dict], skip: set[str]) -> list[str]:
    keys = sorted({k for c in configs for k in c} - skip)
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def method_label(method: str, cfg: dict, keys: list[str]) -> str:
    """A row's name: the method, its training recipe when it has one (a recipe run is another method and
    never reads as the paper's), and the settings that set it apart from the method's other rows."""
    recipe = recipe_name(cfg)
    name = f"{method} + {recipe}" if recipe else method
    keys = [k for k in keys if not k.startswith("sft_")] if recipe else keys
    if not keys:
        return name
    return name + " [" + ", ".join(f"{k}={cfg.get(k)}" for k in keys) + "]"


def order_key(key: str, order: list[str]) -> tuple:
    return (order.index(key) if key in order else len(order), key)


def table1(runs: list[Run]) -> Table:
    """Methods x task families, as the paper lays Table 1 out: one row per method (and settings), one
    column per family; a cell is the mean +/- std of final validation accuracy across seeds.

    A row pools runs that differ in the seed, the cache (one per family) and the evaluation schedule;
    a cell pools runs of equal length, and columns may differ in length (GSM8K 233 steps vs 500). A
    family whose runs span two caches or two lengths splits the row (labelled). Unfinished runs have
    no final accuracy: they are left out and named in the note.

    A column holds runs evaluated on one prompt set (the cache's data fingerprint, `prompt_set`): a
    family whose runs saw different prompts gets one column per prompt set, and the note says which
    prompt set each column covers."""
    done = [r for r in runs if r.finished]
    sets = defaultdict(set)  # family -> its prompt sets
    for r in done:
        sets[r.family].add(run_prompt_set(r))
    columns = [(f, p) for f in sorted(sets, key=lambda f: order_key(f, FAMILY_ORDER)) for p in sorted(sets[f])]
    families = [f if len(sets[f]) == 1 else f"{f} [prompts {p[:8]}]" for f, p in columns]
    rows: dict[tuple, list[Run]] = defaultdict(list)
    for r in done:
        rows[(r.method, r.condition_without("cache_fingerprint", "prompt_set", "task_family", *SCHEDULE,
                                            steps=False))].append(r)
    split_rows: dict[tuple, list[Run]] = {}
    for key, rs in rows.items():
        per_family = defaultdict(set)  # (family, prompt set): a column
        for r in rs:
            per_family[(r.family, run_prompt_set(r))].add((r.config.get("cache_fingerprint"), r.steps))
        if any(len(v) > 1 for v in per_family.values()):
            for r in rs:
                split_rows.setdefault(key + ((r.config.get("cache_fingerprint"), r.steps),), []).append(r)
        else:
            split_rows[key] = rs
    by_method = defaultdict(list)
    for key, rs in split_rows.items():
        by_method[key[0]].append((key, rs))
    out_rows, raw = [], []
    for method in sorted(by_method, key=lambda m: order_key(m, METHOD_ORDER)):
        entries = by_method[method]
        keys = differing_keys([rs[0].config for _, rs in entries], ROW_FREE | set(SCHEDULE)) if len(entries) > 1 else []
        for key, rs in sorted(entries, key=lambda e: str(e[0])):
            label = method_label(method, rs[0].config, keys)
            if len(key) == 3:
                label += f" (cache {str(key[2][0])[:8]}, {key[2][1]} steps)"
            cells = []
            for (fam, ps), head in zip(columns, families):
                here = [r for r in rs if r.family == fam and run_prompt_set(r) == ps]
                c = cell([r.final_accuracy for r in here])
                cells.append(c.fmt())
                raw.append({"row": label, "family": head, "prompt_set": ps, "mean": c.mean, "std": c.std, "n": c.n,
                            "steps": ";".join(sorted({str(r.steps) for r in here})),
                            "runs": ";".join(r.name for r in here)})
            out_rows.append((label, cells))
    lengths = {f: sorted({r.steps for r in done if r.family == f}) for f in sets}
    note = "Steps per run: " + ", ".join(f"{f} {'/'.join(map(str, n))}" for f, n in lengths.items()) + "." \
        if columns else "No finished run."
    if columns:
        note += " Prompt sets (validation prompts of the cache each column read): " + ", ".join(
            f"{head} {ps[:12] or 'unrecorded'}" for (_, ps), head in zip(columns, families)) + "."
    note += unfinished_note(runs)
    if done:
        n_eval = sorted({str(r.summary.get("eval_n", "?")) for r in done})
        note += f" Accuracy over prompts: each run's final greedy evaluation of {'/'.join(n_eval)} validation prompts."
    return Table("Table 1: final validation accuracy (% of prompts), mean ± std across seeds", families, out_rows, raw,
                 done, note)


def run_prompt_set(r: Run) -> str:
    """The data fingerprint of the cache the run read ('' for runs made before it was recorded)."""
    return str(r.config.get("prompt_set") or r.summary.get("prompt_set") or "")


def unfinished_note(runs: list[Run]) -> str:
    """' Left out, unfinished: a (step 3 of 10), ...' or ''."""
    left = [f"{r.name} (step {r.steps} of {r.config.get('total_training_steps', '?')})" for r in runs
            if not r.finished]
    return (" Left out, unfinished (no final evaluation yet): " + ", ".join(sorted(left)) + ".") if left else ""


def table2(runs: list[Run], method: str = "perceiver") -> Table:
    """Pooling variants for one method and family (the one with the most variants)."""
    cands = [r for r in runs if r.method == method]
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in cands:
        groups[(r.family, r.condition_without("pooling"))].append(r)
    cols = list(VARIANTS)
    if not groups:
        return Table(f"Table 2: pooling variants ({method})", cols, [(method, ["missing"] * len(cols))],
                     note=f"No {method} runs: every cell is missing.")
    (family, _), rs = max(groups.items(), key=lambda kv: (len({r.config.get('pooling') for r in kv[1]}), len(kv[1])))
    cells, raw = [], []
    for v in cols:
        c = cell([r.final_accuracy for r in rs if r.config.get("pooling") == v])
        cells.append(c.fmt())
        raw.append({"pooling": v, "family": family, "method": method, "mean": c.mean, "std": c.std, "n": c.n,
                    "runs": ";".join(r.name for r in rs if r.config.get("pooling") == v)})
    note = ("first_layer is the paper's h^(0)_{i,T}: hidden_states[0], the embedding output at the last token "
            "(under a chat template that token is the same for every prompt, so it carries no prompt information); "
            "first_block is hidden_states[1], the first block's output there. random_token and random_layer read "
            "draw seed % D of the cache's D seeded draws, so their spread spans the sampling too.")
    return Table(f"Table 2: pooling ablation, {method} on {family} (accuracy %)", cols, [(method, cells)], raw, rs,
                 note)


# The paper's main setting: last-token pooling and m = 8 latent queries. Runs that differ from it are
# ablations (Table 2 sweeps pooling, Figure 6 sweeps m) and stay out of the Spearman table, Figure 4 and
# the paired tables. m only matters to perceiver; where no perceiver run of a (family, team) has m = 8,
# the m most of them use is the main one (a preset that trains at another m throughout).
MAIN_POOLING, MAIN_LATENTS = "last_token", 8


def ablation_names(runs: list[Run]) -> set[str]:
    """Names of the runs that are ablation conditions (see MAIN_POOLING, MAIN_LATENTS)."""
    ms: dict[tuple, list] = defaultdict(list)
    for r in runs:
        if r.method == "perceiver":
            ms[(r.family, r.team)].append(r.config.get("num_latents", MAIN_LATENTS))
    main = {k: MAIN_LATENTS if MAIN_LATENTS in v else max(set(v), key=v.count) for k, v in ms.items()}
    return {r.name for r in runs
            if r.config.get("pooling", MAIN_POOLING) != MAIN_POOLING
            or (r.method == "perceiver" and r.config.get("num_latents", MAIN_LATENTS) != main[(r.family, r.team)])}


def method_runs(runs: list[Run], method: str = "perceiver") -> dict[tuple, list[Run]]:
    """The method's own runs in its main setting (ablation_names: no pooling ablation, no m sweep, no
    other method), grouped by setting: (task family, team, condition without the seed). The paper
    computes its statistics per run of the method and averages them per setting."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    ablations = ablation_names(runs)
    for r in runs:
        if r.method == method and r.name not in ablations:
            groups[(r.family, r.team, r.condition)].append(r)
    return dict(sorted(groups.items(), key=lambda kv: (order_key(kv[0][0], FAMILY_ORDER), kv[0][1], kv[0][2])))


def setting_label(family: str, team: tuple, rs: list[Run], others: list[list[Run]]) -> str:
    """'family / team' plus the settings that tell this group apart from the other groups."""
    keys = differing_keys([rs[0].config] + [o[0].config for o in others], ROW_FREE | {"experts"}) if others else []
    label = f"{family} / {', '.join(team) or 'no experts'}"
    return label + (" [" + ", ".join(f"{k}={rs[0].config.get(k)}" for k in keys) + "]" if keys else "")


def spearman_table(runs: list[Run], method: str = "perceiver") -> tuple[Table, dict[str, float]]:
    """Spearman rho between reward/mean and routing/entropy over each run's steps, averaged per
    setting (family, team, condition), over the method's runs only: hard-routing's router entropy
    and the pooling ablations are not the paper's quantity. Returns the table and the mean per setting."""
    groups = method_runs(runs, method)
    rows, raw, used, means = [], [], [], {}
    for key, rs in groups.items():
        label = setting_label(key[0], key[1], rs, [g for k, g in groups.items() if k != key])
        rhos = []
        for r in sorted(rs, key=lambda r: r.name):
            m = r.metrics
            if m.is_empty() or "routing/entropy" not in m.columns:
                continue
            m = m.drop_nulls(["routing/entropy", "reward/mean"])
            rho = spearman(m["reward/mean"].to_list(), m["routing/entropy"].to_list())
            used.append(r)
            rhos.append((r.name, rho))
            raw.append({"setting": label, "run": r.name, "seed": r.config.get("seed"), "steps": len(m),
                        "spearman": rho})
        defined = [x for _, x in rhos if x is not None]
        mean = float(np.mean(defined)) if defined else None
        if mean is not None:
            means[label] = mean
        per_run = ", ".join(f"{n}: {'undefined' if x is None else f'{x:+.3f}'}" for n, x in rhos)
        rows.append((label, [str(len(rhos)), per_run or "missing", "undefined" if mean is None else f"{mean:+.3f}"]))
    # the paper's number: ρ per run, then the mean over runs (a setting with more seeds weighs more)
    per_run = [x["spearman"] for x in raw if x["spearman"] is not None]
    overall = float(np.mean(per_run)) if per_run else None
    if overall is not None:
        raw.append({"setting": "all runs", "run": "", "seed": None, "steps": None, "spearman": overall})
    of_settings = float(np.mean(list(means.values()))) if means else None
    note = (f"Over {method} runs in the main setting only (last-token pooling, m = 8 or the m its runs share: "
            "hard-routing, the pooling ablation and the m sweep are left out); ρ per run. Mean ρ over all "
            f"{len(per_run)} runs: " + ("undefined" if overall is None else f"{overall:+.3f}") + " (paper: -0.48; "
            "the mean over runs, as the paper computes it). Beside it, the mean of the "
            f"{len(means)} setting means: " + ("undefined" if of_settings is None else f"{of_settings:+.3f}") + ".")
    if not rows:
        note = f"No {method} run with routing statistics: ρ is missing."
    return Table(f"Spearman ρ(reward, routing entropy), {method} runs, per setting",
                 ["runs", "ρ per run", "mean ρ"], rows, raw, used, note), means


def _mean_std(values: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    c = cell(values)
    if c.n == 0:
        return "missing"
    return f"{c.mean * scale:.{digits}f}" + (f" ± {c.std * scale:.{digits}f}" if c.std is not None else "")


WINDOW = 20  # steps over which the collaboration table averages u_i


def _collaboration_row(rs: list[Run], team: tuple, with_null: bool) -> tuple[list[str], dict]:
    """One condition's cells and CSV fields (see collaboration_table)."""
    with_c = [r.final_accuracy for r in rs]
    without = [r.summary.get("final_val_accuracy_without_context") for r in rs]
    null = [r.summary.get("final_val_accuracy_null_context") for r in rs]
    # the first and last GRPO steps that measured routing (a recipe's warm-up steps measure none)
    measured = [r.metrics["routing/entropy"].drop_nulls() for r in rs if "routing/entropy" in r.metrics.columns]
    first = [h[0] for h in measured if len(h)]
    last = [h[-1] for h in measured if len(h)]
    # u_i of a run: the mean over its last WINDOW steps (one step is one training batch: a few prompts)
    util = [np.mean(r.metrics["routing/utilization"].drop_nulls().to_list()[-WINDOW:], axis=0).tolist() for r in rs
            if "routing/utilization" in r.metrics.columns and r.metrics["routing/utilization"].drop_nulls().len()]
    u = np.array(util, dtype=float) if util and all(len(x) == len(team) for x in util) else None  # [seeds, n]
    u_txt = ", ".join(f"{n}: {u[:, i].mean():.3f}" + (f" ± {u[:, i].std(ddof=1):.3f}" if len(u) > 1 else "")
                      for i, n in enumerate(team)) if u is not None else "—"
    h_txt = f"{np.mean(first):.3f} → {np.mean(last):.3f}" if first else "—"
    some = lambda v: _mean_std(v) if any(x is not None for x in v) else "—"  # noqa: E731
    cells = [str(len(rs)), _mean_std(with_c), some(without)] + ([some(null)] if with_null else []) + [h_txt, u_txt]
    cw, cwo, cn = cell(with_c), cell(without), cell(null)
    raw = {"acc_with_c_mean": cw.mean, "acc_with_c_std": cw.std, "acc_without_c_mean": cwo.mean,
           "acc_without_c_std": cwo.std,
           **({"acc_null_c_mean": cn.mean, "acc_null_c_std": cn.std} if with_null else {}),
           "entropy_first": float(np.mean(first)) if first else None,
           "entropy_last": float(np.mean(last)) if last else None,
           **({f"u_last{WINDOW}[{n}]": float(u[:, i].mean()) for i, n in enumerate(team)} if u is not None else {})}
    return cells, raw


def collaboration_table(runs: list[Run], content=None) -> Table:
    """Does C carry information the policy uses? Per condition (family, team, method, settings):
    first, where `content` (runs -> (cell, fields)) gives it, "with C − all experts shuffled" (the
    experts' information, paired by prompt from `musk eval` folders); final validation accuracy with
    C and with C removed (the same policy), with C's information removed but its slots kept where runs
    evaluated it (eval_null_context), routing entropy H at the first and last step, and each expert's
    utilisation u_i over the last WINDOW steps; mean ± std over seeds."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.family, r.team, r.method, r.condition)].append(r)
    keys = sorted(groups, key=lambda k: (order_key(k[0], FAMILY_ORDER), k[1], order_key(k[2], METHOD_ORDER), k[3]))
    with_null = any(r.summary.get("final_val_accuracy_null_context") is not None for r in runs)
    rows, raw, used = [], [], []
    for key in keys:
        rs = sorted(groups[key], key=lambda r: r.name)
        family, team, method = key[:3]
        others = [groups[k] for k in keys if k[:3] == key[:3] and k != key]
        label = setting_label(family, team, rs, others).replace(" / ", f" / {method} / ", 1)
        cells, fields = _collaboration_row(rs, team, with_null)
        if content is not None:
            txt, f = content(rs)
            cells = cells[:1] + [txt] + cells[1:]
            fields = {**{f"with_minus_shuffled_all_{k}": v for k, v in f.items()}, **fields}
        rows.append((label, cells))
        raw.append({"condition": label, "family": family, "method": method, "runs": ";".join(r.name for r in rs),
                    **fields})
        used += rs
    cols = ["seeds"] + (["with C − all experts shuffled (points)"] if content is not None else []) + \
        ["val acc % (with C)", "val acc % (C removed)"] + \
        (["val acc % (C's information removed)"] if with_null else []) + ["H first → last step", f"u_i, mean of the last {WINDOW} steps"]
    return Table("Collaboration: accuracy (% of prompts) with and without C, routing entropy, utilisation "
                 "(mean ± std over seeds)",
                 cols, rows, raw, used,
                 note=("What each control removes: all experts shuffled (`musk eval`, shuffle:all), what the experts say "
                       "about this prompt (g_phi's prompt-independent part stays); C's information removed (null), "
                       "everything g_phi computed (slots stay); C removed, C and its slots. " if content is not None
                       else "") +
                      "Accuracy is the final greedy validation accuracy; 'C removed' evaluates the same trained "
                      "policy with no context tokens" + ("; \"C's information removed\" keeps the m context slots "
                      "with the gate closed (C = its anchor)" if with_null else "") +
                      f". H = ln n is a uniform attention over the n experts. u_i is each run's mean over its last "
                      f"{WINDOW} training steps (one step reads a few prompts; single steps swing by ±0.2 on the "
                      "probe preset), then mean ± std over seeds; the per-dataset routing table reads u_i on the "
                      "evaluation prompts.")


def cost_table(runs: list[Run]) -> Table:
    """Expert cost per training prompt, as an online (uncached) pipeline would pay it."""
    cols = ["expert forward passes / prompt", "expert prompt tokens / prompt", "expert generated tokens / prompt",
            "policy prompt tokens / rollout"]
    by_method = defaultdict(list)
    for r in runs:
        by_method[r.method].append(r)
    rows, raw, used = [], [], []
    for method in sorted(by_method, key=lambda m: order_key(m, METHOD_ORDER)):
        per_run = []
        for r in by_method[method]:
            m = r.metrics
            need = ("cost/prompts", "cost/expert_forward_passes", "cost/expert_prompt_tokens",
                    "cost/expert_generated_tokens", "cost/policy_prompt_tokens")
            if m.is_empty() or any(c not in m.columns for c in need):  # e.g. probe teams: no expert token counts
                continue
            p = float(m["cost/prompts"].sum())
            g = float(r.config.get("group_size", 1))
            per_run.append([float(m[c].sum()) / p for c in
                            ("cost/expert_forward_passes", "cost/expert_prompt_tokens", "cost/expert_generated_tokens")]
                           + [float(m["cost/policy_prompt_tokens"].sum()) / (p * g)])
            used.append(r)
        if not per_run:
            rows.append((method, ["missing"] * 4))
            continue
        mean = np.mean(per_run, axis=0)
        rows.append((method, [f"{v:.1f}" for v in mean]))
        raw.append({"method": method, **dict(zip(cols, map(float, mean))), "runs": len(per_run)})
    return Table("Cost: expert compute per training prompt (what a pipeline without the cache pays)", cols, rows,
                 raw, used, note="hard-routing runs only the chosen expert; output-collab also decodes every "
                                 "expert's hint; the cache pays each of these once per prompt, not once per step.")


def table_runs_md(t: Table) -> str:
    """The runs a table was computed from: names, cache fingerprints, steps, seeds."""
    if not t.sources:
        return "_computed from no runs_\n"
    lines = ["| run | method | family | seed | steps | cache | condition |", "|---|---|---|---|---|---|---|"]
    for r in sorted(t.sources, key=lambda r: r.name):
        lines.append(f"| {r.name} | {r.method} | {r.family} | {r.config.get('seed')} | {r.steps} | "
                     f"{str(r.config.get('cache_fingerprint', '?'))[:12]} | {r.condition} |")
    return "\n".join(lines) + "\n"


__all__ = ["Table", "table1", "table2", "spearman_table", "cost_table", "collaboration_table", "table_runs_md", "Cell",
           "method_runs"]
