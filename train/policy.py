"""The policy: a causal LM with LoRA, conditioned on context tokens spliced into its input
embeddings (Eq. 3), with a sampler (pipeline/generation.py) and completion log-probs that skip the LM head on
prompt positions.

Sequence layout of a batch (left padding, so every prompt ends at the same column):
  suffix:         [pad.. | prompt x | C (m) | completion y]          ([x || C], Eq. 3)
  prefix:         [C (m) | pad.. | prompt x | completion y]          (pads are masked; positions skip them)
  after-question: [pad.. | system, question | C | end of turn, "assistant:" | completion y]
Position ids are the running count of real tokens, so padding never shifts a sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch

from core.errors import MuskError
from pipeline.experts import ExpertSpec, EXPERTS, PLAIN_FORMAT, load_expert
from pipeline.generation import lm_logits, positions, prefill


def policy_spec(name: str) -> ExpertSpec:
    if name in EXPERTS:
        return EXPERTS[name]
    return ExpertSpec(name="policy", kind="hf", model=name)


def lora_merges(peft_model):
    """(Hugging Face name, base linear, W + delta) for every LoRA-wrapped linear, W + delta computed
    out of place in fp32 and cast back to W's dtype (the trained weights are never merged in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            with torch.no_grad():  # closed before the yield: the caller's grad mode is its own
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                merged = (base.weight.float() + delta.float()).to(base.weight.dtype)
            yield name, base, merged


def merged_lora_weights(peft_model) -> list[tuple[str, torch.Tensor]]:
    """(Hugging Face weight name, W + delta) pairs: what vLLM's load_weights takes after each step."""
    return [(f"{name}.weight", merged) for name, _, merged in lora_merges(peft_model)]


@contextmanager
def merged_lora(peft_model, enabled: bool = True):
    """Inside: every LoRA linear computes x (W + s B A) with its LoRA branch off, instead of
    x W + s (x A) B (one matmul where there were three, plus a scale and an add: on a CPU those small
    ops are a third of a decode step's). Out of place: each base weight is swapped for its merged copy
    and the original tensor put back on exit, so W itself is never rounded. No gradients inside."""
    if not enabled:
        yield
        return
    swapped = []  # [(base linear, its original weight)]
    try:
        for _, base, merged in lora_merges(peft_model):
            swapped.append((base, base.weight))
            base.weight = torch.nn.Parameter(merged, requires_grad=False)
        with peft_model.disable_adapter():
            yield
    finally:
        for base, w in swapped:
            base.weight = w


def load_policy(cfg, dtype: torch.dtype, device: str):
    """(peft model, tokenizer, context scale). Base weights frozen; LoRA in fp32."""
    from peft import LoraConfig, get_peft_model

    model, tok = load_expert(policy_spec(cfg.policy), dtype, device)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.lora_target_modules if t not in names]
    if missing:
        raise MuskError(f"policy {cfg.policy!r} has no modules named {missing} for LoRA")
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, lcfg, autocast_adapter_dtype=True)
    # Gemma-style models scale token embeddings by sqrt(d) inside the embedding module; C is
    # produced in unit scale and multiplied by the same factor so it lives where tokens live.
    scale = float(getattr(model.get_input_embeddings(), "embed_scale", 1.0))
    tok.padding_side = "left"
    return peft_model, tok, scale


CONTEXT_POSITIONS = ("suffix", "prefix", "after-question")
_SENTINEL = "\x00musk-question\x00"


def build_prompt_parts(tok, system: str, question: str, hints: list[tuple[str, str]] | None = None) -> tuple[str, str]:
    """The policy's prompt as (head, tail): head runs through the end of the user's content (the
    question and any [Expert Hints] block), tail is what the format adds after it (the chat
    template's end of turn and generation prompt, or the plain format's "Answer:")."""
    user = question
    if hints:
        block = "\n".join(f"- {name}: {text.strip()}" for name, text in hints)
        user = f"{question}\n\n[Expert Hints]\n{block}"
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": _SENTINEL}]
        full = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        full = system + "\n\n" + PLAIN_FORMAT.format(question=_SENTINEL)
    before, after = full.split(_SENTINEL)
    return before + user, after


def build_prompt_text(tok, system: str, question: str, hints: list[tuple[str, str]] | None = None) -> str:
    """The policy's prompt: developer prompt as system turn, question (+ [Expert Hints]) as user."""
    return "".join(build_prompt_parts(tok, system, question, hints))


class PromptBatch(NamedTuple):
    ids: torch.Tensor  # [N, P] left padded
    mask: torch.Tensor  # [N, P]
    tail: int  # tokens after the user's content, the same in every row (C goes before them: after-question)


