"""Statistics of the report: mean +/- std across seeds, Spearman(reward, entropy) per run."""

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
