"""pass@k, the paired bootstrap and the seed-and-question interval against hand-worked numbers, and the
interval's calibration by simulation."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scipy.stats import norm, t

from analyze.stats import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, pass_at_k, paired_bootstrap, seed_question_interval,
                           two_level_bootstrap)


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


def test_bootstrap_chunks_do_not_change_the_interval():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 2, 97), rng.integers(0, 2, 97)
    assert paired_bootstrap(x, y, resamples=1000, chunk=7) == paired_bootstrap(x, y, resamples=1000, chunk=1000)


@pytest.mark.slow
def test_bootstrap_memory_is_bounded():
    """n = 4,000 prompts, 10,000 resamples: drawn at once, the [10,000 x 4,000] index array and the
    gathered scores are 640 MB; in chunks of 250 resamples the peak stays under 100 MB."""
    import tracemalloc

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 4000).astype(float), rng.integers(0, 2, 4000).astype(float)
    tracemalloc.start()
    paired_bootstrap(a, b)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100e6, f"peak {peak / 1e6:.0f} MB"


Z, T2 = norm.ppf(0.975), t.ppf(0.975, 2)
A = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=float)  # 3 seeds x 4 questions
B = np.array([[0, 1, 0, 0]], dtype=float)  # one fixed row


def test_interval_hand_worked_against_fixed_answers():
    """Seed means .5, .25, .75: var 1/16, seed part 1/48 (df 2). Seed-averaged difference per question
    [1, -1/3, 1/3, 0]: var 35/108, / 4 = 35/432. ANOVA residuals of A: sum of squares 5/6 over (2)(3)
    df = 5/36; / S / n = 5/432. Question part 35/432 - 5/432 = 5/72."""
    ci = seed_question_interval(A, B, fixed_b=True)
    assert ci.diff == pytest.approx(0.25, abs=1e-12)
    assert ci.v_seed == pytest.approx(1 / 48, abs=1e-12) and ci.df == pytest.approx(2.0)
    assert ci.v_question == pytest.approx(5 / 72, abs=1e-12)
    h = math.sqrt(T2 ** 2 / 48 + Z ** 2 * 5 / 72)
    assert (ci.lo, ci.hi) == pytest.approx((0.25 - h, 0.25 + h), abs=1e-12)
    assert not ci.conditional and not ci.two_seeds and ci.n == 4
    assert ci.fmt() == f"+25.0 [{(0.25 - h) * 100:+.1f}, {(0.25 + h) * 100:+.1f}] (3 seeds v fixed answers, 4 questions" \
        f"; a bound is past what the scores allow, [-100.0, +100.0])"  # hi = 1.16: said, not clipped
    assert ci.hi > 1 and ci.beyond


def test_interval_paired_unpaired_and_welch_df():
    """Paired: the same formula on the per-seed difference table (df S - 1). Unpaired: Welch df."""
    b3 = A[::-1].copy()
    p = seed_question_interval(A, b3, paired_seeds=True)
    d = A - b3
    assert p.v_seed == pytest.approx(d.mean(1).var(ddof=1) / 3) and p.df == pytest.approx(2.0)
    u = seed_question_interval(A, np.vstack([b3, b3[:1]]))
    va, vb = A.mean(1).var(ddof=1) / 3, np.vstack([b3, b3[:1]]).mean(1).var(ddof=1) / 4
    assert u.v_seed == pytest.approx(va + vb)
    assert u.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3))
    with pytest.raises(ValueError):
        seed_question_interval(A, A[:2], paired_seeds=True)
    with pytest.raises(ValueError):
        seed_question_interval(A, A[:, :3])
    with pytest.raises(ValueError, match="fixed_b needs one row"):
        seed_question_interval(A, A, fixed_b=True)


def test_interval_one_seed_is_conditional_on_questions_only():
    """One seed a side: Var over questions of the difference / n, z, marked †."""
    ci = seed_question_interval(A[:1], B)
    d = A[0] - B[0]
    h = Z * math.sqrt(d.var(ddof=1) / 4)
    assert ci.conditional and (ci.lo, ci.hi) == pytest.approx((0.25 - h, 0.25 + h), abs=1e-12)
    assert "]† (1 v 1 seed, 4 questions" in ci.fmt()


def test_interval_n_too_small_and_two_seeds():
    """A constant difference (zero width) or one question prints 'n too small'; two seeds print one
    conditional interval a seed and no pooled one."""
    b = np.tile(np.random.default_rng(0).random(20), (3, 1))
    same = seed_question_interval(b + 0.1, b)
    assert same.too_small and not same.excludes_zero()
    assert same.fmt() == "+10.0, n too small for an interval (3 v 3 seeds, 20 questions)"
    one = seed_question_interval(A[:, :1], B[:, :1], fixed_b=True)
    assert one.fmt().startswith("+0.0, n too small") or one.fmt().startswith("+100.0, n too small")
    two = seed_question_interval(A[:2], B, fixed_b=True)
    assert two.two_seeds and not two.excludes_zero() and len(two.per_seed) == 2
    s1 = seed_question_interval(A[:1], B)
    assert two.per_seed[0] == (s1.diff, s1.lo, s1.hi)
    assert "two seeds: no pooled interval; first seed: " in two.fmt() and "second seed: " in two.fmt()


def test_interval_clusters_count_problems_once():
    """Each question asked twice (one cluster each): n counts clusters, the question part stays near the
    single copy's, where without clusters the copies halve it; one cluster per question changes nothing."""
    rng = np.random.default_rng(4)
    a, b = (rng.random((3, 40)) < 0.6).astype(float), (rng.random((3, 40)) < 0.4).astype(float)
    ids = np.repeat(np.arange(40), 2)
    dup = seed_question_interval(np.repeat(a, 2, 1), np.repeat(b, 2, 1), clusters=ids)
    plain = seed_question_interval(np.repeat(a, 2, 1), np.repeat(b, 2, 1))
    assert dup.n == 40 and dup.clustered and "40 problems, 80 questions" in dup.fmt()
    assert dup.v_question > 1.5 * plain.v_question
    assert seed_question_interval(a, b, clusters=np.arange(40)) == seed_question_interval(a, b)._replace(clustered=True)
    with pytest.raises(ValueError, match="one id per question"):
        seed_question_interval(a, b, clusters=[0, 1])


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(2, 30), st.floats(-0.5, 0.5), st.integers(0, 2**31))
def test_interval_moves_with_a_shift(sa, sb, n, c, seed):
    """Adding c to every score of a moves the difference and both ends by c; the former name is the
    same function."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2, (sa, n)).astype(float), rng.integers(0, 2, (sb, n)).astype(float)
    ci, moved = seed_question_interval(a, b), two_level_bootstrap(a + c, b)
    assert moved.diff == pytest.approx(ci.diff + c, abs=1e-9)
    assert moved.lo == pytest.approx(ci.lo + c, abs=1e-9) and moved.hi == pytest.approx(ci.hi + c, abs=1e-9)
    assert ci.lo <= ci.hi and ci.conditional == (min(sa, sb) == 1)


@pytest.mark.slow
@pytest.mark.parametrize("sd", [0.04, 0.10])
def test_interval_calibrated_both_ways(sd):
    """Paired seeds (two conditions of the same runs), 3 seeds, 64 questions, seed shift sd 4 or 10
    points (analyze/calibration.py): 4,000 null draws reject in [2%, 8%] (binomial sd of the rate 0.3
    points), and 4,000 draws with a true +5 points reject at least 80% as often as the seed-level t
    interval over per-seed differences. The per-table function agrees with the batched one."""
    from analyze.calibration import calibrate, draw, seed_question

    r = calibrate("paired", seeds=3, n=64, sd=sd, draws=4000, kinds=("seed-question", "seed t"))
    new, ref = r["seed-question"], r["seed t"]
    assert 0.02 <= new["null"] <= 0.08, r
    assert new["power"] >= 0.8 * ref["power"], r
    a, b = draw(np.random.default_rng(9), "paired", 50, 3, n=64, sd=sd, effect=0.05)
    batched = seed_question(a, b, "paired").reject
    assert [two_level_bootstrap(x, y, paired_seeds=True).excludes_zero() for x, y in zip(a, b)] == batched.tolist()


def test_a_zero_width_seed_of_two_says_n_too_small():
    """Two seeds print one interval a seed; a seed whose differences are all equal has no interval."""
    from analyze.stats import seed_question_interval

    a = [[0.0] * 8, [1, 0, 1, 0, 0, 1, 0, 0]]
    ci = seed_question_interval(a, [[0.25] * 8], fixed_b=True)
    text = ci.fmt()
    assert "first seed: -25.0, n too small" in text and "second seed: +12.5 [" in text
