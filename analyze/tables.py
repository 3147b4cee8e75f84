"""The paper's tables from loaded runs. A cell pools seeds of one condition only: runs that differ
in anything but the seed (config, cache) are never pooled; missing data is 'missing', never 0."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from analyze.runs import NOT_A_CONDITION, Run
from analyze.stats import Cell, cell, spearman
from pipeline.pooling import VARIANTS

METHOD_ORDER = ["single", "hard-routing", "output-collab", "ffn", "perceiver"]
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


def _differing(configs: list[dict], skip: set[str]) -> list[str]:
    keys = sorted({k for c in configs for k in c} - skip)
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def _label(method: str, cfg: dict, keys: list[str]) -> str:
    if not keys:
        return method
    return method + " [" + ", ".join(f"{k}={cfg.get(k)}" for k in keys) + "]"


def _order(key: str, order: list[str]) -> tuple:
    return (order.index(key) if key in order else len(order), key)


def table1(runs: list[Run]) -> Table:
    """Methods x task families: mean +/- std of final validation accuracy across seeds."""
    families = sorted({r.family for r in runs}, key=lambda f: _order(f, FAMILY_ORDER))
    rows: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        # Same row: same method and settings; the cache joins the key so two caches never pool.
        rows[(r.method, r.condition_without("cache_fingerprint", "task_family"))].append(r)
    split_rows: dict[tuple, list[Run]] = {}
    for key, rs in rows.items():
        per_family_caches = defaultdict(set)
        for r in rs:
            per_family_caches[r.family].add(r.config.get("cache_fingerprint"))
        if any(len(v) > 1 for v in per_family_caches.values()):
            for r in rs:
                split_rows.setdefault(key + (r.config.get("cache_fingerprint"),), []).append(r)
        else:
            split_rows[key] = rs
    by_method = defaultdict(list)
    for key, rs in split_rows.items():
        by_method[key[0]].append((key, rs))
    out_rows, raw = [], []
    for method in sorted(by_method, key=lambda m: _order(m, METHOD_ORDER)):
        entries = by_method[method]
        keys = _differing([rs[0].config for _, rs in entries], ROW_FREE) if len(entries) > 1 else []
        for key, rs in sorted(entries, key=lambda e: str(e[0])):
            label = _label(method, rs[0].config, keys)
            if len(key) == 3:
                label += f" (cache {str(key[2])[:8]})"
            cells = []
            for fam in families:
                c = cell([r.final_accuracy for r in rs if r.family == fam])
                cells.append(c.fmt())
                raw.append({"row": label, "family": fam, "mean": c.mean, "std": c.std, "n": c.n,
                            "runs": ";".join(r.name for r in rs if r.family == fam)})
            out_rows.append((label, cells))
    return Table("Table 1: final validation accuracy (%), mean ± std across seeds", families, out_rows, raw, runs)


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
    return Table(f"Table 2: pooling ablation, {method} on {family} (accuracy %)", cols, [(method, cells)], raw, rs)


def spearman_table(runs: list[Run]) -> tuple[Table, float | None]:
    """Spearman rho between reward/mean and routing/entropy over each run's steps, and their mean."""
    rows, raw, vals, used = [], [], [], []
    for r in runs:
        m = r.metrics
        if m.is_empty() or "routing/entropy" not in m.columns:
            continue
        m = m.drop_nulls(["routing/entropy", "reward/mean"])
        rho = spearman(m["reward/mean"].to_list(), m["routing/entropy"].to_list())
        used.append(r)
        rows.append((r.name, [r.method, r.family, str(len(m)), "undefined" if rho is None else f"{rho:+.3f}"]))
        raw.append({"run": r.name, "method": r.method, "family": r.family, "steps": len(m), "spearman": rho})
        if rho is not None:
            vals.append(rho)
    mean = float(np.mean(vals)) if vals else None
    note = (f"Mean Spearman ρ over {len(vals)} runs: {mean:+.3f} (paper: -0.48)." if mean is not None
            else "No run with a defined Spearman ρ (needs routing statistics and non-constant series).")
    return Table("Spearman ρ(reward, routing entropy) per run", ["method", "family", "steps", "ρ"], rows, raw,
                 used, note), mean


def cost_table(runs: list[Run]) -> Table:
    """Expert cost per training prompt, as an online (uncached) pipeline would pay it."""
    cols = ["expert forward passes / prompt", "expert prompt tokens / prompt", "expert generated tokens / prompt",
            "policy prompt tokens / rollout"]
    by_method = defaultdict(list)
    for r in runs:
        by_method[r.method].append(r)
    rows, raw, used = [], [], []
    for method in sorted(by_method, key=lambda m: _order(m, METHOD_ORDER)):
        per_run = []
        for r in by_method[method]:
            m = r.metrics
            if m.is_empty() or "cost/prompts" not in m.columns:
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
        steps = int(r.metrics["step"].max()) if not r.metrics.is_empty() else 0
        lines.append(f"| {r.name} | {r.method} | {r.family} | {r.config.get('seed')} | {steps} | "
                     f"{str(r.config.get('cache_fingerprint', '?'))[:12]} | {r.condition} |")
    return "\n".join(lines) + "\n"


__all__ = ["Table", "table1", "table2", "spearman_table", "cost_table", "table_runs_md", "Cell"]
