"""g_phi's modules (paper Eq. 2): each maps the cached, pooled expert vectors of a batch ([B, d_i] per
expert) to context tokens C [B, m, d_out] in the policy's embedding space and exposes its expert
attention [B, m, n] (or None) for the routing statistics of Eq. 15 (train/adapters.routing_stats).

Each module class declares what it can do in `caps` (a `Capabilities`): callers read that, never probe
for attributes. The method registry that builds them from an `AdapterSpec` is train/adapters.py.

`keep` ([n] bool, None = all) takes experts out at evaluation time (`musk eval --ablate drop:NAME`):
an expert with keep False has no token when g_phi mixes them. Perceiver: its attention score is -inf,
so the softmax renormalises over the rest (exactly the attention over the remaining tokens); FFN: its
token is left out of C (n-1 context tokens); hard-routing: its router logit is -inf, it is never chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import MuskError

class AdapterOut(NamedTuple):
    context: torch.Tensor | None  # [B, m, d_out] or None (no context tokens)
    attention: torch.Tensor | None  # [B, m, n] expert attention (rows sum to 1) or None
    choice: torch.Tensor | None = None  # [B] the one expert hard-routing would run (cost accounting)


@dataclass(frozen=True)
class Capabilities:
    """What a g_phi module can do, declared by its class (`caps`)."""

    reads_experts: bool = False  # reads expert features through ExpertProjections (`experts`: feature_norm stats)
    context: bool = False  # makes C behind an OutputProjection (`out`): a gate, an anchor, a null C to read
    attention: bool = False  # reports expert attention [B, m, n] (routing statistics, Eq. 15)
    hard_routing: bool = False  # runs one expert per prompt (Gumbel in training): needs router_emb, reports choice
    prompt_independent: bool = False  # one C [1, m, d_out] for every prompt (the caller broadcasts it)


class TanhFFN(nn.Module):
    """FFN(x) = tanh(W2 tanh(W1 x)), W1: d -> d/2, W2: d/2 -> d (appendix 7.1, Eq. 16)."""

    def __init__(self, d: int):
        super().__init__()
        self.w1 = nn.Linear(d, d // 2, bias=False)
        self.w2 = nn.Linear(d // 2, d, bias=False)

    def forward(self, x):
        return torch.tanh(self.w2(torch.tanh(self.w1(x))))

class OutputProjection(nn.Module):
    """C = C' W_out + b_out (Eq. 11), W_out ~ N(0, init_std^2) and b_out = 0 at init, so C ~ 0 at step 0.

    gate "none" is the paper's literal Eq. 11. gate "rms" keeps Eq. 11 as the direction of C and sets
    its size: C = tanh(gamma) * k * s * C_raw / rms(C_raw), with s the RMS of the policy's token
    embeddings, k = context_rms, rms over each example's m x d_out entries, and the scalar gamma = 0
    at init. Then C is exactly 0 at step 0 (policy == reference: KL exactly 0), its RMS never exceeds
    k * s (it cannot outgrow the tokens it sits among by more than k), and Adam's first steps, which
    move every entry of W_out by about the learning rate, change only where C points, not how loud it is.

    gate "ramp" keeps the rms form with a size that cannot change sign or close by chance:
    C = r_t * sigmoid(gamma) * k * s * C_raw / rms(C_raw), r_t = min(1, t / gate_warmup_steps) a fixed
    schedule over the training step t (0 at the first step, set by `set_step`; 1 once warmed up and in
    a saved final/), gamma = 0 at init. Why: under "rms" the gate tanh(gamma) starts at 0, where Adam
    moves a lone scalar by about its learning rate a step whatever the gradient, so it random-walks
    across 0 and each crossing flips the sign of the C the LoRA has adapted to. sigmoid(gamma) is
    positive for every gamma, and the schedule, not gamma, holds C at 0 for the first step (KL exactly 0
    at step 0); the RMS bound k * s holds as for "rms".

    anchor "zero": C is the above. anchor "mean-embedding": the policy's mean token embedding is added
    to every context token (a fixed buffer, set by `set_anchor`). Why: C ~ 0 at step 0 is not "no C";
    m zero vectors spliced after the question cost a frozen policy accuracy before any training, m
    copies of its mean embedding far less (the figures: docs/context-path.md, "C = 0 is not 'no C'"),
    so with the anchor a context method starts where single does and C moves away from a neutral
    token, not from a blank one.
    """

    def __init__(self, d: int, d_out: int, init_std: float, *, gate: str = "none", embed_rms: float = 1.0,
                 context_rms: float = 1.0, anchor: str = "zero"):
        super().__init__()
        self.proj = nn.Linear(d, d_out)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)
        self.gate_kind = gate
        self.has_anchor = anchor != "zero"  # the anchor buffer exists (it is in the state dict)
        self.bound = embed_rms * context_rms  # the largest RMS C can have
        if gate in ("rms", "ramp"):
            self.gate = nn.Parameter(torch.zeros(()))  # gamma: tanh(gamma) = 0, sigmoid(gamma) = 1/2 at init
        if gate == "ramp":
            self.register_buffer("ramp", torch.zeros(()))  # r_t: 0 until `set_step` says otherwise
        if self.has_anchor:
            self.register_buffer("anchor", torch.zeros(d_out))

    @torch.no_grad()
    def set_anchor(self, embedding_weight: torch.Tensor) -> None:
        """anchor = the mean row of the policy's input embedding matrix [V, d_out] (unscaled, like C)."""
        if self.has_anchor:
            self.anchor.copy_(embedding_weight.float().mean(dim=0))

    @torch.no_grad()
    def set_step(self, step: int, warmup: int) -> None:
        """gate "ramp": r_t = min(1, (step - 1) / warmup) for training step `step` (1-based), so the
        first step's rollouts read C = anchor (policy == reference). No-op for the other gates."""
        if self.gate_kind == "ramp":
            self.ramp.fill_(min(1.0, max(0, step - 1) / max(1, warmup)))

    def gate_value(self) -> float | None:
        """The factor in front of k * s * C_raw / rms(C_raw) (None for gate "none")."""
        if self.gate_kind == "none":
            return None
        return float(self._gate().detach())

    def _gate(self) -> torch.Tensor:
        if self.gate_kind == "ramp":
            return self.ramp * torch.sigmoid(self.gate)
        return torch.tanh(self.gate)

    def null_context(self, like: torch.Tensor) -> torch.Tensor:
        """The C that carries no information (gate closed): what the reference reads. [.., m, d_out]"""
        return self.anchor.expand_as(like).to(like.dtype) if self.has_anchor else torch.zeros_like(like)

    def forward(self, x):
        c = self.proj(x)  # [B, m, d_out]
        if self.gate_kind != "none":
            rms = c.pow(2).mean(dim=(-2, -1), keepdim=True).add(1e-12).sqrt()  # [B, 1, 1]
            c = self._gate() * self.bound * c / rms
        return c + self.anchor if self.has_anchor else c


