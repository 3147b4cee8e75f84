"""pass@k and the paired bootstrap against hand-worked numbers."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyze.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, pass_at_k, paired_bootstrap, two_level_bootstrap


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


def _null_draw(rng, n=500, seeds=3, spread=0.046):
    """Two methods of equal expected accuracy: per-prompt difficulty shared, each seed shifts its run's
    accuracy by N(0, spread) (training randomness), answers Bernoulli. -> ([seeds, n], [seeds, n])"""
    p = rng.beta(2, 2, n)
    run = lambda: np.stack([(rng.random(n) < np.clip(p + rng.normal(0, spread), 0, 1)).astype(float)  # noqa: E731
                            for _ in range(seeds)])
    return run(), run()


def test_two_level_calibrated_under_the_null():
    """3 seeds a side, seed spread 4.6 points, 500 prompts, equal expected accuracy: the two-level
    interval excludes 0 in at most ~7% of draws (bound: 16 of 120, P(X >= 17 | p = 0.07) < 0.005);
    the prompts-only interval over seed-averaged scores excludes it in about half (>= 40 of 120)."""
    rng = np.random.default_rng(2024)
    draws, old, new = 120, 0, 0
    for i in range(draws):
        a, b = _null_draw(rng)
        old += paired_bootstrap(a.mean(0), b.mean(0), resamples=400, seed=i).excludes_zero()
        new += two_level_bootstrap(a, b, resamples=400, seed=i).excludes_zero()
    assert new <= 16, f"two-level interval excluded 0 in {new} of {draws} null draws"
    assert old >= 40, f"prompts-only interval excluded 0 in only {old} of {draws} null draws"


def test_two_level_hand_worked_and_flags():
    # three identical seeds, and a is b + 0.1 on every prompt: the difference is 0.1 whatever is resampled
    b = np.tile(np.random.default_rng(0).random(20), (3, 1))
    ci = two_level_bootstrap(b + 0.1, b)
    assert ci.diff == pytest.approx(0.1) and ci.lo == pytest.approx(0.1) and ci.hi == pytest.approx(0.1)
    assert (ci.n, ci.seeds_a, ci.seeds_b, ci.conditional) == (20, 3, 3, False)
    assert ci.fmt() == "+10.0 [+10.0, +10.0] (3 v 3 seeds, 20 prompts)"
    one = two_level_bootstrap(b[:1] + 0.1, b)
    assert one.conditional and one.fmt().startswith("+10.0 [+10.0, +10.0]† (1 v 3 seeds")
    # paired seeds: seeds of equal shift on both sides cancel; a shift that varies by seed does not
    shift = np.array([[0.0], [0.2], [0.4]])
    p = two_level_bootstrap(b + shift + 0.05, b + shift, paired_seeds=True)
    assert p.lo == pytest.approx(0.05) and p.hi == pytest.approx(0.05) and p.fmt().endswith("(3 seeds, 20 prompts)")
    u = two_level_bootstrap(b + shift + 0.05, b + shift[::-1])
    assert u.diff == pytest.approx(0.05) and u.hi - u.lo > 0.2
    with pytest.raises(ValueError):
        two_level_bootstrap(b, b[:2], paired_seeds=True)
    with pytest.raises(ValueError):
        two_level_bootstrap(b, b[:, :5])


def test_two_level_seed_spread_widens_the_interval():
    """Seeds 6 points apart on each side: the two-level interval is wider than the prompts-only one."""
    rng = np.random.default_rng(5)
    p = rng.random(400)
    a = np.stack([(rng.random(400) < np.clip(p + s, 0, 1)) for s in (-0.06, 0.0, 0.06)]).astype(float)
    b = np.stack([(rng.random(400) < np.clip(p + s, 0, 1)) for s in (-0.06, 0.0, 0.06)]).astype(float)
    two, one = two_level_bootstrap(a, b, resamples=2000), paired_bootstrap(a.mean(0), b.mean(0), resamples=2000)
    assert two.diff == pytest.approx(one.diff) and two.hi - two.lo > 1.5 * (one.hi - one.lo)


def test_bootstrap_chunks_do_not_change_the_interval():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 2, 97), rng.integers(0, 2, 97)
    assert paired_bootstrap(x, y, resamples=1000, chunk=7) == paired_bootstrap(x, y, resamples=1000, chunk=1000)
    a, b = rng.random((3, 97)), rng.random((2, 97))
    assert two_level_bootstrap(a, b, resamples=1000, chunk=7) == two_level_bootstrap(a, b, resamples=1000)
    assert two_level_bootstrap(a, a[::-1], paired_seeds=True, resamples=999, chunk=10) == \
        two_level_bootstrap(a, a[::-1], paired_seeds=True, resamples=999)


@pytest.mark.slow
def test_bootstrap_memory_is_bounded():
    """n = 4,000 prompts, 10,000 resamples: drawn at once, the [10,000 x 4,000] index array and the
    gathered scores are 640 MB; in chunks of 250 resamples the peak stays under 100 MB."""
    import tracemalloc

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, (3, 4000)).astype(float), rng.integers(0, 2, (3, 4000)).astype(float)
    for f in (lambda: paired_bootstrap(a[0], b[0]), lambda: two_level_bootstrap(a, b)):
        tracemalloc.start()
        f()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 100e6, f"peak {peak / 1e6:.0f} MB"


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 30), st.integers(1, 50), st.floats(-0.5, 0.5),
       st.integers(0, 2**31))
def test_two_level_shift_and_chunks(sa, sb, n, chunk, c, seed):
    """Adding c to every score of a moves the difference and both ends by c; the chunk size never
    changes the interval; with one seed a side it is the paired bootstrap's interval."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2, (sa, n)).astype(float), rng.integers(0, 2, (sb, n)).astype(float)
    ci = two_level_bootstrap(a, b, resamples=300, seed=seed % 1000)
    moved = two_level_bootstrap(a + c, b, resamples=300, seed=seed % 1000, chunk=chunk)
    assert moved.diff == pytest.approx(ci.diff + c, abs=1e-9)
    assert moved.lo == pytest.approx(ci.lo + c, abs=1e-9) and moved.hi == pytest.approx(ci.hi + c, abs=1e-9)
    assert ci.lo <= ci.hi and ci.conditional == (min(sa, sb) == 1)
    if sa == sb == 1:
        p = paired_bootstrap(a[0], b[0], resamples=300, seed=seed % 1000)
        assert (ci.lo, ci.hi) == (p.lo, p.hi)


