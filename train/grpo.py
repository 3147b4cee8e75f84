"""GRPO maths as pure functions returning (value, stats) NamedTuples.

Departures from textbook GRPO (DeepSeekMath, Shao et al. 2024), all deliberate:

1. One optimisation pass per batch of rollouts (num_iterations = 1, as TRL's default): the "old"
   policy is the current one detached, so ratio == 1 in value and the clipped surrogate reduces to
   the policy gradient; the clip is kept so that a future multi-pass setting is correct.
2. KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1 per token (unbiased, >= 0), added to
   the loss with coefficient beta (paper: 0.04), not folded into the reward.
3. The reference policy is the frozen initial policy: LoRA disabled on the same weights (no second
   copy) and zero-valued context tokens at the same positions as C (paper, Sec. 4.1).
4. Advantages are group-normalised with the Bessel-corrected std and a floor (std_floor), so a group
   whose rewards are all equal gets advantage exactly 0 instead of 0/0.
5. Loss normalisation: mean over each completion's real tokens, then mean over completions (the
   original GRPO form; DAPO's token-level mean is not used).
6. Rollouts come from a sampler (the fused decode step, possibly bf16) that is not the training
   forward: their per-token log-probs differ by rounding. The gap is measured every step
   (`sampler_gap`); optionally each token's policy-gradient term is weighted by the truncated
   importance ratio min(pi_trainer / pi_sampler, C) (truncated importance sampling, TIS; Yao et al.
   2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"). Off by default.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AdvantageStats(NamedTuple):
    advantages: torch.Tensor  # [B*G]
    group_mean: torch.Tensor  # [B]
    group_std: torch.Tensor  # [B]
    frac_zero_std: float


def group_advantages(rewards: torch.Tensor, group_size: int, std_floor: float = 1e-4) -> AdvantageStats:
    """A_i = (r_i - mean_g) / max(std_g, std_floor) within each group of `group_size` completions.

    rewards: [B*G], completions of one prompt contiguous. std is Bessel-corrected (G-1).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # [B, G]
    mean = r.mean(dim=1)
    std = r.std(dim=1, unbiased=True) if group_size > 1 else torch.zeros_like(mean)
    adv = (r - mean[:, None]) / std.clamp_min(std_floor)[:, None]
    frac_zero = float((std < std_floor).float().mean())
    return AdvantageStats(adv.reshape(-1), mean, std, frac_zero)


class GRPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    policy_loss: torch.Tensor  # scalar, detached
    kl: torch.Tensor  # scalar mean per-token KL, detached
    clip_frac: torch.Tensor  # fraction of tokens where the clip was active, detached


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    clip_eps: float = 0.2,
    is_weights: torch.Tensor | None = None,
) -> GRPOLoss:
    """Clipped surrogate + beta * k3 KL, per-sequence token mean then batch mean.

    logp, old_logp, ref_logp, mask: [N, T] (N = B*G completions, T completion tokens);
    advantages: [N]. mask is 1 on real completion tokens (through the first EOS).
    is_weights: [N, T] detached weights on each token's policy-gradient term (truncated importance
    sampling, `sampler_gap`); None: 1.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)  # [N, T]
    a = advantages[:, None]
    surr1 = ratio * a
    surr2 = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a
    pg = -torch.minimum(surr1, surr2)  # [N, T]
    if is_weights is not None:
        pg = pg * is_weights
    kl = k3_kl(logp, ref_logp)  # [N, T]
    per_token = pg + beta * kl
    lengths = mask.sum(dim=1).clamp_min(1.0)  # [N]
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()
    with torch.no_grad():
        n_tok = mask.sum().clamp_min(1.0)
        policy_loss = ((pg * mask).sum(dim=1) / lengths).mean()
        kl_mean = (kl * mask).sum() / n_tok
        clipped = ((surr2 < surr1).to(mask.dtype) * mask).sum() / n_tok
    return GRPOLoss(loss, policy_loss.detach(), kl_mean.detach(), clipped.detach())


class RoutingStats(NamedTuple):
    entropy: float  # H of Eq. 15
    utilization: list[float]  # u_i of Eq. 15, [n]
    attention: list[list[float]]  # batch-mean A, [m][n]


def routing_stats(attention: torch.Tensor) -> RoutingStats:
    """Eq. 15 from expert attention A of shape [B, m, n] (rows sum to 1), averaged over the batch.

    H = 1/m sum_j (-sum_i A_ji log A_ji); u_i = 1/m sum_j A_ji. Per-example values are computed
    first and then averaged over the batch ("all statistics are averaged over the batch").
    """
    a = attention.detach().float()
    plogp = torch.where(a > 0, a * torch.log(a.clamp_min(1e-30)), torch.zeros_like(a))
    h = (-plogp.sum(dim=-1)).mean(dim=-1)  # [B]
    u = a.mean(dim=1)  # [B, n]
    return RoutingStats(float(h.mean()), u.mean(dim=0).tolist(), a.mean(dim=0).tolist())


class SamplerGap(NamedTuple):
    weights: torch.Tensor  # [N, T] min(exp(trainer - sampler), cap) on live tokens, 1 elsewhere; detached
    gap: float  # mean over live tokens of sampler - trainer log-prob
    abs_gap: float  # mean |sampler - trainer|
    max_abs_gap: float
    truncated: float  # fraction of live tokens whose ratio exceeded the cap


def sampler_gap(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                cap: float) -> SamplerGap:
    """Per-token log-prob gap between the sampler that drew the rollouts and the training forward,
    and the truncated importance weights min(pi_trainer(y_t) / pi_sampler(y_t), cap) (TIS).

    trainer_logp, sampler_logp, mask: [N, T]. cap: C of TIS (> 0); cap <= 0 gives weights of 1.
    """
    with torch.no_grad():
        m = mask.bool()
        d = (trainer_logp.detach() - sampler_logp).float()  # [N, T] log pi_trainer / pi_sampler
        n = max(1, int(m.sum()))
        gap = float(-(d * m).sum()) / n
        abs_d = d.abs() * m
        ratio = torch.exp(d)
        if cap > 0:
            w = torch.where(m, ratio.clamp_max(cap), torch.ones_like(ratio))
            trunc = float(((ratio > cap) & m).sum()) / n
        else:
            w, trunc = torch.ones_like(ratio), 0.0
    return SamplerGap(w, gap, float(abs_d.sum()) / n, float(abs_d.max()) if m.any() else 0.0, trunc)
