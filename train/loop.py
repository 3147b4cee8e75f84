"""`musk train`: GRPO over cached expert features. No expert is loaded.

One optimizer step = gradient_accumulation_steps micro-batches of train_batch_size prompts, each
prompt sampled group_size times (num_iterations > 1: that many AdamW updates on the same rollouts).
A micro-batch is two named steps, as in torchtune's GRPO recipe:
`generate_trajectory` (context tokens, rollouts, rewards, advantages -> a typed `Rollouts`) and
`grpo_step` (reference and policy log-probs, loss, backward). The maths (advantages, loss, Eq. 15)
live in train/grpo.py; `run_train` at the bottom wires the parts and reads top to bottom.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from cache.run_folder import COMPLETIONS, EVAL, METRICS, RunFolder
from core import dist
from core.atomic import atomic_path
from core.errors import MuskError
from core.hashing import sha256_of
from pipeline.experts import resolve_device, resolve_dtype
from pipeline.generation import decode, sample
from pipeline.vllm_engine import sample_from_embeds, sync_weights
from train import checkpoint as ckpt
from pipeline.rewards import SCORER_ERRORS, score
from train.adapters import method_info, save_adapter
from train.config import TrainConfig, advantage_scale
from train.evaluate import evaluate, rollout_diagnostics, truncated
from train.grpo import group_advantages, grpo_loss, informative_groups, routing_stats, sampler_gap, truncated_rows
from train.inputs import decode_merged, rollout_inputs
from train.policy import (check_policy, completion_logprobs, merged_lora, merged_lora_weights,
                          policy_spec, save_policy)
from train.setup import (CachedFeatures, FeatureSource, Models, RunData, _data_order,  # noqa: F401  (re-exported)
                         build_models, load_data, micro_batches_per_rank, open_run)
from train.trackers import Trackers

# ---------------------------------------------------------------------------------------------
# One micro-batch: generate_trajectory, then grpo_step.


class Rollouts(NamedTuple):
    """A micro-batch of B prompts x G completions, rows of one prompt contiguous."""

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


def generate_trajectory(cfg: TrainConfig, m: Models, data: RunData, idx: list[int], device: str,
                        timing: dict) -> Rollouts:
    G = cfg.group_size
    ctx, e_in, ref_e, m_in = rollout_inputs(cfg, m, data, idx, device)

    t = time.perf_counter()
    sampler_logp = None
    if m.vllm is not None:  # one request per prompt, G samples each; its seed drawn from the micro-batch's RNG
        tokens, live = sample_from_embeds(m.vllm, e_in[::G].detach().cpu(), m_in[::G].cpu(), G, cfg.max_new_tokens,
                                          m.eos, m.tok.pad_token_id, cfg.temperature, False,
                                          int(torch.randint(2**31 - 1, ())), cfg.top_k, cfg.top_p, cfg.min_p)
        tokens, live = tokens.to(device), live.to(device)
    else:
        m.peft.eval()  # decoding: eval mode keeps the KV cache on under gradient checkpointing
        with merged_lora(m.peft, decode_merged(cfg, m)):
            dec = sample(m.lm, e_in.detach(), m_in, cfg.max_new_tokens, m.eos, m.tok.pad_token_id, cfg.temperature,
                         min_new_tokens=cfg.min_new_tokens, group=G if cfg.share_prompt else 1, logprobs=True,
                         filters=(cfg.top_k, cfg.top_p, cfg.min_p))
            tokens, live, sampler_logp = dec.tokens, dec.live, dec.logprobs
        m.peft.train()
    timing["generate"] += time.perf_counter() - t

    t = time.perf_counter()
    texts = decode(m.tok, tokens, live)
    rewards = torch.tensor([score(data.prompts["entry"][i], s, cfg.answer_extraction)
                            for i, s in zip([i for i in idx for _ in range(G)], texts)])  # [B*G]
    adv = group_advantages(rewards, G, cfg.std_floor, advantage_scale(cfg))
    timing["reward"] += time.perf_counter() - t
    return Rollouts(idx, e_in, ref_e, m_in, tokens, live, texts, rewards, adv.advantages.to(device), adv.frac_zero_std,
                    ctx.attention.detach() if ctx.attention is not None else None, ctx.choice,
                    int(m_in.sum()), sampler_logp)


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


def draw_informative(cfg: TrainConfig, m: Models, data: RunData, first: Rollouts, more, device: str,
                     timing: dict) -> tuple[Rollouts, dict]:
    """filter_groups (DAPO's dynamic sampling, verl's filter_groups): keep the groups of `first` whose
    rewards differ, and draw rounds of B more prompts (`more(r)`: the cache rows of round r) until B
    informative groups are kept or filter_groups_max_rounds rounds are spent; at the cap, the last
    round's uninformative groups fill the micro-batch. Advantages are recomputed over the kept batch
    (scale_rewards batch: its std). Returns (the micro-batch, {rounds, drawn, kept, reward_sum})."""
    B, G = len(first.idx), cfg.group_size
    parts, kept, ro, rounds, reward_sum = [], 0, first, 1, 0.0
    while True:
        ok = informative_groups(ro.rewards, G).tolist()  # [B]
        reward_sum += float(ro.rewards.sum())
        take = [b for b in range(B) if ok[b]][: B - kept]
        parts.append((ro, take))
        kept += len(take)
        if kept == B or rounds == cfg.filter_groups_max_rounds:
            break
        ro = generate_trajectory(cfg, m, data, more(rounds), device, timing)
        rounds += 1
    if kept < B:  # at the cap: the micro-batch keeps its size, its remaining groups have advantage 0
        parts[-1] = (ro, sorted(parts[-1][1] + [b for b in range(B) if not ok[b]][: B - kept]))
    out = cat_groups([(r, g) for r, g in parts if g], G, m.tok.pad_token_id)
    adv = group_advantages(out.rewards, G, cfg.std_floor, advantage_scale(cfg))
    out = out._replace(advantages=adv.advantages.to(device), frac_zero_std=adv.frac_zero_std)
    return out, {"rounds": rounds, "drawn": rounds * B, "kept": kept, "reward_sum": reward_sum}


class OldLogps(NamedTuple):
    """What passes 2..num_iterations over the same rollouts reuse."""

    logp: torch.Tensor  # [B*G, T] pi_old: the sampling policy's log-probs (first pass, detached)
    ref: torch.Tensor | None  # [B*G, T] the reference's log-probs (None: beta 0, never computed)


class StepOut(NamedTuple):
    loss: float  # the micro-batch's GRPO loss
    kl_token_sum: float  # summed per-token KL (divide by the completion tokens for the mean)
    loss_tokens: float  # completion tokens in the loss (mask_truncated_completions drops some)
    old: OldLogps | None  # for later passes (num_iterations > 1), else None
    clip_token_sum: float = 0.0  # completion tokens where the clip was active
    entropy_token_sum: float = 0.0  # summed token entropy of the policy on its own completions (nats)
    sampler: dict | None = None  # token-summed sampler/trainer log-prob gaps (sampler_gap), first pass only


def grpo_step(cfg: TrainConfig, m: Models, ro: Rollouts, timing: dict, old: OldLogps | None = None) -> StepOut:
    """Reference log-probs, then the policy's, the GRPO loss and its backward, rollout_chunk rows at a
    time (chunk losses are weighted to sum to the micro-batch's loss; gradients accumulate).

    old None: the first pass, right after sampling: the policy's log-probs detached are pi_old (same
    weights, same inputs) and are kept, with the reference's, for later passes when num_iterations > 1.
    loss_type dapo backpropagates the micro-batch's token sum; `update` divides by the step's tokens."""
    N, G = ro.tokens.shape[0], cfg.group_size
    chunk = cfg.rollout_chunk or N
    # Each prompt runs once per group of G rollouts when the chunks hold whole groups and the KV
    # cache is on (gradient checkpointing turns it off).
    share = G if cfg.share_prompt and chunk % G == 0 and not cfg.gradient_checkpointing else 1
    T = cfg.temperature
    t = time.perf_counter()
    if old is not None or cfg.beta == 0:  # beta 0: the KL term is absent, so the reference never runs
        ref_logp = old.ref if old is not None else None
    else:
        with torch.no_grad(), m.peft.disable_adapter():  # pi_ref: initial policy, zero C
            ref_logp = torch.cat([completion_logprobs(m.lm, ro.ref_embeds[s:s + chunk], ro.mask[s:s + chunk],
                                                      ro.tokens[s:s + chunk], ro.live[s:s + chunk], share, T)
                                  for s in range(0, N, chunk)])  # [B*G, T]
        timing["reference"] += time.perf_counter() - t

    t = time.perf_counter()
    live = ro.live
    if cfg.mask_truncated_completions:  # [B*G, T]: truncated rows leave the loss
        live = live * (~truncated_rows(ro.tokens, ro.live, m.eos, cfg.max_new_tokens)).to(live.dtype)[:, None]
    n_tok = float(live.sum())
    token_mean = cfg.loss_type in ("bnpo", "dapo")  # chunks share the micro-batch's token count
    loss = kl_sum = clip_sum = ent_sum = 0.0
    kept = []
    gaps = {"gap": 0.0, "abs_gap": 0.0, "max_abs_gap": 0.0, "truncated": 0.0} if ro.sampler_logp is not None else None
    for s in range(0, N, chunk):
        sl = slice(s, s + chunk)
        ent = []  # [chunk, T] token entropy, filled by completion_logprobs
        logp = completion_logprobs(m.lm, ro.embeds[sl], ro.mask[sl], ro.tokens[sl], ro.live[sl], share, T, ent)
        old_logp = logp.detach() if old is None else old.logp[sl]
        is_w = None
        if gaps is not None:  # the sampler is not the training forward: measure, and correct if asked (TIS)
            sg = sampler_gap(old_logp, ro.sampler_logp[sl], ro.live[sl], cfg.tis_cap)  # pi_old: first pass's
            if old is None:
                chunk_tok = float(ro.live[sl].sum())
                for k in ("gap", "abs_gap", "truncated"):
                    gaps[k] += getattr(sg, k) * chunk_tok
                gaps["max_abs_gap"] = max(gaps["max_abs_gap"], sg.max_abs_gap)
            is_w = sg.weights if cfg.tis_cap > 0 else None
        ref_sl = ref_logp[sl] if ref_logp is not None else None
        out = grpo_loss(logp, old_logp, ref_sl, ro.advantages[sl], live[sl], cfg.beta, cfg.clip_eps,
                        cfg.clip_eps_high, cfg.loss_type, cfg.max_new_tokens, n_tok if token_mean else None,
                        is_weights=is_w)
        weight = 1.0 if token_mean else logp.shape[0] / N
        if cfg.loss_type == "dapo":
            share_of_step = weight * n_tok  # the token sum; `update` divides by the step's token count
        else:
            share_of_step = weight / cfg.gradient_accumulation_steps  # the step's A micro-batches, over every rank
        (out.loss * share_of_step).backward(retain_graph=s + chunk < N)
        loss += float(out.loss.detach()) * weight
        kl_sum += float(out.kl) * float(live[sl].sum())
        clip_sum += float(out.clip_frac) * float(live[sl].sum())
        ent_sum += float((ent[0] * ro.live[sl]).sum())
        if cfg.num_iterations > 1 and old is None:
            kept.append(old_logp)
    timing["policy"] += time.perf_counter() - t
    return StepOut(loss, kl_sum, n_tok, OldLogps(torch.cat(kept), ref_logp) if kept else None, clip_sum, ent_sum,
                   gaps if old is None else None)


# ---------------------------------------------------------------------------------------------
# One optimizer step and its metrics record.


def _set_lr(optimizer: torch.optim.Optimizer, step: int, warmup_steps: int) -> None:
    """Linear warmup: warmup_steps for the policy's group, each group's own `warmup` on top."""
    for g in optimizer.param_groups:
        w = max(warmup_steps, g.get("warmup", 0))
        g["lr"] = g["base_lr"] * (min(1.0, step / w) if w else 1.0)


def completion_records(cfg: TrainConfig, data: RunData, step: int, ro: Rollouts, prompts: int) -> list[dict]:
    """The first `prompts` prompts of a micro-batch with their G completions, rewards, advantages and
    (context methods) the prompt's expert attention row [m][n] (completions.jsonl)."""
    G, out = cfg.group_size, []
    for b, i in enumerate(ro.idx[:prompts]):
        rows = range(b * G, (b + 1) * G)
        rec = {"step": step, "kind": "train", "prompt": data.prompts["text"][i], "answer": data.prompts["answer"][i],
               "completions": [ro.texts[r] for r in rows], "rewards": [float(ro.rewards[r]) for r in rows],
               "advantages": [float(ro.advantages[r]) for r in rows]}
        if ro.attention is not None:
            rec["attention"] = ro.attention[b].float().cpu().tolist()
        out.append(rec)
    return out