def encode_prompts(tok, parts: list[tuple[str, str]], device) -> PromptBatch:
    """Tokenize (head, tail) prompts, head and tail separately, so the boundary where C may go is a
    token boundary in every row; left padding puts it in one column for the whole batch."""
    tails = {t for _, t in parts}
    if len(tails) != 1:
        raise ValueError("prompts of one batch must share their tail (the format after the question)")
    add_special = not getattr(tok, "chat_template", None)
    enc = tok([h for h, _ in parts], padding=True, add_special_tokens=add_special, return_tensors="pt")
    tail_ids = tok(tails.pop(), add_special_tokens=False, return_tensors="pt")["input_ids"]  # [1, Pt]
    n = enc["input_ids"].shape[0]
    ids = torch.cat([enc["input_ids"], tail_ids.expand(n, -1)], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones(n, tail_ids.shape[1], dtype=enc["attention_mask"].dtype)], 1)
    return PromptBatch(ids.to(device), mask.to(device), int(tail_ids.shape[1]))


def splice(embeds: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None, position: str, tail: int = 0):
    """Insert C [N, m, d] into left-padded prompt embeddings [N, P, d] -> ([N, P+m, d], [N, P+m]).

    suffix: after the whole prompt ([x || C], Eq. 3, right before the answer); prefix: before it
    (and before the padding); after-question: after the user's content, before the last `tail`
    tokens (the end of turn and generation prompt), where an LM reads a hint.
    """
    if context is None:
        return embeds, mask
    at = {"suffix": embeds.shape[1], "prefix": 0, "after-question": embeds.shape[1] - tail}[position]
    context = context.to(embeds.dtype)
    ones = torch.ones(context.shape[:2], dtype=mask.dtype, device=mask.device)
    return (torch.cat([embeds[:, :at], context, embeds[:, at:]], 1),
            torch.cat([mask[:, :at], ones, mask[:, at:]], 1))


def completion_logprobs(lm, embeds, mask, comp_ids, comp_mask, group: int = 1, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | prefix) for each completion token: [N, T]. The LM head runs on completion
    positions only (the prompt's logits over the vocabulary are never formed).

    group > 1: rows come in runs of `group` rollouts of one prompt (identical embeds and mask). The
    prompt then runs once per run, with gradients, and the run's completions attend to its keys and
    values repeated `group` times (the repeat is differentiable): the same log-probs and gradients
    up to rounding, with G-1 of every G prompt forwards saved. Needs the KV cache, so not under
    gradient checkpointing (which turns the cache off in training).

    temperature: the rollouts' sampling temperature; the log-probs are those of softmax(logits / T),
    the distribution the tokens were drawn from (as TRL does), so the ratio and KL compare like with like.
    """
    h = _completion_hidden(lm, embeds, mask, comp_ids, comp_mask, group)
    return token_logprobs(lm, h, comp_ids, temperature=temperature)


def _completion_hidden(lm, embeds, mask, comp_ids, comp_mask, group: int) -> torch.Tensor:
    """Final hidden states [N, T, d] at the positions that predict each completion token."""
    P, T = embeds.shape[1], comp_ids.shape[1]
    if group == 1 or T == 1:
        tok_emb = lm.get_input_embeddings()(comp_ids)  # [N, T, d] (Gemma: scaled inside)
        full = torch.cat([embeds, tok_emb.to(embeds.dtype)], 1)  # [N, P+T, d]
        fmask = torch.cat([mask, comp_mask.to(mask.dtype)], 1)
        h = lm.base_model(inputs_embeds=full, attention_mask=fmask, position_ids=positions(fmask),
                          use_cache=False).last_hidden_state  # [N, P+T, d]
        h = h[:, P - 1: P - 1 + T]  # [N, T, d]: position P-1+t predicts completion token t
    else:
        hp, cache = prefill(lm.base_model, embeds, mask, group)  # [N/G, P, d], cache of N rows
        fmask = torch.cat([mask, comp_mask[:, :-1].to(mask.dtype)], 1)  # [N, P+T-1]
        tok_emb = lm.get_input_embeddings()(comp_ids[:, :-1]).to(embeds.dtype)  # [N, T-1, d]
        hc = lm.base_model(inputs_embeds=tok_emb, attention_mask=fmask, position_ids=positions(fmask)[:, P:],
                           cache=cache, use_cache=True).last_hidden_state  # [N, T-1, d]
        h = torch.cat([hp[:, -1:].repeat_interleave(group, 0), hc], 1)  # [N, T, d]
    return h


def token_logprobs(lm, h: torch.Tensor, ids: torch.Tensor, rows: int = 64, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(head(h) / temperature)[ids] in float32: [N, T] from h [N, T, d], ids [N, T].

    `rows` positions at a time: the [rows, V] float32 logits stay in cache and no [N, T, V] tensor
    is ever formed (1.7x faster forward and backward than one log_softmax over 384 x 49k on a CPU;
    less peak memory on a GPU). cross_entropy is log_softmax + gather in one kernel.
    """
    flat_h, flat_ids = h.reshape(-1, h.shape[-1]), ids.reshape(-1)
    out = [-torch.nn.functional.cross_entropy(lm_logits(lm, flat_h[s:s + rows]) / temperature, flat_ids[s:s + rows],
                                              reduction="none")
           for s in range(0, flat_ids.numel(), rows)]
    return torch.cat(out).view(ids.shape)
