"""The `optim` section of the train config: what one optimizer step takes, how many there are, and
AdamW's settings per parameter group (read by train/optim.py and train/setup.py; `--set optim.KEY=VALUE`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config import bound, check_bounds


@dataclass(frozen=True)
class OptimConfig:
    train_batch_size: int = bound(4, ge=1)
    """Prompts per micro-batch (each gives grpo.group_size completions)."""
    gradient_accumulation_steps: int = bound(8, ge=1)
    """Micro-batches per optimizer step (paper: 4 x 8 = 32 prompts a step)."""
    total_training_steps: int = bound(500, ge=1)
    """Optimizer steps (paper: 500 on Reasoning Gym, 233 on GSM8K)."""
    lr: float = 1e-4
    """AdamW learning rate of the LoRA policy."""
    router_lr: float = 1e-4
    """AdamW learning rate of g_phi (the context-token adapter)."""
    gate_lr: float = 1e-2
    """AdamW learning rate of the gate gamma (context.context_gate: rms or ramp)."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    epsilon: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max grad norm (see grad_clip_scope)."""
    grad_clip_scope: Literal["global", "per-group"] = "global"
    """global: one norm over all trainable tensors (the paper's recipe); per-group: LoRA, g_phi and the
    gate are clipped each on its own, so the gate's large gradient cannot shrink the LoRA's update."""
    warmup_steps: int = 0
    """Linear LR warmup steps (paper: none)."""
    router_warmup_steps: int = bound(0, ge=0, note="0: none")
    """Linear warmup of router_lr over the first K steps (0: none; the gate's lr is not warmed up)."""

    def validate(self) -> None:
        """Raises MuskError naming optim.KEY for a value outside its bounds."""
        check_bounds(self, "optim")
