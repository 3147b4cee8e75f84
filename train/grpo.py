"""GRPO maths as pure functions returning (value, stats) NamedTuples.

One objective (paper Eq. 4: reward minus beta * KL to the reference), several estimators of it, named
as TRL names them so that a run states its estimator in the words its readers use:

- advantages (`scale_rewards`): A_i = r_i - mean of its group, divided by the group's std (group, the
  original GRPO), by the std over the whole batch of rollouts (batch) or by nothing (none: Dr. GRPO).
- surrogate: the PPO clip on the ratio pi_theta / pi_old per token, clipped to [1 - clip_eps,
  1 + clip_eps_high] (DAPO's asymmetric "clip-higher" when clip_eps_high > clip_eps). pi_old is the
  policy that sampled the rollouts; with one pass per batch (num_iterations = 1, the paper) it is the
  current policy detached, so ratio == 1 in value and the surrogate is the policy gradient.
- loss normalisation (`loss_type`): grpo (mean over each completion's tokens, then over completions:
  the original GRPO and the paper), dr_grpo (token sum over a constant, completions x max_new_tokens),
  bnpo (token mean over the micro-batch), dapo (token mean over the optimizer step's whole batch).

Fixed choices, all deliberate:

1. KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1 per token (unbiased, >= 0), added to
   the loss with coefficient beta (paper: 0.04), not folded into the reward (as TRL). beta 0: the
   reference is never run (grpo_loss takes ref_logp None).
2. The reference policy is the frozen initial policy: LoRA disabled on the same weights (no second
   copy) and zero-valued context tokens at the same positions as C (paper, Sec. 4.1).
3. The std is Bessel-corrected and floored (std_floor), so a group whose rewards are all equal gets
   advantage exactly 0 instead of 0/0 (TRL adds 1e-4 to the std instead of flooring it).
4. Rollouts come from a sampler (the fused decode step, possibly bf16) that is not the training
   forward: their per-token log-probs differ by rounding. Both are log softmax(logits / T) over the
   whole vocabulary (the sampler records that, not its filtered distribution's renormalised log-prob,
   when top_k / top_p / min_p are on), so they compare one support. The gap is measured every step
   (`sampler_gap`); optionally each token's policy-gradient term is weighted by the truncated
   importance ratio min(pi_trainer / pi_sampler, C) (truncated importance sampling, TIS; Yao et al.
   2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"). Off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch

from core.config import bound, check_bounds


class AdvantageStats(NamedTuple):
    advantages: torch.Tensor  # [B*G]
    group_mean: torch.Tensor  # [B]
    group_std: torch.Tensor  # [B]
    frac_zero_std: float


LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
ScaleRewards = Literal["auto", "group", "batch", "none"]
SCALE_REWARDS = get_args(ScaleRewards)[1:]  # what group_advantages takes: auto is resolved before
LOSS_TYPES = get_args(LossType)


@dataclass(frozen=True)
class GrpoConfig:
    """The `grpo` section of the train config: the objective and its estimator (`--set grpo.KEY=VALUE`)."""

    group_size: int = bound(8, ge=2, note="GRPO normalises within a group")
    """G completions per prompt (paper: 8)."""
    beta: float = bound(0.04, ge=0)
    """KL coefficient (paper: 0.04)."""
    clip_eps: float = bound(0.2, ge=0)
    """Lower PPO clip of the ratio pi/pi_old: the surrogate clips it at 1 - clip_eps (TRL: epsilon;
    default 0.2 as TRL). Active only when num_iterations > 1 (with one pass the ratio is 1)."""
    clip_eps_high: float | None = bound(None, ge=0)
    """Upper PPO clip: the ratio is clipped at 1 + clip_eps_high; null: clip_eps (symmetric, TRL:
    epsilon_high, default null as TRL). DAPO's clip-higher sets it above clip_eps (e.g. 0.28)."""
    num_iterations: int = bound(1, ge=1)
    """mu, AdamW updates per batch of rollouts (TRL: num_iterations; paper and default 1). Each step
    samples once, then makes mu passes over the same rollouts, the ratio taken against the sampling
    policy's log-probs (PPO-style GRPO). optim.total_training_steps counts batches of rollouts, so a run
    makes mu x total_training_steps updates."""
    loss_type: LossType = "grpo"
    """How per-token losses become one number: grpo (mean over each completion's tokens, then over
    completions: the paper and original GRPO), dr_grpo (token sum over the constant completions x
    max_new_tokens), bnpo (token mean over the micro-batch), dapo (token mean over the whole optimizer
    step). TRL's name; TRL's default is dapo."""
    scale_rewards: ScaleRewards = "auto"
    """Advantage scaling (TRL: scale_rewards): group (divide by the group's reward std: GRPO), batch (by
    the std of the micro-batch's B*G rewards), none (no division: Dr. GRPO). auto: none under
    loss_type dr_grpo, group otherwise (the paper: group)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_new_tokens without EOS out of the loss (DAPO's overlong
    filtering; TRL: mask_truncated_completions, default false). They still count in the advantages."""
    filter_groups: bool = False
    """Dynamic sampling (DAPO; verl's algorithm.filter_groups): drop the groups whose G rewards are all
    equal (advantage 0: no policy gradient) and draw further prompts until each micro-batch has
    train_batch_size informative groups, at most filter_groups_max_rounds generation rounds (logged per
    step: filter/groups_drawn, filter/groups_kept). Off: the paper's GRPO."""
    filter_groups_max_rounds: int = bound(10, ge=1)
    """Cap on generation rounds of train_batch_size prompts a micro-batch may take under filter_groups
    (verl's max_num_gen_batches; DAPO's recipe 10). At the cap the micro-batch is filled with the
    uninformative groups last drawn (they add only the KL term) and filter/groups_kept says so."""
    std_floor: float = bound(1e-4, ge=0)
    """Floor of the group std in the advantage denominator."""
    tis_cap: float = bound(0.0, ge=0, note="0: off")
    """Truncated importance sampling: weight each rollout token's policy-gradient term by
    min(pi_trainer(y_t) / pi_sampler(y_t), tis_cap), correcting for a sampler that is not the training
    forward (the fused decode step in bf16, vLLM with merged bf16 weights). 0 = off (paper presets:
    off; the paper trains on-policy). Typical when on: 2. The gap itself is logged every step
    (sampler/logprob_gap, sampler/logprob_abs_gap, sampler/logprob_max_abs_gap) whenever musk's own
    decoder draws the rollouts."""

    def validate(self) -> None:
        """Raises MuskError naming grpo.KEY for a value outside its bounds."""
        check_bounds(self, "grpo")

    def advantage_scale(self) -> str:
        """scale_rewards with auto resolved: none under dr_grpo (Dr. GRPO drops the std), group otherwise."""
        if self.scale_rewards != "auto":
            return self.scale_rewards
        return "none" if self.loss_type == "dr_grpo" else "group"


