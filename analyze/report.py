"""`musk report`: run folders -> Markdown/CSV tables, PNG figures, a summary.md that links them and a
self-contained report.html."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from analyze import baselines, plots
from analyze.html import write_html
from analyze.curves import speed_table
from analyze.records import ablation_table, paired_tables, routing_table, shuffled_all_cell, table1_per_task
from analyze.runs import distinct_runs, dtype_note, load_runs
from analyze.tables import (Table, collaboration_table, cost_table, spearman_table, table1, table2, table_runs_md,
                            unfinished_note)


def _write_table(t: Table, out: Path, stem: str) -> None:
    (out / f"{stem}.md").write_text(t.markdown())
    pl.DataFrame(t.raw, infer_schema_length=None).write_csv(out / f"{stem}.csv") if t.raw else \
        (out / f"{stem}.csv").write_text("")


def run_report(paths: list[Path], out: Path, log=print) -> Path:
    every, aside = distinct_runs(load_runs([Path(p) for p in paths]))
    # A run without summary.json (still training, killed, waiting for --resume) has no final evaluation
    # and stops at another step than its seeds: it is left out of every table and figure and named.
    runs = [r for r in every if r.finished]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t1 = baselines.extend_table1(table1(every), runs)  # + each expert alone, best, oracle, vote
    t2 = table2(runs)
    ts, rho_means = spearman_table(runs)
    tc = cost_table(runs)
    tk = collaboration_table(runs, content=shuffled_all_cell)
    tp, tpt = paired_tables(runs)
    tables = ((t1, "table1"), (table1_per_task(runs), "table1_per_task"), (tp, "paired"),
              (baselines.paired_best_expert(runs), "paired_best_expert"), (tpt, "paired_per_task"), (ablation_table(runs), "ablations"),
              (tk, "collaboration"), (routing_table(runs), "routing_per_task"), (t2, "table2"), (ts, "spearman"),
              (tc, "cost"), (baselines.solo_cost_table(runs), "cost_solo"), (speed_table(runs), "speed"))
    for t, stem in tables:
        t.note += dtype_note(t.sources)
        _write_table(t, out, stem)
    figs = {
        "figure4.png": ("Figure 4: change in utilisation and routing entropy from initialisation",
                        plots.figure4(runs, out / "figure4.png", rho=rho_means)),
        "figure5.png": ("Figure 5: with vs without C", plots.figure5(runs, out / "figure5.png")),
        "figure6.png": ("Figure 6: accuracy vs m", plots.figure6(runs, out / "figure6.png")),
    }

    copies = (" Copies set aside (the same condition and seed as a run kept): " +
              ", ".join(f"{c} (= {k})" for c, k in aside) + ".") if aside else ""
    md = [f"# musk report\n\n{len(every)} runs from {', '.join(str(p) for p in paths)}.{unfinished_note(every)}"
          f"{copies}\n"]
    for t, stem in tables:
        md.append(t.markdown())
        md.append(f"\n[{stem}.md]({stem}.md) · [{stem}.csv]({stem}.csv)\n\nComputed from:\n\n{table_runs_md(t)}\n")
    for name, (title, used) in figs.items():
        if used is None:
            md.append(f"### {title}\n\nmissing: no run has the data this figure needs.\n")
        else:
            fake = Table(title, [], [], sources=used)
            md.append(f"### {title}\n\n![{title}]({name})\n\nComputed from:\n\n{table_runs_md(fake)}\n")
    (out / "summary.md").write_text("\n".join(md))
    write_html(out, every, [t for t, _ in tables],
               {name: (title, out / name if used is not None else None) for name, (title, used) in figs.items()})
    rho = "; ".join(f"{k}: {v:+.3f}" for k, v in rho_means.items()) or "undefined"
    overall = next((f"{x['spearman']:+.3f}" for x in ts.raw if x["setting"] == "all runs"), "undefined")
    log(f"report of {len(every)} runs ({len(every) - len(runs)} unfinished, left out"
        f"{f', {len(aside)} copies set aside' if aside else ''}) written to {out}/summary.md "
        f"(mean Spearman rho per setting: {rho}; over all runs: {overall})")
    return out / "summary.md"
