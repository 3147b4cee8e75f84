"""What a run writes about its steps: the completions of a micro-batch (completions.jsonl), one
micro-batch's statistics (plain numbers, exchanged between ranks), the step's metrics record
(metrics.jsonl) with its statistics over every update, and the run's summary (summary.json)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from core.hashing import sha256_of
from pipeline.rewards import SCORER_ERRORS
from train.config import TrainConfig
from train.adapters import routing_stats
from train.grpo import truncated_rows
from train.rollouts import Rollouts
from train.data import RunData
from train.setup import Models


def completion_records(cfg: TrainConfig, data: RunData, step: int, ro: Rollouts, prompts: int) -> list[dict]:
    """The first `prompts` prompts of a micro-batch with their G completions, rewards, advantages and
    (context methods) the prompt's expert attention row [m][n] (completions.jsonl)."""
    G, out = cfg.grpo.group_size, []
    for b, i in enumerate(ro.idx[:prompts]):
        rows = range(b * G, (b + 1) * G)
        rec = {"step": step, "kind": "train", "prompt": data.prompts["text"][i], "answer": data.prompts["answer"][i],
               "completions": [ro.texts[r] for r in rows], "rewards": [float(ro.rewards[r]) for r in rows],
               "advantages": [float(ro.advantages[r]) for r in rows]}
        if ro.attention is not None:
            rec["attention"] = ro.attention[b].float().cpu().tolist()
        out.append(rec)
    return out


def micro_stats(cfg, m, data, *, idx, ro, out, method) -> dict:
    """What one micro-batch contributes to the step's metrics (plain numbers: ranks exchange them)."""
    st = {"rewards": ro.rewards.tolist(), "zero_std": ro.frac_zero_std, "loss": out.loss,
          "kl": out.kl_token_sum / max(1.0, out.loss_tokens), "tokens": int(ro.live.sum()),
          "loss_tokens": out.loss_tokens,
          "attention": ro.attention.float().cpu().tolist() if ro.attention is not None else None,
          "cost": {"cost/prompts": len(idx), "cost/policy_prompt_tokens": ro.policy_prompt_tokens},
          "scorer_errors": SCORER_ERRORS.take(),  # verifier exceptions (scored 0) since the last micro-batch
          "lengths": ro.live.sum(1).tolist(), "truncated": truncated_rows(ro.tokens, ro.live, m.eos, cfg.sampling.max_new_tokens).tolist(),
          "tasks": [data.prompts["task"][i] for i in idx for _ in range(cfg.grpo.group_size)],
          "clip": out.clip_token_sum, "entropy": out.entropy_token_sum, "sampler": out.sampler}
    if data.prompt_tokens is not None:
        hint = data.hint_tokens[:, idx] if data.hint_tokens is not None else None
        choice = ro.choice.cpu().numpy() if ro.choice is not None else None
        st["cost"].update(method.cost(data.prompt_tokens[:, idx], hint, choice))
    return st


def rollout_diagnostics(lengths: list[int], truncated: list[bool], rewards: list[float], tasks: list[str]) -> dict:
    """A training step's completion length (mean, max, in tokens), the fraction truncated at the budget,
    and the mean reward per dataset (reward/task/<name>), over its rollouts (one entry each)."""
    by_task = defaultdict(list)
    for t, r in zip(tasks, rewards):
        by_task[t].append(r)
    return {"completion/length_mean": float(np.mean(lengths)), "completion/length_max": int(max(lengths)),
            "completion/truncated_frac": float(np.mean(truncated)),
            **{f"reward/task/{t}": float(np.mean(v)) for t, v in sorted(by_task.items())}}


def step_record(cfg: TrainConfig, m: Models, *, step: int, stats: list[dict], grad_norm: float, dt: float,
                timing: dict, device: str) -> dict:
    """The step's metrics.jsonl record from its micro-batches' statistics (every rank's); dt in seconds."""
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
    if m.gate_value() is not None:
        rec["context/gate"] = m.gate_value()
    if device.startswith("cuda"):
        rec["mem/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    attn = [torch.tensor(st["attention"]) for st in stats if st["attention"] is not None]
    if attn:
        rs = routing_stats(torch.cat(attn))
        rec.update({"routing/entropy": rs.entropy, "routing/utilization": rs.utilization,
                    "routing/attention": rs.attention})
    return rec


def update_record(cfg: TrainConfig, updates: list[list[dict]], norms: list[tuple[float, dict]]) -> dict:
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


def summary_record(cfg: TrainConfig, data: RunData, *, resolved: dict, final_step: int, last_eval: dict, m: Models) -> dict:
    """summary.json: the run's settings and its last full evaluation (SPEC)."""
    return {
        "method": cfg.method, "team": data.experts, "task_family": data.family, "seed": cfg.seed,
        "steps": final_step, "final_val_accuracy": last_eval.get("accuracy"),
        "final_val_accuracy_without_context": last_eval.get("accuracy_without_context"),
        "final_val_accuracy_null_context": last_eval.get("accuracy_null_context"),
        "eval_n": last_eval.get("n"), "pooling": cfg.context.pooling, "pooling_draw": data.pooling_draw,
        "num_latents": cfg.context.num_latents, "policy": cfg.policy.name, "cache_fingerprint": data.cache_fingerprint,
        "prompt_set": data.prompt_set, "dtype": resolved.get("dtype_resolved"),
        "config_fingerprint": sha256_of(resolved), "group_size": cfg.grpo.group_size,
        "train_batch_size": cfg.optim.train_batch_size, "gradient_accumulation_steps": cfg.optim.gradient_accumulation_steps,
        "max_new_tokens": cfg.sampling.max_new_tokens, "context_position": cfg.context.context_position,
        "context_gate": cfg.context.context_gate, "context_anchor": cfg.context.context_anchor, "context_scale": m.scale,
    }
