"""Decode speed: musk's transformers loop, transformers' own generate with its static cache, and the
fused step (pipeline/decode_step.py) with plain and with oneDNN-packed weights, against the machine's
weight-read floor measured in the same run.

A token step is timed as (time for T new tokens - time for 1) / (T - 1): prefill excluded, every
row decodes all T tokens (min_new_tokens = T). The weight-read floor is one pass that reads every
parameter once (all of them packed into one buffer, read by one sum; tied embeddings once): no decoder can step faster than it at
this batch. The floor and every decoder are measured once per round, `--repeats` rounds, and the
medians over rounds are reported (on a shared host whose speed drifts, all move together).
Random-init models of the exact shapes (speed depends on shape and dtype only).

    python benchmarks/decode.py                        # CPU: SmolLM2-135M shape, batch 8, 48 tokens
    python benchmarks/decode.py --threads 1 --dtype float32
    python benchmarks/decode.py --device cuda          # adds the paper shape: Qwen2.5-3B, batch 256, 128 tokens
    python benchmarks/decode.py --real                 # the embedded SmolLM2-135M-Instruct weights

Prints ms per token step per decoder and
    RATIO decode new / old = X               (fused step / musk's loop)
    RATIO decode new / weight-read floor = Y
    RATIO decode compiled layers / new = Z   (MUSK_DECODE_COMPILE=1: one compiled function per layer)
for the first shape (the embedded default's), and the same with a shape suffix for the paper shape.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.machine import cpu_name  # noqa: E402

from pipeline.experts import resolve_dtype
from pipeline.generation import sample

SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5}
QWEN25_3B = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 32768,
             "tie_word_embeddings": True, "rope_theta": 1e6}


def build(shape: str, dtype, device, real: bool):
    import transformers

    if real:
        from pipeline.experts import EXPERTS, load_expert

        return load_expert(EXPERTS["smollm2-135m-instruct"], dtype, device)[0]
    cfg = (transformers.LlamaConfig(**SMOLLM2_135M) if shape == "smollm2-135m"
           else transformers.Qwen2Config(**QWEN25_3B))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs (the caller warms up)."""
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def weight_read_floor(model, device, repeats: int) -> tuple[float, int]:
    """(median seconds of one read of every parameter, bytes read). The parameters (tied ones once)
    are packed into one contiguous buffer [n] of their dtype, read by one sum: one large read, the
    floor no decode step at small batch can beat (a read per tensor would add a launch per tensor,
    hundreds of them tiny)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # [n]: a copy, one allocation
    nbytes = flat.numel() * flat.element_size()
    flat.sum()  # warm-up
    return timed(flat.sum, device, repeats * 3), nbytes


def matmuls_alone(model, batch: int, device) -> callable:
    """One pass of the fused step's matrix multiplies alone (every fused weight and the LM head once,
    on random [batch, in] inputs, packed where the step packs): what the step's other operations
    (norms, rotary, attention, sampling) add on top of."""
    from pipeline import decode_step

    W = decode_step.fused_weights(model, 64)
    mats = [f for la in W.layers for f in (la.qkv, la.o, la.gate_up, la.down)] + [W.head]
    xs = {f.weight.shape[1]: torch.randn(batch, f.weight.shape[1], dtype=f.weight.dtype, device=device)
          for f in mats}

    def run():
        with torch.inference_mode():
            for f in mats:
                f(xs[f.weight.shape[1]])
    run()
    return run


def decoders(model, emb, mask, T: int, compile_hf: bool):
    def musk(step, pack="1", compiled="0"):
        def run(n):
            env = {"MUSK_DECODE_PACK": pack, "MUSK_DECODE_COMPILE": compiled}
            before = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return sample(model, emb, mask, n, eos=[], pad_id=0, greedy=True, min_new_tokens=n, step=step)
            finally:
                for k, v in before.items():
                    os.environ.pop(k) if v is None else os.environ.update({k: v})
        return run

    def hf_static(n):
        with torch.inference_mode():
            model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, cache_implementation="static", pad_token_id=0,
                           **({} if compile_hf else {"disable_compile": True}))
    return {"musk loop (transformers modules, dynamic cache)": musk("loop"),
            "transformers generate, static cache" + (" + torch.compile" if compile_hf else ""): hf_static,
            "fused step, plain F.linear (MUSK_DECODE_PACK=0)": musk("fused", "0"),
            "fused step (new)": musk("fused"),
            "fused step, compiled layers (MUSK_DECODE_COMPILE=1)": musk("fused", compiled="1")}


def run_shape(shape: str, batch: int, T: int, prompt: int, dtype, device: str, repeats: int, real: bool,
              compile_hf: bool, suffix: str) -> None:
    model = build(shape, dtype, device, real)
    n_params = sum(p.numel() for p in model.parameters())
    nbytes = weight_read_floor(model, device, 1)[1]  # also warms the weights
    print(f"\n{shape}{' (real weights)' if real else ''}: {n_params / 1e6:.0f}M parameters, {dtype}, batch {batch}, "
          f"prompt {prompt}, {T} new tokens")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=g)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    for i in range(batch):  # left padding: rows of different lengths
        mask[i, : (i * 7) % (prompt // 3)] = 0
    ids, mask = (ids * mask).to(device), mask.to(device)
    with torch.inference_mode():
        emb = model.get_input_embeddings()(ids)
    fns = {}
    for name, fn in decoders(model, emb, mask, T, compile_hf).items():
        try:
            t = time.perf_counter()
            fn(2)  # warm-up (two tokens: one decode step): fused weights, allocator, compilation where asked
            if "compile" in name:  # the timed lengths' shapes too (the compiled layers: one per cache size)
                fn(T)
                print(f"  {name}: warm-up with compilation {time.perf_counter() - t:.1f} s")
            fns[name] = fn
        except (RuntimeError, ValueError, TypeError) as e:  # a path this transformers does not take: say so
            print(f"  {name}: not run ({type(e).__name__}: {str(e)[:120]})")
    # Rounds: each measures the floor and every decoder once, so a machine whose speed drifts (a shared
    # host) moves all of them together; the medians over rounds are reported.
    rounds = {name: [] for name in fns}
    floors, fulls, mms = [], {name: [] for name in fns}, []
    mm = matmuls_alone(model, batch, device)
    for _ in range(repeats):
        floors.append(weight_read_floor(model, device, 1)[0])
        mms.append(timed(mm, device, 3))
        for name, fn in fns.items():
            full = timed(functools.partial(fn, T), device, 1)
            one = timed(functools.partial(fn, 1), device, 1)
            rounds[name].append((full - one) / (T - 1))
            fulls[name].append(full)
    floor = statistics.median(floors)
    print(f"  weight-read floor: {floor * 1e3:.1f} ms ({nbytes / 2**20:.0f} MiB, {nbytes / floor / 1e9:.1f} GB/s; "
          f"rounds {', '.join(f'{f * 1e3:.1f}' for f in floors)})")
    mm_t = statistics.median(mms)
    print(f"  the fused step's matmuls alone (packed as the step packs them): {mm_t * 1e3:.1f} ms "
          f"({mm_t / floor:.2f}x the floor)")
    step = {name: statistics.median(v) for name, v in rounds.items()}
    for name in fns:
        print(f"  {name}: {step[name] * 1e3:.1f} ms/token step  ({statistics.median(fulls[name]):.2f} s for {T} "
              f"tokens, {step[name] / floor:.2f}x the floor; rounds {', '.join(f'{x * 1e3:.1f}' for x in rounds[name])})")
    old, new = step["musk loop (transformers modules, dynamic cache)"], step["fused step (new)"]
    print(f"RATIO decode new / old{suffix} = {new / old:.3f}")
    print(f"RATIO decode new / weight-read floor{suffix} = {new / floor:.3f}")
    comp = step.get("fused step, compiled layers (MUSK_DECODE_COMPILE=1)")
    if comp is not None:
        print(f"RATIO decode compiled layers / new{suffix} = {comp / new:.3f}")
        print(f"RATIO decode compiled layers / weight-read floor{suffix} = {comp / floor:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds the paper shape)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: torch's default)")
    ap.add_argument("--dtype", default="auto", help="auto (as `dtype: auto` picks), float32, bfloat16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=96, help="prompt length in tokens (C included)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (floor and every decoder once each); medians")
    ap.add_argument("--real", action="store_true", help="the embedded SmolLM2-135M-Instruct weights")
    ap.add_argument("--compile", action="store_true", help="let transformers' generate torch.compile its step")
    ap.add_argument("--paper-only", action="store_true", help="cuda: only the paper shape")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, args.device)
    cpu = cpu_name()
    import transformers

    print(f"{datetime.date.today()} | {cpu} | ISA {torch.backends.cpu.get_cpu_capability()} | "
          f"threads {torch.get_num_threads()} | torch {torch.__version__} | transformers {transformers.__version__}"
          + (f" | {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    if not args.paper_only:
        run_shape("smollm2-135m", args.batch, args.tokens, args.prompt, dtype, args.device, args.repeats, args.real,
                  args.compile, "")
    if args.device.startswith("cuda"):
        run_shape("qwen2.5-3b", 256, 128, 160, dtype, args.device, args.repeats, False, args.compile,
                  " (qwen2.5-3b, batch 256, 128 tokens)")


if __name__ == "__main__":
    main()