def micro_seed(seed: int, step: int, g: int) -> int:
    """Seed of the global micro-batch g of `step`: sampling does not depend on which rank runs it, so
    W ranks x k micro-batches draw what one process with W*k micro-batches draws (and resume is exact)."""
    return (seed * 1_000_003 + step * 1009 + g) % 2**63


def _micro_stats(cfg, m, data, idx, ro, out, method) -> dict:
    """What one micro-batch contributes to the step's metrics (plain numbers: ranks exchange them)."""
    st = {"rewards": ro.rewards.tolist(), "zero_std": ro.frac_zero_std, "loss": out.loss,
          "kl": out.kl_token_sum / max(1.0, out.loss_tokens), "tokens": int(ro.live.sum()),
          "loss_tokens": out.loss_tokens,
          "attention": ro.attention.float().cpu().tolist() if ro.attention is not None else None,
          "cost": {"cost/prompts": len(idx), "cost/policy_prompt_tokens": ro.policy_prompt_tokens},
          "scorer_errors": SCORER_ERRORS.take(),  # verifier exceptions (scored 0) since the last micro-batch
          "lengths": ro.live.sum(1).tolist(), "truncated": truncated(ro.tokens, ro.live, m.eos).tolist(),
          "tasks": [data.prompts["task"][i] for i in idx for _ in range(cfg.group_size)],
          "clip": out.clip_token_sum, "entropy": out.entropy_token_sum, "sampler": out.sampler}
    if data.prompt_tokens is not None:
        hint = data.hint_tokens[:, idx] if data.hint_tokens is not None else None
        choice = ro.choice.cpu().numpy() if ro.choice is not None else None
        st["cost"].update(method.cost(data.prompt_tokens[:, idx], hint, choice))
    return st


