"""KV-cached decoding shared by the expert hints (greedy) and the policy rollouts (sampling).

The LM head is applied by hand to contiguous 2-D hidden states: transformers' `logits_to_keep`
hands `F.linear` a non-contiguous 3-D slice, which PyTorch turns into a batched matmul against a
copy of the whole [V, d] head per row (README, Design notes, gives the cost measured on Gemma-3).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so padding never shifts a sequence."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def set_head_fp32(lm, on: bool) -> None:
    """Make lm_logits compute `lm`'s head in float32 (on) or in the weight's dtype (off): the flag
    lives on the output embedding module, so every wrapper (PEFT, the fused step) sees it."""
    head = lm.get_output_embeddings()
    head.musk_fp32 = bool(on)
    head.musk_fp32_weight = None
    if on:
        _fp32_weight(head)  # made now, outside any CUDA graph capture


def _fp32_weight(head) -> torch.Tensor:
    """A float32 copy of head.weight [V, d] (V x d x 4 bytes, e.g. 1.2 GB for Qwen2.5-3B's tied
    head), remade when the weight changes place or version; detached (musk never trains the head)."""
    w, c = head.weight, getattr(head, "musk_fp32_weight", None)
    key = (w.device, w.data_ptr(), w._version)
    if c is None or head.musk_fp32_key != key:
        c = head.musk_fp32_weight = w.detach().float()
        head.musk_fp32_key = key
    return c


def lm_logits(lm, hidden: torch.Tensor, head=None) -> torch.Tensor:
    """Logits in float32 for hidden states [..., d], through a 2-D matmul: lm's output embedding, or
    `head` (the fused step's copy of it, decode_step.Fused) when given. Under set_head_fp32(lm, True)
    the product itself is float32 (hidden states and weight cast up): no bf16 rounding of the logits."""
    shape = hidden.shape
    flat = hidden.reshape(-1, shape[-1]).contiguous()
    out = lm.get_output_embeddings()
    if getattr(out, "musk_fp32", False):
        b = out.bias.float() if getattr(out, "bias", None) is not None else None
        logits = torch.nn.functional.linear(flat.float(), _fp32_weight(out), b)
    else:
        logits = (out(flat) if head is None else head(flat)).float()
    softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.view(*shape[:-1], -1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v of softmax(logits) over the last axis, in nats: [...] from [..., V]."""
    lz = torch.log_softmax(logits, -1)
    return -(lz.exp() * lz).sum(-1)


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


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0) -> torch.Tensor:
    """The logits [N, V] of the distribution a token is drawn from: logits / temperature, filtered by
    filter_logits when a filter is on (softmax of them is that distribution, log_softmax its log-probs)."""
    logits = logits / temperature
    if top_k > 0 or top_p < 1.0 or min_p > 0.0:
        logits = filter_logits(logits, top_k, top_p, min_p)
    return logits


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """One sampled token per row of logits [N, V] -> [N], drawn by sample_rows from torch's global RNG
    out of sampling_logits' distribution. With the filters off the draw is exactly
    sample_rows(softmax(logits / temperature)) (the same tokens for the same RNG state)."""
    return sample_rows(torch.softmax(sampling_logits(logits, temperature, top_k, top_p, min_p), dim=-1))


def prefill(backbone, embeds: torch.Tensor, mask: torch.Tensor, group: int = 1):
    """Run left-padded prompts [N, P, d] with the KV cache on, each distinct prompt once.

    Rows come in runs of `group` copies of one prompt (GRPO's G rollouts): only every group-th row
    goes through the model and the cache is repeated back to N rows (differentiably, when grad is on).
    Returns (last_hidden_state [N/group, P, d], cache for N rows).
    """
    pm = mask[::group]  # [N/group, P]
    out = backbone(inputs_embeds=embeds[::group], attention_mask=pm, position_ids=positions(pm), use_cache=True)
    cache = out.cache
    if group > 1:
        cache.batch_repeat_interleave(group)
    return out.last_hidden_state, cache


