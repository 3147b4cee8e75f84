"""Statistics of the report: mean +/- std across seeds, Spearman(reward, entropy) per run, unbiased
pass@k, the paired bootstrap over prompts, and the seed-and-question interval of a difference between runs."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from core.metrics import pass_at_k  # noqa: F401  (re-exported: the report reads it here)
from scipy.stats import norm, spearmanr, t


class Cell(NamedTuple):
    mean: float | None
    std: float | None  # sample std (ddof=1); None with one seed
    n: int

    def fmt(self, scale: float = 100.0) -> str:
        """'75.26 ± 5.62 (n=3)' in percent; 'missing' when there is no run (never 0)."""
        if self.n == 0 or self.mean is None:
            return "missing"
        if self.std is None:
            return f"{self.mean * scale:.2f} (n=1)"
        return f"{self.mean * scale:.2f} ± {self.std * scale:.2f} (n={self.n})"


def cell(values: list[float | None]) -> Cell:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return Cell(None, None, 0)
    arr = np.array(vals)
    return Cell(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None, len(arr))


def spearman(reward: list[float], entropy: list[float]) -> float | None:
    """Spearman rank correlation of two time series of one run; None when undefined (constant series)."""
    r, h = np.asarray(reward, dtype=float), np.asarray(entropy, dtype=float)
    ok = ~(np.isnan(r) | np.isnan(h))
    r, h = r[ok], h[ok]
    if len(r) < 3 or np.all(r == r[0]) or np.all(h == h[0]):
        return None
    rho = spearmanr(r, h).statistic
    return None if math.isnan(rho) else float(rho)


def band(series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std across runs of equal-length series (truncated to the shortest)."""
    n = min(len(s) for s in series)
    arr = np.stack([np.asarray(s[:n], dtype=float) for s in series])
    return arr.mean(0), arr.std(0, ddof=1) if len(series) > 1 else np.zeros(n)


BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


class PairedCI(NamedTuple):
    diff: float  # mean over prompts of a - b
    lo: float  # 2.5th percentile of the resampled mean difference
    hi: float  # 97.5th percentile
    n: int  # paired prompts
    resamples: int
    seed: int

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def fmt(self, scale: float = 100.0) -> str:
        """'+3.1 [+0.4, +5.9] (n=500)' in points."""
        return f"{self.diff * scale:+.1f} [{self.lo * scale:+.1f}, {self.hi * scale:+.1f}] (n={self.n})"


BOOTSTRAP_CHUNK = 250  # resamples drawn at once: memory is [chunk, n], not [resamples, n]


