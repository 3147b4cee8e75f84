"""The method registry (one entry per method: what it reads, how its g_phi is built from an
`AdapterSpec`, what its experts would cost without the cache), g_phi's save and load, and the routing
statistics of Eq. 15 over the expert attention g_phi reports. The modules themselves are train/gphi.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from core.errors import MuskError
from core.registry import registry
from train.checkpoint import safe_load
from train.gphi import FFNOnly, HardRouter, NoContext, Perceiver, Prefix

CONTEXT_GATES = ("none", "rms", "ramp")
CONTEXT_ANCHORS = ("zero", "mean-embedding")
FEATURE_NORMS = ("none", "standardize")


class RoutingStats(NamedTuple):
    entropy: float  # H of Eq. 15
    utilization: list[float]  # u_i of Eq. 15, [n]
    attention: list[list[float]]  # batch-mean A, [m][n]


def routing_stats(attention: torch.Tensor) -> RoutingStats:
    """Eq. 15 from expert attention A of shape [B, m, n] (rows sum to 1), averaged over the batch.

    H = 1/m sum_j (-sum_i A_ji log A_ji); u_i = 1/m sum_j A_ji. Per-example values are computed
    first and then averaged over the batch ("all statistics are averaged over the batch").
    """
    a = attention.detach().float()
    plogp = torch.where(a > 0, a * torch.log(a.clamp_min(1e-30)), torch.zeros_like(a))
    h = (-plogp.sum(dim=-1)).mean(dim=-1)  # [B]
    u = a.mean(dim=1)  # [B, n]
    return RoutingStats(float(h.mean()), u.mean(dim=0).tolist(), a.mean(dim=0).tolist())


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
    context_gate: str = "none"
    embed_rms: float = 1.0
    feature_norm: str = "none"
    context_rms: float = 1.0
    context_anchor: str = "zero"

    @property
    def out_kwargs(self) -> dict:
        return {"gate": self.context_gate, "embed_rms": self.embed_rms, "norm": self.feature_norm,
                "context_rms": self.context_rms, "anchor": self.context_anchor}


# ---------------------------------------------------------------------------------------------
# The method registry: what a method reads, how its g_phi is built, and what its experts would
# cost a pipeline without the cache, in one entry each.


def _no_cost(prompt_tokens, hint_tokens, choice) -> dict:
    return {"cost/expert_forward_passes": 0, "cost/expert_prompt_tokens": 0, "cost/expert_generated_tokens": 0}


def _every_expert(prompt_tokens, hint_tokens, choice) -> dict:
    """Every expert reads every prompt once. prompt_tokens: [n, b]."""
    return {**_no_cost(None, None, None), "cost/expert_forward_passes": int(prompt_tokens.size),
            "cost/expert_prompt_tokens": int(prompt_tokens.sum())}


def _chosen_expert(prompt_tokens, hint_tokens, choice) -> dict:
    """Selective execution: only the routed expert runs (choice [b])."""
    b = prompt_tokens.shape[1]
    return {**_no_cost(None, None, None), "cost/expert_forward_passes": b,
            "cost/expert_prompt_tokens": int(prompt_tokens[choice, range(b)].sum())}


def _every_expert_decodes(prompt_tokens, hint_tokens, choice) -> dict:
    """Every expert reads the prompt and decodes its hint token by token (hint_tokens [n, b])."""
    out = _every_expert(prompt_tokens, hint_tokens, choice)
    if hint_tokens is not None:
        out["cost/expert_generated_tokens"] = int(hint_tokens.sum())
    return out


@dataclass(frozen=True, kw_only=True)
class MethodInfo:
    name: str
    needs_hints: bool
    description: str
    module: type[nn.Module]
    """g_phi's class (train/gphi.py): its `caps` say what it can do."""
    build: Callable[[AdapterSpec], nn.Module] = field(repr=False)
    cost: Callable[..., dict] = field(repr=False)
    """(prompt_tokens [n, b], hint_tokens [n, b] | None, choice [b] | None) -> cost/* counts."""

    @property
    def needs_features(self) -> bool:
        """The run reads the cache's expert features (g_phi projects them)."""
        return self.module.caps.reads_experts

    @property
    def needs_router(self) -> bool:
        """The run reads the cache's router embeddings (hard routing)."""
        return self.module.caps.hard_routing

    @property
    def has_context(self) -> bool:
        """g_phi makes context tokens C behind an output projection (so C can be removed or nulled)."""
        return self.module.caps.context


METHODS = registry([
    MethodInfo(name="single", needs_hints=False,
               description="single-model RLVR: no context tokens",
               module=NoContext, build=lambda s: NoContext(), cost=_no_cost),
    MethodInfo(name="perceiver", needs_hints=False,
               description="the method: Perceiver cross-attention, m latent queries (Eqs. 5-11)",
               module=Perceiver, build=lambda s: Perceiver(list(s.expert_dims), s.d_latent, s.d_out, s.num_latents,
                                                           num_heads=s.num_heads, init_std=s.init_std, **s.out_kwargs),
               cost=_every_expert),
    MethodInfo(name="ffn", needs_hints=False,
               description="the method without cross-attention: FFN(V) (Eq. 14)",
               module=FFNOnly, build=lambda s: FFNOnly(list(s.expert_dims), s.d_latent, s.d_out, s.init_std,
                                                       **s.out_kwargs),
               cost=_every_expert),
    MethodInfo(name="hard-routing", needs_hints=False,
               description="top-1 router over a sentence embedding, one memory token (Eq. 13)",
               module=HardRouter, build=lambda s: HardRouter(list(s.expert_dims), s.d_latent, s.d_out, s.router_dim,
                                                             init_std=s.init_std, tau=s.gumbel_tau, **s.out_kwargs),
               cost=_chosen_expert),
    MethodInfo(name="prefix", needs_hints=False,
               description="m trainable context tokens, no experts (prompt tuning): the perceiver without its "
                           "read of the experts",
               module=Prefix, build=lambda s: Prefix(s.d_latent, s.d_out, s.num_latents, s.init_std, **s.out_kwargs),
               cost=_no_cost),
    MethodInfo(name="output-collab", needs_hints=True,
               description="expert hints as text in an [Expert Hints] block (Eq. 12)",
               module=NoContext, build=lambda s: NoContext(), cost=_every_expert_decodes),
], "method")


def method_info(name: str) -> MethodInfo:
    if name not in METHODS:
        raise MuskError(f"unknown method {name!r}; choices: {list(METHODS)}")
    return METHODS[name]


def build_adapter(spec: AdapterSpec) -> nn.Module:
    return method_info(spec.method).build(spec)


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
    module.load_state_dict(safe_load(folder / "context_adapter.pt"))
    return module, spec
