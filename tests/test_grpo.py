"""GRPO maths against hand-worked numbers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from train.adapters import routing_stats
from train.grpo import group_advantages, grpo_loss, k3_kl, truncated_rows


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


# --- loss variants, several passes, advantage scaling -----------------------------------------


def _original_grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta, clip_eps):
    """The loss before loss_type existed, verbatim: the default must reproduce it bit for bit."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    pg = -torch.minimum(ratio * a, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
    per_token = pg + beta * k3_kl(logp, ref_logp)
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)).mean()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 0.2), st.booleans())
def test_default_loss_is_the_original_bit_for_bit(seed, beta, off_policy):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(6, 5, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(6, 5, generator=g, dtype=torch.float64) if off_policy else logp
    ref = logp + 0.2 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=g) < 0.7).long()
    a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    new = grpo_loss(a, old if off_policy else a.detach(), ref, adv, mask, beta)  # defaults: grpo, symmetric clip
    orig = _original_grpo_loss(b, old if off_policy else b.detach(), ref, adv, mask, beta, 0.2)
    new.loss.backward()
    orig.backward()
    assert torch.equal(new.loss.detach(), orig.detach()) and torch.equal(a.grad, b.grad)


# Two completions, T=3, ratio 1, beta 0: per-token loss -A. Seq 0: 3 real tokens, A=+1;
# seq 1: 1 real token, A=-0.5. Token sum: -3 + 0.5 = -2.5 over 4 real tokens.
LOSS_CASES = [
    # loss_type, kwargs, loss, d loss / d logp[0, 0], d loss / d logp[1, 0]
    ("grpo", {}, (-1 + 0.5) / 2, -1 / 3 / 2, 0.5 / 1 / 2),
    ("dr_grpo", {"max_tokens": 4}, -2.5 / (2 * 4), -1 / 8, 0.5 / 8),
    ("dr_grpo", {}, -2.5 / (2 * 3), -1 / 6, 0.5 / 6),  # no budget given: T
    ("bnpo", {}, -2.5 / 4, -1 / 4, 0.5 / 4),
    ("dapo", {"num_tokens": 10}, -2.5 / 10, -1 / 10, 0.5 / 10),  # the step holds 10 tokens in all
    ("dapo", {}, -2.5 / 4, -1 / 4, 0.5 / 4),
]


@pytest.mark.parametrize("loss_type,kw,loss,g00,g10", LOSS_CASES)
def test_loss_types_hand_worked(loss_type, kw, loss, g00, g10):
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.125], [0.5, 1.0, 1.0]])).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -0.5]), mask, 0.0,
                    loss_type=loss_type, **kw)
    assert float(out.loss.detach()) == pytest.approx(loss, abs=1e-7)
    assert float(out.policy_loss) == pytest.approx(loss, abs=1e-7)
    out.loss.backward()
    assert float(logp.grad[0, 0]) == pytest.approx(g00, abs=1e-7)
    assert float(logp.grad[0, 2]) == pytest.approx(g00, abs=1e-7)
    assert float(logp.grad[1, 0]) == pytest.approx(g10, abs=1e-7)
    assert float(logp.grad[1, 1]) == 0.0


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="choices"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), 0.0,
                  loss_type="ppo")


def test_clip_higher_hand_worked():
    # ratio 1.25, A=+1: inside [0.8, 1.28] -> -1.25 (symmetric 0.2 would clip it to -1.2);
    # ratio 0.75, A=-1: min(-0.75, -0.8) = -0.8 -> +0.8 (the low clip is clip_eps either way).
    old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.25], [0.75]]))
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 1)
    high = grpo_loss(logp, old, logp, adv, mask, 0.0, clip_eps=0.2, clip_eps_high=0.28)
    sym = grpo_loss(logp, old, logp, adv, mask, 0.0, clip_eps=0.2)
    assert float(high.loss) == pytest.approx((-1.25 + 0.8) / 2, abs=1e-6)
    assert float(high.clip_frac) == pytest.approx(0.5)
    assert float(sym.loss) == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    assert float(sym.clip_frac) == pytest.approx(1.0)


def test_off_policy_ratio_gradient_hand_worked():
    # Second pass (mu = 2): pi_old = .5 for both tokens. Token 0: pi = .55, ratio 1.1 (inside the
    # clip), A=+1: d/dlogp of -ratio*A = -ratio = -1.1. Token 1: pi = .8, ratio 1.6 > 1.2 with A=+1:
    # clipped, the surrogate is constant -> no policy gradient; beta*k3 still pulls it to ref (= pi).
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.55, 0.8]])).requires_grad_()
    out = grpo_loss(logp, old, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), 0.04)
    assert float(out.loss.detach()) == pytest.approx((-1.1 - 1.2) / 2, abs=1e-6)
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.1 / 2, 0.0], abs=1e-6)
    assert float(out.clip_frac) == pytest.approx(0.5)