class ExpertProjections(nn.Module):
    """z_i = h_i W_i, one linear map per expert to the shared latent size d (Eq. 6).

    norm "standardize" first z-scores each expert's features per dimension with the train split's
    mean and std (buffers set by `set_feature_stats`, saved with the weights): experts whose hidden
    states differ in scale by 10x or more (a final-norm LM state against a probe vector) then enter
    the cross-attention on equal terms instead of the loudest one owning the keys and values.
    """

    def __init__(self, dims: list[int], d: int, norm: str = "none"):
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(di, d, bias=False) for di in dims])
        self.norm = norm
        if norm == "standardize":
            for i, di in enumerate(dims):
                self.register_buffer(f"mean_{i}", torch.zeros(di))
                self.register_buffer(f"inv_std_{i}", torch.ones(di))

    @torch.no_grad()
    def set_feature_stats(self, feats: list[torch.Tensor]) -> None:
        """Per-dimension mean and 1/std of each expert's features [N, d_i] (train split)."""
        if self.norm != "standardize":
            return
        for i, f in enumerate(feats):
            f = f.float()
            std = f.std(dim=0, unbiased=False)
            getattr(self, f"mean_{i}").copy_(f.mean(dim=0))
            # a constant dimension carries nothing: it maps to 0 instead of 0/0
            getattr(self, f"inv_std_{i}").copy_(torch.where(std > 1e-8, 1.0 / std.clamp_min(1e-8), torch.zeros_like(std)))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if self.norm == "standardize":
            feats = [(h - getattr(self, f"mean_{i}")) * getattr(self, f"inv_std_{i}") for i, h in enumerate(feats)]
        return torch.stack([p(h) for p, h in zip(self.proj, feats)], dim=1)  # V: [B, n, d]


