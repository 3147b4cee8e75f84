"""Extraction speed: `musk extract`'s feature pass against the plain transformers loop.

Plain loop (what a user would write): one prompt at a time, AutoModelForCausalLM in fp32,
output_hidden_states=True (the LM head runs on every token). musk: batched by length, bf16 where
the hardware runs it fast, backbone only (no logits), all five pooling variants, the prompts'
shared prefix (chat template, system prompt) run once; also timed without that prefix reuse.
Same model, same prompts, same chat formatting, measured side by side; medians of --repeats runs.
Also prints the achieved fraction of this machine's bf16 matmul ceiling (2 x non-embedding params
x tokens / s against a large bf16 matmul's FLOP/s, measured in the same run).

    python benchmarks/extract_speed.py [--expert smollm2-135m-instruct] [--prompts 64] [--repeats 3]
    python benchmarks/extract_speed.py --expert shape:qwen2.5-7b --tokenizer <folder> --device cuda \
        --prompts 256 --batch-size 16 --hints 16,64      # a 7B-shaped expert on a GPU, hints too

--expert shape:qwen2.5-7b is a random-init model with Qwen2.5-7B's exact architecture, built on the
device (cost depends on shape only; no hub here). --hints times musk's greedy hint decoding at the
given batch sizes with the whole --hint-tokens budget forced (random weights rarely stop early).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.experts import EXPERTS, ExpertSpec, load_expert, resolve_dtype  # noqa: E402
from pipeline.extract import (length_batches, common_prefix_length, feature_batches, greedy_hints,  # noqa: E402
                              tokenize_prompts)
from pipeline.generation import eos_ids  # noqa: E402
from pipeline.pooling import seeded_indices  # noqa: E402
from pipeline.tasks import TaskConfig, build_prompts  # noqa: E402


SHAPES = {"qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                             rope_theta=1e6, tie_word_embeddings=False)}


def shaped_expert(kind: str, tokenizer: str) -> ExpertSpec:
    if kind not in SHAPES:
        raise SystemExit(f"unknown shape {kind!r}; choices: {sorted(SHAPES)}")
    return ExpertSpec(f"shape-{kind}", "random", "qwen2", config=SHAPES[kind], tokenizer=tokenizer or "bytes")


def load_both(spec: ExpertSpec, dtype, device: str):
    """(musk's model in dtype, the plain loop's fp32 model, tokenizer). A shaped expert is built once,
    on the device (a 7B fp32 init on the host takes minutes), and the plain copy cast from it."""
    if spec.kind != "random":
        fast, tok = load_expert(spec, dtype, device)
        return fast, load_expert(spec, torch.float32, device)[0], tok
    with torch.device(device):
        fast, tok = load_expert(spec, dtype, device)
    return fast, copy.deepcopy(fast).float(), tok


def time_hints(model, tok, ids, sizes, budget, device, sync) -> dict[int, float]:
    """Seconds for musk's greedy hint decoding of all prompts at each batch size (extract's loop:
    batches by length, left padded, KV-cached, `budget` tokens forced)."""
    eos, n_tok, out = eos_ids(model, tok), np.array([len(x) for x in ids]), {}
    for size in sizes:
        t = time.perf_counter()
        for rows in length_batches(n_tok, size):
            greedy_hints(model, tok, [ids[i] for i in rows], budget, eos=eos, device=device, min_new_tokens=budget)
        sync()
        out[size] = time.perf_counter() - t
    return out


def matmul_ceiling(dtype, n=2048, reps=10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--expert", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="also time musk with torch.compile (extract's compile: true)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokenizer", default="", help="shape: experts: a tokenizer folder (default: bytes)")
    ap.add_argument("--hints", default="", help="also time hint decoding at these batch sizes, e.g. 16,64")
    ap.add_argument("--hint-tokens", type=int, default=128)
    args = ap.parse_args()
    if args.expert.startswith("shape:"):
        spec = shaped_expert(args.expert.split(":", 1)[1], args.tokenizer)
    elif args.expert in EXPERTS:
        spec = EXPERTS[args.expert]
    else:
        raise SystemExit(f"unknown expert {args.expert!r}; choices: {sorted(EXPERTS)} or shape:{sorted(SHAPES)}")
    prompts = build_prompts(TaskConfig(family="arithmetic", train_size=args.prompts, val_size=1))[: args.prompts]
    dtype = resolve_dtype("auto", args.device)
    t0 = time.perf_counter()
    fast, plain, tok = load_both(spec, dtype, args.device)
    print(f"{spec.name} loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    ids, _ = tokenize_prompts(tok, prompts)
    n_tok = np.array([len(x) for x in ids])
    tokens = int(n_tok.sum())
    L = fast.config.num_hidden_layers
    rti, rli = seeded_indices(0, spec.name, n_tok, L)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run_plain():
        with torch.inference_mode():
            for x in ids:
                out = plain(input_ids=torch.tensor([x], device=args.device), output_hidden_states=True)
                _ = [h[0, -1] for h in out.hidden_states]
        sync()

    def run_musk(backbone=fast.base_model, share_prefix=True):
        for _ in feature_batches(backbone, ids, tok.pad_token_id, rti, rli, batch_size=args.batch_size,
                                 share_prefix=share_prefix, device=args.device):
            pass
        sync()

    variants = {"musk extract (features)": lambda: run_musk(),
                "  without shared prefix": lambda: run_musk(share_prefix=False)}
    tc0 = None
    if args.compile:
        compiled = torch.compile(fast.base_model, dynamic=True)
        t = time.perf_counter(); run_musk(compiled); tc0 = time.perf_counter() - t
        variants["musk extract, compiled"] = lambda: run_musk(compiled)
    run_plain()  # warm-up
    for f in variants.values():
        f()
    print(f"warmed up at {time.perf_counter() - t0:.0f} s", flush=True)
    tp, tv, ceil = [], {k: [] for k in variants}, []
    for _ in range(args.repeats):  # interleaved, so load on the shared machine hits every variant alike
        t = time.perf_counter(); run_plain(); tp.append(time.perf_counter() - t)
        for k, f in variants.items():
            t = time.perf_counter(); f(); tv[k].append(time.perf_counter() - t)
        if args.device == "cpu":
            ceil.append(matmul_ceiling(dtype))
    p = statistics.median(tp)
    med = {k: statistics.median(v) for k, v in tv.items()}
    emb = sum(p_.numel() for p_ in fast.get_input_embeddings().parameters())
    non_emb = sum(p_.numel() for p_ in fast.base_model.parameters()) - emb
    P = common_prefix_length(ids)
    computed = tokens - P * (len(ids) - 1)  # the shared prefix runs once
    print(f"model {spec.name} ({non_emb / 1e6:.0f}M non-embedding params), {len(ids)} prompts, {tokens} tokens "
          f"(shared prefix {P} tokens: {computed} computed), device {args.device}, "
          f"musk dtype {str(dtype).replace('torch.', '')}, medians of {args.repeats}")
    print(f"{'plain transformers loop':26s}: {len(ids) / p:8.1f} prompts/s {tokens / p:9.0f} tokens/s")
    for k, m in med.items():
        print(f"{k:26s}: {len(ids) / m:8.1f} prompts/s {tokens / m:9.0f} tokens/s  ({p / m:.2f}x)")
    m = med["musk extract (features)"]
    print(f"RATIO extract speedup = {p / m:.2f}x  (target >= 8x)")
    if args.compile:
        mc = med["musk extract, compiled"]
        print(f"RATIO extract speedup, compiled = {p / mc:.2f}x  (target >= 8x; one-off compile + first pass "
              f"{tc0:.0f} s)")
        m = min(m, mc)
    if args.hints:
        del plain
        sizes = [int(x) for x in args.hints.split(",")]
        time_hints(fast, tok, ids[: max(sizes)], sizes[:1], 4, args.device, sync)  # warm-up
        hint_s = time_hints(fast, tok, ids, sizes, args.hint_tokens, args.device, sync)
        for size, sec in hint_s.items():
            print(f"hints, batch {size:4d}         : {len(ids) / sec:8.1f} prompts/s "
                  f"{len(ids) * args.hint_tokens / sec:9.0f} new tokens/s ({args.hint_tokens} tokens each)")
        best = min(hint_s, key=hint_s.get)
        print(f"extraction, features + hints (batch {best}): {len(ids) / (m + hint_s[best]):.1f} prompts/s")
    if ceil:
        c = statistics.median(ceil)
        eff, hw = 2 * non_emb * tokens / m, 2 * non_emb * computed / m
        print(f"RATIO bf16 ceiling fraction = {eff / c:.0%}  ({eff / 1e9:.0f} of {c / 1e9:.0f} GFLOP/s counting every "
              f"prompt token; target >= 60%)")
        print(f"      counting only the tokens computed (prefix once): {hw / c:.0%}")

if __name__ == "__main__":
    main()
