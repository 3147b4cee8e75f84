"""One AdamW update of a GRPO step: the learning-rate warmup, gradients summed over ranks (dapo: divided
by the step's loss tokens), clipped globally or per optimizer group, and refused when non-finite."""

from __future__ import annotations

import math

import torch

from core import dist
from train.config import TrainConfig
from train.setup import Models


def set_lr(optimizer: torch.optim.Optimizer, step: int, warmup_steps: int) -> None:
    """Linear warmup: warmup_steps for the policy's group, each group's own `warmup` on top."""
    for g in optimizer.param_groups:
        w = max(warmup_steps, g.get("warmup", 0))
        g["lr"] = g["base_lr"] * (min(1.0, step / w) if w else 1.0)


def begin_step(cfg: TrainConfig, m: Models, step: int) -> None:
    """What every optimizer step does first: this step's learning rates (warmups), the ramp gate's r_t
    (0 on the first step: KL = 0), and cleared gradients."""
    set_lr(m.optimizer, step, cfg.optim.warmup_steps)
    if m.caps.context:  # context_gate ramp: this step's r_t
        m.adapter.out.set_step(step, cfg.context.gate_warmup_steps)
    m.optimizer.zero_grad(set_to_none=True)


def update(cfg: TrainConfig, m: Models, loss: float, step_tokens: float, it: int = 0) -> tuple[float, dict]:
    """One AdamW update on the accumulated gradients: sum over ranks, dapo's token sums divided by the
    step's loss tokens (all ranks), clip. A non-finite loss or norm raises NonFinite before the update.
    it: the pass over the step's rollouts (0 the first). Returns clip_gradients' (global norm, {group: norm})."""
    dist.sum_grads(m.trainable)
    if cfg.grpo.loss_type == "dapo":
        for p in m.trainable:
            if p.grad is not None:
                p.grad.div_(max(step_tokens, 1.0))
    grad_norm, group_norms = clip_gradients(m.optimizer, cfg.optim.grad_clip, cfg.optim.grad_clip_scope)
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        m.optimizer.zero_grad(set_to_none=True)
        raise NonFinite(loss, grad_norm, it)
    m.optimizer.step()
    return grad_norm, group_norms


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float, scope: str) -> tuple[float, dict]:
    """Clip to max_norm over all trainable tensors together (global: one norm, as verl and TRL clip) or
    per optimizer group (per-group: LoRA, g_phi and the gate each get their own budget). Why per-group:
    under the rms gate C = tanh(gamma) k s C_raw / rms(C_raw) divides by a small rms(C_raw) at init,
    so g_phi's gradient norm can exceed the LoRA's by orders of magnitude in the first steps, and a
    global clip then divides the LoRA's update by that much (the measured norms: docs/context-path.md,
    "A global gradient clip lets g_phi starve the LoRA").
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


class NonFinite(Exception):
    def __init__(self, loss: float, grad_norm: float, it: int = 0):
        self.loss, self.grad_norm, self.it = loss, grad_norm, it  # it > 0: earlier passes already updated
