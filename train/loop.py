"""`musk train`: GRPO over cached expert features. No expert is loaded.

The file reads top to bottom as the paper's loop (GRPO on Eq. 4's KL-regularised objective):
`generate_trajectory` samples G completions per prompt and scores them (rewards, group advantages ->
a typed `Rollouts`), `grpo_step` takes the reference's and the policy's log-probs, the loss and its
backward, `train_step` runs the micro-batches of one optimizer step and the AdamW update, `train_loop`
evaluates and checkpoints between steps, and `run_train` at the bottom wires the parts.

One optimizer step = gradient_accumulation_steps micro-batches of train_batch_size prompts, each
prompt sampled group_size times (num_iterations > 1: that many AdamW updates on the same rollouts).
The parts beside it: the maths (advantages, loss, Eq. 15) in train/grpo.py; the run's data, folder and
models in train/setup.py; `Rollouts` and dynamic sampling in train/rollouts.py; the update (warmup,
clipping, the non-finite guard) in train/optim.py; the metrics, completions and summary records in
train/records.py. Two parts are handed in, not imported: the task's `scorer` (the reward) and the
`evaluator` (evaluate/records.evaluate, passed by cli.py), so training never reads the evaluation's room.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import numpy as np
import torch
from tqdm import tqdm

from cache.run_folder import COMPLETIONS, EVAL, METRICS, RunFolder
from core import dist
from core.atomic import atomic_path
from core.errors import MuskError
from pipeline.experts import resolve_device, resolve_dtype
from pipeline.vllm_engine import sample_from_embeds, sync_weights
from pipeline.rewards import score
from train import checkpoint as ckpt
from train.adapters import method_info
from train.config import TrainConfig, advantage_scale
from train.grpo import group_advantages, grpo_loss, sampler_gap, truncated_rows
from train.optim import NonFinite, begin_step, update
from train.policy import check_policy, merged_lora_weights
from train.recipes import (answer_nll, in_warmup, kl_to_warmup_end, mix_coef, reference_state, resumed_reference,
                           warmup_reference, warmup_step)
from train.records import completion_records, micro_stats, step_record, summary_record, update_record
from train.rollouts import Rollouts, draw_informative, micro_seed
from train.data import FeatureSource, RunData
from train.setup import Models, build_models, load_data, micro_batches_per_rank, open_run, step_prompts
from train.trackers import Trackers

# The task's reward: (entry JSON, completion, answer_extraction mode) -> reward (pipeline.rewards.score).
Scorer = Callable[[str, str, str], float]


class Evaluator(Protocol):
    """A training evaluation (evaluate/records.evaluate): greedy decoding of cache rows `rows` under the
    run's conditions, written to the run folder; returns the aggregate record (step, split, n, kind,
    accuracy, ...)."""

    def __call__(self, cfg: TrainConfig, m: Models, data: RunData, *, step: int, rows: np.ndarray, kind: str,
                 device: str, run: RunFolder, scorer: Scorer) -> dict: ...

# ---------------------------------------------------------------------------------------------
# One micro-batch: generate_trajectory, then grpo_step.


def generate_trajectory(cfg: TrainConfig, m: Models, data: RunData, idx: list[int], *, device: str,
                        timing: dict, scorer: Scorer) -> Rollouts:
    """G completions for each prompt of idx, scored by `scorer`, with their group advantages."""
    G = cfg.grpo.group_size
    ctx, e_in, ref_e, m_in = m.rollout_inputs(cfg, data, idx, device=device)

    t = time.perf_counter()
    sampler_logp = None
    if m.vllm is not None:  # one request per prompt, G samples each; its seed drawn from the micro-batch's RNG
        seed = int(torch.randint(2**31 - 1, ()))
        tokens, live = sample_from_embeds(m.vllm, e_in[::G].detach().cpu(), m_in[::G].cpu(), G,
                                          max_new_tokens=cfg.sampling.max_new_tokens, eos=m.eos,
                                          pad_id=m.tok.pad_token_id, temperature=cfg.sampling.temperature,
                                          greedy=False, seed=seed, top_k=cfg.sampling.top_k,
                                          top_p=cfg.sampling.top_p, min_p=cfg.sampling.min_p)
        tokens, live = tokens.to(device), live.to(device)
    else:
        m.peft.eval()  # decoding: eval mode keeps the KV cache on under gradient checkpointing
        with m.decoding(cfg):
            dec = m.sample(e_in.detach(), m_in, max_new_tokens=cfg.sampling.max_new_tokens,
                           temperature=cfg.sampling.temperature, min_new_tokens=cfg.sampling.min_new_tokens,
                           group=G if cfg.run.share_prompt else 1, logprobs=True,
                           filters=(cfg.sampling.top_k, cfg.sampling.top_p, cfg.sampling.min_p))
            tokens, live, sampler_logp = dec.tokens, dec.live, dec.logprobs
        m.peft.train()
    timing["generate"] += time.perf_counter() - t

    t = time.perf_counter()
    texts = m.texts(tokens, live)
    rewards = torch.tensor([scorer(data.prompts["entry"][i], s, cfg.sampling.answer_extraction)
                            for i, s in zip([i for i in idx for _ in range(G)], texts)])  # [B*G]
    adv = group_advantages(rewards, G, cfg.grpo.std_floor, advantage_scale(cfg))
    timing["reward"] += time.perf_counter() - t
    return Rollouts(idx=idx, embeds=e_in, ref_embeds=ref_e, mask=m_in, tokens=tokens, live=live, texts=texts,
                    rewards=rewards, advantages=adv.advantages.to(device), frac_zero_std=adv.frac_zero_std,
                    attention=ctx.attention.detach() if ctx.attention is not None else None, choice=ctx.choice,
                    policy_prompt_tokens=int(m_in.sum()), sampler_logp=sampler_logp)


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
    N, G = ro.tokens.shape[0], cfg.grpo.group_size
    chunk = cfg.run.rollout_chunk or N
    # Each prompt runs once per group of G rollouts when the chunks hold whole groups and the KV
    # cache is on (gradient checkpointing turns it off).
    share = G if cfg.run.share_prompt and chunk % G == 0 and not cfg.run.gradient_checkpointing else 1
    T = cfg.sampling.temperature
    t = time.perf_counter()
    if old is not None or cfg.grpo.beta == 0:  # beta 0: the KL term is absent, so the reference never runs
        ref_logp = old.ref if old is not None else None
    else:
        # pi_ref: the initial policy (LoRA off) reading C with its gate closed
        ref_logp = torch.cat([m.reference_logprobs(ro.ref_embeds[s:s + chunk], ro.mask[s:s + chunk],
                                                   ro.tokens[s:s + chunk], ro.live[s:s + chunk], group=share,
                                                   temperature=T)
                              for s in range(0, N, chunk)])  # [B*G, T]
        timing["reference"] += time.perf_counter() - t

    t = time.perf_counter()
    live = ro.live
    if cfg.grpo.mask_truncated_completions:  # [B*G, T]: truncated rows leave the loss
        live = live * (~truncated_rows(ro.tokens, ro.live, m.eos, cfg.sampling.max_new_tokens)).to(live.dtype)[:, None]
    n_tok = float(live.sum())
    token_mean = cfg.grpo.loss_type in ("bnpo", "dapo")  # chunks share the micro-batch's token count
    loss = kl_sum = clip_sum = ent_sum = 0.0
    kept = []
    gaps = {"gap": 0.0, "abs_gap": 0.0, "max_abs_gap": 0.0, "truncated": 0.0} if ro.sampler_logp is not None else None
    for s in range(0, N, chunk):
        sl = slice(s, s + chunk)
        ent = []  # [chunk, T] token entropy, filled by completion_logprobs
        logp = m.logprobs(ro.embeds[sl], ro.mask[sl], ro.tokens[sl], ro.live[sl], group=share, temperature=T,
                          entropy=ent)
        old_logp = logp.detach() if old is None else old.logp[sl]
        is_w = None
        if gaps is not None:  # the sampler is not the training forward: measure, and correct if asked (TIS)
            sg = sampler_gap(old_logp, ro.sampler_logp[sl], ro.live[sl], cfg.grpo.tis_cap)  # pi_old: first pass's
            if old is None:
                chunk_tok = float(ro.live[sl].sum())
                for k in ("gap", "abs_gap", "truncated"):
                    gaps[k] += getattr(sg, k) * chunk_tok
                gaps["max_abs_gap"] = max(gaps["max_abs_gap"], sg.max_abs_gap)
            is_w = sg.weights if cfg.grpo.tis_cap > 0 else None
        ref_sl = ref_logp[sl] if ref_logp is not None else None
        out = grpo_loss(logp, old_logp, ref_sl, ro.advantages[sl], live[sl], cfg.grpo.beta, clip_eps=cfg.grpo.clip_eps,
                        clip_eps_high=cfg.grpo.clip_eps_high, loss_type=cfg.grpo.loss_type, max_tokens=cfg.sampling.max_new_tokens,
                        num_tokens=n_tok if token_mean else None, is_weights=is_w)
        weight = 1.0 if token_mean else logp.shape[0] / N
        if cfg.grpo.loss_type == "dapo":
            share_of_step = weight * n_tok  # the token sum; `update` divides by the step's token count
        else:
            share_of_step = weight / cfg.optim.gradient_accumulation_steps  # the step's A micro-batches, over every rank
        (out.loss * share_of_step).backward(retain_graph=s + chunk < N)
        loss += float(out.loss.detach()) * weight
        kl_sum += float(out.kl) * float(live[sl].sum())
        clip_sum += float(out.clip_frac) * float(live[sl].sum())
        ent_sum += float((ent[0] * ro.live[sl]).sum())
        if cfg.grpo.num_iterations > 1 and old is None:
            kept.append(old_logp)
    timing["policy"] += time.perf_counter() - t
    return StepOut(loss, kl_sum, n_tok, OldLogps(torch.cat(kept), ref_logp) if kept else None, clip_sum, ent_sum,
                   gaps if old is None else None)


# ---------------------------------------------------------------------------------------------
# One optimizer step and its metrics record.


def train_step(cfg: TrainConfig, m: Models, data: RunData, *, step: int, cursor: int, device: str, scorer: Scorer,
               run: RunFolder | None = None) -> tuple[dict, int]:
    """gradient_accumulation_steps (A) micro-batches in all, A / W on each of the W ranks (W = 1 without
    torchrun), and one AdamW update on gradients summed over ranks: a step takes the prompts the config
    promises whatever the rank count. Returns (metrics, new cursor)."""
    t_step = time.perf_counter()
    timing = {"generate": 0.0, "reward": 0.0, "policy": 0.0, "reference": 0.0}
    begin_step(cfg, m, step)
    method, W, B = method_info(cfg.method), dist.world(), cfg.optim.train_batch_size
    stats = []  # [(global micro index, stats)]
    sft_nll = []  # the mixed objective's answer NLL per micro-batch (sft_mix_coef > 0)
    again = []  # num_iterations > 1: (global micro index, rollouts without their graph, pi_old and ref log-probs)
    for micro in range(micro_batches_per_rank(cfg.optim.gradient_accumulation_steps, W)):
        g = micro * W + dist.rank()  # global micro-batch index: whole groups per rank, no exchange for advantages
        A = cfg.optim.gradient_accumulation_steps  # round r of micro-batch g reads the step's r-th block of A*B prompts

        def prompts(r: int, g: int = g) -> list[int]:
            return step_prompts(cfg, data.train_idx, cursor, r * A + g)

        idx = prompts(0)
        torch.manual_seed(micro_seed(cfg.seed, step, g))
        ro = generate_trajectory(cfg, m, data, idx, device=device, timing=timing, scorer=scorer)
        drew = None
        if cfg.grpo.filter_groups:  # dynamic sampling: informative groups only, further rounds drawn
            def more(r: int) -> Rollouts:
                return generate_trajectory(cfg, m, data, prompts(r), device=device, timing=timing, scorer=scorer)

            ro, drew = draw_informative(cfg, ro, more, m.tok.pad_token_id, device)
            idx = ro.idx
        out = grpo_step(cfg, m, ro, timing)
        coef = mix_coef(cfg, step)
        if coef > 0:  # the mixed objective's supervised term, this micro-batch's share of the step
            nll = answer_nll(cfg, m, data, idx, device)
            (coef * nll / cfg.optim.gradient_accumulation_steps).backward()
            sft_nll.append(float(nll.detach()))
        if out.old is not None:
            again.append((g, replace(ro, embeds=None, ref_embeds=None), out.old))
        if run is not None and g == 0 and cfg.run.log_completions_freq and step % cfg.run.log_completions_freq == 0:
            for rec in completion_records(cfg, data, step, ro, cfg.run.log_completions_prompts):
                run.append(COMPLETIONS, rec)
        stats.append((g, {**micro_stats(cfg, m, data, idx=idx, ro=ro, out=out, method=method), "filter": drew}))
    stats = [st for _, st in sorted(dist.gather_all(stats))]  # every rank's micro-batches, in global order
    rounds = max(st["filter"]["rounds"] for st in stats) if cfg.grpo.filter_groups else 1
    cursor += cfg.optim.gradient_accumulation_steps * B * rounds  # blocks a round of any micro-batch drew from
    step_tokens = sum(st["loss_tokens"] for st in stats)
    norms = [update(cfg, m, float(np.mean([st["loss"] for st in stats])), step_tokens)]
    updates = [stats]  # per update (pass over the rollouts): its micro-batches' statistics, every rank's
    for it in range(1, cfg.grpo.num_iterations):  # PPO-style passes 2..mu over the same rollouts
        m.optimizer.zero_grad(set_to_none=True)
        passed = []
        for g, ro, old in again:
            torch.manual_seed(micro_seed(cfg.seed, step, g))  # hard-routing's Gumbel draw as at sampling time
            ri = m.rollout_inputs(cfg, data, ro.idx, device=device)  # C from g_phi as it is now
            ro = replace(ro, embeds=ri.embeds, mask=ri.mask)  # the mask: filter_groups' rows were padded otherwise
            passed.append((g, _pass_stats(grpo_step(cfg, m, ro, timing, old), ro)))
        updates.append([st for _, st in sorted(dist.gather_all(passed))])
        norms.append(update(cfg, m, float(np.mean([st["loss"] for st in updates[-1]])), step_tokens, it))
    if m.vllm is not None:
        sync_weights(m.vllm, merged_lora_weights(m.peft))  # the next rollouts sample from the updated policy
    rec = step_record(cfg, m, step=step, stats=stats, grad_norm=norms[0][0], dt=time.perf_counter() - t_step,
                      timing=timing, device=device)
    rec.update({f"grad_norm/{k}": v for k, v in norms[0][1].items()})
    if cfg.grpo.filter_groups:  # reward/* and accuracy describe the kept groups (what is trained on)
        drew = [st["filter"] for st in stats]
        rec.update({"filter/groups_drawn": sum(d["drawn"] for d in drew), "filter/groups_kept": sum(d["kept"] for d in drew),
                    "filter/rounds_max": rounds,
                    "filter/reward_mean_drawn": sum(d["reward_sum"] for d in drew) / (sum(d["drawn"] for d in drew) * cfg.grpo.group_size)})
    rec.update(update_record(cfg, updates, norms))  # clip_frac, policy/entropy, kl over every update
    if cfg.recipe.sft_mix_coef > 0:
        nll = dist.gather_all(sft_nll)
        rec.update({"sft/coef": mix_coef(cfg, step), "sft/nll": sum(nll) / len(nll) if nll else None})
    if cfg.grpo.beta == 0:
        rec.pop("kl")  # the reference never ran: no KL was measured
    return rec, cursor


def _pass_stats(out: StepOut, ro: Rollouts) -> dict:
    """A later pass's per-update statistics of one micro-batch (the keys micro_stats gives the first)."""
    return {"loss": out.loss, "kl": out.kl_token_sum / max(1.0, out.loss_tokens), "clip": out.clip_token_sum,
            "loss_tokens": out.loss_tokens, "entropy": out.entropy_token_sum, "tokens": int(ro.live.sum())}