def _percentiles(means: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_bootstrap(a, b, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95, chunk: int = BOOTSTRAP_CHUNK) -> PairedCI:
    """Percentile bootstrap interval of mean(a - b) over paired prompts (Efron & Tibshirani 1993, ch. 13).

    a, b: [n] per-prompt scores of two conditions on the same prompts, in the same order (correct 0/1,
    or a prompt's mean over its samples). Prompts are resampled with replacement `resamples` times
    from numpy's default_rng(seed), `chunk` resamples at a time (peak memory [chunk, n]; the draws and
    so the interval do not depend on chunk); the interval is the (1-level)/2 and (1+level)/2
    percentiles of the resampled means. Pairing removes the prompts' difficulty from the spread: a
    difference that is the same on every prompt has a zero-width interval whatever the prompts' scores
    are. The interval is about these prompts given fixed trained weights: it carries no seed variance
    (see seed_question_interval). Raises ValueError on unequal or empty inputs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length non-empty 1-D arrays, got {a.shape}, {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)  # [R]
    for s in range(0, resamples, chunk):
        k = min(chunk, resamples - s)
        means[s:s + k] = d[rng.integers(0, len(d), size=(k, len(d)))].mean(axis=1)  # [k, n] -> [k]
    lo, hi = _percentiles(means, level)
    return PairedCI(float(d.mean()), lo, hi, len(d), resamples, seed)


class SeedQuestionCI(NamedTuple):
    """A difference between runs with its 95% interval from seed and question variance components
    (see seed_question_interval). Scores and bounds are fractions; fmt prints points."""

    diff: float  # mean over seeds and questions of a minus that of b
    lo: float  # diff - half-width (never clipped: see beyond)
    hi: float
    n: int  # questions, or clusters of questions when clustered
    seeds_a: int
    seeds_b: int
    paired_seeds: bool  # a and b are two conditions of the same runs (seed s of a is seed s of b)
    fixed_b: bool  # b has no training randomness (an expert's greedy answers): only a's seeds vary
    v_seed: float  # seed part of Var(diff)
    v_question: float  # question part of Var(diff)
    df: float  # degrees of freedom of the seed part (Welch-Satterthwaite); inf when conditional
    floor: float  # the least difference the scores allow (min a - max b; per-seed with paired seeds)
    ceil: float
    clustered: bool = False  # n counts clusters of questions (one problem asked in several forms)
    per_seed: tuple = ()  # ((diff, lo, hi), ...) conditional per-seed intervals, filled with two seeds
    questions: int = 0  # questions (n counts clusters when clustered)

    @property
    def conditional(self) -> bool:
        """True when a trained side has one seed: the interval then holds its weights fixed (questions only)."""
        return self.seeds_a < 2 if self.fixed_b else min(self.seeds_a, self.seeds_b) < 2

    @property
    def two_seeds(self) -> bool:
        """A trained side has exactly two seeds: t_1 makes a pooled interval useless; per_seed holds one
        conditional interval a seed instead."""
        trained = (self.seeds_a,) if self.fixed_b else (self.seeds_a, self.seeds_b)
        return not self.conditional and min(trained) == 2

    @property
    def too_small(self) -> bool:
        """Fewer than two questions (clusters), or nothing varies: no interval to print."""
        return self.n < 2 or not self.hi > self.lo

    @property
    def beyond(self) -> bool:
        """A bound lies past the differences the scores allow ([floor, ceil])."""
        return self.lo < self.floor or self.hi > self.ceil

    def excludes_zero(self) -> bool:
        return not self.too_small and not self.two_seeds and (self.lo > 0 or self.hi < 0)

    def fmt(self, scale: float = 100.0, unit: str = "questions") -> str:
        """'+3.1 [-0.4, +5.9] (3 v 3 seeds, 500 questions)' in points. '†' marks an interval conditional
        on the trained weights (a side with one seed); two seeds print one interval per seed and no pooled
        one; 'n too small' replaces a zero-width or one-question interval; a bound past what the scores
        allow is said, not clipped. unit names what the questions are; with clusters that merge questions,
        n counts problems beside them."""
        s = lambda k: f"{k} seed" + ("s" if k > 1 else "")  # noqa: E731
        seeds = s(self.seeds_a) if self.paired_seeds else f"{self.seeds_a} v {s(self.seeds_b)}"
        if self.fixed_b:
            seeds = f"{s(self.seeds_a)} v fixed answers"
        what = f"{seeds}, {self.n} problems, {self.questions} {unit}" if self.n < self.questions else \
            f"{seeds}, {self.n} {unit}"
        iv = lambda d, lo, hi: f"{d * scale:+.1f} [{lo * scale:+.1f}, {hi * scale:+.1f}]"  # noqa: E731
        if self.too_small:
            return f"{self.diff * scale:+.1f}, n too small for an interval ({what})"
        if self.two_seeds:
            # ordinal names: the seeds' own numbers are not known here, and "seed 1" would read as one of them
            per = "; ".join(f"{o} seed: {iv(*x)}†" if x[2] > x[1] else f"{o} seed: {x[0] * scale:+.1f}, n too small"
                            for o, x in zip(("first", "second"), self.per_seed))  # a zero-width seed says so
            return f"{self.diff * scale:+.1f}, two seeds: no pooled interval; {per} ({what})"
        out = iv(self.diff, self.lo, self.hi) + ("†" if self.conditional else "") + f" ({what}"
        if self.beyond:
            out += f"; a bound is past what the scores allow, [{self.floor * scale:+.1f}, {self.ceil * scale:+.1f}]"
        return out + ")"


TwoLevelCI = SeedQuestionCI  # the name callers of the former two-level bootstrap use


def _residual_var(x: np.ndarray) -> np.ndarray:
    """sigma_e^2 of a [..., S, n] table: the two-way ANOVA residual mean square (seed and question main
    effects removed), sum r^2 / ((S-1)(n-1)); 0 where S < 2 or n < 2. -> [...]"""
    s, n = x.shape[-2:]
    if s < 2 or n < 2:
        return np.zeros(x.shape[:-2])
    r = x - x.mean(-1, keepdims=True) - x.mean(-2, keepdims=True) + x.mean((-2, -1), keepdims=True)
    return (r ** 2).sum((-2, -1)) / ((s - 1) * (n - 1))


def _question_var(d: np.ndarray, clusters: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(Var of mean(d) over questions, clusters counted): d [..., n]. Without clusters var(d, ddof=1)/n;
    with cluster ids [n], the cluster-robust form G/(G-1) sum_g (sum_{q in g} (d_q - mean d))^2 / n^2
    (Cameron & Miller 2015, eq. 11), which is the former when every question is its own cluster."""
    n = d.shape[-1]
    dev = d - d.mean(-1, keepdims=True)
    if clusters is None:
        return (dev ** 2).sum(-1) / max(n - 1, 1) / n, n
    _, g = np.unique(np.asarray(clusters), return_inverse=True)
    k = int(g.max()) + 1
    sums = dev @ np.eye(k)[g]  # [..., G] per-cluster sums of deviations
    return (sums ** 2).sum(-1) * k / max(k - 1, 1) / n ** 2, k


def components(a: np.ndarray, b: np.ndarray, paired_seeds: bool = False, fixed_b: bool = False,
               clusters=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Variance components of mean(a) - mean(b), batched: a [..., S_a, n], b [..., S_b, n].

    Returns (diff, v_seed, df, v_question, n), each [...] but n (questions or clusters). The seed part is
    sum over trained sides of var_s(per-seed means, ddof 1) / S (paired seeds: of the per-seed difference
    table; fixed_b: a only), with Welch-Satterthwaite df (S - 1 for one side). The question part is
    (Var over questions of the seed-averaged difference - sum over sides of sigma_e^2 / S / n), floored at
    0: the per-seed means already hold each seed x question residual sigma_e^2 (two-way ANOVA), so it is
    counted once. With one seed on a trained side the result is conditional on the weights: v_seed 0,
    df inf, and the question part is the whole Var over questions (nothing subtracted)."""
    diff = a.mean((-2, -1)) - b.mean((-2, -1))
    vq, n = _question_var(a.mean(-2) - b.mean(-2), clusters)
    sides = [a - b] if paired_seeds else [a] if fixed_b else [a, b]
    if min(len_s := [x.shape[-2] for x in sides]) < 2:
        return diff, np.zeros_like(diff), np.full_like(diff, np.inf), vq, n
    v = [x.mean(-1).var(-1, ddof=1) / s for x, s in zip(sides, len_s)]  # [...] each
    e = sum(_residual_var(x) / s for x, s in zip(sides, len_s))
    v_seed = sum(v)
    den = sum(vi ** 2 / (s - 1) for vi, s in zip(v, len_s))
    with np.errstate(invalid="ignore", divide="ignore"):
        df = np.where(den > 0, v_seed ** 2 / np.where(den > 0, den, 1), sum(s - 1 for s in len_s))
    return diff, v_seed, df, np.maximum(vq - e / a.shape[-1], 0.0), n


def half_width(v_seed, df, v_question, level: float = 0.95):
    """sqrt(t_{df}^2 v_seed + z^2 v_question): Student's t only on the seed part (few seeds), the normal
    quantile on the question part (many questions). Broadcasts over arrays."""
    q = 0.5 + level / 2
    return np.sqrt(t.ppf(q, df) ** 2 * v_seed + norm.ppf(q) ** 2 * v_question)


def seed_question_interval(a, b, *, paired_seeds: bool = False, fixed_b: bool = False, clusters=None,
                           level: float = 0.95) -> SeedQuestionCI:
    """Interval of a between-run difference that carries training randomness: diff +/- half_width of
    the seed and question variance components (`components`; a random-effects two-way layout, Searle,
    Casella & McCulloch 1992, ch. 4). Its null rejection rate and power are measured by simulation in
    analyze/calibration.py (docs/evaluation.md).

    a: [S_a, n], b: [S_b, n] per-seed, per-question scores on the same n questions in the same order.
    paired_seeds: a and b are two conditions of the same S runs (S_a == S_b). fixed_b: b is one row with
    no training randomness (an expert's greedy answers). clusters: optional [n] ids of questions that are
    one problem (`core.heldout.problem_key`): the question part then uses cluster sums and n counts
    clusters. One seed on a trained side: the interval is conditional (questions only, z). Two seeds:
    lo/hi are still computed, and per_seed holds each seed's conditional interval (paired: seed s of a v
    seed s of b; otherwise a's seed v b's seed-averaged scores), which is what fmt prints. Bounds are
    never clipped (`beyond` says when one leaves [floor, ceil]). Raises ValueError on shapes that do not fit."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0 or 0 in (len(a), len(b)):
        raise ValueError(f"seed_question_interval needs [S_a, n] and [S_b, n] with n > 0, got {a.shape}, {b.shape}")
    if paired_seeds and len(a) != len(b):
        raise ValueError(f"paired seeds need as many seeds on both sides, got {len(a)} and {len(b)}")
    if fixed_b and (len(b) != 1 or paired_seeds):
        raise ValueError(f"fixed_b needs one row of b and unpaired seeds, got {len(b)} rows")
    if clusters is not None and len(clusters) != a.shape[1]:
        raise ValueError(f"clusters needs one id per question ({a.shape[1]}), got {len(clusters)}")
    diff, v_seed, df, v_q, n = components(a, b, paired_seeds, fixed_b, clusters)
    h = float(half_width(v_seed, df, v_q, level))
    floor, ceil = ((float((a - b).min()), float((a - b).max())) if paired_seeds
                   else (float(a.min() - b.max()), float(a.max() - b.min())))
    ci = SeedQuestionCI(float(diff), float(diff) - h, float(diff) + h, n, len(a), len(b), paired_seeds, fixed_b,
                        float(v_seed), float(v_q), float(df), floor, ceil, clusters is not None, (), a.shape[1])
    if ci.two_seeds:
        rest = b.mean(0, keepdims=True)
        per = [seed_question_interval(a[i:i + 1], b[i:i + 1] if paired_seeds else rest, clusters=clusters,
                                      level=level) for i in range(len(a))]
        ci = ci._replace(per_seed=tuple((x.diff, x.lo, x.hi) for x in per))
    return ci


def two_level_bootstrap(a, b, *, paired_seeds: bool = False, fixed_b: bool = False, clusters=None,
                        level: float = 0.95) -> SeedQuestionCI:
    """The former name of seed_question_interval (the same interval, no resampling)."""
    return seed_question_interval(a, b, paired_seeds=paired_seeds, fixed_b=fixed_b, clusters=clusters, level=level)
