"""The `sampling` section of the train config: how rollouts and evaluations are decoded, by which
engine, and how an answer is read from a completion (read by train/loop.py, train/inputs.py and
train/setup.py; `--set sampling.KEY=VALUE`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config import bound, check_bounds
from core.errors import MuskError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = bound(128, ge=1)
    """Fixed generation budget (paper: 128 tokens for all methods)."""
    min_new_tokens: int = bound(0, ge=0, note="0: off")
    """EOS is suppressed in a rollout's first K tokens (0: off). Not a paper setting: benchmarks set
    it to max_new_tokens for fixed-length rollouts, as in the TRL comparison."""
    temperature: float = bound(1.0, gt=0)
    """Sampling temperature of the rollouts."""
    top_p: float = bound(1.0, gt=0, le=1)
    """Nucleus sampling of the rollouts: keep the smallest set of tokens whose probability reaches
    top_p (1.0: off, the paper and TRL's default). The loss's log-probs stay those of the unfiltered
    softmax(logits / temperature), as TRL computes them."""
    top_k: int = bound(0, ge=0, note="0: off")
    """Sample the rollouts from the k most probable tokens only (0: off, the paper and TRL's default)."""
    min_p: float = bound(0.0, ge=0, lt=1)
    """Drop tokens whose probability is below min_p x the most probable token's (0.0: off; TRL: null)."""
    answer_extraction: Literal["strict", "lenient"] = "strict"
    """strict (paper: last closed <answer> tag) or lenient (see pipeline/rewards.py MODES)."""
    rollout_engine: Literal["musk", "vllm"] = "musk"
    """musk (its own KV-cached decoder, any device) or vllm (GPU, the optional extra: prompt embeddings
    with C spliced in, LoRA merged into vLLM's weights after every optimizer step; pipeline/vllm_engine.py
    ENGINES)."""
    vllm_memory: float = 0.3
    """rollout_engine vllm: the share of GPU memory vLLM may take (the policy trains in the rest)."""
    decode_merged: Literal["auto", "on", "off"] = "auto"
    """auto, on, off: decode rollouts and evaluations through W + B A, merged out of place for each
    LoRA linear (one matmul instead of three; the LoRA branch is a third of a CPU decode step's ops).
    Same numbers up to rounding where the policy is float32 (auto: float32 only); in bf16 W + B A
    rounds a small B A away, so the rollouts would lag the policy."""

    def validate(self) -> None:
        """Raises MuskError naming sampling.KEY for a value outside its bounds."""
        check_bounds(self, "sampling")
        if self.min_new_tokens > self.max_new_tokens:
            raise MuskError(f"sampling.min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
