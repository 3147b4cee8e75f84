"""The float32 LM head (train config `lm_head_fp32`): what it costs and what it changes.

On one policy in bf16 (the embedded SmolLM2-135M-Instruct under MUSK_HOME, or a random model of its
shape with --random), rollouts of `arithmetic`-style chat prompts are sampled with the bf16 head;
then the same tokens' log-probs and entropies are computed by the trainer's forward
(train.policy.completion_logprobs) with the head in bf16 and in float32:

  - the log-prob difference a token, bf16 head - float32 head (mean |d|, max |d|, in nats);
  - the KL that difference alone shows: the k3 estimator (r - 1 - log r, r = p_fp32 / p_bf16, as
    GRPO's KL term) averaged over tokens, and the entropy difference;
  - the cost: ms a sampled token (musk's decoder, the fused step) and ms a token of the trainer's
    forward + backward, each with the bf16 and the float32 head, medians over --repeats rounds.

    python benchmarks/lm_head_fp32.py                 # SmolLM2-135M-Instruct, bf16, 8 prompts x 64 tokens
    python benchmarks/lm_head_fp32.py --random        # a random model of the same shape
    python benchmarks/lm_head_fp32.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.machine import cpu_name  # noqa: E402
from pipeline.experts import load_expert  # noqa: E402
from pipeline.generation import eos_ids, sample, set_head_fp32  # noqa: E402
from train.policy import completion_logprobs, policy_spec  # noqa: E402

QUESTIONS = ["What is 17 + 25?", "Compute 63 - 48 + 9.", "What is 7 * 8 - 13?", "Calculate 125 + 376 - 48.",
             "What is 9 + 14 + 33?", "Compute 81 - 27 - 16.", "What is 6 * 7 + 5?", "Calculate 240 - 75 + 19."]
SYSTEM = "Solve the problem. Give the final answer inside <answer></answer> tags."


def load(random: bool, dtype: torch.dtype, device: str):
    spec = policy_spec("smollm2-135m-instruct")
    lm, tok = load_expert(spec, dtype, device)
    if random:  # the same shape and tokenizer, random weights
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(lm.config, dtype=dtype).to(device)
    return lm.eval(), tok


def prompts(lm, tok, n: int):
    """Left-padded chat prompts [n, P] as embeddings, and their mask."""
    texts = [tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                     tokenize=False, add_generation_prompt=True)
             for q in (QUESTIONS * n)[:n]]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    with torch.no_grad():
        emb = lm.get_input_embeddings()(enc.input_ids)
    return emb, enc.attention_mask


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() over `repeats` runs."""
    out = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", help="the policy's dtype (bf16: what the head rounds in)")
    ap.add_argument("--random", action="store_true", help="random weights of SmolLM2-135M's shape")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    lm, tok = load(args.random, dtype, args.device)
    emb, mask = prompts(lm, tok, args.prompts)
    T, N = args.tokens, args.prompts
    torch.manual_seed(0)
    with torch.no_grad():
        d = sample(lm, emb, mask, T, eos=eos_ids(lm, tok), pad_id=tok.pad_token_id, min_new_tokens=T)

    def trainer(fp32: bool, grad: bool):
        set_head_fp32(lm, fp32)
        e = emb.detach().requires_grad_(grad)  # the backward runs through every layer, as LoRA's does
        ent = []
        lp = completion_logprobs(lm, e, mask, d.tokens, d.live, entropy=ent)
        if grad:
            lp.sum().backward()
        return lp.detach(), ent[0]

    (lp16, h16), (lp32, h32) = trainer(False, False), trainer(True, False)
    diff = (lp16 - lp32)[d.live.bool()]  # nats, [live tokens]
    log_r = -diff  # log p_fp32 - log p_bf16
    k3 = (log_r.exp() - 1 - log_r).mean().item()
    ms = {}
    for fp32 in (False, True):
        name = "fp32" if fp32 else "bf16"
        set_head_fp32(lm, fp32)

        def decode(n):
            return lambda: sample(lm, emb, mask, n, eos=[], pad_id=tok.pad_token_id, min_new_tokens=n)
        with torch.no_grad():
            decode(3)()
            full, two = timed(decode(T), args.repeats, args.device), timed(decode(2), args.repeats, args.device)
        ms[f"sample_{name}"] = (full - two) / (T - 2) / N * 1e3  # ms a sampled token (a row's)
        trainer(fp32, True)  # warm-up
        ms[f"train_fwd_bwd_{name}"] = timed(lambda: trainer(fp32, True), args.repeats, args.device) / (N * T) * 1e3
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"# {datetime.date.today()} {where}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{'random' if args.random else 'SmolLM2-135M-Instruct'} in {args.dtype}, {N} prompts x {T} tokens "
          f"({int(d.live.sum())} live)")
    print(f"log-prob bf16 head - fp32 head: mean |d| {diff.abs().mean():.4f} nats, max |d| {diff.abs().max():.4f}, "
          f"mean d {diff.mean():+.4f}")
    print(f"KL (k3) from the rounding alone: {k3:.2e} nats a token; entropy |dH| mean "
          f"{(h16 - h32)[d.live.bool()].abs().mean():.4f} nats")
    for k, v in ms.items():
        print(f"{k}: {v:.3f} ms a token")
    print(f"RATIO sample fp32 / bf16 head = {ms['sample_fp32'] / ms['sample_bf16']:.3f}")
    print(f"RATIO trainer fwd+bwd fp32 / bf16 head = {ms['train_fwd_bwd_fp32'] / ms['train_fwd_bwd_bf16']:.3f}")


if __name__ == "__main__":
    main()
