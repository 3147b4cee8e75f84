"""The feature pass of `musk extract`: one forward of an expert's backbone per batch (no LM head)
pooled into every variant (pipeline/pooling.py). Prompts are batched by length (longest first, so an
out-of-memory shows at once), padding goes on `padding_side`, and position ids come from the attention
mask, so a prompt's vectors do not depend on its batch. The leading tokens every prompt shares run once
per expert (`SharedPrefix`) and each batch attends to their cached keys and values."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.experts import format_prompt
from pipeline.generation import positions
from pipeline.pooling import pool_hidden_states
from pipeline.tasks import Prompt


def pad_ids(batch_ids: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), T), dtype=torch.long)
    for i, x in enumerate(batch_ids):
        if side == "right":
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        else:
            ids[i, T - len(x):] = torch.tensor(x)
            mask[i, T - len(x):] = 1
    return ids, mask


def length_batches(n_tokens: np.ndarray, size: int) -> list[np.ndarray]:
    order = np.argsort(-n_tokens, kind="stable")  # longest first; ties by index: deterministic
    return [order[i: i + size] for i in range(0, len(order), size)]


@dataclass
class SharedPrefix:
    """The leading tokens every prompt shares (chat template, system prompt, task instruction), run
    once per expert: its KV cache and hidden states are reused by every batch."""

    length: int
    cache: object
    """transformers Cache of the prefix, batch 1 (copied and repeated per batch, never mutated)."""
    hidden: tuple[torch.Tensor, ...]
    """L+1 tensors [1, P, d]: the prefix's hidden states (pooling may land on a prefix token)."""


def common_prefix_length(ids: list[list[int]]) -> int:
    """Longest run of leading tokens all prompts share, leaving each prompt >= 1 token of its own
    (the last token, which most variants read, is then always computed in the batch)."""
    limit = min(len(x) for x in ids) - 1
    p = 0
    while p < limit and all(x[p] == ids[0][p] for x in ids):
        p += 1
    return p


@torch.inference_mode()
def run_prefix(backbone, prefix_ids: list[int], device) -> SharedPrefix:
    ids = torch.tensor([prefix_ids], device=device)  # [1, P]
    out = backbone(input_ids=ids, output_hidden_states=True, use_cache=True)
    return SharedPrefix(len(prefix_ids), out.cache, tuple(out.hidden_states))


@torch.inference_mode()
def expert_forward_pool(backbone, ids: torch.Tensor, mask: torch.Tensor, rti: torch.Tensor, *, rli: torch.Tensor,
                        prefix: SharedPrefix | None = None):
    """One forward of the backbone (model.base_model: no LM head) -> pooled variants, each [B, d] float32.

    With a shared prefix, ids/mask [B, T] hold only each prompt's tokens after it, padded on the
    right: the batch attends to the prefix's cached keys and values, so the result equals the full
    forward up to rounding. (Padding between prefix and prompt would stretch the distances that
    sliding-window layers measure in key slots, not in real tokens.)
    """
    if prefix is None:
        pos = positions(mask)  # [B, T] positions count real tokens only
        out = backbone(
            input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False
        )
        return pool_hidden_states(out.hidden_states, mask, rti, rli)
    B, P = ids.shape[0], prefix.length
    if not bool(mask[:, 0].all()):
        raise ValueError("a batch after a shared prefix must be padded on the right")
    full = torch.cat([torch.ones(B, P, dtype=mask.dtype, device=mask.device), mask], 1)  # [B, P+T]
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(B)
    out = backbone(input_ids=ids, attention_mask=full, position_ids=positions(full)[:, P:],
                   cache=cache, output_hidden_states=True, use_cache=True)
    # Join prefix and batch states only for the layers some variant reads ([B, P+T, d] each).
    L = len(out.hidden_states) - 1
    read = {0, 1, L, *rli.flatten().tolist()}
    hs = tuple(torch.cat([ph.expand(B, -1, -1), h], 1) if l in read else None
               for l, (ph, h) in enumerate(zip(prefix.hidden, out.hidden_states)))
    return pool_hidden_states(hs, full, rti, rli)


def feature_batches(backbone, ids: list[list[int]], pad_id: int, rti: np.ndarray, rli: np.ndarray, *,
                    batch_size: int, padding_side: str = "right", share_prefix: bool = True, device="cpu",
                    done=lambda b: False):
    """The feature pass over tokenized prompts: yields (batch index, rows, pooled variants), pooled
    None for the batches `done` says are stored already (a resumed run computes nothing for them)."""
    n_tokens = np.array([len(x) for x in ids], dtype=np.int64)
    P = common_prefix_length(ids) if share_prefix else 0
    prefix = None
    for b, rows in enumerate(length_batches(n_tokens, batch_size)):
        if done(b):
            yield b, rows, None
            continue
        if prefix is None and P > 0:
            prefix = run_prefix(backbone, ids[0][:P], device)
        side = "right" if P > 0 else padding_side  # see expert_forward_pool
        bid, mask = pad_ids([ids[i][P:] for i in rows], pad_id, side)
        yield b, rows, expert_forward_pool(backbone, bid.to(device), mask.to(device),
                                           torch.from_numpy(rti[rows]).to(device), rli=torch.from_numpy(rli[rows]),
                                           prefix=prefix)  # rti, rli: [N, D] (D seeded draws)


def tokenize_prompts(tok, prompts: list[Prompt]) -> tuple[list[list[int]], str]:
    ids, fmt = [], None
    for p in prompts:
        text, fmt, add_special = format_prompt(tok, p.text)
        ids.append(tok(text, add_special_tokens=add_special)["input_ids"])
    return ids, fmt
