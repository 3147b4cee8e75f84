"""The `context` section of the train config: g_phi (the context-token adapter, train/adapters.py),
where its tokens C go in the prompt (train/inputs.py), and output-collab's hint block, which takes C's
place (`--set context.KEY=VALUE`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cache.schema import POOLED
from core.config import bound, check_bounds
from core.errors import MuskError


@dataclass(frozen=True)
class ContextConfig:
    pooling: str = "last_token"
    """Pooling variant read from the cache (Table 2 ablation): one of cache/schema.py POOLED, which owns
    the names."""
    router: str | None = None
    """Router encoder in the cache for hard-routing; null takes the first one."""
    d_latent: int = bound(512, ge=1)
    """Shared latent size d of the expert projections (paper: 512)."""
    num_latents: int = bound(8, ge=1)
    """m, the number of latent queries / context tokens of perceiver (paper: 8; Figure 6 sweep)."""
    num_heads: int = bound(8, ge=1)
    """Cross-attention heads (paper: 8)."""
    init_std: float = 1e-4
    """Std of W_out at initialisation (near zero so that C ~ 0 and KL ~ 0 at step 0)."""
    gumbel_tau: float = 1.0
    """Temperature of the straight-through Gumbel-softmax of hard-routing."""
    context_position: Literal["suffix", "prefix", "after-question"] = "suffix"
    """Where C goes (train/inputs.splice): suffix ([x || C], Eq. 3: after the whole prompt, right before
    the answer), prefix (before the prompt) or after-question (after the user's content, before the end
    of turn and the generation prompt: where a chat model reads a hint)."""
    context_gate: Literal["none", "rms", "ramp"] = "none"
    """none: C = C' W_out + b_out (Eq. 11 as printed). rms: C = tanh(gamma) * s * C_raw / rms(C_raw),
    s the RMS of the policy's token embeddings, gamma = 0 at init (C = 0 and KL = 0 at step 0, C never
    louder than a token). ramp: C = r_t * sigmoid(gamma) * s * C_raw / rms(C_raw), r_t = min(1, (t - 1) /
    gate_warmup_steps) at training step t: positive for every gamma, so C can neither flip its sign nor
    close by chance; r_1 = 0 keeps KL = 0 at step 0 (docs/context-path.md)."""
    gate_warmup_steps: int = bound(10, ge=1)
    """context_gate ramp: steps over which r_t rises linearly from 0 to 1."""
    context_rms: float = bound(1.0, gt=0)
    """context_gate rms: the largest RMS of C, in units of the RMS of the policy's token embeddings."""
    context_anchor: Literal["zero", "mean-embedding"] = "zero"
    """zero: C as above (the paper). mean-embedding: the policy's mean token embedding is added to every
    context token, so a closed gate leaves m neutral tokens rather than m zero vectors (what zero vectors
    cost an untrained policy: docs/context-path.md); the reference reads the same anchor."""
    feature_norm: Literal["none", "standardize"] = "none"
    """none, or standardize: z-score each expert's cached features per dimension with the train split's
    statistics before W_i (experts of very different scale meet on equal terms)."""
    hint_format: Literal["literal", "labelled"] = "literal"
    """output-collab: literal (Eq. 12 as written: the experts' decoded hints verbatim, unlabelled, in an
    [Expert Hints] block) or labelled (musk's: one "- <expert>: <stripped hint>" line per expert)."""
    hint_position: Literal["context", "user-turn"] = "context"
    """output-collab: context (the hint block's tokens go where the paper puts C, context_position) or
    user-turn (inside the user's message, after the question)."""
    hint_reference: Literal["zeros", "reads"] = "zeros"
    """output-collab: zeros (the reference policy reads zero-valued tokens at the hints' positions, as
    Sec. 4.1 gives it zero-valued context tokens at C's) or reads (it reads the hints like the policy).
    zeros needs hint_position context."""

    def validate(self) -> None:
        """Raises MuskError naming context.KEY for a value outside its bounds or choices."""
        if self.pooling not in POOLED:
            raise MuskError(f"context.pooling: unknown pooling {self.pooling!r}; choices: {list(POOLED)}")
        check_bounds(self, "context")
        if self.hint_reference == "zeros" and self.hint_position != "context":
            raise MuskError("context.hint_reference zeros needs hint_position context (the reference's zero tokens take "
                            "the hint block's slots); with hint_position user-turn use hint_reference reads")
