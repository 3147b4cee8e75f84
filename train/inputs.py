"""The policy's input for a batch of cache rows: prompt tokens (with the experts' hints for
output-collab), context tokens C from g_phi, and C with its information removed. Shared by the
rollouts (train/loop.py) and the evaluations (train/evaluate.py).

An `ExpertView` says which experts are read and from which prompt: evaluation-time ablations
(`musk eval --ablate`) take an expert out (keep False) or feed it another prompt's features (source).
Training always reads ALL: every expert, each prompt's own row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from train.adapters import AdapterOut, method_info
from train.policy import PromptBatch, build_prompt_parts, encode_blocks, encode_prompts, hint_block_text, splice

if TYPE_CHECKING:
    from train.config import TrainConfig
    from train.setup import Models, RunData


class ExpertView(NamedTuple):
    keep: torch.Tensor | None = None  # [n] bool over data.experts; None: all
    source: dict[int, dict[int, int]] | None = None  # expert index -> {cache row: row it reads instead}

    def row(self, expert: int, row: int) -> int:
        return self.source.get(expert, {}).get(row, row) if self.source else row

    def kept(self, expert: int) -> bool:
        return self.keep is None or bool(self.keep[expert])


ALL = ExpertView()


def decode_merged(cfg: TrainConfig, m: Models) -> bool:
    """Whether rollouts and evaluations decode through merged LoRA weights (cfg.decode_merged)."""
    return cfg.decode_merged == "on" or (cfg.decode_merged == "auto" and m.lm.dtype == torch.float32)


def expert_features(data: RunData, idx: list[int], view: ExpertView = ALL) -> list[torch.Tensor]:
    """n tensors [b, d_i]: each expert's features of prompts idx (or of the rows the view maps them to)."""
    feats = data.features(idx)
    for i in (view.source or {}):
        feats[i] = data.features([view.row(i, r) for r in idx])[i]
    return feats


def context_tokens(m: Models, data: RunData, idx: list[int], device: str, view: ExpertView = ALL) -> AdapterOut:
    """g_phi on prompts idx: C [b, m, d_out] (scaled like the policy's token embeddings) with grad,
    expert attention [b, m, n] and the routed expert [b] where the method has them."""
    feats = [f.to(device) for f in expert_features(data, idx, view)] if data.features is not None else []
    rb = data.router_emb[idx].to(device) if data.router_emb is not None else None
    o = m.adapter(feats, rb, keep=view.keep) if view.keep is not None else m.adapter(feats, rb)
    if o.context is not None and o.context.shape[0] != len(idx):  # prefix: one C [1, m, d] for every prompt
        o = o._replace(context=o.context.expand(len(idx), -1, -1))
    return o._replace(context=o.context * m.scale if o.context is not None else None)


def null_context_tokens(m: Models, C: torch.Tensor) -> torch.Tensor:
    """C with its information removed (the gate closed: the anchor, or zeros), scaled like C: what the
    reference reads in training and the policy reads in the null-context evaluation. [.., m, d_out]"""
    return m.adapter.out.null_context(C) * m.scale


def expert_hints(data: RunData, i: int, view: ExpertView = ALL) -> list[tuple[str, str]]:
    """(expert, hint) of every kept expert for cache row i, each read from the row the view maps i to."""
    return [(n, data.hints[n][view.row(e, i)]) for e, n in enumerate(data.experts) if view.kept(e)]


def prompt_batch(m: Models, data: RunData, idx: list[int], with_hints: bool, device: str,
                 view: ExpertView = ALL, hint_format: str = "labelled") -> PromptBatch:
    """The prompts idx, left padded [b, P]; with_hints: each kept expert's hint in the user turn."""
    parts = [build_prompt_parts(m.tok, data.system, data.prompts["text"][i],
                                expert_hints(data, i, view) if with_hints else None, hint_format)
             for i in idx]
    return encode_prompts(m.tok, parts, device)


class PolicyInputs(NamedTuple):
    """What the policy and the reference read for b prompts, C or the hint block spliced in."""

    embeds: torch.Tensor  # [b, L, d] the policy's input (differentiable into g_phi)
    ref_embeds: torch.Tensor  # [b, L, d] the reference's: C with its gate closed, or zeros at the hints
    mask: torch.Tensor  # [b, L] left padded
    ctx: AdapterOut | None  # g_phi's output (None with C removed)


def policy_inputs(cfg: TrainConfig, m: Models, data: RunData, idx: list[int], device: str, mode: str = "with",
                  view: ExpertView = ALL) -> PolicyInputs:
    """The policy's input for prompts idx under `mode`: with (C, or output-collab's hints), removed
    (the bare prompt: Figure 5), null (C's information removed, its slots kept).

    output-collab's hints go in the user turn (hint_position user-turn) or as a block of tokens
    where C goes (context: Eq. 12), the reference then reading zero-valued tokens at their positions
    (hint_reference zeros) or the hints themselves (reads)."""
    hints = method_info(cfg.method).needs_hints and mode != "removed"
    block = hints and cfg.hint_position == "context"
    pb = prompt_batch(m, data, idx, hints and not block, device, view, cfg.hint_format)  # [b, P]
    emb = m.lm.get_input_embeddings()(pb.ids)  # [b, P, d]
    ctx = context_tokens(m, data, idx, device, view) if mode != "removed" else None
    extra, ref_extra, extra_mask = None, None, None
    if ctx is not None and ctx.context is not None:  # C [b, m, d]
        extra = ref_extra = null_context_tokens(m, ctx.context)
        if mode == "with":
            extra = ctx.context
    elif block:
        texts = [hint_block_text(expert_hints(data, i, view), cfg.hint_format) for i in idx]
        ids, extra_mask = encode_blocks(m.tok, texts, device)  # [b, H]
        extra = m.lm.get_input_embeddings()(ids)  # [b, H, d]
        ref_extra = torch.zeros_like(extra) if cfg.hint_reference == "zeros" else extra
    e_in, m_in = splice(emb, pb.mask, extra, cfg.context_position, pb.tail, extra_mask)
    ref_e = splice(emb, pb.mask, ref_extra, cfg.context_position, pb.tail, extra_mask)[0] if extra is not None else emb
    return PolicyInputs(e_in, ref_e, m_in, ctx)


class RolloutInputs(NamedTuple):
    ctx: AdapterOut  # C [B, m, d_out] with grad, attention, choice
    embeds: torch.Tensor  # [B*G, L, d] C (or the hint block) spliced in
    ref_embeds: torch.Tensor  # [B*G, L, d] what the reference reads
    mask: torch.Tensor  # [B*G, L]


def rollout_inputs(cfg: TrainConfig, m: Models, data: RunData, idx: list[int], device: str) -> RolloutInputs:
    """policy_inputs for prompts idx, each row repeated G times, with C made by g_phi as it is now
    (num_iterations > 1 rebuilds them after each update)."""
    pi = policy_inputs(cfg, m, data, idx, device)  # [B, L, d]
    G = cfg.group_size
    return RolloutInputs(pi.ctx, *(x.repeat_interleave(G, 0) for x in (pi.embeds, pi.ref_embeds, pi.mask)))