# ---------------------------------------------------------------------------------------------
# The run: steps, evaluations between them, checkpoints, final artefacts.


def train_loop(cfg: TrainConfig, m: Models, data: RunData, *, run: RunFolder, start: tuple[int, int], device: str,
               trackers: Trackers, evaluator: Evaluator, scorer: Scorer, progress: bool = True,
               log=print) -> dict | None:
    """Steps start+1..total: train, log, evaluate (`evaluator`, rank 0), checkpoint. Returns the last full
    evaluation (or None)."""
    start_step, cursor = start
    full_rows = data.val_idx[: min(len(data.val_idx), cfg.eval.eval_batches * cfg.eval.val_batch_size)]
    curve_rows = data.val_idx[: min(len(data.val_idx), cfg.eval.curve_prompts)]
    m.train()
    main = dist.is_main()  # under torchrun rank 0 alone writes, evaluates and logs; the others train
    bar = tqdm(total=cfg.optim.total_training_steps, initial=start_step, desc=f"train {cfg.method}", unit="step",
               disable=not progress or not main, dynamic_ncols=True)
    last_eval = None
    for step in range(start_step + 1, cfg.optim.total_training_steps + 1):
        cursor_at_start = cursor  # the data position that goes with the weights before this step
        try:
            if in_warmup(cfg, step):  # the supervised warm-up's steps (sft_warmup_steps): no rollouts
                rec, cursor = warmup_step(cfg, m, data, step, cursor=cursor, device=device)
                if step == cfg.recipe.sft_warmup_steps and kl_to_warmup_end(cfg):
                    m.reference = warmup_reference(m)  # GRPO's KL reference from here on
            else:
                rec, cursor = train_step(cfg, m, data, step=step, cursor=cursor, device=device, scorer=scorer,
                                         run=run if main else None)
        except NonFinite as e:
            if main and e.it == 0:  # pass it > 0: the weights hold this step's first updates, not step-1's
                ckpt.save_checkpoint(run, step - 1, m.peft, m.adapter, optimizer=m.optimizer,
                                     state={"cursor": cursor_at_start}, reference=reference_state(m.reference))
            bar.close()
            saved = f"saved {run.checkpoint(step - 1)}" if e.it == 0 else \
                f"saved nothing (pass {e.it + 1} of num_iterations; the last checkpoint is the one to resume)"
            raise MuskError(
                f"non-finite {'loss' if not math.isfinite(e.loss) else 'gradient norm'} at step {step} "
                f"(loss={e.loss}, grad_norm={e.grad_norm}); stopped before the update and {saved}. "
                f"Lower lr/router_lr or check the cache's features."
            ) from None
        full = step % cfg.eval.test_freq == 0 or step == cfg.optim.total_training_steps
        curve = bool(cfg.eval.curve_freq) and step % cfg.eval.curve_freq == 0  # the Figure 5 curve: same prompts each time
        if not main:
            if full or curve:
                dist.barrier()  # wait for rank 0's evaluation
            continue
        run.append(METRICS, rec)
        trackers.log(rec, step)
        bar.update(1)
        if "sft/nll" in rec and "reward/mean" not in rec:  # a warm-up step: no rollouts, no reward
            bar.set_postfix(sft_nll=f"{rec['sft/nll']:.3f}")
            if not progress and step % cfg.run.log_freq == 0:
                log(f"step {step}: sft warm-up nll {rec['sft/nll']:.3f} {rec['step_seconds']:.1f}s")
        else:
            bar.set_postfix(reward=f"{rec['reward/mean']:.3f}", kl=f"{rec.get('kl', math.nan):.4f}")
            if not progress and step % cfg.run.log_freq == 0:
                log(f"step {step}: reward {rec['reward/mean']:.3f} acc {rec['accuracy']:.3f} kl {rec.get('kl', math.nan):.4f} "
                    f"{rec['step_seconds']:.1f}s")
        evals = []
        if full:
            last_eval = evaluator(cfg, m, data, step=step, rows=full_rows, kind="full", device=device, run=run,
                                  scorer=scorer)
            evals.append(last_eval)
        if curve:
            evals.append(evaluator(cfg, m, data, step=step, rows=curve_rows, kind="curve", device=device, run=run,
                                   scorer=scorer))
        for ev in evals:
            trackers.log({f"eval/{ev['kind']}/{k}": v for k, v in ev.items() if k not in ("step", "split", "kind")}, step)
        if evals:
            dist.barrier()
        if step % cfg.run.save_freq == 0 or step == cfg.optim.total_training_steps:
            ckpt.save_checkpoint(run, step, m.peft, m.adapter, optimizer=m.optimizer, state={"cursor": cursor},
                                 reference=reference_state(m.reference))
    bar.close()
    return last_eval


