"""Calibration of the between-run intervals by simulation: null rejection rate, power and width.

The model (shared by both sides, so only training randomness and answer noise separate them):
question difficulty p_q ~ Beta(2, 2); each seed shifts its run's accuracy by N(0, sd); answers are
Bernoulli(clip(p_q + shifts, 0, 1)). Three designs:

- "unpaired": method v method, S seeds each, independent shifts per side;
- "paired": two conditions of the same S runs: seed s shifts both by the same r_s ~ N(0, sd); on a
  share AGREE of (seed, question) cells both conditions' answers come from one uniform draw (one
  policy answers alike where the condition does not matter), elsewhere independently;
- "fixed": S seeds of a method v one row of fixed answers (an expert's greedy ones, Bernoulli(p_q)).

An effect of `effect` (fraction, e.g. 0.05) is added to side a's probabilities before clipping.
Every interval kind here is vectorised over draws: arrays are [draws, S, n].
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import t

from analyze.stats import components, half_width

DESIGNS = ("unpaired", "paired", "fixed")
AGREE = 0.5
KINDS = ("seed-question", "seed t", "question bootstrap")


def draw(rng: np.random.Generator, design: str, draws: int, seeds: int, *, n: int, sd: float,
         effect: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(a [draws, S, n], b [draws, S or 1, n]) 0/1 scores of one design (module docstring)."""
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    p = rng.beta(2, 2, (draws, 1, n))
    bern = lambda q: (rng.random(q.shape) < np.clip(q, 0, 1)).astype(float)  # noqa: E731
    shift = lambda: rng.normal(0, sd, (draws, seeds, 1))  # noqa: E731
    if design == "unpaired":
        return bern(p + shift() + effect), bern(p + shift())
    if design == "paired":
        r = shift()  # one shift a run, both conditions
        u = rng.random((draws, seeds, n))
        v = np.where(rng.random((draws, seeds, n)) < AGREE, u, rng.random((draws, seeds, n)))
        return (u < np.clip(p + r + effect, 0, 1)).astype(float), (v < np.clip(p + r, 0, 1)).astype(float)
    return bern(p + shift() + effect), bern(p)


class Decision(NamedTuple):
    reject: np.ndarray  # [draws] bool: the interval excludes 0
    width: np.ndarray  # [draws] hi - lo


def seed_question(a: np.ndarray, b: np.ndarray, design: str, level: float = 0.95) -> Decision:
    """The report's interval (analyze.stats.seed_question_interval), batched. A zero-width interval
    ('n too small') never rejects."""
    diff, v_seed, df, v_q, _ = components(a, b, paired_seeds=design == "paired", fixed_b=design == "fixed")
    h = half_width(v_seed, df, v_q, level)
    return Decision((np.abs(diff) > h) & (h > 0), 2 * h)


def seed_t(a: np.ndarray, b: np.ndarray, design: str, level: float = 0.95) -> Decision:
    """The classical seed-level t interval: paired, over per-seed differences (df S - 1); fixed, over
    per-seed means minus the fixed row's mean (df S - 1); unpaired, Welch over per-seed means."""
    q = 0.5 + level / 2
    ma, mb = a.mean(-1), b.mean(-1)  # [draws, S]
    if design == "unpaired":
        va, vb = ma.var(-1, ddof=1) / ma.shape[1], mb.var(-1, ddof=1) / mb.shape[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            df = (va + vb) ** 2 / (va ** 2 / (ma.shape[1] - 1) + vb ** 2 / (mb.shape[1] - 1))
        h = t.ppf(q, np.nan_to_num(df, nan=ma.shape[1] + mb.shape[1] - 2)) * np.sqrt(va + vb)
        d = ma.mean(-1) - mb.mean(-1)
    else:
        x = ma - mb  # [draws, S]: per-seed differences (b broadcasts when fixed)
        h = t.ppf(q, x.shape[1] - 1) * x.std(-1, ddof=1) / np.sqrt(x.shape[1])
        d = x.mean(-1)
    return Decision((np.abs(d) > h) & (h > 0), 2 * h)


def question_bootstrap(a: np.ndarray, b: np.ndarray, design: str, *, level: float = 0.95, resamples: int = 1000,
                       seed: int = 0) -> Decision:
    """The plain percentile bootstrap over questions of the seed-averaged difference (seeds ignored)."""
    d = a.mean(-2) - b.mean(-2)  # [draws, n]
    rng = np.random.default_rng(seed)
    lo, hi = np.empty(len(d)), np.empty(len(d))
    for i in range(len(d)):
        means = d[i][rng.integers(0, d.shape[1], (resamples, d.shape[1]))].mean(-1)
        lo[i], hi[i] = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return Decision((lo > 0) | (hi < 0), hi - lo)


INTERVALS = {"seed-question": seed_question, "seed t": seed_t, "question bootstrap": question_bootstrap}


def calibrate(design: str, seeds: int, n: int, sd: float, *, draws: int, effect: float = 0.05, seed: int = 0,
              kinds=KINDS, extra: dict | None = None) -> dict[str, dict[str, float]]:
    """{kind: {"null": rejection rate under no effect, "power": rejection rate at `effect`, "width":
    mean width under the null}} over `draws` draws of each, from default_rng([seed, 0]) and ([seed, 1]).
    extra: more {kind: fn(a, b, design) -> Decision} to measure on the same draws."""
    fns = {k: INTERVALS[k] for k in kinds} | (extra or {})
    null = draw(np.random.default_rng([seed, 0]), design, draws, seeds, n=n, sd=sd)
    alt = draw(np.random.default_rng([seed, 1]), design, draws, seeds, n=n, sd=sd, effect=effect)
    out = {}
    for k, fn in fns.items():
        d0, d1 = fn(*null, design), fn(*alt, design)
        out[k] = {"null": float(d0.reject.mean()), "power": float(d1.reject.mean()), "width": float(d0.width.mean())}
    return out