class Decoded(NamedTuple):
    tokens: torch.Tensor  # [N, T] generated ids, pad_id after each row's EOS
    live: torch.Tensor  # [N, T] 1 through the first EOS (inclusive), 0 after
    logprobs: torch.Tensor | None  # [N, T] float32 log-prob of each token under softmax(logits / T) over the
    #                                whole vocabulary (before top_k/top_p/min_p and min_new_tokens' EOS
    #                                suppression: the support of the training forward's log-probs); 0 where not live
    entropy: torch.Tensor | None = None  # [N, T] float32 nats: H of softmax(logits / entropy_temperature) at
    #                                      each generated position (raw logits: no filter, no EOS mask); 0 where not live


STEPS = ("auto", "fused", "loop")
_said: set = set()


def fused_step_weights(lm, max_pos: int, step: str):
    """The fused step's weights for lm, or None (today's loop) where the family or a module is not
    covered: said once per model type in the log. step 'loop' (or 'auto' under MUSK_DECODE_STEP=loop)
    returns None.

    float32: the fused step gives the loop's tokens (tested). bf16: both round, in different places
    (the fused step's attention runs in float32), so greedy tokens may part ways; along a float32
    model's tokens the fused step is as close to float32 as the loop is (tested; on a trained probe
    policy the next-token KL from float32 was 1.80e-3 fused, 1.83e-3 loop), and on 512 prompts its
    greedy accuracy was the loop's within the paired interval (docs/performance.md)."""
    if step == "loop" or (step == "auto" and os.environ.get("MUSK_DECODE_STEP") == "loop"):
        return None
    from pipeline import decode_step

    try:
        return decode_step.fused_weights(lm, max_pos)
    except decode_step.Unsupported as e:
        if step == "fused":
            raise
        key = (getattr(lm.config, "model_type", "?"), str(e))
        if key not in _said:
            _said.add(key)
            log.info("decoding %s through the transformers loop: the fused step does not cover it (%s)", *key)
        return None