def run_train(cfg: TrainConfig, cache_path: Path, out: Path | None = None, *, evaluator: Evaluator,
              scorer: Scorer = score, resume: bool = False, progress: bool = True, log=print,
              features: FeatureSource | None = None) -> Path:
    """Train one run into `out` (default runs/<method>-<family>-s<seed>); returns the run folder.

    evaluator: the training evaluation (evaluate/records.evaluate; cli.py hands it in). scorer: the
    task's reward (default pipeline.rewards.score), used by the rollouts and handed to the evaluator.

    features: where expert vectors come from (default: the cache, in memory). benchmarks/train_step.py
    passes experts run online on each batch's prompts, to time what the cache saves.
    """
    device = resolve_device(cfg.run.device)
    device = dist.init(device)
    dtype = resolve_dtype(cfg.policy.dtype, device)
    data = load_data(cfg, cache_path)
    if features is not None:
        data.features = features
    cfg = replace(cfg, experts=tuple(data.experts))
    check_policy(cfg, device)  # a policy that cannot train here stops before the run folder is made
    run, resolved = open_run(cfg, cache_path, out, resume, data=data, dtype=dtype)
    m = build_models(cfg, data, device, dtype)

    start_step, cursor = 0, 0
    if resume:
        last = run.latest_checkpoint()
        if last is not None:
            state = ckpt.load_checkpoint(last, m.peft, m.adapter, m.optimizer)
            start_step, cursor = state["step"], state["cursor"]
            m.reference = resumed_reference(cfg, m, last, start_step)
        if dist.is_main():
            run.truncate(start_step)
            log(f"resuming {run} at step {start_step}")
    trackers = Trackers(cfg.run.report_to if dist.is_main() else ("none",), run.path, resolved, log)
    try:
        last_eval = train_loop(cfg, m, data, run=run, start=(start_step, cursor), device=device, trackers=trackers,
                               evaluator=evaluator, scorer=scorer, progress=progress, log=log)
    finally:
        trackers.close()

    if not dist.is_main():
        dist.barrier()  # rank 0 writes the final artefacts
        return run.path
    # ---- final artefacts: PEFT adapter (PeftModel.from_pretrained), g_phi + its config, summary.
    final_step = max(start_step, cfg.optim.total_training_steps)
    if last_eval is None:
        evals = [e for e in run.read(EVAL) if e.get("kind", "full") == "full"]
        full_rows = data.val_idx[: min(len(data.val_idx), cfg.eval.eval_batches * cfg.eval.val_batch_size)]
        last_eval = evals[-1] if evals else evaluator(cfg, m, data, step=final_step, rows=full_rows, kind="full",
                                                      device=device, run=run, scorer=scorer)
    with atomic_path(run.final, directory=True) as tmp:
        m.save(tmp)  # PEFT's files + where the base model comes from, g_phi + its spec
    summary = summary_record(cfg, data, resolved=resolved, final_step=final_step, last_eval=last_eval, m=m)
    run.write_summary(summary)
    dist.barrier()
    log(f"run {run}: final val accuracy {summary['final_val_accuracy']}")
    return run.path