def test_scale_rewards_hand_worked():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    c = (0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5)  # r - group mean (.25, .5)
    group_std2 = math.sqrt(4 * 0.25 / 3)  # Bessel std of (1, 1, 0, 0)
    batch_std = math.sqrt((3 * 0.625**2 + 5 * 0.375**2) / 7)  # Bessel std of all 8 around .375
    group = group_advantages(r, 4, scale="group").advantages
    batch = group_advantages(r, 4, scale="batch").advantages
    none = group_advantages(r, 4, scale="none")
    assert group.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5] + [x / group_std2 for x in c[4:]], abs=1e-6)
    assert batch.tolist() == pytest.approx([x / batch_std for x in c], abs=1e-6)
    assert none.advantages.tolist() == pytest.approx(c, abs=1e-7)
    assert none.frac_zero_std == 0.0 and none.group_std.tolist() == pytest.approx([0.5, group_std2])
    assert torch.equal(group_advantages(r, 4).advantages, group)  # group is the default
    with pytest.raises(ValueError, match="choices"):
        group_advantages(r, 4, scale="global")


def test_batch_scale_keeps_zero_std_groups_at_zero():
    out = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2, scale="batch")
    assert out.advantages[:2].tolist() == [0.0, 0.0] and out.frac_zero_std == 0.5


def test_truncated_rows_hand_worked():
    # budget 3, EOS = 9. Row 0: EOS at 2 (live 1,1,1): not truncated. Row 1: three tokens, no EOS:
    # truncated. Row 2: stopped at EOS after one token. Row 3: two tokens and the engine stopped
    # without returning the EOS (fewer than the budget): not truncated.
    tokens = torch.tensor([[4, 5, 9], [4, 5, 6], [9, 0, 0], [4, 5, 0]])
    live = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    assert truncated_rows(tokens, live, [9], 3).tolist() == [False, True, False, False]
    assert truncated_rows(tokens, live, [9, 6], 3).tolist() == [False, False, False, False]


# --- parity with TRL's own loss code ------------------------------------------------------------


def _trl_loss(GRPOTrainer, logp, old, ref, adv, mask, *, loss_type, beta, eps, eps_high, max_len):
    """TRL's GRPOTrainer._compute_loss on given log-probs: the method runs unbound on a stand-in for
    the trainer whose model forward returns `logp` (one process, one accumulation step, token-level
    importance sampling, no vLLM: TRL's defaults for a plain run)."""
    from collections import defaultdict
    from types import SimpleNamespace

    acc = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x, gather_for_metrics=lambda x: x,
                          reduce=lambda x, reduction="sum": x)
    me = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps, epsilon_high=eps if eps_high is None else eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, accelerator=acc,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
    )
    n = mask.shape[0]
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(me, None, inputs)
    return loss, me._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("beta,eps_high", [(0.0, None), (0.04, None), (0.04, 0.28)])
def test_loss_matches_trl(loss_type, beta, eps_high):
    """Same log-probs, advantages and masks in as TRL's GRPOTrainer._compute_loss; the same loss,
    gradient and clip fraction out, for every loss_type both projects have, off-policy (mu > 1)."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (the `bench` extra): no parity check against it")
    from trl import GRPOTrainer

    g = torch.Generator().manual_seed(7)
    N, T, max_len = 6, 5, 8
    base = -torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    old = base + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)  # a later pass: ratio != 1
    ref = base + 0.2 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0],
                         [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    ours_lp, trl_lp = base.clone().requires_grad_(), base.clone().requires_grad_()
    ours = grpo_loss(ours_lp, old, ref, adv, mask, beta, clip_eps=0.2, clip_eps_high=eps_high, loss_type=loss_type,
                     max_tokens=max_len)
    theirs, metrics = _trl_loss(GRPOTrainer, trl_lp, old, ref, adv, mask, loss_type=loss_type, beta=beta, eps=0.2,
                                eps_high=eps_high, max_len=max_len)
    ours.loss.backward()
    theirs.backward()
    assert float(ours.loss.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12, abs=1e-12), trl.__version__
    assert torch.allclose(ours_lp.grad, trl_lp.grad, rtol=1e-10, atol=1e-12)
    assert float(ours.clip_frac) == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-7)  # TRL: float32 count
    assert 0.0 < float(ours.clip_frac) < 1.0  # the clip is exercised
    if beta:
        assert float(ours.kl) == pytest.approx(metrics["kl"][0], rel=1e-12)
