"""The run's data as types: what a run reads from the cache once into memory (no per-row HDF5 reads
on the hot path): prompts, splits, the experts' pooled features (or another `FeatureSource`), router
embeddings, hints and their token counts. train/setup.load_data fills a RunData from a cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class FeatureSource(Protocol):
    """Where the pooled expert vectors of a batch come from: n tensors [b, d_i] for cache rows idx."""

    def __call__(self, idx: list[int]) -> list[torch.Tensor]: ...


class CachedFeatures:
    """The cache's features, held in memory: n tensors [N, d_i]."""

    def __init__(self, feats: list[torch.Tensor]):
        self.feats = feats

    def __call__(self, idx: list[int]) -> list[torch.Tensor]:
        return [f[idx] for f in self.feats]


@dataclass(kw_only=True)
class RunData:
    family: str
    system: str  # the developer prompt (system turn of the policy)
    cache_fingerprint: str
    prompts: dict[str, list[str]]  # the cache's prompt columns
    train_idx: np.ndarray  # cache rows of the train split
    val_idx: np.ndarray  # cache rows of the validation (GSM8K: test) split
    val_split: str
    experts: list[str]  # the team, in order (empty for methods without experts)
    features: CachedFeatures | None  # [N, d_i] per expert
    router_emb: torch.Tensor | None  # [N, e]
    hints: dict[str, list[str]]  # expert -> hint per row (output-collab)
    prompt_tokens: np.ndarray | None  # [n, N] prompt length in each expert's tokenizer (cost)
    hint_tokens: np.ndarray | None  # [n, N] generated hint tokens (cost)
    pooling_draw: int  # which seeded draw of random_token / random_layer this run reads (seed % draws)
    prompt_set: str = ""  # the cache's data fingerprint: runs with equal values saw the same prompts
