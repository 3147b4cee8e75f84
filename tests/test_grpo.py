"""GRPO maths against hand-worked numbers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from train.grpo import group_advantages, grpo_loss, k3_kl, routing_stats


def test_advantages_hand_worked():
    # group 1: mean .25, Bessel std sqrt((.5625 + 3 * .0625) / 3) = .5 -> (1.5, -.5, -.5, -.5)
    # group 2: all equal -> std 0 -> floored -> exactly 0
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    out = group_advantages(r, 4)
    assert torch.allclose(out.advantages, torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]), atol=1e-6)
    assert torch.allclose(out.group_mean, torch.tensor([0.25, 1.0]))
    assert torch.allclose(out.group_std, torch.tensor([0.5, 0.0]))
    assert out.frac_zero_std == 0.5


def test_advantages_partial_rewards():
    # rewards 0, .5, 1: mean .5, std 0.5 -> -1, 0, 1
    out = group_advantages(torch.tensor([0.0, 0.5, 1.0]), 3)
    assert torch.allclose(out.advantages, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)


def test_advantages_bad_group():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 4)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=8, max_size=8))
def test_advantages_zero_mean_and_unit_std(rs):
    out = group_advantages(torch.tensor(rs), 4)
    a = out.advantages.view(2, 4)
    assert torch.allclose(a.mean(1), torch.zeros(2), atol=1e-4)
    for g in range(2):
        if out.group_std[g] > 1e-3:
            assert abs(float(a[g].std()) - 1.0) < 1e-3


def test_k3_hand_worked():
    # pi = .5, ref = .25: d = ln .5; exp(d) - d - 1 = .5 + ln 2 - 1
    v = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert float(v) == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert float(k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0]))) == 0.0


def test_grpo_loss_hand_worked():
    # Two completions, T=2. Seq 0: both tokens real, A=+1; seq 1: one real token, A=-1.
    logp = torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(0.25), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)], [math.log(0.25), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    out = grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.1)
    kl00 = 0.5 + math.log(2) - 1  # only token (0,0) differs from ref
    seq0 = ((-1 + 0.1 * kl00) + (-1 + 0)) / 2
    seq1 = (+1 + 0) / 1
    assert float(out.loss.detach()) == pytest.approx((seq0 + seq1) / 2, abs=1e-6)
    assert float(out.policy_loss) == pytest.approx(((-1 - 1) / 2 + 1) / 2, abs=1e-6)
    assert float(out.kl) == pytest.approx(kl00 / 3, abs=1e-6)
    assert float(out.clip_frac) == 0.0
    # Gradient with ratio == 1: d/dlogp of -A*ratio is -A, of beta*k3 is beta*(1 - exp(ref - logp)).
    out.loss.backward()
    g = logp.grad
    assert float(g[0, 0]) == pytest.approx((-1 + 0.1 * (1 - 0.5)) / 2 / 2, abs=1e-6)
    assert float(g[0, 1]) == pytest.approx(-1 / 2 / 2, abs=1e-6)
    assert float(g[1, 0]) == pytest.approx(1 / 1 / 2, abs=1e-6)
    assert float(g[1, 1]) == 0.0  # padding gets no gradient


def test_grpo_loss_clip():
    # ratio 1.5 with A=+1 is clipped to 1.2; ratio .5 with A=-1: min(-.5, -.8) = -.8 -> loss .8
    old = torch.zeros(2, 1)
    logp = torch.tensor([[math.log(1.5)], [math.log(0.5)]])
    out = grpo_loss(logp, old, logp.clone(), torch.tensor([1.0, -1.0]), torch.ones(2, 1), beta=0.0, clip_eps=0.2)
    assert float(out.loss) == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    assert float(out.clip_frac) == pytest.approx(1.0)


def test_routing_stats_eq15():
    # Example 1: rows (.5, .5) and (1, 0): H = (ln 2 + 0) / 2, u = (.75, .25)
    # Example 2: rows (0, 1) twice: H = 0, u = (0, 1)  -> batch means
    a = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    rs = routing_stats(a)
    assert rs.entropy == pytest.approx(math.log(2) / 2 / 2, abs=1e-6)
    assert rs.utilization == pytest.approx([0.375, 0.625], abs=1e-6)
    assert rs.attention == [[pytest.approx(0.25), pytest.approx(0.75)], [pytest.approx(0.5), pytest.approx(0.5)]]


def test_routing_uniform_entropy_is_log_n():
    a = torch.full((3, 8, 5), 0.2)
    assert routing_stats(a).entropy == pytest.approx(math.log(5), abs=1e-5)