def _step_record(cfg: TrainConfig, m: Models, step: int, stats: list[dict], grad_norm: float, dt: float,
                 timing: dict, device: str) -> dict:
    r = torch.tensor([x for st in stats for x in st["rewards"]])
    n_tokens = sum(st["tokens"] for st in stats)
    cost: dict[str, float] = {}
    for st in stats:
        for k, v in st["cost"].items():
            cost[k] = cost.get(k, 0) + v
    rec = {
        "step": step, "reward/mean": float(r.mean()), "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
        "accuracy": float((r >= 1.0).float().mean()), "kl": float(np.mean([st["kl"] for st in stats])),
        "loss": float(np.mean([st["loss"] for st in stats])), "grad_norm": grad_norm,
        "lr": m.optimizer.param_groups[0]["lr"], "frac_reward_zero_std": float(np.mean([st["zero_std"] for st in stats])),
        "step_seconds": dt, "tokens_per_second": n_tokens / dt, "completion_tokens": n_tokens,
        "reward/scorer_errors": sum(st["scorer_errors"] for st in stats),
        **{f"time/{k}": v for k, v in timing.items()}, **cost,
        **rollout_diagnostics([x for st in stats for x in st["lengths"]], [x for st in stats for x in st["truncated"]],
                              r.tolist(), [x for st in stats for x in st["tasks"]]),
    }
    gaps = [st["sampler"] for st in stats if st.get("sampler") is not None]
    if gaps and n_tokens:  # token-weighted means over the step; the max over it
        for k in ("gap", "abs_gap", "truncated"):
            rec[f"sampler/logprob_{k}" if k != "truncated" else "sampler/tis_truncated"] = sum(g[k] for g in gaps) / n_tokens
        rec["sampler/logprob_max_abs_gap"] = max(g["max_abs_gap"] for g in gaps)
    if len(m.optimizer.param_groups) > 1:
        rec["router_lr"] = m.optimizer.param_groups[1]["lr"]
    out = getattr(m.adapter, "out", None)
    if out is not None and out.gate_value() is not None:
        rec["context/gate"] = out.gate_value()
    if device.startswith("cuda"):
        rec["mem/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    attn = [torch.tensor(st["attention"]) for st in stats if st["attention"] is not None]
    if attn:
        rs = routing_stats(torch.cat(attn))
        rec.update({"routing/entropy": rs.entropy, "routing/utilization": rs.utilization,
                    "routing/attention": rs.attention})
    return rec


def train_step(cfg: TrainConfig, m: Models, data: RunData, step: int, cursor: int, device: str,
               run: RunFolder | None = None) -> tuple[dict, int]:
    """gradient_accumulation_steps (A) micro-batches in all, A / W on each of the W ranks (W = 1 without
    torchrun), and one AdamW update on gradients summed over ranks: a step takes the prompts the config
    promises whatever the rank count. Returns (metrics, new cursor)."""
    t_step = time.perf_counter()
    timing = {"generate": 0.0, "reward": 0.0, "policy": 0.0, "reference": 0.0}
    _set_lr(m.optimizer, step, cfg.warmup_steps)
    if hasattr(m.adapter, "out"):  # context_gate ramp: this step's r_t (0 on the first step: KL = 0)
        m.adapter.out.set_step(step, cfg.gate_warmup_steps)
    m.optimizer.zero_grad(set_to_none=True)
    method, W, B = method_info(cfg.method), dist.world(), cfg.train_batch_size
    stats = []  # [(global micro index, stats)]
    again = []  # num_iterations > 1: (global micro index, rollouts without their graph, pi_old and ref log-probs)
    for micro in range(micro_batches_per_rank(cfg.gradient_accumulation_steps, W)):
        g = micro * W + dist.rank()  # global micro-batch index: whole groups per rank, no exchange for advantages
        A = cfg.gradient_accumulation_steps  # round r of micro-batch g reads the step's r-th block of A*B prompts

        def prompts(r: int, g: int = g) -> list[int]:
            return [int(data.train_idx[i]) for i in _data_order(cfg.seed, len(data.train_idx), cursor + (r * A + g) * B, B)]

        idx = prompts(0)
        torch.manual_seed(micro_seed(cfg.seed, step, g))
        ro = generate_trajectory(cfg, m, data, idx, device, timing)
        drew = None
        if cfg.filter_groups:  # dynamic sampling: informative groups only, further rounds drawn
            ro, drew = draw_informative(cfg, m, data, ro, prompts, device, timing)
            idx = ro.idx
        out = grpo_step(cfg, m, ro, timing)
        if out.old is not None:
            again.append((g, ro._replace(embeds=None, ref_embeds=None), out.old))
        if run is not None and g == 0 and cfg.log_completions_freq and step % cfg.log_completions_freq == 0:
            for rec in completion_records(cfg, data, step, ro, cfg.log_completions_prompts):
                run.append(COMPLETIONS, rec)
        stats.append((g, {**_micro_stats(cfg, m, data, idx, ro, out, method), "filter": drew}))
    stats = [st for _, st in sorted(dist.gather_all(stats))]  # every rank's micro-batches, in global order
    rounds = max(st["filter"]["rounds"] for st in stats) if cfg.filter_groups else 1
    cursor += cfg.gradient_accumulation_steps * B * rounds  # blocks a round of any micro-batch drew from
    step_tokens = sum(st["loss_tokens"] for st in stats)
    norms = [update(cfg, m, float(np.mean([st["loss"] for st in stats])), step_tokens)]
    updates = [stats]  # per update (pass over the rollouts): its micro-batches' statistics, every rank's
    for it in range(1, cfg.num_iterations):  # PPO-style passes 2..mu over the same rollouts
        m.optimizer.zero_grad(set_to_none=True)
        passed = []
        for g, ro, old in again:
            torch.manual_seed(micro_seed(cfg.seed, step, g))  # hard-routing's Gumbel draw as at sampling time
            ri = rollout_inputs(cfg, m, data, ro.idx, device)  # C from g_phi as it is now
            ro = ro._replace(embeds=ri.embeds, mask=ri.mask)  # the mask: filter_groups' rows were padded otherwise
            passed.append((g, _pass_stats(grpo_step(cfg, m, ro, timing, old), ro)))
        updates.append([st for _, st in sorted(dist.gather_all(passed))])
        norms.append(update(cfg, m, float(np.mean([st["loss"] for st in updates[-1]])), step_tokens, it))
    if m.vllm is not None:
        sync_weights(m.vllm, merged_lora_weights(m.peft))  # the next rollouts sample from the updated policy
    rec = _step_record(cfg, m, step, stats, norms[0][0], time.perf_counter() - t_step, timing, device)
    rec.update({f"grad_norm/{k}": v for k, v in norms[0][1].items()})
    if cfg.filter_groups:  # reward/* and accuracy describe the kept groups (what is trained on)
        drew = [st["filter"] for st in stats]
        rec.update({"filter/groups_drawn": sum(d["drawn"] for d in drew), "filter/groups_kept": sum(d["kept"] for d in drew),
                    "filter/rounds_max": rounds,
                    "filter/reward_mean_drawn": sum(d["reward_sum"] for d in drew) / (sum(d["drawn"] for d in drew) * cfg.group_size)})
    rec.update(_update_record(cfg, updates, norms))  # clip_frac, policy/entropy, kl over every update
    if cfg.beta == 0:
        rec.pop("kl")  # the reference never ran: no KL was measured
    return rec, cursor


def _pass_stats(out: StepOut, ro: Rollouts) -> dict:
    """A later pass's per-update statistics of one micro-batch (the keys _micro_stats gives the first)."""
    return {"loss": out.loss, "kl": out.kl_token_sum / max(1.0, out.loss_tokens), "clip": out.clip_token_sum,
            "loss_tokens": out.loss_tokens, "entropy": out.entropy_token_sum, "tokens": int(ro.live.sum())}


def _update_record(cfg: TrainConfig, updates: list[list[dict]], norms: list[tuple[float, dict]]) -> dict:
    """The per-update statistics over every update of the step (num_iterations of them): with one pass
    the ratio pi / pi_old is exactly 1 and the clip cannot act, so a first-pass clip_frac reads 0.

    clip_frac: clipped tokens / loss tokens (both the tokens the loss counts, mask_truncated_completions
    applied), summed over updates; policy/entropy: token mean over every update's live tokens; kl: the
    mean over updates of the micro-batch means. loss and grad_norm stay the first update's (what the
    sampled rollouts gave, comparable across num_iterations); with several updates their means over
    updates are added (updates/loss_mean, updates/grad_norm_mean).
    updates: [num_iterations][micro-batches] of stats dicts; norms: `update`'s return, one per update."""
    flat = [st for u in updates for st in u]
    rec = {"clip_frac": sum(st["clip"] for st in flat) / max(1.0, sum(st["loss_tokens"] for st in flat)),
           "policy/entropy": sum(st["entropy"] for st in flat) / max(1, sum(st["tokens"] for st in flat)),
           "kl": float(np.mean([np.mean([st["kl"] for st in u]) for u in updates]))}
    if len(updates) > 1:
        rec["updates/loss_mean"] = float(np.mean([np.mean([st["loss"] for st in u]) for u in updates]))
        rec["updates/grad_norm_mean"] = float(np.mean([n for n, _ in norms]))
    return rec


def update(cfg: TrainConfig, m: Models, loss: float, step_tokens: float, it: int = 0) -> tuple[float, dict]:
    """One AdamW update on the accumulated gradients: sum over ranks, dapo's token sums divided by the
    step's loss tokens (all ranks), clip. A non-finite loss or norm raises _NonFinite before the update.
    it: the pass over the step's rollouts (0 the first). Returns clip_gradients' (global norm, {group: norm})."""
    dist.sum_grads(m.trainable)
    if cfg.loss_type == "dapo":
        for p in m.trainable:
            if p.grad is not None:
                p.grad.div_(max(step_tokens, 1.0))
    grad_norm, group_norms = clip_gradients(m.optimizer, cfg.grad_clip, cfg.grad_clip_scope)
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        m.optimizer.zero_grad(set_to_none=True)
        raise _NonFinite(loss, grad_norm, it)
    m.optimizer.step()
    return grad_norm, group_norms


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float, scope: str) -> tuple[float, dict]:
    """Clip to max_norm over all trainable tensors together (global: one norm, as verl and TRL clip) or
    per optimizer group (per-group: LoRA, g_phi and the gate each get their own budget). Why per-group:
    under the rms gate C = tanh(gamma) k s C_raw / rms(C_raw) divides by a small rms(C_raw) at init,
    so g_phi's gradient norm reached 10^2-10^3 on the embedded default while the LoRA's was below 1;
    a global clip then divides the LoRA's update by that much on those steps.
    Returns (the global norm before clipping, {group name: its norm})."""
    groups = [(g.get("name", str(i)), [p for p in g["params"] if p.grad is not None])
              for i, g in enumerate(optimizer.param_groups)]
    norms = {name: float(torch.nn.utils.get_total_norm([p.grad for p in ps])) if ps else 0.0 for name, ps in groups}
    total = math.sqrt(sum(v * v for v in norms.values()))
    if scope == "global":
        torch.nn.utils.clip_grads_with_norm_([p for _, ps in groups for p in ps], max_norm, torch.tensor(total))
    else:
        for name, ps in groups:
            if ps:
                torch.nn.utils.clip_grads_with_norm_(ps, max_norm, torch.tensor(norms[name]))
    return total, norms


