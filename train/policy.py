"""The policy: a causal LM with LoRA, conditioned on context tokens spliced into its input
embeddings (Eq. 3), with a KV-cached sampler and completion log-probs that skip the LM head on
prompt positions.

Sequence layout of a batch (left padding, so every prompt ends at the same column):
  suffix: [pad.. | prompt x | C (m) | completion y]      ([x || C], Eq. 3)
  prefix: [C (m) | pad.. | prompt x | completion y]      (pads are masked; positions skip them)
Position ids are the running count of real tokens, so padding never shifts a sequence.
"""

from __future__ import annotations

import torch

from pipeline.config import MuskError
from pipeline.experts import ExpertSpec, EXPERTS, PLAIN_FORMAT, load_expert


def policy_spec(name: str) -> ExpertSpec:
    if name in EXPERTS:
        return EXPERTS[name]
    return ExpertSpec(name="policy", kind="hf", model=name)


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


def build_prompt_text(tok, system: str, question: str, hints: list[tuple[str, str]] | None = None) -> str:
    """The policy's prompt: developer prompt as system turn, question (+ [Expert Hints]) as user."""
    user = question
    if hints:
        block = "\n".join(f"- {name}: {text.strip()}" for name, text in hints)
        user = f"{question}\n\n[Expert Hints]\n{block}"
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return system + "\n\n" + PLAIN_FORMAT.format(question=user)


def encode_prompts(tok, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    add_special = not getattr(tok, "chat_template", None)
    enc = tok(texts, padding=True, add_special_tokens=add_special, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def splice(embeds: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None, position: str):
    """Insert C [N, m, d] into left-padded prompt embeddings [N, P, d] -> ([N, P+m, d], [N, P+m])."""
    if context is None:
        return embeds, mask
    context = context.to(embeds.dtype)
    ones = torch.ones(context.shape[:2], dtype=mask.dtype, device=mask.device)
    if position == "suffix":
        return torch.cat([embeds, context], 1), torch.cat([mask, ones], 1)
    return torch.cat([context, embeds], 1), torch.cat([ones, mask], 1)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def eos_ids(model, tok) -> list[int]:
    ids = set()
    gen = getattr(model, "generation_config", None)
    e = getattr(gen, "eos_token_id", None) if gen is not None else None
    for x in (e if isinstance(e, (list, tuple)) else [e]):
        if x is not None:
            ids.add(int(x))
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids)


@torch.no_grad()
def generate(lm, embeds, mask, max_new_tokens: int, eos: list[int], pad_id: int,
             temperature: float = 1.0, greedy: bool = False):
    """KV-cached sampling from prompt embeddings. Returns (tokens [N, T], mask [N, T]).

    The mask is 1 through the first EOS (inclusive) and 0 after; later tokens are pad_id.
    """
    N = embeds.shape[0]
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), use_cache=True,
             logits_to_keep=1)
    past, logits = out.past_key_values, out.logits[:, -1].float()  # [N, V]
    pos = positions(mask)[:, -1]  # [N]
    eos_t = torch.tensor(eos, device=embeds.device)
    done = torch.zeros(N, dtype=torch.bool, device=embeds.device)
    toks, live = [], []
    for t in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        live.append(~done)
        toks.append(nxt)
        done = done | torch.isin(nxt, eos_t)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(N, 1, dtype=mask.dtype, device=mask.device)], 1)
        pos = pos + 1
        out = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                 past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
    return torch.stack(toks, 1), torch.stack(live, 1).long()


def completion_logprobs(lm, embeds, mask, comp_ids, comp_mask) -> torch.Tensor:
    """log pi(y_t | prefix) for each completion token: [N, T]. The LM head runs on completion
    positions only (the prompt's logits over the vocabulary are never formed)."""
    tok_emb = lm.get_input_embeddings()(comp_ids)  # [N, T, d] (Gemma: scaled inside)
    full = torch.cat([embeds, tok_emb.to(embeds.dtype)], 1)  # [N, P+T, d]
    fmask = torch.cat([mask, comp_mask.to(mask.dtype)], 1)
    h = lm.base_model(inputs_embeds=full, attention_mask=fmask, position_ids=positions(fmask),
                      use_cache=False).last_hidden_state  # [N, P+T, d]
    P, T = embeds.shape[1], comp_ids.shape[1]
    logits = lm.get_output_embeddings()(h[:, P - 1: P - 1 + T]).float()  # [N, T, V]
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, -1).gather(-1, comp_ids[..., None]).squeeze(-1)
