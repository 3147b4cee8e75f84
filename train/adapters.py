"""Context-token operators g_phi (paper Eq. 2), one registry entry per method.

Each adapter maps the cached, pooled expert vectors of a batch ([B, d_i] per expert) to context
tokens C [B, m, d_out] in the policy's embedding space, and exposes its expert attention [B, m, n]
(or None) for the routing statistics of Eq. 15.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import MuskError


class AdapterOut(NamedTuple):
    context: torch.Tensor | None  # [B, m, d_out] or None (no context tokens)
    attention: torch.Tensor | None  # [B, m, n] expert attention (rows sum to 1) or None


@dataclass(frozen=True)
class MethodInfo:
    name: str
    needs_features: bool
    needs_router: bool
    needs_hints: bool
    description: str


METHODS = {
    m.name: m
    for m in [
        MethodInfo("single", False, False, False, "single-model RLVR: no context tokens"),
        MethodInfo("perceiver", True, False, False, "the method: Perceiver cross-attention, m latent queries (Eqs. 5-11)"),
        MethodInfo("ffn", True, False, False, "the method without cross-attention: FFN(V) (Eq. 14)"),
        MethodInfo("hard-routing", True, True, False, "top-1 router over a sentence embedding, one memory token (Eq. 13)"),
        MethodInfo("output-collab", False, False, True, "expert hints as text in an [Expert Hints] block (Eq. 12)"),
    ]
}


def method_info(name: str) -> MethodInfo:
    if name not in METHODS:
        raise MuskError(f"unknown method {name!r}; choices: {list(METHODS)}")
    return METHODS[name]


class TanhFFN(nn.Module):
    """FFN(x) = tanh(W2 tanh(W1 x)), W1: d -> d/2, W2: d/2 -> d (appendix 7.1, Eq. 16)."""

    def __init__(self, d: int):
        super().__init__()
        self.w1 = nn.Linear(d, d // 2, bias=False)
        self.w2 = nn.Linear(d // 2, d, bias=False)

    def forward(self, x):
        return torch.tanh(self.w2(torch.tanh(self.w1(x))))


class OutputProjection(nn.Module):
    """C = C' W_out + b_out with W_out, b_out near zero at init (Eq. 11), so C ~ 0 at step 0."""

    def __init__(self, d: int, d_out: int, init_std: float):
        super().__init__()
        self.proj = nn.Linear(d, d_out)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        return self.proj(x)


class ExpertProjections(nn.Module):
    """z_i = h_i W_i, one linear map per expert to the shared latent size d (Eq. 6)."""

    def __init__(self, dims: list[int], d: int):
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(di, d, bias=False) for di in dims])

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([p(h) for p, h in zip(self.proj, feats)], dim=1)  # V: [B, n, d]


class Perceiver(nn.Module):
    """C = (FFN(Q_lat + softmax(Q K^T / sqrt(d_h)) V')) W_out + b_out  (Eqs. 6-11).

    Multi-head (default 8): scores are scaled by sqrt(d_head), the standard multi-head form of the
    paper's sqrt(d); heads are concatenated back to d with no extra output projection (Eq. 10 has
    none). The reported attention A is the head average.
    """

    def __init__(self, dims, d, d_out, num_latents, num_heads, init_std):
        super().__init__()
        if d % num_heads:
            raise MuskError(f"d_latent {d} is not divisible by num_heads {num_heads}")
        self.h, self.dh = num_heads, d // num_heads
        self.experts = ExpertProjections(dims, d)
        self.latents = nn.Parameter(torch.randn(num_latents, d) / math.sqrt(d))  # Q_lat [m, d]
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.ffn = TanhFFN(d)
        self.out = OutputProjection(d, d_out, init_std)

    def forward(self, feats, router_emb=None) -> AdapterOut:
        V = self.experts(feats)  # [B, n, d]
        B, n, d = V.shape
        m = self.latents.shape[0]
        q = self.wq(self.latents).view(m, self.h, self.dh).transpose(0, 1)  # [h, m, dh]
        k = self.wk(V).view(B, n, self.h, self.dh).transpose(1, 2)  # [B, h, n, dh]
        v = self.wv(V).view(B, n, self.h, self.dh).transpose(1, 2)  # [B, h, n, dh]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), dim=-1)  # [B, h, m, n]
        mixed = (att @ v).transpose(1, 2).reshape(B, m, d)  # [B, m, d]
        c = self.out(self.ffn(self.latents + mixed))  # [B, m, d_out]
        return AdapterOut(c, att.mean(dim=1))