class Perceiver(nn.Module):
    """C = (FFN(Q_lat + softmax(Q K^T / sqrt(d_h)) V')) W_out + b_out  (Eqs. 6-11).

    Multi-head (default 8): scores are scaled by sqrt(d_head), the standard multi-head form of the
    paper's sqrt(d); heads are concatenated back to d with no extra output projection (Eq. 10 has
    none). The reported attention A is the head average.
    """

    caps: ClassVar[Capabilities] = Capabilities(reads_experts=True, context=True, attention=True)


    def __init__(self, dims, d, d_out, num_latents, *, num_heads, init_std, gate="none", embed_rms=1.0,
                 norm="none", context_rms=1.0, anchor="zero"):
        super().__init__()
        if d % num_heads:
            raise MuskError(f"d_latent {d} is not divisible by num_heads {num_heads}")
        self.h, self.dh = num_heads, d // num_heads
        self.experts = ExpertProjections(dims, d, norm)
        self.latents = nn.Parameter(torch.randn(num_latents, d) / math.sqrt(d))  # Q_lat [m, d]
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.ffn = TanhFFN(d)
        self.out = OutputProjection(d, d_out, init_std, gate=gate, embed_rms=embed_rms, context_rms=context_rms,
                                    anchor=anchor)

    def forward(self, feats, router_emb=None, keep=None) -> AdapterOut:
        V = self.experts(feats)  # [B, n, d]
        B, n, d = V.shape
        m = self.latents.shape[0]
        q = self.wq(self.latents).view(m, self.h, self.dh).transpose(0, 1)  # [h, m, dh]
        k = self.wk(V).view(B, n, self.h, self.dh).transpose(1, 2)  # [B, h, n, dh]
        v = self.wv(V).view(B, n, self.h, self.dh).transpose(1, 2)  # [B, h, n, dh]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh)  # [B, h, m, n]
        if keep is not None:  # a dropped expert gets weight exactly 0; the rest renormalise
            scores = scores.masked_fill(~keep.to(scores.device), float("-inf"))
        att = torch.softmax(scores, dim=-1)  # [B, h, m, n]
        mixed = (att @ v).transpose(1, 2).reshape(B, m, d)  # [B, m, d]
        c = self.out(self.ffn(self.latents + mixed))  # [B, m, d_out]
        return AdapterOut(c, att.mean(dim=1))


class FFNOnly(nn.Module):
    """C = FFN(V) W_out + b_out, one token per expert, no cross-attention (Eq. 14)."""

    caps: ClassVar[Capabilities] = Capabilities(reads_experts=True, context=True)


    def __init__(self, dims, d, d_out, init_std, *, gate="none", embed_rms=1.0, norm="none", context_rms=1.0,
                 anchor="zero"):
        super().__init__()
        self.experts = ExpertProjections(dims, d, norm)
        self.ffn = TanhFFN(d)
        self.out = OutputProjection(d, d_out, init_std, gate=gate, embed_rms=embed_rms, context_rms=context_rms,
                                    anchor=anchor)

    def forward(self, feats, router_emb=None, keep=None) -> AdapterOut:
        V = self.experts(feats)  # [B, n, d]
        if keep is not None:
            V = V[:, keep.to(V.device)]  # [B, n_kept, d]: a dropped expert has no token
        return AdapterOut(self.out(self.ffn(V)), None)


