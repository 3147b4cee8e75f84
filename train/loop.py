"""`musk train`: GRPO over cached expert features. Reads top to bottom; no expert is loaded.

One optimizer step = gradient_accumulation_steps micro-batches of train_batch_size prompts, each
prompt sampled group_size times. The maths (advantages, loss, Eq. 15) live in train/grpo.py.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from cache.reader import Cache
from pipeline.config import MuskError, dump_yaml, from_dict, sha256_of, to_dict
from pipeline.experts import resolve_device, resolve_dtype
from pipeline.generation import decode, eos_ids, generate
from pipeline.tasks import TaskConfig
from train import checkpoint as ckpt
from train.adapters import AdapterSpec, build_adapter, method_info, save_adapter
from train.config import TrainConfig
from train.grpo import group_advantages, grpo_loss, routing_stats
from train.policy import build_prompt_text, completion_logprobs, encode_prompts, load_policy, splice
from train.rewards import score


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _data_order(seed: int, n: int, cursor: int, count: int) -> list[int]:
    """Prompts cursor..cursor+count of an endless stream of seeded per-epoch permutations."""
    out = []
    for c in range(cursor, cursor + count):
        epoch, offset = divmod(c, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[offset]))
    return out


def expert_cost(method: str, idx: list[int], prompt_tokens: np.ndarray | None, hint_tokens: np.ndarray | None,
                choice: torch.Tensor | None) -> dict:
    """What an online system (no cache) would spend on the experts for prompts idx.

    prompt_tokens, hint_tokens: [n_experts, N]. perceiver/ffn run every expert's forward pass;
    hard-routing runs only the chosen expert (selective execution); output-collab runs every expert
    and decodes its hint token by token.
    """
    zero = {"cost/expert_forward_passes": 0, "cost/expert_prompt_tokens": 0, "cost/expert_generated_tokens": 0}
    if prompt_tokens is None or method == "single":
        return zero
    if method == "hard-routing":
        chosen = choice.cpu().numpy()
        return {**zero, "cost/expert_forward_passes": len(idx),
                "cost/expert_prompt_tokens": int(prompt_tokens[chosen, idx].sum())}
    out = {**zero, "cost/expert_forward_passes": prompt_tokens.shape[0] * len(idx),
           "cost/expert_prompt_tokens": int(prompt_tokens[:, idx].sum())}
    if method == "output-collab" and hint_tokens is not None:
        out["cost/expert_generated_tokens"] = int(hint_tokens[:, idx].sum())
    return out


def run_train(cfg: TrainConfig, cache_path: Path, out: Path | None = None, resume: bool = False,
              progress: bool = True, log=print, features_fn=None) -> Path:
    """Train one run into `out` (default runs/<method>-<family>-s<seed>); returns the run folder.

    features_fn(idx) -> n tensors [b, d_i]: replaces the cache's expert features (benchmarks/train_step.py
    passes experts run online on each batch's prompts, to time what the cache saves).
    """
    info = method_info(cfg.method)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)

    # ---- data: everything the run needs is read from the cache once, into memory (no per-row
    # HDF5 reads on the hot path).
    with Cache(cache_path) as cache:
        cache_fp = cache.fingerprint
        cache_cfg = yaml.safe_load(cache.config_yaml)
        prompts = cache.prompts()
        train_idx = cache.split_indices("train")
        val_idx = cache.split_indices("val")
        if len(val_idx) == 0:
            val_idx = cache.split_indices("test")  # GSM8K evaluates on its test split
        experts = list(cfg.experts) if cfg.experts is not None else cache.experts
        if info.needs_features or info.needs_hints:
            if not experts:
                raise MuskError(f"method {cfg.method!r} needs experts, but cache {str(cache_path)!r} has none")
            feats = cache.features(cfg.pooling, experts)  # raises on an unknown expert
            expert_feats = [torch.from_numpy(feats[n]).float() for n in experts]  # n x [N, d_i]
        else:
            experts, expert_feats = [], []
        router_emb = None
        if info.needs_router:
            router_emb = torch.from_numpy(cache.router_embedding(cfg.router)).float()  # [N, e]
        hints = {n: cache.hints(n) for n in experts} if info.needs_hints else {}
        prompt_tokens = np.stack([cache.column(n, "n_tokens") for n in experts]) if experts else None  # [n, N]
        hint_tokens = None
        if info.needs_hints and all("hint_n_tokens" in cache.f["experts"][n] for n in experts):
            hint_tokens = np.stack([cache.column(n, "hint_n_tokens") for n in experts])  # [n, N]
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise MuskError(f"cache {str(cache_path)!r} needs a train and a val (or test) split")
    family = cache_cfg["task"]["family"]
    system = from_dict(TaskConfig, cache_cfg["task"], "cache task config").system_prompt()
    cfg = replace(cfg, experts=tuple(experts))

    # ---- the run folder
    run = Path(out) if out is not None else Path("runs") / f"{cfg.method}-{family}-s{cfg.seed}"
    resolved = {**to_dict(cfg), "cache": str(cache_path), "cache_fingerprint": cache_fp, "task_family": family}
    if resume:
        if not (run / "config.yaml").exists():
            raise MuskError(f"--resume: {str(run)!r} holds no run (no config.yaml)")
        old = yaml.safe_load((run / "config.yaml").read_text())
        diff = sorted(k for k in resolved if k not in ("total_training_steps", "cache") and old.get(k) != resolved[k])
        if diff:
            raise MuskError(f"--resume: the run in {str(run)!r} was made with other settings: {diff}")
    elif (run / "metrics.jsonl").exists() or (run / "config.yaml").exists():
        raise MuskError(f"run folder {str(run)!r} already holds a run; use --resume or another --out")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(dump_yaml(resolved))

    # ---- models: policy with LoRA, g_phi; the reference is the same weights with LoRA disabled.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    peft_model, tok, scale = load_policy(cfg, dtype, device)
    lm = peft_model.get_base_model()  # the causal LM with LoRA layers injected
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    d_out = lm.get_input_embeddings().weight.shape[1]
    spec = AdapterSpec(
        method=cfg.method, expert_dims=tuple(int(f.shape[1]) for f in expert_feats), expert_names=tuple(experts),
        d_latent=cfg.d_latent, d_out=d_out, num_latents=cfg.num_latents, num_heads=cfg.num_heads,
        router_dim=int(router_emb.shape[1]) if router_emb is not None else 0, init_std=cfg.init_std,
        gumbel_tau=cfg.gumbel_tau, pooling=cfg.pooling, context_scale=scale,
    )
    adapter = build_adapter(spec).to(device)
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    groups = [{"params": lora_params, "lr": cfg.lr, "base_lr": cfg.lr}]
    if any(True for _ in adapter.parameters()):
        groups.append({"params": list(adapter.parameters()), "lr": cfg.router_lr, "base_lr": cfg.router_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, eps=cfg.epsilon)
    trainable = lora_params + list(adapter.parameters())
    eos, pad_id = eos_ids(lm, tok), tok.pad_token_id
    G, B = cfg.group_size, cfg.train_batch_size

    start_step, cursor = 0, 0
    if resume:
        last = ckpt.latest_checkpoint(run)
        if last is not None:
            state = ckpt.load_checkpoint(last, peft_model, adapter, optimizer)
            start_step, cursor = state["step"], state["cursor"]
        for name in ("metrics.jsonl", "eval.jsonl"):
            ckpt.truncate_jsonl(run / name, start_step)
        log(f"resuming {run} at step {start_step}")

    def prompt_texts(idx: list[int], with_hints: bool) -> list[str]:
        return [build_prompt_text(tok, system, prompts["text"][i],
                                  [(n, hints[n][i]) for n in experts] if with_hints else None) for i in idx]

    def context_for(idx: list[int]):
        """C [b, m, d_out] (scaled like token embeddings) and expert attention for prompts idx."""
        fb = [f.to(device) for f in features_fn(idx)] if features_fn else [f[idx].to(device) for f in expert_feats]
        rb = router_emb[idx].to(device) if router_emb is not None else None
        o = adapter(fb, rb)
        return (o.context * scale if o.context is not None else None), o.attention

    def evaluate(step: int) -> dict:
        """Greedy decoding on the validation split, with C and (Figure 5) without it."""
        peft_model.eval()
        adapter.eval()
        n = min(len(val_idx), cfg.eval_batches * cfg.val_batch_size)
        variants = [True] + ([False] if cfg.eval_without_context and cfg.method != "single" else [])
        result = {"step": step, "split": "val" if "val" in prompts["split"] else "test", "n": n}
        with torch.no_grad():
            for with_ctx in variants:
                rewards = []
                for s in range(0, n, cfg.val_batch_size):
                    idx = [int(i) for i in val_idx[s: s + cfg.val_batch_size]]
                    ids, pm = encode_prompts(tok, prompt_texts(idx, info.needs_hints and with_ctx), device)
                    c = context_for(idx)[0] if with_ctx else None
                    e, m = splice(lm.get_input_embeddings()(ids), pm, c, cfg.context_position)
                    comp, cm = generate(lm, e, m, cfg.max_new_tokens, eos, pad_id, greedy=True)
                    texts = decode(tok, comp, cm)
                    rewards += [score(prompts["entry"][i], t, cfg.answer_extraction) for i, t in zip(idx, texts)]
                r = np.array(rewards)
                key = "" if with_ctx else "_without_context"
                result["accuracy" + key] = float((r >= 1.0).mean())
                result["reward" + key] = float(r.mean())
        _append_jsonl(run / "eval.jsonl", result)
        peft_model.train()
        adapter.train()
        return result

    def save(step: int, data_cursor: int) -> None:
        ckpt.save_checkpoint(run, step, peft_model, adapter, optimizer, {"cursor": data_cursor})

    # ---- the loop
    peft_model.train()
    adapter.train()
    bar = tqdm(total=cfg.total_training_steps, initial=start_step, desc=f"train {cfg.method}", unit="step",
               disable=not progress, dynamic_ncols=True)
    last_eval = None
    for step in range(start_step + 1, cfg.total_training_steps + 1):
        t_step = time.perf_counter()
        cursor_at_start = cursor  # the data position that goes with the weights before this step
        timing = {"generate": 0.0, "reward": 0.0, "policy": 0.0, "reference": 0.0}
        warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * warm
        optimizer.zero_grad(set_to_none=True)
        all_r, zero_std, kls, losses, attn, n_tokens = [], [], [], [], [], 0
        cost = {"cost/prompts": 0, "cost/policy_prompt_tokens": 0}
        for micro in range(cfg.gradient_accumulation_steps):
            idx = _data_order(cfg.seed, len(train_idx), cursor, B)
            cursor += B
            idx = [int(train_idx[i]) for i in idx]
            ids, pm = encode_prompts(tok, prompt_texts(idx, info.needs_hints), device)  # [B, P]
            C, att = context_for(idx)  # [B, m, d_out] with grad, [B, m, n]
            if att is not None:
                attn.append(att.detach())
            for k, v in expert_cost(cfg.method, idx, prompt_tokens, hint_tokens,
                                    getattr(adapter, "last_choice", None)).items():
                cost[k] = cost.get(k, 0) + v
            cost["cost/prompts"] += B
            cost["cost/policy_prompt_tokens"] += int(pm.sum()) * G + (0 if C is None else C.shape[1] * B * G)
            ids_g, pm_g = ids.repeat_interleave(G, 0), pm.repeat_interleave(G, 0)  # [B*G, P]
            C_g = C.repeat_interleave(G, 0) if C is not None else None  # [B*G, m, d_out]
            emb = lm.get_input_embeddings()(ids_g)  # [B*G, P, d_out]
            e_in, m_in = splice(emb, pm_g, C_g, cfg.context_position)  # [B*G, P+m, d_out]

            t = time.perf_counter()
            peft_model.eval()  # decoding: eval mode keeps the KV cache on under gradient checkpointing
            comp, cm = generate(lm, e_in.detach(), m_in, cfg.max_new_tokens, eos, pad_id, cfg.temperature,
                                min_new_tokens=cfg.min_new_tokens, group=G if cfg.share_prompt else 1)
            peft_model.train()
            timing["generate"] += time.perf_counter() - t  # comp, cm: [B*G, T]
            n_tokens += int(cm.sum())

            t = time.perf_counter()
            texts = decode(tok, comp, cm)
            rewards = torch.tensor([score(prompts["entry"][i], s, cfg.answer_extraction)
                                    for i, s in zip([i for i in idx for _ in range(G)], texts)])  # [B*G]
            adv = group_advantages(rewards, G, cfg.std_floor)
            advantages = adv.advantages.to(device)
            timing["reward"] += time.perf_counter() - t

            N = B * G
            chunk = cfg.rollout_chunk or N
            # Each prompt runs once per group of G rollouts in the forwards below when the chunks hold
            # whole groups and the KV cache is on (gradient checkpointing turns it off).
            share = G if cfg.share_prompt and chunk % G == 0 and not cfg.gradient_checkpointing else 1
            t = time.perf_counter()
            with torch.no_grad(), peft_model.disable_adapter():
                # pi_ref: initial policy, zero-valued context tokens at the same positions as C.
                ref_e, ref_m = splice(emb, pm_g, torch.zeros_like(C_g) if C_g is not None else None,
                                      cfg.context_position)
                ref_logp = torch.cat([completion_logprobs(lm, ref_e[s:s + chunk], ref_m[s:s + chunk],
                                                          comp[s:s + chunk], cm[s:s + chunk], share)
                                      for s in range(0, N, chunk)])  # [B*G, T]
            timing["reference"] += time.perf_counter() - t

            t = time.perf_counter()
            micro_loss = kl_sum = 0.0
            for s in range(0, N, chunk):
                sl = slice(s, s + chunk)
                logp = completion_logprobs(lm, e_in[sl], m_in[sl], comp[sl], cm[sl], share)  # grad: LoRA, g_phi
                out_loss = grpo_loss(logp, logp.detach(), ref_logp[sl], advantages[sl], cm[sl], cfg.beta,
                                     cfg.clip_eps)
                weight = logp.shape[0] / N  # chunk losses sum to the full batch's loss
                (out_loss.loss * weight / cfg.gradient_accumulation_steps).backward(retain_graph=s + chunk < N)
                micro_loss += float(out_loss.loss.detach()) * weight
                kl_sum += float(out_loss.kl) * float(cm[sl].sum())
            timing["policy"] += time.perf_counter() - t

            all_r.append(rewards)
            zero_std.append(adv.frac_zero_std)
            kls.append(kl_sum / max(1.0, float(cm.sum())))
            losses.append(micro_loss)

        loss_value = float(np.mean(losses))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            save(step - 1, cursor_at_start)
            bar.close()
            raise MuskError(
                f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at step {step} "
                f"(loss={loss_value}, grad_norm={grad_norm}); stopped before the update and saved "
                f"{run}/checkpoints/step_{step - 1}. Lower lr/router_lr or check the cache's features."
            )
        optimizer.step()

        r = torch.cat(all_r)
        dt = time.perf_counter() - t_step
        rec = {
            "step": step, "reward/mean": float(r.mean()), "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
            "accuracy": float((r >= 1.0).float().mean()), "kl": float(np.mean(kls)), "loss": loss_value,
            "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"],
            "frac_reward_zero_std": float(np.mean(zero_std)), "step_seconds": dt,
            "tokens_per_second": n_tokens / dt, "completion_tokens": n_tokens,
            **{f"time/{k}": v for k, v in timing.items()}, **cost,
        }
        if device.startswith("cuda"):
            rec["mem/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if attn:
            rs = routing_stats(torch.cat(attn))
            rec.update({"routing/entropy": rs.entropy, "routing/utilization": rs.utilization,
                        "routing/attention": rs.attention})
        _append_jsonl(run / "metrics.jsonl", rec)
        bar.update(1)
        bar.set_postfix(reward=f"{rec['reward/mean']:.3f}", kl=f"{rec['kl']:.4f}")
        if not progress and step % cfg.log_freq == 0:
            log(f"step {step}: reward {rec['reward/mean']:.3f} acc {rec['accuracy']:.3f} kl {rec['kl']:.4f} "
                f"{dt:.1f}s")
        if step % cfg.test_freq == 0 or step == cfg.total_training_steps:
            last_eval = evaluate(step)
        if step % cfg.save_freq == 0 or step == cfg.total_training_steps:
            save(step, cursor)
    bar.close()

    # ---- final artefacts: PEFT adapter (PeftModel.from_pretrained), g_phi + its config, summary.
    final_step = max(start_step, cfg.total_training_steps)
    if last_eval is None:
        evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()] \
            if (run / "eval.jsonl").exists() else []
        last_eval = evals[-1] if evals else evaluate(final_step)
    peft_model.save_pretrained(run / "final")
    save_adapter(adapter, spec, run / "final")
    summary = {
        "method": cfg.method, "team": experts, "task_family": family, "seed": cfg.seed, "steps": final_step,
        "final_val_accuracy": last_eval.get("accuracy"),
        "final_val_accuracy_without_context": last_eval.get("accuracy_without_context"),
        "eval_n": last_eval.get("n"), "pooling": cfg.pooling, "num_latents": cfg.num_latents,
        "policy": cfg.policy, "cache_fingerprint": cache_fp, "config_fingerprint": sha256_of(resolved),
        "group_size": G, "train_batch_size": B, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_new_tokens": cfg.max_new_tokens, "context_position": cfg.context_position,
        "context_scale": scale,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"run {run}: final val accuracy {summary['final_val_accuracy']}")
    return run
