"""The `recipe` section of the train config: training recipes beyond the paper (train/recipes.py), off
in every paper preset (`--set recipe.KEY=VALUE`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config import bound, check_bounds


@dataclass(frozen=True)
class RecipeConfig:
    sft_warmup_steps: int = bound(0, ge=0, note="0: off")
    """Supervised warm-up: optimizer steps 1..K minimise the reference answer's NLL given the prompt with C
    (training split only) instead of GRPO's loss; GRPO runs steps K+1..optim.total_training_steps. 0: off
    (the paper). At most optim.total_training_steps."""
    sft_warmup_train: Literal["context", "context+lora"] = "context"
    """What the warm-up trains: context (g_phi and its gate; the LoRA frozen: LLaVA's projector-first
    stage) or context+lora. single and output-collab have no g_phi: they take context+lora only."""
    sft_reference: Literal["warmup-end", "base"] = "warmup-end"
    """GRPO's KL reference after a warm-up: warmup-end, the policy as the warm-up left it (its LoRA, g_phi
    and gate: RLHF's KL to the supervised model, as InstructGPT and DeepSeek-R1), or base, the paper's
    (LoRA off, C's gate closed), whose KL term pulls the policy back to where it started and undoes the
    warm-up (docs/results.md, the sums probe). Inert without a warm-up."""
    sft_mix_coef: float = bound(0.0, ge=0, note="0: off")
    """Mixed objective: GRPO's loss plus sft_mix_coef * max(0, 1 - (t - 1) / sft_mix_steps) times the
    answer NLL at GRPO step t (a supervised term that decays to 0; CHORD-style). 0: off (the paper)."""
    sft_mix_steps: int = bound(1, ge=1)
    """GRPO steps over which the mixed supervised term decays linearly to 0."""

    def validate(self) -> None:
        """Raises MuskError naming recipe.KEY for a value outside its bounds."""
        check_bounds(self, "recipe")