def generate(lm, embeds, mask, max_new_tokens: int, *, eos: list[int], pad_id: int,
             temperature: float = 1.0, greedy: bool = False, min_new_tokens: int = 0, group: int = 1,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Decode from prompt embeddings [N, P, d] (left padded, mask [N, P]).

    EOS is masked out of the first `min_new_tokens` steps (HF's min_new_tokens), which gives
    fixed-length completions when it equals max_new_tokens (benchmarks). group > 1: rows come in
    runs of `group` copies of one prompt (GRPO's G rollouts); the prompt is prefilled once per run
    and its KV cache repeated, instead of G times. top_k, top_p, min_p filter the sampling
    distribution (filter_logits; off by default).

    Llama, Qwen2, Mistral and Gemma-3 decode through the fused step (pipeline/decode_step.py), other
    families through transformers' modules; MUSK_DECODE_STEP=loop forces the latter (`sample` takes
    the choice as an argument).

    Returns (tokens [N, T], live [N, T]): live is 1 through the first EOS (inclusive) and 0 after,
    where tokens are pad_id. Sampling draws from torch's global RNG (seeded, checkpointed).
    """
    out = sample(lm, embeds, mask, max_new_tokens, eos=eos, pad_id=pad_id, temperature=temperature, greedy=greedy,
                 min_new_tokens=min_new_tokens, group=group,
                 filters=(top_k, top_p, min_p))
    return out.tokens, out.live


def sample(lm, embeds, mask, max_new_tokens: int, *, eos: list[int], pad_id: int, temperature: float = 1.0,
           greedy: bool = False, min_new_tokens: int = 0, group: int = 1, logprobs: bool = False,
           step: str = "auto", check_every: int | None = None, static: bool | None = None,
           filters: tuple[int, float, float] = (0, 1.0, 0.0), entropy_temperature: float | None = None) -> Decoded:
    """`generate` with the sampler's own log-probs (logprobs=True) and the decoder chosen: step
    'auto' (fused where covered), 'fused' (raises decode_step.Unsupported where not), 'loop'.
    check_every: tokens between all-done checks (a host sync); default 1 on a CPU, 8 on a GPU.
    Tokens and live are the same whatever check_every is (trailing all-pad columns are cut); on a GPU
    the RNG may advance by a few more draws after the last row stops. static: the fixed-shape step
    (default on CUDA, where it is captured as a CUDA graph; on a CPU it runs eagerly, for tests).
    filters: (top_k, top_p, min_p) of the sampling distribution. The log-probs are the policy's,
    log softmax(logits / T) over the whole vocabulary, not renormalised over the tokens the filters
    (and min_new_tokens' EOS suppression) keep: the quantity the training forward computes, so the
    sampler/trainer gap compares one support (over the kept set every token would read higher by
    minus the log of the kept mass). entropy_temperature: also return the policy's
    token entropy at that temperature from the decoder's own logits (what `completion_logprobs`'
    `entropy` gives from a second forward pass, equal up to the decoders' rounding)."""
    if step not in STEPS:
        raise ValueError(f"unknown decode step {step!r}; choices: {list(STEPS)}")
    if check_every is None:
        check_every = 8 if embeds.device.type == "cuda" else 1
    with torch.inference_mode():  # faster decode steps than no_grad on a CPU (docs/performance.md)
        W = fused_step_weights(lm, mask.shape[1] + max_new_tokens + 1, step)
        kw = dict(max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id, temperature=temperature, greedy=greedy,
                  min_new_tokens=min_new_tokens, group=group, logprobs=(logprobs, filters, entropy_temperature))
        out = _decode(lm, embeds, mask, **kw) if W is None else \
            _decode_fused(W, lm, embeds, mask, **kw, check_every=check_every, static=static)
    # normal tensors again: autograd may index with them
    return Decoded(*(None if x is None else x.clone() for x in out))


class _Picker:
    """Choose each row's next token from logits [N, V] as the old loop did (EOS suppressed for the
    first min_new_tokens, greedy argmax or one inverse-CDF draw per row, pad after EOS)."""

    def __init__(self, N, eos, pad_id, temperature, *, greedy, min_new_tokens, want, device):
        logprobs, self.filters, self.ent_t = want  # (bool, (top_k, top_p, min_p), entropy temperature or None)
        self.eos_t = torch.tensor(eos, device=device, dtype=torch.long)
        self.done = torch.zeros(N, dtype=torch.bool, device=device)
        self.pad, self.greedy, self.min_new, self.want = pad_id, greedy, min_new_tokens, logprobs
        self.temp = 1.0 if greedy else temperature
        self.toks, self.live, self.lps, self.ents = [], [], [], []

    def __call__(self, t: int, logits: torch.Tensor) -> torch.Tensor:
        if self.ent_t is not None:  # of softmax(logits / T_H), as token_logprobs computes it
            self.ents.append(token_entropy(logits / self.ent_t).masked_fill(self.done, 0.0))  # [N]
        raw = logits  # [N, V] before the EOS suppression and the filters: the log-probs' support
        if t < self.min_new:
            logits = logits.index_fill(-1, self.eos_t, float("-inf"))
        filtered = any(f != off for f, off in zip(self.filters, (0, 1.0, 0.0)))
        scaled = logits / self.temp if self.greedy else sampling_logits(logits, self.temp, *self.filters)
        if self.greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = sample_rows(torch.softmax(scaled, dim=-1))
        if self.want:  # over the whole vocabulary, as the training forward computes it (no renormalising)
            full = scaled if not filtered and t >= self.min_new else raw / self.temp  # [N, V]
            lp = torch.log_softmax(full, -1).gather(1, nxt[:, None])[:, 0]
            self.lps.append(lp.masked_fill(self.done, 0.0))
        nxt = torch.where(self.done, torch.full_like(nxt, self.pad), nxt)
        self.live.append(~self.done)
        self.toks.append(nxt)
        self.done = self.done | torch.isin(nxt, self.eos_t)
        return nxt

    def result(self) -> Decoded:
        tokens, live = torch.stack(self.toks, 1), torch.stack(self.live, 1).long()
        lp = torch.stack(self.lps, 1) if self.want else None
        ent = torch.stack(self.ents, 1) if self.ent_t is not None else None
        n = int(live.any(0).sum())  # columns past the last live one (checks every k tokens) are cut
        return Decoded(tokens[:, :n], live[:, :n], lp[:, :n] if lp is not None else None,
                       ent[:, :n] if ent is not None else None)


def _decode(lm, embeds, mask, *, max_new_tokens, eos, pad_id, temperature, greedy, min_new_tokens, group, logprobs):
    """Today's loop: transformers' modules with their dynamic cache, one forward per token."""
    N = embeds.shape[0]
    backbone = lm.base_model
    h, cache = prefill(backbone, embeds, mask, group)  # [N/group, P, d], cache of N rows
    logits = lm_logits(lm, h[:, -1]).repeat_interleave(group, 0)  # [N, V]
    pos = positions(mask)[:, -1]  # [N]
    pick = _Picker(N, eos, pad_id, temperature, greedy=greedy, min_new_tokens=min_new_tokens, want=logprobs,
                   device=embeds.device)
    for t in range(max_new_tokens):
        nxt = pick(t, logits)
        if bool(pick.done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(N, 1, dtype=mask.dtype, device=mask.device)], 1)
        pos = pos + 1
        out = backbone(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                       cache=cache, use_cache=True)
        cache, logits = out.cache, lm_logits(lm, out.last_hidden_state[:, -1])
    return pick.result()


def _decode_fused(W, lm, embeds, mask, *, max_new_tokens, eos, pad_id, temperature, greedy, min_new_tokens, group,
                  logprobs, check_every: int = 1, static: bool | None = None):
    """The fused step (pipeline/decode_step.py): static cache, prefill once per group, one step a token.
    On CUDA the step is captured as a CUDA graph after its first run and replayed; the all-done check
    (a host sync) runs every `check_every` tokens."""
    from pipeline import decode_step as ds

    N, P, _ = embeds.shape
    S, dev = P + max_new_tokens, embeds.device
    cache = ds.KVCache(W, N, S, ds.cache_dtype(W.embed.dtype, dev), dev)
    valid = torch.cat([mask.bool(), torch.ones(N, max_new_tokens, dtype=torch.bool, device=dev)], 1)  # [N, S]
    pos = positions(mask)  # [N, P]
    cols = torch.arange(P, device=dev)
    pv = valid[::group]
    h = ds.forward(W, cache, embeds[::group].to(W.embed.dtype), pos[::group], col0=0, masks=ds.attn_masks(W, pv, cols,
                                                                                                          P), L=P,
                   group=group)  # [N/group, P, d]
    logits = lm_logits(lm, h[:, -1], W.head).repeat_interleave(group, 0)  # [N, V]
    last = pos[:, -1]  # [N]
    pick = _Picker(N, eos, pad_id, temperature, greedy=greedy, min_new_tokens=min_new_tokens, want=logprobs, device=dev)
    static = dev.type == "cuda" if static is None else static
    step, gen_cols = None, torch.arange(P, S, device=dev)  # [T] the columns tokens land in, on the device
    for t in range(max_new_tokens):
        nxt = pick(t, logits)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(pick.done.all())):
            break
        p = last + (t + 1)  # [N]
        if static:  # fixed shapes, column as a tensor: on CUDA one graph replay a token
            col = gen_cols[t]  # a view: no host-to-device copy
            if step is None:
                fn = functools.partial(_static_step, W, lm, cache, valid, S=S)
                step = ds.GraphedStep(fn, nxt, col, p) if dev.type == "cuda" else fn
            logits = step(nxt, col, p)
        else:
            c = P + t
            x = ds.embed(W, nxt[:, None])  # [N, 1, d]
            masks = ds.attn_masks(W, valid, torch.tensor([c], device=dev), c + 1)
            logits = lm_logits(lm, ds.forward(W, cache, x, p[:, None], col0=c, masks=masks, L=c + 1)[:, 0], W.head)
    return pick.result()


def _static_step(W, lm, cache, valid, nxt, col, p, *, S: int):
    """One token through the fused step with fixed shapes (all S cache columns under a mask, the
    column a 0-d tensor): no host sync, capturable as a CUDA graph. Returns logits [N, V]."""
    from pipeline import decode_step as ds

    masks = ds.attn_masks(W, valid, col.view(1), S)
    return lm_logits(lm, ds.forward(W, cache, ds.embed(W, nxt[:, None]), p[:, None], col0=col, masks=masks, L=S)[:, 0],
                     W.head)
