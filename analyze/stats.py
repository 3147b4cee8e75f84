"""Statistics of the report: mean +/- std across seeds, Spearman(reward, entropy) per run, unbiased
pass@k, and the paired bootstrap interval of a difference measured on the same prompts."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt from n samples of which c are correct (Chen et al. 2021, Eq. 1):
    1 - C(n-c, k) / C(n, k), computed as a product (no huge binomials). Raises ValueError unless
    0 <= c <= n and 1 <= k <= n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


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


def paired_bootstrap(a, b, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95, chunk: int = BOOTSTRAP_CHUNK) -> PairedCI:
    """Percentile bootstrap interval of mean(a - b) over paired prompts (Efron & Tibshirani 1993, ch. 13).

    a, b: [n] per-prompt scores of two conditions on the same prompts, in the same order (correct 0/1,
    or a prompt's mean over its samples). Prompts are resampled with replacement `resamples` times
    from numpy's default_rng(seed), `chunk` resamples at a time (peak memory [chunk, n]; the draws and
    so the interval do not depend on chunk); the interval is the (1-level)/2 and (1+level)/2
    percentiles of the resampled means. Pairing removes the prompts' difficulty from the spread: a
    difference that is the same on every prompt has a zero-width interval whatever the prompts' scores
    are. The interval is about these prompts given fixed trained weights: it carries no seed variance
    (see two_level_bootstrap). Raises ValueError on unequal or empty inputs."""
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


class TwoLevelCI(NamedTuple):
    diff: float  # mean over seeds and prompts of a minus that of b
    lo: float  # lower end of the interval (see two_level_bootstrap)
    hi: float
    n: int  # paired prompts
    seeds_a: int
    seeds_b: int
    paired_seeds: bool  # a and b are two conditions of the same runs (seed s of a is seed s of b)
    resamples: int
    seed: int
    fixed_b: bool = False  # b has no training randomness (an expert's greedy answers): only a's seeds vary

    @property
    def conditional(self) -> bool:
        """True when a trained side has one seed: the interval then holds its weights fixed (prompts only)."""
        return self.seeds_a < 2 if self.fixed_b else min(self.seeds_a, self.seeds_b) < 2

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def fmt(self, scale: float = 100.0, unit: str = "prompts") -> str:
        """'+3.1 [-0.4, +5.9] (3 v 3 seeds, 500 prompts)' in points; '†' marks an interval conditional on
        the trained weights (a side with one seed). unit names what n counts (prompts, distinct questions)."""
        s = lambda k: f"{k} seed" + ("s" if k > 1 else "")  # noqa: E731
        seeds = s(self.seeds_a) if self.paired_seeds else f"{self.seeds_a} v {s(self.seeds_b)}"
        if self.fixed_b:
            seeds = f"{s(self.seeds_a)} v fixed answers"
        mark = "†" if self.conditional else ""
        return (f"{self.diff * scale:+.1f} [{self.lo * scale:+.1f}, {self.hi * scale:+.1f}]{mark} "
                f"({seeds}, {self.n} {unit})")


def two_level_bootstrap(a, b, paired_seeds: bool = False, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED, level: float = 0.95,
                        chunk: int = BOOTSTRAP_CHUNK, fixed_b: bool = False) -> TwoLevelCI:
    """Interval of a between-run difference that carries training randomness (a hierarchical bootstrap,
    Davison & Hinkley 1997, sec. 3.8): each resample draws seeds with replacement within each side,
    then prompts with replacement, the same prompts for both sides (paired over prompts).

    a: [S_a, n], b: [S_b, n] per-seed, per-prompt scores on the same n prompts in the same order.
    paired_seeds: a and b are two conditions of the same S runs (S_a == S_b; e.g. with C and without
    C), so seeds are drawn once for both and the per-seed differences are resampled.

    Two small-sample corrections keep the interval near its level with 3 seeds a side: each side's
    per-seed deviations from its mean are scaled by sqrt(S/(S-1)) before resampling (the plain
    bootstrap's variance of a mean of S draws is (S-1)/S of the unbiased one), and the percentile
    interval is widened about the observed difference by t_{df}/z (df = S_a + S_b - 2, or S - 1 with
    paired seeds: S seeds estimate their spread with few degrees of freedom). With one seed on a side
    nothing is widened and only prompts vary on that side: `conditional` is then True (the interval
    holds the trained weights fixed). The widened interval is clipped to the differences the scores
    allow ([min a - max b, max a - min b], per-seed differences with paired seeds; [-1, 1] for 0/1
    scores). Drawn `chunk` resamples at a time (memory [chunk, n]) from default_rng([seed, i]) (i = 0
    prompts, 1.. a side's seeds).

    fixed_b: b is one row with no training randomness (an expert's own greedy answers): a's seeds are
    resampled, b's row is not, the widening uses df = S_a - 1, and the interval is conditional only
    when a has one seed. Raises ValueError on shapes that do not fit."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0 or 0 in (len(a), len(b)):
        raise ValueError(f"two_level_bootstrap needs [S_a, n] and [S_b, n] with n > 0, got {a.shape}, {b.shape}")
    if paired_seeds and len(a) != len(b):
        raise ValueError(f"paired seeds need as many seeds on both sides, got {len(a)} and {len(b)}")
    if fixed_b and (len(b) != 1 or paired_seeds):
        raise ValueError(f"fixed_b needs one row of b and unpaired seeds, got {len(b)} rows")
    n = a.shape[1]
    diff = float(a.mean() - b.mean())
    if len(a) == 1 and len(b) == 1:  # nothing to draw at the seed level: the paired bootstrap over prompts
        ci = paired_bootstrap(a[0], b[0], resamples, seed, level, chunk)
        return TwoLevelCI(ci.diff, ci.lo, ci.hi, n, 1, 1, paired_seeds, resamples, seed, fixed_b)
    sides = [a - b] if paired_seeds else [a, b]
    sides = [_inflate(x) for x in sides]  # [S, n] each
    # one stream for the prompts and one per side, so the draws do not depend on the chunk size
    rng, *seed_rngs = [np.random.default_rng([seed, i]) for i in range(len(sides) + 1)]
    means = np.empty(resamples)  # [R]
    for s in range(0, resamples, chunk):
        k = min(chunk, resamples - s)
        # seed weights: how often each seed is drawn, / S -> [k, S]; per-prompt mean over drawn seeds [k, n]
        per_prompt = [g.multinomial(len(x), np.full(len(x), 1 / len(x)), size=k) / len(x) @ x
                      for g, x in zip(seed_rngs, sides)]
        d = per_prompt[0] - per_prompt[1] if len(per_prompt) == 2 else per_prompt[0]  # [k, n]
        idx = rng.integers(0, n, size=(k, n))  # [k, n] the same prompts for both sides
        means[s:s + k] = np.take_along_axis(d, idx, axis=1).mean(axis=1)
    lo, hi = _percentiles(means, level)
    df = len(a) - 1 if paired_seeds or fixed_b else len(a) + len(b) - 2
    if (len(a) >= 2 if fixed_b else min(len(a), len(b)) >= 2) and df >= 1:
        widen = float(t.ppf(0.5 + level / 2, df) / norm.ppf(0.5 + level / 2))
        lo, hi = diff - (diff - lo) * widen, diff + (hi - diff) * widen
        # the widening knows no bounds; a mean difference cannot leave [min a - max b, max a - min b]
        # (for 0/1 scores [-1, 1]): with 2 seeds a side t_1 / z is 6.5 and would print -130 points
        if paired_seeds:  # [S, n] per-seed differences bound the mean difference
            floor, ceil = float((a - b).min()), float((a - b).max())
        else:
            floor, ceil = float(a.min() - b.max()), float(a.max() - b.min())
        lo, hi = max(lo, floor), min(hi, ceil)
    return TwoLevelCI(diff, float(lo), float(hi), n, len(a), len(b), paired_seeds, resamples, seed, fixed_b)


def _inflate(x: np.ndarray) -> np.ndarray:
    """[S, n] seeds' scores with their deviations from the seed mean scaled by sqrt(S/(S-1)) (S >= 2)."""
    if len(x) < 2:
        return x
    m = x.mean(axis=0, keepdims=True)
    return m + (x - m) * np.sqrt(len(x) / (len(x) - 1))