class HardRouter(nn.Module):
    """Top-1 routing (Eq. 13): router head over the sentence embedding; straight-through
    Gumbel-softmax in training, argmax at evaluation; one memory token FFN(sum_i R_i W_i h_i).

    The reported attention is the router's softmax [B, 1, n]; `choice` is the expert that would run.
    """

    caps: ClassVar[Capabilities] = Capabilities(reads_experts=True, context=True, attention=True, hard_routing=True)


    def __init__(self, dims, d, d_out, router_dim, *, init_std, tau, gate="none", embed_rms=1.0, norm="none",
                 context_rms=1.0, anchor="zero"):
        super().__init__()
        self.experts = ExpertProjections(dims, d, norm)
        self.router = nn.Linear(router_dim, len(dims))
        self.ffn = TanhFFN(d)
        self.out = OutputProjection(d, d_out, init_std, gate=gate, embed_rms=embed_rms, context_rms=context_rms,
                                    anchor=anchor)
        self.tau = tau

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        """One-hot R [B, n]: straight-through Gumbel-softmax in train mode, argmax in eval mode."""
        if self.training:
            return F.gumbel_softmax(logits, tau=self.tau, hard=True)
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)

    def forward(self, feats, router_emb=None, keep=None) -> AdapterOut:
        if router_emb is None:
            raise MuskError("hard-routing needs the router's sentence embedding")
        logits = self.router(router_emb)  # [B, n]
        if keep is not None:  # a dropped expert can never be chosen (argmax or Gumbel)
            logits = logits.masked_fill(~keep.to(logits.device), float("-inf"))
        r = self.route(logits)  # [B, n]
        z = (r[:, :, None] * self.experts(feats)).sum(dim=1)  # [B, d]
        c = self.out(self.ffn(z))[:, None, :]  # [B, 1, d_out]
        return AdapterOut(c, torch.softmax(logits, dim=-1)[:, None, :], r.detach().argmax(dim=-1))


class Prefix(nn.Module):
    """C = FFN(Q_lat) W_out + b_out: m trainable context tokens and no experts (prompt tuning, Lester et
    al. 2021). It is the perceiver with its read of the experts removed (Eq. 10 without the attention
    term): the same latents, FFN, output projection, gate and anchor, so "perceiver - prefix" measures
    what the experts' features add beyond m learned, prompt-independent tokens.

    The context does not depend on the prompt: forward returns C [1, m, d_out], which the caller
    broadcasts over its batch."""

    caps: ClassVar[Capabilities] = Capabilities(context=True, prompt_independent=True)


    def __init__(self, d, d_out, num_latents, init_std, *, gate="none", embed_rms=1.0, norm="none", context_rms=1.0,
                 anchor="zero"):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, d) / math.sqrt(d))  # Q_lat [m, d]
        self.ffn = TanhFFN(d)
        self.out = OutputProjection(d, d_out, init_std, gate=gate, embed_rms=embed_rms, context_rms=context_rms,
                                    anchor=anchor)

    def forward(self, feats, router_emb=None, keep=None) -> AdapterOut:
        if keep is not None:
            raise MuskError("method prefix reads no experts, so there is none to drop or keep")
        return AdapterOut(self.out(self.ffn(self.latents))[None], None)  # [1, m, d_out]


class NoContext(nn.Module):
    """No context tokens (single; output-collab, whose hints are text in the prompt)."""

    caps: ClassVar[Capabilities] = Capabilities()

    def forward(self, feats, router_emb=None, keep=None) -> AdapterOut:
        return AdapterOut(None, None)


