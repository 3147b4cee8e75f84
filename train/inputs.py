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

from train.adapters import AdapterOut
from train.policy import PromptBatch, build_prompt_parts, encode_prompts

if TYPE_CHECKING:
    from train.config import TrainConfig
    from train.loop import Models, RunData


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
    return o._replace(context=o.context * m.scale if o.context is not None else None)


def null_context_tokens(m: Models, C: torch.Tensor) -> torch.Tensor:
    """C with its information removed (the gate closed: the anchor, or zeros), scaled like C: what the
    reference reads in training and the policy reads in the null-context evaluation. [.., m, d_out]"""
    return m.adapter.out.null_context(C) * m.scale


def prompt_batch(m: Models, data: RunData, idx: list[int], with_hints: bool, device: str,
                 view: ExpertView = ALL) -> PromptBatch:
    """The prompts idx, left padded [b, P]; with_hints: each kept expert's hint (output-collab, Eq. 12)."""
    def hints(i: int):
        return [(n, data.hints[n][view.row(e, i)]) for e, n in enumerate(data.experts) if view.kept(e)]

    parts = [build_prompt_parts(m.tok, data.system, data.prompts["text"][i], hints(i) if with_hints else None)
             for i in idx]
    return encode_prompts(m.tok, parts, device)