class _NonFinite(Exception):
    def __init__(self, loss: float, grad_norm: float, it: int = 0):
        self.loss, self.grad_norm, self.it = loss, grad_norm, it  # it > 0: earlier passes already updated


# ---------------------------------------------------------------------------------------------


def _summary(cfg: TrainConfig, data: RunData, resolved: dict, final_step: int, last_eval: dict, m: Models) -> dict:
    return {
        "method": cfg.method, "team": data.experts, "task_family": data.family, "seed": cfg.seed,
        "steps": final_step, "final_val_accuracy": last_eval.get("accuracy"),
        "final_val_accuracy_without_context": last_eval.get("accuracy_without_context"),
        "final_val_accuracy_null_context": last_eval.get("accuracy_null_context"),
        "eval_n": last_eval.get("n"), "pooling": cfg.pooling, "pooling_draw": data.pooling_draw,
        "num_latents": cfg.num_latents, "policy": cfg.policy, "cache_fingerprint": data.cache_fingerprint,
        "prompt_set": data.prompt_set, "dtype": resolved.get("dtype_resolved"),
        "config_fingerprint": sha256_of(resolved), "group_size": cfg.group_size,
        "train_batch_size": cfg.train_batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_new_tokens": cfg.max_new_tokens, "context_position": cfg.context_position,
        "context_gate": cfg.context_gate, "context_anchor": cfg.context_anchor, "context_scale": m.scale,
    }