def group_advantages(rewards: torch.Tensor, group_size: int, std_floor: float = 1e-4,
                     scale: str = "group") -> AdvantageStats:
    """A_i = (r_i - mean_g) / max(s, std_floor) within each group of `group_size` completions.

    rewards: [B*G], completions of one prompt contiguous. s is the group's std (scale "group", GRPO),
    the std of all B*G rewards (scale "batch", TRL's scale_rewards="batch") or 1 (scale "none", Dr.
    GRPO: no std division). stds are Bessel-corrected. group_std and frac_zero_std always describe the
    groups. Raises ValueError when the rewards do not split into groups or scale is unknown.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale!r}; choices: {list(SCALE_REWARDS)}")
    r = rewards.float().view(-1, group_size)  # [B, G]
    mean = r.mean(dim=1)
    std = r.std(dim=1, unbiased=True) if group_size > 1 else torch.zeros_like(mean)
    if scale == "group":
        adv = (r - mean[:, None]) / std.clamp_min(std_floor)[:, None]
    elif scale == "batch":
        batch_std = r.std(unbiased=True) if r.numel() > 1 else r.new_zeros(())
        adv = (r - mean[:, None]) / batch_std.clamp_min(std_floor)
    else:
        adv = r - mean[:, None]
    frac_zero = float((std < std_floor).float().mean())
    return AdvantageStats(adv.reshape(-1), mean, std, frac_zero)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups carry a policy gradient: [B] bool, False where the group's G rewards are all equal
    (every advantage is then exactly 0, whatever scale_rewards). rewards: [B*G], groups contiguous.
    DAPO's dynamic sampling (Yu et al. 2025, Eq. 11's constraint 0 < |{correct}| < G; verl's
    filter_groups on the reward) keeps only these."""
    r = rewards.view(-1, group_size)  # [B, G]
    return r.amax(dim=1) != r.amin(dim=1)


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
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_type: str = "grpo",
    max_tokens: int | None = None,
    num_tokens: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> GRPOLoss:
    """Clipped surrogate + beta * k3 KL per token, reduced as `loss_type` says.

    logp, old_logp, ref_logp, mask: [N, T] (N = B*G completions, T completion tokens);
    advantages: [N]. mask is 1 on the completion tokens that count (through the first EOS).
    ratio = exp(logp - old_logp) is clipped to [1 - clip_eps, 1 + clip_eps_high] (clip_eps_high
    None: clip_eps); per token l = -min(ratio A, clip(ratio) A) + beta k3. Reductions (TRL's
    GRPOTrainer._compute_loss names and formulas):
      grpo     mean_i (sum_t l m / sum_t m)             per-completion token mean, then mean
      dr_grpo  sum l m / (N * max_tokens)               max_tokens: the generation budget (default T)
      bnpo     sum l m / num_tokens                     num_tokens default: sum m (this batch's tokens)
      dapo     sum l m / num_tokens                     the caller passes the tokens of the whole
                                                        optimizer step (TRL: num_items_in_batch)
    policy_loss is the same reduction of the surrogate alone; kl and clip_frac are token means over
    mask (clip_frac: tokens where the clip decides the value, TRL's clip_ratio/region_mean).
    ref_logp None (beta 0: the reference is never run): no KL term, and kl is 0 (not measured).
    Raises ValueError on an unknown loss_type.
    is_weights: [N, T] detached weights on each token's policy-gradient term (truncated importance
    sampling, `sampler_gap`); None: 1.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choices: {list(LOSS_TYPES)}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)  # [N, T]
    a = advantages[:, None]
    surr1 = ratio * a
    surr2 = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * a
    pg = -torch.minimum(surr1, surr2)  # [N, T]
    if is_weights is not None:
        pg = pg * is_weights
    if ref_logp is None:
        if beta != 0:
            raise ValueError(f"beta {beta} needs the reference's log-probs (ref_logp is None)")
        kl = torch.zeros_like(logp)  # [N, T]
        per_token = pg
    else:
        kl = k3_kl(logp, ref_logp)  # [N, T]
        per_token = pg + beta * kl
    reduce = _reduction(mask, loss_type, max_tokens, num_tokens)
    loss = reduce(per_token)
    with torch.no_grad():
        n_tok = mask.sum().clamp_min(1.0)
        policy_loss = reduce(pg)
        kl_mean = (kl * mask).sum() / n_tok
        clipped = ((surr2 < surr1).to(mask.dtype) * mask).sum() / n_tok
    return GRPOLoss(loss, policy_loss.detach(), kl_mean.detach(), clipped.detach())


def _reduction(mask: torch.Tensor, loss_type: str, max_tokens: int | None, num_tokens: float | None):
    """Per-token values [N, T] -> the scalar loss_type asks for (see grpo_loss)."""
    if loss_type == "grpo":
        lengths = mask.sum(dim=1).clamp_min(1.0)  # [N]
        return lambda x: ((x * mask).sum(dim=1) / lengths).mean()
    if loss_type == "dr_grpo":
        denom = mask.shape[0] * (max_tokens if max_tokens is not None else mask.shape[1])
        return lambda x: (x * mask).sum() / denom
    denom = mask.sum().clamp_min(1.0) if num_tokens is None else max(float(num_tokens), 1.0)
    return lambda x: (x * mask).sum() / denom


def truncated_rows(tokens: torch.Tensor, live: torch.Tensor, eos: list[int], max_new_tokens: int) -> torch.Tensor:
    """Which completions hit the budget without an EOS: [N] bool, from tokens and live [N, T] (live 1
    through the first EOS). A row is truncated when it has max_new_tokens live tokens and none is an
    EOS (TRL's mask_truncated_completions: the last token is not EOS)."""
    eos_t = torch.tensor(eos, device=tokens.device)
    has_eos = (torch.isin(tokens, eos_t) & live.bool()).any(dim=1)  # [N]
    return (live.sum(dim=1) >= max_new_tokens) & ~has_eos


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
