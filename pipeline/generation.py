"""KV-cached decoding shared by the expert hints (greedy) and the policy rollouts (sampling).

The LM head is applied by hand to contiguous 2-D hidden states: transformers' `logits_to_keep`
hands `F.linear` a non-contiguous 3-D slice, which PyTorch turns into a batched matmul against a
copy of the whole [V, d] head per row (README, Design notes, gives the cost measured on Gemma-3).
"""

from __future__ import annotations

import torch


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so padding never shifts a sequence."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def lm_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """Logits in float32 for hidden states [..., d], through a 2-D matmul."""
    shape = hidden.shape
    logits = lm.get_output_embeddings()(hidden.reshape(-1, shape[-1]).contiguous()).float()
    softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.view(*shape[:-1], -1)


def decode(tok, tokens: torch.Tensor, live: torch.Tensor) -> list[str]:
    """Text of generated tokens [N, T]; tokens past each row's EOS (live == 0) are dropped."""
    return tok.batch_decode(tokens * live + tok.pad_token_id * (1 - live), skip_special_tokens=True)


def eos_ids(lm, tok) -> list[int]:
    ids = set()
    gen = getattr(lm, "generation_config", None)
    e = getattr(gen, "eos_token_id", None) if gen is not None else None
    for x in (e if isinstance(e, (list, tuple)) else [e]):
        if x is not None:
            ids.add(int(x))
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids)


def sample_rows(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs [N, V] by inverse CDF, from one uniform per row of torch's RNG.

    torch.multinomial draws V exponentials per row on a CPU (more than the rest of the sampling costs,
    README "Decoding"); this draws N uniforms. Zero-probability tokens are never drawn.
    """
    cdf = probs.double().cumsum(-1)  # [N, V]
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[-1] - 1).squeeze(1)  # [N]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Logits [N, V] with the tokens that top_k, then top_p, then min_p remove set to -inf
    (transformers' order and definitions; the most probable token always stays):
    top_k > 0 keeps the k largest logits; top_p < 1 keeps the smallest set of most probable tokens
    whose probability reaches top_p (a token stays while the mass above it is below top_p); min_p > 0
    drops tokens whose probability is below min_p x the top token's. Off at 0, 1.0, 0.0."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p = torch.softmax(sorted_logits, dim=-1)
        drop = (p.cumsum(-1) - p) >= top_p  # [N, V] sorted: the mass above the token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0.0:
        p = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(p < min_p * p.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """One sampled token per row of logits [N, V] -> [N]: softmax(logits / temperature), filtered by
    filter_logits, drawn by sample_rows from torch's global RNG. With the filters off the draw is
    exactly sample_rows(softmax(logits / temperature)) (the same tokens for the same RNG state)."""
    logits = logits / temperature
    if top_k > 0 or top_p < 1.0 or min_p > 0.0:
        logits = filter_logits(logits, top_k, top_p, min_p)
    return sample_rows(torch.softmax(logits, dim=-1))


def prefill(backbone, embeds: torch.Tensor, mask: torch.Tensor, group: int = 1):
    """Run left-padded prompts [N, P, d] with the KV cache on, each distinct prompt once.

    Rows come in runs of `group` copies of one prompt (GRPO's G rollouts): only every group-th row
    goes through the model and the cache is repeated back to N rows (differentiably, when grad is on).
    Returns (last_hidden_state [N/group, P, d], cache for N rows).
    """
    pm = mask[::group]  # [N/group, P]
    out = backbone(inputs_embeds=embeds[::group], attention_mask=pm, position_ids=positions(pm), use_cache=True)
    cache = out.past_key_values
    if group > 1:
        cache.batch_repeat_interleave(group)
    return out.last_hidden_state, cache


def generate(lm, embeds, mask, max_new_tokens: int, eos: list[int], pad_id: int,
             temperature: float = 1.0, greedy: bool = False, min_new_tokens: int = 0, group: int = 1,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Decode from prompt embeddings [N, P, d] (left padded, mask [N, P]).

    EOS is masked out of the first `min_new_tokens` steps (HF's min_new_tokens), which gives
    fixed-length completions when it equals max_new_tokens (benchmarks). group > 1: rows come in
    runs of `group` copies of one prompt (GRPO's G rollouts); the prompt is prefilled once per run
    and its KV cache repeated, instead of G times. top_k, top_p, min_p filter the sampling
    distribution (sample_tokens; off by default).

    Returns (tokens [N, T], live [N, T]): live is 1 through the first EOS (inclusive) and 0 after,
    where tokens are pad_id. Sampling draws from torch's global RNG (seeded, checkpointed).
    """
    with torch.inference_mode():  # ~5% faster decode steps than no_grad on a CPU
        tokens, live = _decode(lm, embeds, mask, max_new_tokens, eos, pad_id, temperature, greedy,
                               min_new_tokens, group, (top_k, top_p, min_p))
    return tokens.clone(), live.clone()  # normal tensors again: autograd may index with them


def _decode(lm, embeds, mask, max_new_tokens, eos, pad_id, temperature, greedy, min_new_tokens, group,
            filters=(0, 1.0, 0.0)):
    N = embeds.shape[0]
    backbone = lm.base_model
    h, past = prefill(backbone, embeds, mask, group)  # [N/group, P, d], cache of N rows
    logits = lm_logits(lm, h[:, -1]).repeat_interleave(group, 0)  # [N, V]
    pos = positions(mask)[:, -1]  # [N]
    eos_t = torch.tensor(eos, device=embeds.device)
    done = torch.zeros(N, dtype=torch.bool, device=embeds.device)
    toks, live = [], []
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits = logits.index_fill(-1, eos_t, float("-inf"))
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = sample_tokens(logits, temperature, *filters)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        live.append(~done)
        toks.append(nxt)
        done = done | torch.isin(nxt, eos_t)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(N, 1, dtype=mask.dtype, device=mask.device)], 1)
        pos = pos + 1
        out = backbone(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                       past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, lm_logits(lm, out.last_hidden_state[:, -1])
    return torch.stack(toks, 1), torch.stack(live, 1).long()
