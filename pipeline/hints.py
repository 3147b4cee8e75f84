"""The experts' text hints (output-level collaboration, Eq. 12): a greedy decode of each prompt,
stored batch by batch in the parts folder, by musk's KV-cached decoder or by vLLM (same token ids in,
same budget and EOS), so a run killed half way can be completed by either engine."""

from __future__ import annotations

import numpy as np
import torch

from core import dist
from pipeline.experts import KINDS
from pipeline.feature_pass import length_batches, pad_ids
from pipeline.generation import decode, eos_ids, generate
from pipeline.vllm_engine import greedy_texts, make_llm, release


def greedy_hints(model, tok, batch_ids: list[list[int]], max_new_tokens: int, *, eos: list[int], device,
                 min_new_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of hints: (tokens [b, T], live [b, T]) greedy from the prompts, left padded."""
    bid, mask = pad_ids(batch_ids, tok.pad_token_id, "left")  # generation: left
    with torch.inference_mode():
        emb = model.get_input_embeddings()(bid.to(device))
        return generate(model, emb, mask.to(device), max_new_tokens, eos=eos, pad_id=tok.pad_token_id, greedy=True,
                        min_new_tokens=min_new_tokens)


def hint_batches(cfg, model, tok, ids, *, n_tokens, parts, group, device, bar) -> None:
    """This rank's share of the greedy hints, stored batch by batch in the parts folder."""
    eos = eos_ids(model, tok)
    for b, rows in enumerate(length_batches(n_tokens, cfg.hint_batch_size)):
        if not dist.mine(b):
            continue
        if not parts.has(group, "hint", b):
            gen, live = greedy_hints(model, tok, [ids[i] for i in rows], cfg.hint_max_new_tokens, eos=eos,
                                     device=device)
            parts.save(group, "hint", b, rows=rows, text=np.array(decode(tok, gen, live), dtype=str),
                       n_tokens=live.sum(1).cpu().numpy())
        bar.update(len(rows))


def hint_batches_vllm(cfg, spec, model, tok, *, ids, n_tokens, parts, group, bar) -> None:
    """The same hints through vLLM (greedy, same token ids in, same budget and EOS), stored in the same
    parts, so a run killed half way can be completed by either engine."""
    todo = [(b, rows) for b, rows in enumerate(length_batches(n_tokens, cfg.hint_batch_size))
            if dist.mine(b) and not parts.has(group, "hint", b)]
    if todo:
        llm = make_llm(KINDS[spec.kind].folder(spec), model.dtype, cfg.vllm_memory)
        eos = eos_ids(model, tok)
        for b, rows in todo:
            texts, counts = greedy_texts(llm, [ids[i] for i in rows], cfg.hint_max_new_tokens, eos)
            parts.save(group, "hint", b, rows=rows, text=np.array(texts, dtype=str), n_tokens=np.array(counts))
            bar.update(len(rows))
        release(llm)