def test_two_level_against_fixed_answers_resamples_one_side_and_widens_by_its_seeds():
    """A method's 3 seeds against an expert's fixed greedy answers: the same resampled means as the
    plain call (b's single row draws nothing), widened about the difference by t_2 / z (df = S_a - 1),
    and not conditional (only the method has training randomness)."""
    from scipy.stats import norm, t

    from analyze.stats import two_level_bootstrap

    rng = np.random.default_rng(7)
    a = (rng.random((3, 40)) < [[0.3], [0.5], [0.7]]).astype(float)  # three seeds far apart
    b = (rng.random((1, 40)) < 0.5).astype(float)
    plain = two_level_bootstrap(a, b, resamples=2000)
    fixed = two_level_bootstrap(a, b, resamples=2000, fixed_b=True)
    ratio = t.ppf(0.975, 2) / norm.ppf(0.975)
    assert fixed.diff == plain.diff
    assert fixed.diff - fixed.lo == pytest.approx((plain.diff - plain.lo) * ratio, rel=1e-12)
    assert fixed.hi - fixed.diff == pytest.approx((plain.hi - plain.diff) * ratio, rel=1e-12)
    assert plain.conditional and not fixed.conditional
    assert "(3 seeds v fixed answers, 40 prompts)" in fixed.fmt() and "†" not in fixed.fmt()
    assert two_level_bootstrap(a[:1], b, fixed_b=True).conditional  # one seed: conditional on its weights
    with pytest.raises(ValueError, match="fixed_b needs one row"):
        two_level_bootstrap(a, a, fixed_b=True)


def test_two_level_interval_stays_inside_the_differences_scores_allow():
    """2 seeds a side: t_2 / z widening (2.2x, df = 2) of a wide seed spread would reach past ±100
    points; the interval is clipped to [min a - max b, max a - min b] = [-1, 1] for 0/1 scores."""
    from analyze.stats import two_level_bootstrap

    a = np.array([[1.0] * 20, [0.0] * 20])  # seeds at 100% and 0%
    b = np.array([[0.0] * 20, [1.0] * 20])
    ci = two_level_bootstrap(a, b, resamples=2000)
    assert ci.diff == 0.0 and ci.lo == -1.0 and ci.hi == 1.0
    paired = two_level_bootstrap(a, b, paired_seeds=True, resamples=2000)
    assert -1.0 <= paired.lo <= paired.hi <= 1.0
