"""Statistics of the report: mean +/- std across seeds, Spearman(reward, entropy) per run, unbiased
pass@k, and the paired bootstrap interval of a difference measured on the same prompts."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.stats import spearmanr


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


def paired_bootstrap(a, b, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95) -> PairedCI:
    """Percentile bootstrap interval of mean(a - b) over paired prompts (Efron & Tibshirani 1993, ch. 13).

    a, b: [n] per-prompt scores of two conditions on the same prompts, in the same order (correct 0/1,
    or a prompt's mean over its samples). Prompts are resampled with replacement `resamples` times
    from numpy's default_rng(seed); the interval is the (1-level)/2 and (1+level)/2 percentiles of the
    resampled means. Pairing removes the prompts' difficulty from the spread: a difference that is
    the same on every prompt has a zero-width interval whatever the prompts' scores are."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length non-empty 1-D arrays, got {a.shape}, {b.shape}")
    d = a - b
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))  # [R, n]
    means = d[idx].mean(axis=1)  # [R]
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return PairedCI(float(d.mean()), float(lo), float(hi), len(d), resamples, seed)
