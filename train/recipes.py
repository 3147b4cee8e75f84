"""Training recipes beyond the paper: a supervised warm-up before GRPO, and a decaying supervised term
mixed into GRPO's loss. The paper trains g_phi with reward alone; every published connector between
language models trains it with a dense supervised signal first or alongside (LLaVA's projector-first
stage, Cache-to-Cache's next-token loss on its fuser, DeepSeek-R1's cold start, CHORD's decaying
supervised term). Both recipes here minimise one loss, `answer_nll`: the negative log-likelihood of the
reference answer's tokens and EOS given the prompt with C spliced in, teacher-forced, on prompts of the
training split only (the same data order GRPO reads: the held-out split cannot be reached).

- sft_warmup_steps W: steps 1..W are supervised (no rollouts, no reward); GRPO runs steps W+1..total.
  sft_warmup_train says what the warm-up trains: `context` (g_phi and its gate, the LoRA frozen: the
  projector-first stage) or `context+lora`. After a warm-up GRPO's KL reference is the policy as the
  warm-up left it (sft_reference warmup-end: its LoRA, g_phi and gate; RLHF's KL to the supervised
  model), not the paper's (LoRA off, C's gate closed), whose KL term would pull the policy back to where
  it started and undo the warm-up.
- sft_mix_coef c, sft_mix_steps D: at GRPO step t (t = 1 the first step after the warm-up) the loss is
  GRPO's plus c * max(0, 1 - (t - 1) / D) * answer_nll, so the supervised term decays linearly to 0 over
  D GRPO steps and the run ends as the paper's GRPO (docs/grpo.md says why this and not a reference
  answer placed in each group).

Both are off (0) in every paper preset; a run with either is a different method, and the report names
its recipe (`recipe_name`). Refusals live in TrainConfig.validate.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import NamedTuple

import torch

from core import dist
from core.errors import MuskError
from train import checkpoint as ckpt
from train.config import TrainConfig
from train.optim import begin_step, update
from train.policy import KLReference, Policy
from train.data import RunData
from train.setup import Models, micro_batches_per_rank, step_prompts


def answer_tokens(tok, answers: list[str], eos: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference answers as completions: ids [b, T] right-padded with EOS, mask [b, T] (1 on the
    answer's tokens and its EOS, 0 on padding)."""
    ids = [tok(str(a), add_special_tokens=False)["input_ids"] + [eos] for a in answers]
    T = max(len(x) for x in ids)
    out = torch.full((len(ids), T), eos, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    return out.to(device), mask.to(device)


def answer_nll(cfg: TrainConfig, m: Policy, data: RunData, idx: list[int], device: str) -> torch.Tensor:
    """Mean negative log-likelihood, nats per answer token (a scalar with its graph), of the reference
    answers and EOS of prompts `idx`, each read after its prompt with C spliced in (teacher-forced, the
    rollouts' temperature 1). Gradients reach the LoRA and g_phi (and the gate) like GRPO's do."""
    pi = m.inputs(cfg, data, idx, device=device)  # [b, L, d], C spliced in with its gate
    ids, mask = answer_tokens(m.tok, [data.prompts["answer"][i] for i in idx], m.eos[0], device)  # [b, T]
    logp = m.logprobs(pi.embeds, pi.mask, ids, mask)  # [b, T]
    return -(logp * mask).sum() / mask.sum()


def in_warmup(cfg: TrainConfig, step: int) -> bool:
    """Whether optimizer step `step` (1-based) is a supervised warm-up step."""
    return step <= cfg.recipe.sft_warmup_steps


def mix_coef(cfg: TrainConfig, step: int) -> float:
    """The mixed supervised term's weight at optimizer step `step`: c * max(0, 1 - (t - 1) / D), t the
    GRPO step counted from the end of the warm-up; 0 when the recipe is off or has decayed."""
    if cfg.recipe.sft_mix_coef == 0 or in_warmup(cfg, step):
        return 0.0
    t = step - cfg.recipe.sft_warmup_steps
    return cfg.recipe.sft_mix_coef * max(0.0, 1.0 - (t - 1) / cfg.recipe.sft_mix_steps)


def kl_to_warmup_end(cfg: TrainConfig) -> bool:
    """Whether GRPO's KL reference is the policy as the warm-up left it (LoRA, g_phi and its gate, a
    snapshot taken after step sft_warmup_steps) instead of the paper's (LoRA off, C's gate closed)."""
    return cfg.recipe.sft_warmup_steps > 0 and cfg.recipe.sft_reference == "warmup-end"


def warmup_reference(m: Policy, kept: dict | None = None) -> KLReference:
    """The policy as it is now, frozen: copies of the LoRA's trainable tensors (as a checkpoint's lora.pt
    holds them) and of g_phi; with `kept` (a checkpoint's reference_state), that reference instead, on a
    frozen copy of g_phi."""
    adapter = copy.deepcopy(m.adapter).requires_grad_(False)
    if kept is None:
        return KLReference(ckpt.trainable_state(m.peft.named_parameters()), adapter)
    adapter.load_state_dict(kept["adapter"])
    return KLReference(kept["lora"], adapter)


def reference_state(ref: KLReference | None) -> dict | None:
    """What a checkpoint keeps of the reference: {"lora": {name: tensor}, "adapter": g_phi's state_dict}."""
    return None if ref is None else {"lora": ref.lora, "adapter": ref.adapter.state_dict()}


def resumed_reference(cfg: TrainConfig, m: Policy, checkpoint: Path, step: int) -> KLReference | None:
    """The KL reference a resume at `step` continues with: at the warm-up's last step the loaded weights
    themselves (the snapshot the uninterrupted run takes there), later the checkpoint's kept one. Raises
    MuskError for a checkpoint past the warm-up that keeps none (written before the reference was kept)."""
    if not kl_to_warmup_end(cfg) or step < cfg.recipe.sft_warmup_steps:
        return None
    if step == cfg.recipe.sft_warmup_steps:
        return warmup_reference(m)
    kept = ckpt.load_reference(checkpoint)
    if kept is None:
        raise MuskError(f"--resume: {checkpoint} is past the warm-up (step {step} > {cfg.recipe.sft_warmup_steps}) and "
                        f"keeps no KL reference ({ckpt.REFERENCE}); resume from the warm-up's last checkpoint or "
                        "start a new run")
    return warmup_reference(m, kept)


def recipe_name(config: dict) -> str | None:
    """A run's recipe in words from its config mapping ('sft-warmup 20 (context, KL to base)', 'sft-warmup
    100 (context+lora, KL to warm-up end)', 'sft-mix 0.5/30'), None for the paper's recipe (reward only). Keys
    absent from an older run's config read as off, and its KL reference as the base model (what it did)."""
    parts = []
    if int(config.get("sft_warmup_steps", 0) or 0) > 0:
        ref = "warm-up end" if config.get("sft_reference", "base") == "warmup-end" else "base"
        parts.append(f"sft-warmup {config['sft_warmup_steps']} ({config.get('sft_warmup_train', 'context')}, KL to {ref})")
    if float(config.get("sft_mix_coef", 0.0) or 0.0) > 0:
        parts.append(f"sft-mix {config['sft_mix_coef']:g}/{config.get('sft_mix_steps')}")
    return " + ".join(parts) or None


class WarmupOut(NamedTuple):
    record: dict  # the step's metrics.jsonl record (stage "sft-warmup")
    cursor: int  # the data position after the step's prompts


def warmup_step(cfg: TrainConfig, m: Models, data: RunData, step: int, *, cursor: int, device: str) -> WarmupOut:
    """One supervised warm-up step: the same prompts a GRPO step would read (gradient_accumulation_steps
    micro-batches of train_batch_size prompts in the run's data order, split over ranks), the mean of
    their answer NLLs backpropagated, and one AdamW update through `update` (clipping, the non-finite
    guard). With sft_warmup_train `context` the LoRA's gradients are dropped before the update, so the
    LoRA is untouched (AdamW skips a tensor without a gradient: no weight decay either)."""
    t0 = time.perf_counter()
    begin_step(cfg, m, step)  # the ramp gate's r_t rises over the warm-up as over GRPO steps
    W, B, A = dist.world(), cfg.optim.train_batch_size, cfg.optim.gradient_accumulation_steps
    losses = []
    for micro in range(micro_batches_per_rank(A, W)):
        g = micro * W + dist.rank()
        idx = step_prompts(cfg, data.train_idx, cursor, g)
        loss = answer_nll(cfg, m, data, idx, device)
        (loss / A).backward()  # the step's A micro-batches, over every rank, average
        losses.append(float(loss.detach()))
    losses = dist.gather_all(losses)  # every rank's micro-batches
    if cfg.recipe.sft_warmup_train == "context":
        for group in m.optimizer.param_groups:
            if group.get("name") == "lora":
                for p in group["params"]:
                    p.grad = None
    nll = sum(losses) / len(losses)
    grad_norm, norms = update(cfg, m, nll, step_tokens=1.0)  # step_tokens 1: no token division (dapo)
    rec = {"step": step, "stage": "sft-warmup", "sft/nll": nll, "grad_norm": grad_norm,
           "lr": m.optimizer.param_groups[0]["lr"], "step_seconds": time.perf_counter() - t0,
           **{f"grad_norm/{k}": v for k, v in norms.items()}}
    if m.gate_value() is not None:
        rec["context/gate"] = m.gate_value()
    return WarmupOut(rec, cursor + A * B)
