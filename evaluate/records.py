"""Evaluation of a trained policy on held-out prompts, one record per (prompt, condition, sample).

A condition is what the policy reads: "with" C, "without" C (no context slots, Figure 5), "null"
(C's information removed, its m slots kept: the gate closed), or an expert ablation of "with"
("drop:NAME", "shuffle:NAME", "only:NAME", see train/inputs.ExpertView). Decoding is greedy (the
paper's validation accuracy) or K samples at a temperature (mean@K, pass@K).

`musk train` is handed `evaluate` (cli.py passes it to train.loop.run_train) and calls it every
test_freq / curve_freq steps (eval.jsonl gets the aggregate, eval_records.jsonl the records,
completions.jsonl a few side by side); `musk eval` (evaluate/run.py) calls `condition_records` on a
saved run under any condition.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from core.metrics import pass_at_k
from cache.run_folder import COMPLETIONS, EVAL, EVAL_RECORDS, RunFolder
from train.adapters import routing_stats
from train.grpo import truncated_rows
from train.inputs import ALL, ExpertView
from pipeline.rewards import score

if TYPE_CHECKING:
    from train.config import TrainConfig
    from train.policy import Policy
    from train.data import RunData


class Condition(NamedTuple):
    name: str  # the records' condition: with | without | null | drop:NAME | shuffle:NAME | only:NAME
    context: str  # what the policy reads: with | without | null
    view: ExpertView = ALL


# the eval.jsonl key suffix of each training-evaluation condition (kept from the first run folders)
SUFFIX = {"with": "", "without": "_without_context", "null": "_null_context"}
_MODE = {"with": "with", "without": "removed", "null": "null"}


def training_conditions(cfg: TrainConfig, m: Policy) -> list[Condition]:
    """With C; with C removed (Figure 5, eval_without_context); with C's information removed but its m
    slots kept (eval_null_context), for methods that have a C."""
    conds = [Condition("with", "with")]
    if cfg.eval.eval_without_context and cfg.method != "single":
        conds.append(Condition("without", "without"))
    if cfg.eval.eval_null_context and m.caps.context:
        conds.append(Condition("null", "null"))
    return conds


def eval_inputs(cfg: TrainConfig, m: Policy, data: RunData, idx: list[int], mode: str, device: str, *,
                view: ExpertView = ALL):
    """The policy's input under one mode (with | removed | null): (embeds [b, L, d], mask [b, L],
    expert attention [b, m, n] or None)."""
    pi = m.inputs(cfg, data, idx, device=device, mode=mode, view=view)
    return pi.embeds, pi.mask, (pi.ctx.attention if pi.ctx is not None and mode == "with" else None)


def condition_records(cfg: TrainConfig, m: Policy, data: RunData, rows, cond: Condition, *, device: str,
                      samples: int = 1, temperature: float | None = None, seed: int = 0, scorer=None) -> list[dict]:
    """Decode every prompt of `rows` (cache rows) under `cond`, val_batch_size prompts at a time.

    temperature None: greedy, samples must be 1. Otherwise `samples` draws per prompt at `temperature`
    from torch's RNG seeded with `seed` (forked: the caller's RNG is untouched). Returns one record per
    (prompt, sample): prompt (row), task, split, question_sha (the question's digest: reports pair
    prompts by it), condition, sample, reward, correct, completion_tokens,
    truncated (no EOS within max_new_tokens), completion, token_entropy (the policy's mean token entropy
    over the completion at the sampling temperature, nats, from the decoder's logits); with expert attention also utilization
    ([n], mean over the m context tokens) and entropy (H of Eq. 15 for this prompt).
    scorer: (entry JSON, completion, mode) -> reward; default pipeline.rewards.score."""
    scorer = scorer or score
    greedy = temperature is None
    K = 1 if greedy else samples
    out = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]), m.decoding(cfg):
        torch.manual_seed(seed)
        for s in range(0, len(rows), cfg.eval.val_batch_size):
            idx = [int(i) for i in rows[s: s + cfg.eval.val_batch_size]]
            e, mk, att = eval_inputs(cfg, m, data, idx, _MODE[cond.context], device, view=cond.view)
            if K > 1:
                e, mk = e.repeat_interleave(K, 0), mk.repeat_interleave(K, 0)
            # the policy's token entropy at the sampling temperature comes from the decoder's own logits
            dec = m.sample(e, mk, max_new_tokens=cfg.sampling.max_new_tokens, temperature=temperature or 1.0,
                           greedy=greedy, group=K, entropy_temperature=temperature or cfg.sampling.temperature)
            toks, live = dec.tokens, dec.live
            texts = m.texts(toks, live)
            cut = truncated_rows(toks, live, m.eos, cfg.sampling.max_new_tokens)  # [b*K]
            tok_h = (dec.entropy * live).sum(1) / live.sum(1).clamp_min(1)  # [b*K] mean over each completion
            for j, (row, text) in enumerate(zip([i for i in idx for _ in range(K)], texts)):
                r = scorer(data.prompts["entry"][row], text, cfg.sampling.answer_extraction)
                rec = {"prompt": row, "task": data.prompts["task"][row], "split": data.prompts["split"][row],
                       "question_sha": hashlib.sha256(data.prompts["text"][row].encode()).hexdigest()[:16],
                       "condition": cond.name, "sample": j % K, "reward": float(r), "correct": bool(r >= 1.0),
                       "completion_tokens": int(live[j].sum()), "truncated": bool(cut[j]), "completion": text,
                       "token_entropy": float(tok_h[j])}
                if att is not None:
                    rs = routing_stats(att[j // K: j // K + 1])
                    rec.update({"utilization": rs.utilization, "entropy": rs.entropy})
                out.append(rec)
    return out


def diagnostics(records: list[dict]) -> dict:
    """Completion length (mean, max), the fraction truncated at the budget and the policy's mean token
    entropy (the mean over completions of each one's mean), over records."""
    n = [r["completion_tokens"] for r in records]
    return {"completion_tokens_mean": float(np.mean(n)) if n else None, "completion_tokens_max": max(n, default=None),
            "truncated_frac": float(np.mean([r["truncated"] for r in records])) if records else None,
            "token_entropy_mean": float(np.mean([r["token_entropy"] for r in records])) if records else None}


def _scores(records: list[dict], sampled: bool = False) -> dict:
    """accuracy (greedy: one sample) or mean_at_k and pass_at_k (sampled, K >= 1 samples at a
    temperature), n prompts, and diagnostics."""
    by_prompt = defaultdict(list)
    for r in records:
        by_prompt[r["prompt"]].append(r["correct"])
    k = min(len(v) for v in by_prompt.values())
    mean = float(np.mean([np.mean(v) for v in by_prompt.values()]))
    out = {"n": len(by_prompt), "reward": float(np.mean([r["reward"] for r in records]))}
    if k == 1 and not sampled:
        out["accuracy"] = mean
    else:
        out.update({"mean_at_k": mean, "k": k,
                    "pass_at_k": float(np.mean([pass_at_k(len(v), sum(v), k) for v in by_prompt.values()]))})
    return {**out, **diagnostics(records)}


def _routing(records: list[dict]) -> dict | None:
    """Mean u_i and H over the records' prompts (sample 0), with the std over prompts, and per task."""
    rs = [r for r in records if "utilization" in r and r["sample"] == 0]
    if not rs:
        return None

    def stats(sub):
        u = np.array([r["utilization"] for r in sub])  # [prompts, n]
        h = np.array([r["entropy"] for r in sub])
        return {"entropy": float(h.mean()), "entropy_std": float(h.std()), "utilization": u.mean(0).tolist(),
                "utilization_std": u.std(0).tolist(), "n": len(sub)}

    tasks = sorted({r["task"] for r in rs})
    return {**stats(rs), "per_task": {t: stats([r for r in rs if r["task"] == t]) for t in tasks}}


def summarize(records: list[dict], sampled: bool = False) -> dict:
    """{condition: {accuracy | mean_at_k + pass_at_k, n, reward, diagnostics, per_task: {task: ...},
    routing: {entropy, utilization, per_task} (methods with expert attention)}} (SPEC summary.json).
    sampled: the completions were drawn at a temperature (scores are mean@k, pass@k even at k = 1)."""
    out = {}
    for cond in dict.fromkeys(r["condition"] for r in records):
        rs = [r for r in records if r["condition"] == cond]
        tasks = sorted({r["task"] for r in rs})
        out[cond] = {**_scores(rs, sampled),
                     "per_task": {t: _scores([r for r in rs if r["task"] == t], sampled) for t in tasks}}
        routing = _routing(rs)
        if routing is not None:
            out[cond]["routing"] = routing
    return out


def evaluate(cfg: TrainConfig, m: Policy, data: RunData, *, step: int, rows: np.ndarray, kind: str, device: str,
             run: RunFolder, scorer=None) -> dict:
    """A training evaluation (greedy) on cache rows `rows`: eval.jsonl gets one aggregate record
    (accuracy, reward and diagnostics per condition, keys suffixed as SUFFIX), eval_records.jsonl the
    records (with step and kind), and a full evaluation its first eval_completions prompts side by side
    in completions.jsonl; scorer: the training reward (default pipeline.rewards.score). Returns the aggregate record."""
    m.train(False)
    result = {"step": step, "split": data.val_split, "n": len(rows), "kind": kind}
    by_cond = {}
    for cond in training_conditions(cfg, m):
        recs = condition_records(cfg, m, data, rows, cond, device=device, scorer=scorer)
        s = _scores(recs)
        result.update({k + SUFFIX[cond.name]: s[k] for k in ("accuracy", "reward", "completion_tokens_mean",
                                                               "completion_tokens_max", "truncated_frac",
                                                               "token_entropy_mean")})
        by_cond[cond.name] = recs
    run.append(EVAL, result)
    for recs in by_cond.values():
        for r in recs:
            run.append(EVAL_RECORDS, {"step": step, "kind": kind, **r})
    if kind == "full":
        for i, row in enumerate(rows[: cfg.eval.eval_completions]):
            rec = {"step": step, "kind": "eval", "prompt": data.prompts["text"][row],
                   "answer": data.prompts["answer"][row]}
            for name, recs in by_cond.items():
                rec.update({"completion" + SUFFIX[name]: recs[i]["completion"], "reward" + SUFFIX[name]: recs[i]["reward"]})
            run.append(COMPLETIONS, rec)
    m.train()
    return result
