"""The paper's figures (4, 5, 6) as PNGs with labelled axes and legends."""

from __future__ import annotations

import textwrap
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


def _smooth(x: np.ndarray, w: int) -> np.ndarray:
    """Trailing mean over the last w steps (fewer at the start), along axis 0."""
    c = np.cumsum(np.concatenate([np.zeros((1,) + x.shape[1:]), x]), axis=0)
    k = np.minimum(np.arange(1, len(x) + 1), w).reshape((-1,) + (1,) * (x.ndim - 1))
    return (c[1:] - c[np.maximum(np.arange(1, len(x) + 1) - w, 0)]) / k


def _span(ax, series: list[np.ndarray], least: float) -> None:
    """Symmetric y-range around 0 of at least ±least: a change smaller than that stays visibly small
    instead of filling the axis (noise is not magnified into structure)."""
    top = max([least] + [float(np.nanmax(np.abs(s))) * 1.15 for s in series if len(s)])
    ax.set_ylim(-top, top)
    ax.axhline(0, color="0.6", lw=0.8)


def change_from_start(x: np.ndarray, w: int) -> np.ndarray:
    """x [T, ...] minus the mean of its first w steps: the baseline of a change from initialisation
    (one step is one training batch of a few prompts; its value alone is noise). -> [T, ...]"""
    x = np.asarray(x, dtype=float)
    return x - x[: max(1, w)].mean(axis=0)


def figure4(runs: list[Run], out: Path, method: str = "perceiver", rho: dict | None = None) -> list[Run] | None:
    """As the paper's Figure 1: the change from initialisation (the mean of the first W steps) of each
    expert's utilisation u_i (top) and of the routing entropy H (bottom, with the mean reward), trailing
    means over W steps, mean
    over seeds with ± one std shaded. Axes span at least ±0.1 for u_i and ±0.1 ln n for H, so that
    jitter between runs looks as small as it is. One column per setting of the method's main-setting
    runs (ablations left out), titled with the setting's mean Spearman rho(reward, H)."""
    all_groups = method_runs(runs, method)
    groups = {k: [r for r in rs if not r.metrics.is_empty() and "routing/utilization" in r.metrics.columns]
              for k, rs in all_groups.items()}
    groups = {k: rs for k, rs in groups.items() if rs}
    if not groups:
        return None
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 7.5), squeeze=False)
    for col, (key, rs) in enumerate(groups.items()):
        label = setting_label(key[0], key[1], rs, [g for k, g in all_groups.items() if k != key])
        names = list(rs[0].team)
        # the GRPO steps: a recipe's warm-up steps measure no routing and earn no reward
        ms = [r.metrics.filter(r.metrics["routing/utilization"].is_not_null()) for r in rs]
        util = [np.array(m["routing/utilization"].to_list(), dtype=float) for m in ms]  # [T, n] each
        T = min(len(u) for u in util)
        steps = ms[0]["step"].to_numpy()[:T]
        w = min(10, max(1, T // 5))
        du = [_smooth(change_from_start(u[:T], w), w) for u in util]  # [T, n] change from the first window
        ax = axes[0, col]
        for i in range(du[0].shape[1]):
            _band_line(ax, steps, [d[:, i] for d in du], label=names[i] if i < len(names) else f"expert {i}")
        _span(ax, du, 0.1)
        r_txt = f"; mean ρ(reward, H) {rho[label]:+.2f}" if rho and label in rho else ""
        ax.set_title(textwrap.fill(f"{label} ({len(rs)} seed{'s' if len(rs) > 1 else ''}{r_txt})", 48), fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"Δ utilisation $u_i$ from the first {w} steps' mean ({w}-step mean)")
        ax.legend(fontsize=8)
        ax = axes[1, col]
        _band_line(ax, steps, [_smooth(m["reward/mean"].to_numpy()[:T].astype(float), w) for m in ms],
                   color="tab:blue", label="reward")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"mean reward ({w}-step mean)", color="tab:blue")
        ax2 = ax.twinx()
        dh = [_smooth(change_from_start(h, w), w)
              for h in (m["routing/entropy"].to_numpy()[:T].astype(float) for m in ms)]
        _band_line(ax2, steps, dh, color="tab:red", label="Δ routing entropy H")
        _span(ax2, dh, 0.1 * np.log(max(2, len(names))))
        ax2.set_ylabel(f"Δ routing entropy H from the first {w} steps' mean", color="tab:red")
        lines = ax.get_lines()[:1] + [x for x in ax2.get_lines() if x.get_label() == "Δ routing entropy H"][:1]
        ax.legend(lines, [x.get_label() for x in lines], fontsize=8, loc="upper left")
    _save(fig, f"Figure 4 ({method}): change from initialisation", out)
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
        if r.method == method and r.final_accuracy is not None:
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
