"""The paper's figures (4, 5, 6) as PNGs with labelled axes and legends."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analyze.runs import Run  # noqa: E402
from analyze.stats import band, cell  # noqa: E402
from analyze.tables import method_runs, setting_label  # noqa: E402


def _groups(runs: list[Run]) -> dict[str, list[Run]]:
    g = defaultdict(list)
    for r in runs:
        g[r.condition].append(r)
    return g


def _band_line(ax, steps, series, **plot_kw):
    """Mean over seeds as a line, ± one std as a shaded band (same colour when one is given)."""
    mean, std = band(series)
    ax.plot(steps, mean, **plot_kw)
    ax.fill_between(steps, mean - std, mean + std, color=plot_kw.get("color"), alpha=0.2)


def _save(fig, title: str, out: Path) -> None:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def figure4(runs: list[Run], out: Path, method: str = "perceiver") -> list[Run] | None:
    """Per-expert utilisation u_i over steps (mean ± std band across seeds); reward and entropy. One
    column per setting (family, team, condition) of the method's own runs, as Figure 4 shows teams."""
    groups = {k: [r for r in rs if not r.metrics.is_empty() and "routing/utilization" in r.metrics.columns]
              for k, rs in method_runs(runs, method).items()}
    groups = {k: rs for k, rs in groups.items() if rs}
    if not groups:
        return None
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 7.5), squeeze=False)
    for col, (key, rs) in enumerate(groups.items()):
        names = list(rs[0].team)
        steps = rs[0].metrics["step"].to_numpy()
        util = [np.array(r.metrics["routing/utilization"].to_list(), dtype=float) for r in rs]  # [T, n] each
        n = min(len(u) for u in util)
        steps = steps[:n]
        ax = axes[0, col]
        for i in range(util[0].shape[1]):
            _band_line(ax, steps, [u[:n, i] for u in util], label=names[i] if i < len(names) else f"expert {i}")
        ax.set_title(f"{setting_label(key[0], key[1], rs, [])} ({len(rs)} seed{'s' if len(rs) > 1 else ''})",
                     fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("utilisation $u_i$")
        ax.legend(fontsize=8)
        ax = axes[1, col]
        _band_line(ax, steps, [r.metrics["reward/mean"].to_numpy()[:n] for r in rs], color="tab:blue", label="reward")
        ax.set_xlabel("training step")
        ax.set_ylabel("mean reward", color="tab:blue")
        ax2 = ax.twinx()
        _band_line(ax2, steps, [r.metrics["routing/entropy"].to_numpy()[:n] for r in rs], color="tab:red",
                   label="routing entropy H")
        ax2.set_ylabel("routing entropy H", color="tab:red")
        lines = ax.get_lines()[:1] + ax2.get_lines()[:1]
        ax.legend(lines, [l.get_label() for l in lines], fontsize=8, loc="upper left")
    _save(fig, f"Figure 4: expert utilisation, reward and routing entropy over training ({method})", out)
    return [r for rs in groups.values() for r in rs]


def context_curve(run: Run):
    """The with-C / without-C evaluations of a run, as Figure 5 draws them: the fixed-subset curve
    (kind "curve", every curve_freq steps) when the run has one, else its full evaluations."""
    ev = run.evals
    if ev.is_empty() or "reward_without_context" not in ev.columns:
        return None
    if "kind" in ev.columns and (ev["kind"] == "curve").any():
        return ev.filter(ev["kind"] == "curve")
    return ev.filter(ev["kind"] != "curve") if "kind" in ev.columns else ev


def figure5(runs: list[Run], out: Path) -> list[Run] | None:
    """Validation reward of the same policy with C and with C removed, over training steps."""
    curves = {r.name: c for r in runs if (c := context_curve(r)) is not None}
    groups = _groups([r for r in runs if r.name in curves])
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for col, (cond, rs) in enumerate(sorted(groups.items())):
        ax = axes[0, col]
        n = min(len(curves[r.name]) for r in rs)
        steps = curves[rs[0].name]["step"].to_numpy()[:n]
        for key, label, color in (("reward", "with C", "tab:green"), ("reward_without_context", "without C", "tab:gray")):
            _band_line(ax, steps, [curves[r.name][key].to_numpy()[:n] for r in rs], marker="o", color=color,
                       label=label)
        ax.set_title(f"{rs[0].method} / {rs[0].family} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation reward")
        ax.legend()
    _save(fig, "Figure 5: the same policy with and without the context tokens C", out)
    return [r for rs in groups.values() for r in rs]


def figure6(runs: list[Run], out: Path, method: str = "perceiver") -> list[Run] | None:
    """Final validation accuracy against the number of latent queries m."""
    groups = defaultdict(list)
    for r in runs:
        if r.method == method:
            groups[(r.family, r.condition_without("num_latents"))].append(r)
    if not groups:
        return None
    (family, _), rs = max(groups.items(), key=lambda kv: (len({r.config["num_latents"] for r in kv[1]}), len(kv[1])))
    ms = sorted({r.config["num_latents"] for r in rs})
    cells = [cell([r.final_accuracy for r in rs if r.config["num_latents"] == m]) for m in ms]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar(ms, [c.mean * 100 for c in cells], yerr=[(c.std or 0) * 100 for c in cells], marker="o",
                capsize=4, label=f"{method} / {family}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_xlabel("number of latent queries m")
    ax.set_ylabel("final validation accuracy (%)")
    ax.set_title("Figure 6: accuracy vs m")
    ax.legend()
    _save(fig, "", out)
    return rs
