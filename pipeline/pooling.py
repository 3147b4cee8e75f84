"""Pooling of expert hidden states: every variant of the cache from one forward pass.

`hidden_states[k]` follows transformers' `output_hidden_states` indexing: 0 is the embedding
output, L the final layer after the final norm. "Real" tokens are the ones the attention mask keeps,
so a prompt's vectors do not depend on its batch or on the padding side.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from cache.schema import POOLED as VARIANTS  # noqa: F401  (the cache schema owns the variant names)


def seeded_indices(seed: int, expert: str, n_tokens: np.ndarray, num_layers: int,
                   draw: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt random token index in [0, n_tokens) and random layer in [0, num_layers] (inclusive).

    Drawn for the whole cache at once from (seed, expert name, draw): a prompt's index depends on
    neither its batch nor the order of extraction, so resumed and uninterrupted runs agree. Draw 0 is
    the one schema-1 caches hold; the cache stores several draws and a training seed picks one.
    """
    name = f"{seed}:{expert}" if draw == 0 else f"{seed}:{expert}:{draw}"
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(key)
    u = rng.random(len(n_tokens))
    token_index = np.minimum((u * n_tokens).astype(np.int64), np.maximum(n_tokens - 1, 0))
    layer_index = rng.integers(0, num_layers + 1, size=len(n_tokens), dtype=np.int64)
    return token_index, layer_index


def real_token_span(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) position of the real tokens of each row; works for left and right padding."""
    mask = attention_mask.bool()  # [B, T]
    T = mask.shape[1]
    first = mask.int().argmax(dim=1)  # first True
    last = T - 1 - mask.flip(1).int().argmax(dim=1)  # last True
    return first, last


def pool_hidden_states(
    hidden_states: tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor,
    random_token_index: torch.Tensor,
    random_layer_index: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """All pooling variants, each [B, d] float32 ([B, D, d] for the random ones when the indices are
    [B, D]: D seeded draws per prompt).

    hidden_states: L+1 tensors [B, T, d] (None for a layer no variant of this batch reads);
    random_token_index counts real tokens from the first one. first_layer is hidden_states[0] (the
    embedding output, the paper's h^(0)) and first_block hidden_states[1] (the first block's output),
    both at the last real token.
    """
    L = len(hidden_states) - 1
    first, last = real_token_span(attention_mask)  # [B], [B]
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
    top = hidden_states[L]  # [B, T, d]
    rti = random_token_index.to(first.device)
    rti2 = rti if rti.dim() == 2 else rti[:, None]  # [B, D]
    rli2 = random_layer_index if random_layer_index.dim() == 2 else random_layer_index[:, None]  # [B, D]
    rand_tok = top[rows[:, None], first[:, None] + rti2]  # [B, D, d]
    # One layer per (row, draw): gather one by one rather than stacking all L+1 layers ([L+1, B, T, d]).
    rand_layer = torch.stack([torch.stack([hidden_states[int(l)][b, last[b]] for l in ls])
                              for b, ls in enumerate(rli2.tolist())])  # [B, D, d]
    out = {
        "last_token": top[rows, last],
        "first_token": top[rows, first],
        "random_token": rand_tok if rti.dim() == 2 else rand_tok[:, 0],
        "first_layer": hidden_states[0][rows, last],
        "first_block": hidden_states[min(1, L)][rows, last],
        "random_layer": rand_layer if random_layer_index.dim() == 2 else rand_layer[:, 0],
    }
    return {k: v.float() for k, v in out.items()}


def mean_pool_normalized(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' pooling for all-MiniLM-L6-v2: masked mean, then L2 normalisation."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)  # [B, T, 1]
    summed = (last_hidden * m).sum(1)
    mean = summed / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(mean.float(), dim=-1)