class FFNOnly(nn.Module):
    """C = FFN(V) W_out + b_out, one token per expert, no cross-attention (Eq. 14)."""

    def __init__(self, dims, d, d_out, init_std):
        super().__init__()
        self.experts = ExpertProjections(dims, d)
        self.ffn = TanhFFN(d)
        self.out = OutputProjection(d, d_out, init_std)

    def forward(self, feats, router_emb=None) -> AdapterOut:
        return AdapterOut(self.out(self.ffn(self.experts(feats))), None)


class HardRouter(nn.Module):
    """Top-1 routing (Eq. 13): router head over the sentence embedding; straight-through
    Gumbel-softmax in training, argmax at evaluation; one memory token FFN(sum_i R_i W_i h_i).

    The reported attention is the router's softmax [B, 1, n].
    """

    def __init__(self, dims, d, d_out, router_dim, init_std, tau):
        super().__init__()
        self.experts = ExpertProjections(dims, d)
        self.router = nn.Linear(router_dim, len(dims))
        self.ffn = TanhFFN(d)
        self.out = OutputProjection(d, d_out, init_std)
        self.tau = tau

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        """One-hot R [B, n]: straight-through Gumbel-softmax in train mode, argmax in eval mode."""
        if self.training:
            return F.gumbel_softmax(logits, tau=self.tau, hard=True)
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)

    def forward(self, feats, router_emb=None) -> AdapterOut:
        if router_emb is None:
            raise MuskError("hard-routing needs the router's sentence embedding")
        logits = self.router(router_emb)  # [B, n]
        r = self.route(logits)  # [B, n]
        self.last_choice = r.detach().argmax(dim=-1)  # [B] the one expert that would run (cost accounting)
        z = (r[:, :, None] * self.experts(feats)).sum(dim=1)  # [B, d]
        c = self.out(self.ffn(z))[:, None, :]  # [B, 1, d_out]
        return AdapterOut(c, torch.softmax(logits, dim=-1)[:, None, :])


class NoContext(nn.Module):
    def forward(self, feats, router_emb=None) -> AdapterOut:
        return AdapterOut(None, None)


@dataclass(frozen=True)
class AdapterSpec:
    """Everything needed to rebuild g_phi (saved next to its weights)."""

    method: str
    expert_dims: tuple[int, ...]
    expert_names: tuple[str, ...]
    d_latent: int
    d_out: int
    num_latents: int
    num_heads: int
    router_dim: int
    init_std: float
    gumbel_tau: float
    pooling: str
    context_scale: float


def build_adapter(spec: AdapterSpec) -> nn.Module:
    dims, d = list(spec.expert_dims), spec.d_latent
    if spec.method == "perceiver":
        return Perceiver(dims, d, spec.d_out, spec.num_latents, spec.num_heads, spec.init_std)
    if spec.method == "ffn":
        return FFNOnly(dims, d, spec.d_out, spec.init_std)
    if spec.method == "hard-routing":
        return HardRouter(dims, d, spec.d_out, spec.router_dim, spec.init_std, spec.gumbel_tau)
    method_info(spec.method)
    return NoContext()


def save_adapter(module: nn.Module, spec: AdapterSpec, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), folder / "context_adapter.pt")
    d = dict(spec.__dict__)
    (folder / "context_adapter.json").write_text(json.dumps(d, indent=2))


def load_adapter(folder: str | Path) -> tuple[nn.Module, AdapterSpec]:
    """Rebuild g_phi from a run's final/ (or a checkpoint) folder."""
    folder = Path(folder)
    raw = json.loads((folder / "context_adapter.json").read_text())
    raw["expert_dims"] = tuple(raw["expert_dims"])
    raw["expert_names"] = tuple(raw["expert_names"])
    spec = AdapterSpec(**raw)
    module = build_adapter(spec)
    module.load_state_dict(torch.load(folder / "context_adapter.pt", weights_only=True))
    return module, spec
