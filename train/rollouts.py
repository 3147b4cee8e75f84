"""A micro-batch's rollouts (`Rollouts`: B prompts x G completions with their rewards and advantages),
the seed that draws them, and dynamic sampling (filter_groups), which assembles a micro-batch from the
informative groups of several rounds. The loop (train/loop.py) generates and scores each round."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from train.config import TrainConfig, advantage_scale
from train.grpo import group_advantages, informative_groups


@dataclass(frozen=True, kw_only=True, eq=False)
class Rollouts:
    """A micro-batch of B prompts x G completions, rows of one prompt contiguous (built by keyword;
    dataclasses.replace makes a changed copy)."""

    idx: list[int]  # [B] cache rows
    embeds: torch.Tensor  # [B*G, P+m, d] the policy's input, C spliced in (differentiable into g_phi)
    ref_embeds: torch.Tensor  # [B*G, P+m, d] the reference's input: C with its gate closed (null_context)
    mask: torch.Tensor  # [B*G, P+m]
    tokens: torch.Tensor  # [B*G, T] completions (pad after EOS)
    live: torch.Tensor  # [B*G, T] 1 through the first EOS
    texts: list[str]  # [B*G] decoded completions
    rewards: torch.Tensor  # [B*G]
    advantages: torch.Tensor  # [B*G]
    frac_zero_std: float
    attention: torch.Tensor | None  # [B, m, n]
    choice: torch.Tensor | None  # [B] the expert hard-routing ran
    policy_prompt_tokens: int  # prompt tokens the policy read, C included (cost accounting)
    sampler_logp: torch.Tensor | None = None  # [B*G, T] the sampler's log-probs of its tokens (musk's decoder)


def micro_seed(seed: int, step: int, g: int) -> int:
    """Seed of the global micro-batch g of `step`: sampling does not depend on which rank runs it, so
    W ranks x k micro-batches draw what one process with W*k micro-batches draws (and resume is exact)."""
    return (seed * 1_000_003 + step * 1009 + g) % 2**63



def cat_groups(parts: list[tuple[Rollouts, list[int]]], G: int, pad_id: int) -> Rollouts:
    """One micro-batch of the groups `b` picked from each Rollouts, in order. Prompts are left padded
    to the longest (pads are masked and positions skip them: the same log-probs), completions right
    padded (pad id, live 0, sampler log-prob 0). Advantages are the caller's to recompute."""
    L = max(ro.embeds.shape[1] for ro, _ in parts)
    T = max(ro.tokens.shape[1] for ro, _ in parts)

    def rows(groups):
        return torch.tensor([b * G + j for b in groups for j in range(G)], dtype=torch.long)

    def left(x, r):  # [n, l, ...] -> [n, L, ...], zeros in front
        x = x[r.to(x.device)]
        return torch.cat([x.new_zeros((x.shape[0], L - x.shape[1], *x.shape[2:])), x], 1)

    def right(x, r, fill):  # [n, t] -> [n, T], `fill` behind
        x = x[r.to(x.device)]
        return torch.cat([x, x.new_full((x.shape[0], T - x.shape[1]), fill)], 1)

    def cat(get):
        got = [get(ro, g, rows(g)) for ro, g in parts]
        return None if got[0] is None else torch.cat(got)

    mask = cat(lambda ro, g, r: left(ro.mask, r))
    return Rollouts(
        idx=[ro.idx[b] for ro, g in parts for b in g],
        embeds=cat(lambda ro, g, r: left(ro.embeds, r)), ref_embeds=cat(lambda ro, g, r: left(ro.ref_embeds, r)),
        mask=mask, tokens=cat(lambda ro, g, r: right(ro.tokens, r, pad_id)), live=cat(lambda ro, g, r: right(ro.live, r, 0)),
        texts=[ro.texts[i] for ro, g in parts for i in rows(g).tolist()], rewards=cat(lambda ro, g, r: ro.rewards[r]),
        advantages=cat(lambda ro, g, r: ro.advantages[r.to(ro.advantages.device)]), frac_zero_std=0.0,
        attention=cat(lambda ro, g, r: None if ro.attention is None else ro.attention[g]),
        choice=cat(lambda ro, g, r: None if ro.choice is None else ro.choice[g]), policy_prompt_tokens=int(mask.sum()),
        sampler_logp=cat(lambda ro, g, r: None if ro.sampler_logp is None else right(ro.sampler_logp, r, 0.0)))


def draw_informative(cfg: TrainConfig, first: Rollouts, more: Callable[[int], Rollouts], pad_id: int,
                     device: str) -> tuple[Rollouts, dict]:
    """filter_groups (DAPO's dynamic sampling, verl's filter_groups): keep the groups of `first` whose
    rewards differ, and draw rounds of B more prompts (`more(r)`: round r's rollouts, generated and
    scored by the loop) until B
    informative groups are kept or filter_groups_max_rounds rounds are spent; at the cap, the last
    round's uninformative groups fill the micro-batch. Advantages are recomputed over the kept batch
    (scale_rewards batch: its std). Returns (the micro-batch, {rounds, drawn, kept, reward_sum})."""
    B, G = len(first.idx), cfg.grpo.group_size
    parts, kept, ro, rounds, reward_sum = [], 0, first, 1, 0.0
    while True:
        ok = informative_groups(ro.rewards, G).tolist()  # [B]
        reward_sum += float(ro.rewards.sum())
        take = [b for b in range(B) if ok[b]][: B - kept]
        parts.append((ro, take))
        kept += len(take)
        if kept == B or rounds == cfg.grpo.filter_groups_max_rounds:
            break
        ro = more(rounds)
        rounds += 1
    if kept < B:  # at the cap: the micro-batch keeps its size, its remaining groups have advantage 0
        parts[-1] = (ro, sorted(parts[-1][1] + [b for b in range(B) if not ok[b]][: B - kept]))
    out = cat_groups([(r, g) for r, g in parts if g], G, pad_id)
    adv = group_advantages(out.rewards, G, cfg.grpo.std_floor, advantage_scale(cfg))
    out = replace(out, advantages=adv.advantages.to(device), frac_zero_std=adv.frac_zero_std)
    return out, {"rounds": rounds, "drawn": rounds * B, "kept": kept, "reward_sum": reward_sum}