def train_loop(cfg: TrainConfig, m: Models, data: RunData, run: RunFolder, start: tuple[int, int], device: str,
               trackers: Trackers, progress: bool, log) -> dict | None:
    """Steps start+1..total: train, log, evaluate, checkpoint. Returns the last full evaluation (or None)."""
    start_step, cursor = start
    full_rows = data.val_idx[: min(len(data.val_idx), cfg.eval_batches * cfg.val_batch_size)]
    curve_rows = data.val_idx[: min(len(data.val_idx), cfg.curve_prompts)]
    m.peft.train()
    m.adapter.train()
    main = dist.is_main()  # under torchrun rank 0 alone writes, evaluates and logs; the others train
    bar = tqdm(total=cfg.total_training_steps, initial=start_step, desc=f"train {cfg.method}", unit="step",
               disable=not progress or not main, dynamic_ncols=True)
    last_eval = None
    for step in range(start_step + 1, cfg.total_training_steps + 1):
        cursor_at_start = cursor  # the data position that goes with the weights before this step
        try:
            rec, cursor = train_step(cfg, m, data, step, cursor, device, run if main else None)
        except _NonFinite as e:
            if main and e.it == 0:  # pass it > 0: the weights hold this step's first updates, not step-1's
                ckpt.save_checkpoint(run, step - 1, m.peft, m.adapter, m.optimizer, {"cursor": cursor_at_start})
            bar.close()
            saved = f"saved {run.checkpoint(step - 1)}" if e.it == 0 else \
                f"saved nothing (pass {e.it + 1} of num_iterations; the last checkpoint is the one to resume)"
            raise MuskError(
                f"non-finite {'loss' if not math.isfinite(e.loss) else 'gradient norm'} at step {step} "
                f"(loss={e.loss}, grad_norm={e.grad_norm}); stopped before the update and {saved}. "
                f"Lower lr/router_lr or check the cache's features."
            ) from None
        full = step % cfg.test_freq == 0 or step == cfg.total_training_steps
        curve = bool(cfg.curve_freq) and step % cfg.curve_freq == 0  # the Figure 5 curve: same prompts each time
        if not main:
            if full or curve:
                dist.barrier()  # wait for rank 0's evaluation
            continue
        run.append(METRICS, rec)
        trackers.log(rec, step)
        bar.update(1)
        bar.set_postfix(reward=f"{rec['reward/mean']:.3f}", kl=f"{rec.get('kl', math.nan):.4f}")
        if not progress and step % cfg.log_freq == 0:
            log(f"step {step}: reward {rec['reward/mean']:.3f} acc {rec['accuracy']:.3f} kl {rec.get('kl', math.nan):.4f} "
                f"{rec['step_seconds']:.1f}s")
        evals = []
        if full:
            last_eval = evaluate(cfg, m, data, step, full_rows, "full", device, run, score)
            evals.append(last_eval)
        if curve:
            evals.append(evaluate(cfg, m, data, step, curve_rows, "curve", device, run, score))
        for ev in evals:
            trackers.log({f"eval/{ev['kind']}/{k}": v for k, v in ev.items() if k not in ("step", "split", "kind")}, step)
        if evals:
            dist.barrier()
        if step % cfg.save_freq == 0 or step == cfg.total_training_steps:
            ckpt.save_checkpoint(run, step, m.peft, m.adapter, m.optimizer, {"cursor": cursor})
    bar.close()
    return last_eval


