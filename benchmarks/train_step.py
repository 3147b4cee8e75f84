"""GRPO step time: `single` against `perceiver` with n = 2, 3, 5 cached experts (experts cost
nothing at training time), on one policy. Medians over steps 2..N (step 1 warms up).

Experts are seeded random-init models of the requested hidden sizes (2 layers): only their
feature width matters to training, which never loads them. The policy is a registry name, a
folder, or `shape:<hf-config-folder-or-qwen2.5-3b>` for a random-init model of that exact shape
(for paper-scale timing where the real weights cannot be downloaded; rollouts then always use the
full budget, the fixed-length worst case).

    python benchmarks/train_step.py --steps 6                      # CPU, embedded default policy
    python benchmarks/train_step.py --policy shape:qwen2.5-3b --device cuda --batch 4 --group 8 --tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.extract import load_extract_config, run_extract  # noqa: E402
from train.config import load_train_config  # noqa: E402
from train.loop import run_train  # noqa: E402

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
                 rope_theta=1e6)


def shaped_policy(kind: str, root: Path) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline.experts import byte_tokenizer

    if kind != "qwen2.5-3b":
        raise SystemExit(f"unknown shape {kind!r}; choices: ['qwen2.5-3b']")
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    cfg = Qwen2Config(**QWEN25_3B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    del model
    return str(root / "policy")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="smollm2-135m-instruct")
    ap.add_argument("--dims", default="576,640,256,1536,3584", help="hidden sizes of the cached experts")
    ap.add_argument("--ns", default="2,3,5", help="expert counts to time perceiver with")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk", type=int, default=0, help="rollout_chunk")
    ap.add_argument("--gc", action="store_true", help="gradient_checkpointing")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="musk-bench-"))
    policy = shaped_policy(args.policy.split(":", 1)[1], root) if args.policy.startswith("shape:") else args.policy
    dims = [int(d) for d in args.dims.split(",")]
    experts = [{"name": f"e{i}-{d}", "kind": "random", "model": "llama", "seed": i,
                "config": {"hidden_size": d, "num_hidden_layers": 2, "num_attention_heads": 8 if d % 8 == 0 else 1,
                           "num_key_value_heads": 8 if d % 8 == 0 else 1, "intermediate_size": 2 * d}}
               for i, d in enumerate(dims)]
    cache = run_extract(load_extract_config(None, {
        "task": {"family": "easy-arithmetic", "train_size": 64, "val_size": 4}, "experts": experts,
        "router": None, "hints": False, "out": str(root / "cache.h5"), "device": args.device}),
        progress=False, log=lambda *a: None)
    base = {"policy": policy, "group_size": args.group, "train_batch_size": args.batch,
            "gradient_accumulation_steps": 1, "total_training_steps": args.steps, "max_new_tokens": args.tokens,
            "temperature": 1.0, "test_freq": 10_000, "save_freq": 10_000, "eval_batches": 1, "val_batch_size": 4,
            "device": args.device, "rollout_chunk": args.chunk, "gradient_checkpointing": args.gc}
    results = {}
    runs = [("single", None)] + [("perceiver", int(n)) for n in args.ns.split(",")]
    for method, n in runs:
        cfg = load_train_config(None, {**base, "method": method,
                                       **({"experts": [e["name"] for e in experts[:n]]} if n else {})})
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        run = run_train(cfg, cache, root / f"{method}-{n}", progress=False, log=lambda *a: None)
        m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
        key = method if n is None else f"perceiver n={n}"
        results[key] = {"step_s": statistics.median(r["step_seconds"] for r in m),
                        "tokens": statistics.median(r["completion_tokens"] for r in m),
                        "peak_gb": max((r.get("mem/peak_gb", 0) for r in m), default=0)}
    ref = results["single"]["step_s"]
    print(f"policy {args.policy}, device {args.device}, {args.batch} prompts x {args.group} completions, "
          f"{args.tokens} new tokens, medians of steps 2..{args.steps}")
    for k, v in results.items():
        mem = f", peak GPU {v['peak_gb']:.1f} GiB" if v["peak_gb"] else ""
        print(f"{k:16s}: {v['step_s']:7.2f} s/step ({v['tokens']:.0f} completion tokens){mem}")
    for k, v in results.items():
        if k != "single":
            print(f"RATIO {k} / single step time = {v['step_s'] / ref:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
