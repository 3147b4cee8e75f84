"""The `policy` section of the train config: the policy LM, its LoRA adapters and its precision
(read by train/policy.py and train/setup.py; `--set policy.KEY=VALUE`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config import bound, check_bounds


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "smollm2-135m-instruct"
    """The policy LM: an expert-registry name, a hub id or a local folder (flat spelling: `policy`)."""
    lora_rank: int = bound(8, ge=1)
    """LoRA rank (paper: 8)."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout (0 keeps the GRPO forward deterministic)."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names that get LoRA adapters."""
    dtype: Literal["auto", "bfloat16", "bf16", "float32", "fp32", "float16", "fp16"] = "auto"
    """Policy weights: auto (bf16 where fast), bfloat16, float32 (pipeline/experts.py resolve_dtype)."""
    lm_head_fp32: bool = False
    """Compute the LM head (logits) in float32 from a float32 copy of its weight, in the sampler (musk's
    decoder) and in the trainer's log-probs alike (pipeline/generation.py lm_logits). Off: the head runs
    in the policy's dtype, so a bf16 policy's log-probs, and the KL, entropy and TIS weights built from
    them, carry bf16 rounding (docs/performance.md measures both). Needs sampling.rollout_engine musk."""

    def validate(self) -> None:
        """Raises MuskError naming policy.KEY for a value outside its bounds."""
        check_bounds(self, "policy")