def run_train(cfg: TrainConfig, cache_path: Path, out: Path | None = None, resume: bool = False,
              progress: bool = True, log=print, features: FeatureSource | None = None) -> Path:
    """Train one run into `out` (default runs/<method>-<family>-s<seed>); returns the run folder.

    features: where expert vectors come from (default: the cache, in memory). benchmarks/train_step.py
    passes experts run online on each batch's prompts, to time what the cache saves.
    """
    device = resolve_device(cfg.device)
    device = dist.init(device)
    dtype = resolve_dtype(cfg.dtype, device)
    data = load_data(cfg, cache_path)
    if features is not None:
        data.features = features
    cfg = replace(cfg, experts=tuple(data.experts))
    check_policy(cfg, device)  # a policy that cannot train here stops before the run folder is made
    run, resolved = open_run(cfg, cache_path, out, resume, data, dtype)
    m = build_models(cfg, data, device, dtype)

    start_step, cursor = 0, 0
    if resume:
        last = run.latest_checkpoint()
        if last is not None:
            state = ckpt.load_checkpoint(last, m.peft, m.adapter, m.optimizer)
            start_step, cursor = state["step"], state["cursor"]
        if dist.is_main():
            run.truncate(start_step)
            log(f"resuming {run} at step {start_step}")
    trackers = Trackers(cfg.report_to if dist.is_main() else ("none",), run.path, resolved, log)
    try:
        last_eval = train_loop(cfg, m, data, run, (start_step, cursor), device, trackers, progress, log)
    finally:
        trackers.close()

    if not dist.is_main():
        dist.barrier()  # rank 0 writes the final artefacts
        return run.path
    # ---- final artefacts: PEFT adapter (PeftModel.from_pretrained), g_phi + its config, summary.
    final_step = max(start_step, cfg.total_training_steps)
    if last_eval is None:
        evals = [e for e in run.read(EVAL) if e.get("kind", "full") == "full"]
        full_rows = data.val_idx[: min(len(data.val_idx), cfg.eval_batches * cfg.val_batch_size)]
        last_eval = evals[-1] if evals else evaluate(cfg, m, data, final_step, full_rows, "full", device, run, score)
    with atomic_path(run.final, directory=True) as tmp:
        save_policy(m.peft, tmp, policy_spec(cfg.policy))  # PEFT's files + where the base model comes from
        save_adapter(m.adapter, m.spec, tmp)
    summary = _summary(cfg, data, resolved, final_step, last_eval, m)
    run.write_summary(summary)
    dist.barrier()
    log(f"run {run}: final val accuracy {summary['final_val_accuracy']}")
    return run.path
