"""The `run` section of the train config: how the run executes (device, memory trade-offs) and what it
logs and saves into its folder (read by train/loop.py, train/setup.py, train/trackers.py;
`--set run.KEY=VALUE`). None of it changes what a step computes beyond rounding."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import bound, check_bounds
from train.trackers import check_trackers


@dataclass(frozen=True)
class RunConfig:
    device: str = "auto"
    """auto, cpu, cuda."""
    rollout_chunk: int = bound(0, ge=0, note="0: all at once")
    """Rollouts per differentiable policy forward (0: all B*G at once). Smaller saves memory; the
    gradient is the same (chunk losses are weighted to sum to the full loss)."""
    share_prompt: bool = True
    """Run each prompt once per group of G rollouts (prefill, policy and reference forwards) and let
    the group's completions attend to its cached keys/values: same numbers up to rounding, G-1 of
    every G prompt forwards saved. Off under gradient checkpointing, or when rollout_chunk splits
    groups."""
    gradient_checkpointing: bool = False
    """Recompute the policy's activations in backward (paper-scale policies on one GPU)."""
    log_freq: int = bound(1, ge=1)
    """Print a progress line every K steps (metrics.jsonl gets every step)."""
    log_completions_freq: int = 10
    """Every K steps, append the first micro-batch's first prompts with their completions, rewards,
    advantages and attention rows to completions.jsonl (0: never)."""
    log_completions_prompts: int = 1
    """Prompts per completions.jsonl entry step."""
    report_to: tuple[str, ...] = ("none",)
    """Experiment trackers that mirror metrics.jsonl: none, tensorboard (<run>/tensorboard, extra
    `tensorboard`), wandb, trackio (extras of the same names). Not a setting of the run: a resume may
    change it and the report ignores it."""
    save_freq: int = bound(1000, ge=1)
    """Checkpoint every K steps (and at the end)."""

    def validate(self) -> None:
        """Raises MuskError naming run.KEY for a value outside its bounds, or an unknown or missing tracker."""
        check_bounds(self, "run")
        check_trackers(self.report_to)
