"""The run's data, read from the cache once into memory (no per-row HDF5 reads on the hot path):
prompts, splits, the experts' pooled features (or another `FeatureSource`), router embeddings, hints
and their token counts (RunData, load_data)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml

from cache.reader import Cache
from core.config import from_dict
from core.errors import MuskError
from pipeline.tasks import TaskConfig
from train.adapters import method_info
from train.config import TrainConfig


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


def load_data(cfg: TrainConfig, cache_path: Path) -> RunData:
    info = method_info(cfg.method)
    with Cache(cache_path) as cache:
        cache_cfg = yaml.safe_load(cache.config_yaml)
        if (overlap := cache.split_overlap()) > 0:
            raise MuskError(f"cache {str(cache_path)!r}: {overlap} of its held-out prompts are also in its training "
                            "split, so its validation numbers would be training accuracy. Rebuild it with this "
                            "musk's `musk extract` (held-out splits by construction).")
        prompts = cache.prompts()
        train_idx, val_idx, val_split = cache.split_indices("train"), cache.split_indices("val"), "val"
        if len(val_idx) == 0:
            val_idx, val_split = cache.split_indices("test"), "test"  # GSM8K evaluates on its test split
        experts = list(cfg.experts) if cfg.experts is not None else cache.experts
        features, draw = None, 0
        if info.needs_features or info.needs_hints:
            if not experts:
                raise MuskError(f"method {cfg.method!r} needs experts, but cache {str(cache_path)!r} has none")
        else:
            experts = []
        if info.needs_features:
            feats = cache.features(cfg.pooling, experts, draw=cfg.seed)  # raises on an unknown expert
            features = CachedFeatures([torch.from_numpy(feats[n]).float() for n in experts])
            draw = cfg.seed % cache.draws(cfg.pooling, experts[0])
        router_emb = torch.from_numpy(cache.router_embedding(cfg.router)).float() if info.needs_router else None
        hints = {n: cache.hints(n) for n in experts} if info.needs_hints else {}
        prompt_tokens = np.stack([cache.column(n, "n_tokens") for n in experts]) if experts else None
        hint_tokens = None
        if info.needs_hints and all(cache.has_column(n, "hint_n_tokens") for n in experts):
            hint_tokens = np.stack([cache.column(n, "hint_n_tokens") for n in experts])
        fingerprint, prompt_set = cache.fingerprint, cache.data_fingerprint
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise MuskError(f"cache {str(cache_path)!r} needs a train and a val (or test) split")
    system = from_dict(TaskConfig, cache_cfg["task"], "cache task config").system_prompt()
    return RunData(family=cache_cfg["task"]["family"], system=system, cache_fingerprint=fingerprint, prompts=prompts,
                   train_idx=train_idx, val_idx=val_idx, val_split=val_split, experts=experts, features=features,
                   router_emb=router_emb, hints=hints, prompt_tokens=prompt_tokens, hint_tokens=hint_tokens,
                   pooling_draw=draw, prompt_set=prompt_set)

