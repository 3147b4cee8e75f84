"""pass@k and the paired bootstrap against hand-worked numbers."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyze.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, pass_at_k, paired_bootstrap


def test_pass_at_k_hand_worked():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(8, 3, 4) == pytest.approx(1 - 5 / 70)  # 1 - C(5,4)/C(8,4)
    assert pass_at_k(3, 0, 3) == 0.0
    assert pass_at_k(3, 2, 2) == 1.0  # fewer wrong samples than k: every draw of 2 holds a correct one
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_closed_form(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    if k == 1:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_paired_bootstrap_hand_worked():
    """d = a - b = [1, 0, 0, 0]: a resampled mean is K/4 with K ~ Binomial(4, 1/4), whose CDF is
    .316, .738, .949, .996, 1 at K = 0..4; so the 2.5th percentile is 0 and the 97.5th is 3/4."""
    ci = paired_bootstrap([1, 1, 0, 1], [0, 1, 0, 1])
    assert ci.diff == pytest.approx(0.25) and ci.n == 4
    assert ci.lo == 0.0 and ci.hi == 0.75
    assert (ci.resamples, ci.seed) == (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED) == (10_000, 0)
    assert not ci.excludes_zero() and ci.fmt() == "+25.0 [+0.0, +75.0] (n=4)"


def test_paired_bootstrap_pairs_and_is_seeded():
    rng = np.random.default_rng(1)
    hard = rng.random(50)  # prompt difficulty, shared by both conditions
    a, b = hard + 0.1, hard  # the same +0.1 on every prompt: pairing gives a zero-width interval
    ci = paired_bootstrap(a, b)
    assert ci.lo == pytest.approx(0.1) and ci.hi == pytest.approx(0.1) and ci.excludes_zero()
    x, y = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    assert paired_bootstrap(x, y, seed=3) == paired_bootstrap(x, y, seed=3)
    assert paired_bootstrap(x, y, seed=3) != paired_bootstrap(x, y, seed=4)
    # the interval is numpy's percentiles of the seeded resampled means
    d = (x - y).astype(float)
    means = d[np.random.default_rng(3).integers(0, 60, size=(500, 60))].mean(1)
    ci = paired_bootstrap(x, y, resamples=500, seed=3)
    assert (ci.lo, ci.hi) == tuple(np.percentile(means, [2.5, 97.5]))
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])
