"""`report.html`: the whole report as one self-contained page (tables, figures inlined as data URIs,
the run list, sampled completions per method). Opens from disk in a browser, no server, no network."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from analyze.runs import Run
from analyze.tables import Table
from cache.run_folder import COMPLETIONS, RunFolder

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:14px}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}.note{color:#555;font-size:13px}
pre{white-space:pre-wrap;margin:0;font-size:13px}details{margin:.3em 0}"""


def _e(x) -> str:
    return html.escape(str(x))


def table_html(t: Table) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{_e(c)}</th>" for c in t.columns) + "</tr>"
    body = "".join("<tr><th>" + _e(label) + "</th>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"
                   for label, cells in t.rows)
    note = f'<p class="note">{_e(t.note)}</p>' if t.note else ""
    used = ", ".join(_e(r.name) for r in sorted(t.sources, key=lambda r: r.name)) or "no runs"
    return (f"<h2>{_e(t.title)}</h2><table>{head}{body}</table>{note}"
            f'<details><summary>computed from {len(t.sources)} runs</summary><p class="note">{used}</p></details>')


def figure_html(title: str, png: Path | None) -> str:
    if png is None or not png.exists():
        return f"<h2>{_e(title)}</h2><p>missing: no run has the data this figure needs.</p>"
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<h2>{_e(title)}</h2><img alt="{_e(title)}" src="data:image/png;base64,{data}">'


def runs_html(runs: list[Run]) -> str:
    rows = "".join(f"<tr><td>{_e(r.name)}</td><td>{_e(r.method)}</td><td>{_e(r.family)}</td>"
                   f"<td>{_e(r.config.get('seed'))}</td><td>{_e(r.steps)}</td><td>{_e(r.status())}</td>"
                   f"<td>{_e(r.final_accuracy)}</td>"
                   f"<td>{_e(str(r.config.get('cache_fingerprint', '?'))[:12])}</td></tr>" for r in runs)
    return ("<h2>Runs</h2><table><tr><th>run</th><th>method</th><th>family</th><th>seed</th><th>steps</th>"
            f"<th>status</th><th>final val accuracy</th><th>cache</th></tr>{rows}</table>")


def completions_html(runs: list[Run], per_method: int = 3) -> str:
    """The last evaluation's greedy completions with C and with C removed, a few per method."""
    parts = ["<h2>Sampled completions (last evaluation, greedy)</h2>"]
    for method in sorted({r.method for r in runs}):
        recs = []
        for r in sorted((r for r in runs if r.method == method), key=lambda r: r.name):
            ev = [c for c in RunFolder(r.path).read(COMPLETIONS) if c.get("kind") == "eval"]
            last = max((c["step"] for c in ev), default=None)
            recs += [(r.name, c) for c in ev if c["step"] == last]
        if not recs:
            continue
        rows = "".join(
            f"<tr><td>{_e(name)}</td><td><pre>{_e(c['prompt'])}</pre></td><td>{_e(c['answer'])}</td>"
            f"<td><pre>{_e(c.get('completion', ''))}</pre> ({_e(c.get('reward'))})</td>"
            f"<td><pre>{_e(c.get('completion_without_context', '—'))}</pre> "
            f"({_e(c.get('reward_without_context', '—'))})</td></tr>" for name, c in recs[:per_method])
        parts.append(f"<h3>{_e(method)}</h3><table><tr><th>run</th><th>prompt</th><th>answer</th>"
                     f"<th>with C (reward)</th><th>C removed (reward)</th></tr>{rows}</table>")
    return "".join(parts) if len(parts) > 1 else ""


def write_html(out: Path, runs: list[Run], tables: list[Table], figures: dict[str, tuple[str, Path | None]]) -> Path:
    body = [f"<h1>musk report</h1><p>{len(runs)} runs.</p>"]
    body += [table_html(t) for t in tables]
    body += [figure_html(title, png) for title, png in figures.values()]
    body += [runs_html(runs), completions_html(runs)]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>musk report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>")
    path = Path(out) / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
