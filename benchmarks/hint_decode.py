"""Hint decoding on the CPU: where a greedy token step's time goes, the backbone against the LM head.

Gemma-3-270M's head is 262,144 x 640 (168M of its 268M parameters), read in full every token.

    python benchmarks/hint_decode.py [--expert gemma3-270m] [--batch 32]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.experts import EXPERTS, load_expert, resolve_dtype
from pipeline.extract import pad_ids, tokenize_prompts
from pipeline.generation import lm_logits, prefill, positions
from pipeline.tasks import TaskConfig, build_prompts

ap = argparse.ArgumentParser()
ap.add_argument("--expert", default="gemma3-270m", choices=sorted(EXPERTS))
ap.add_argument("--batch", type=int, default=32)
args = ap.parse_args()
dtype = resolve_dtype("auto", "cpu")
model, tok = load_expert(EXPERTS[args.expert], dtype, "cpu")
head = model.get_output_embeddings().weight
print(f"dtype {dtype}, cpu capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
n_params = sum(p.numel() for p in model.parameters())
print(f"params {n_params / 1e6:.0f}M, LM head {tuple(head.shape)} = {head.numel() / 1e6:.0f}M "
      f"({head.numel() * head.element_size() / 2**20:.0f} MiB read per token step)")
prompts = build_prompts(TaskConfig(family="easy-arithmetic", train_size=args.batch, val_size=1))[:args.batch]
ids, _ = tokenize_prompts(tok, prompts)
bid, mask = pad_ids(ids, tok.pad_token_id, "left")
with torch.inference_mode():
    emb = model.get_input_embeddings()(bid)
    h, past = prefill(model.base_model, emb, mask)
    nxt = lm_logits(model, h[:, -1]).argmax(-1)
    pos = positions(mask)[:, -1]
    tb, th = [], []
    for t in range(24):
        mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype)], 1)
        pos = pos + 1
        s = time.perf_counter()
        out = model.base_model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                               cache=past, use_cache=True)
        m = time.perf_counter()
        logits = lm_logits(model, out.last_hidden_state[:, -1])
        nxt = logits.argmax(-1)
        e = time.perf_counter()
        past = out.cache
        if t >= 4:
            tb.append(m - s); th.append(e - m)
b, hh = statistics.median(tb), statistics.median(th)
print(f"batch {len(ids)}, per token step: backbone {b * 1e3:.0f} ms, LM head + argmax {hh * 1e3:.0f} ms "
      f"({hh / (b + hh):.0%} of the step); {len(ids) / (b + hh):.0f} tokens/s")
print(f"RATIO LM head / token step = {hh / (b + hh):.2f}")
