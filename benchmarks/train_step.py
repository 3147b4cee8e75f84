"""GRPO step time: `single` against `perceiver` with n = 2, 3, 5 experts, read from the cache
(experts cost nothing at training time) and run online (each step loads nothing but forwards every
expert on the batch's prompts, as a pipeline without a cache must). Medians over steps 2..N (step 1
warms up); rollouts have a fixed length (min_new_tokens = max_new_tokens), so every run times the
same number of tokens.

The team, in order: SmolLM2-135M-Instruct and Gemma-3-270M (the embedded GGUF models), the
naive-random expert, and random-init models with the exact shapes of SmolLM2-360M and
Qwen2.5-0.5B (forward cost depends on shape only; no hub here). The policy is a registry name,
a folder, or `shape:qwen2.5-3b` for a random-init model of that exact shape (paper-scale timing).

    python benchmarks/train_step.py --steps 6                      # CPU, embedded default policy
    python benchmarks/train_step.py --policy shape:qwen2.5-3b --device cuda --batch 4 --group 8 --tokens 128
    python benchmarks/train_step.py --watch --ns 3 --no-online    # what watching a run costs a step
    python benchmarks/train_step.py --merge-ab --tokens 48 --dtype float32   # decoding through merged LoRA
    python benchmarks/train_step.py --beta-ab --dims 64 --steps 4 --tokens 16   # beta 0: no reference forward
    python benchmarks/train_step.py --policy shape:qwen2.5-3b --tokenizer <folder> --device cuda --batch 32 \
        --group 8 --tokens 128 --chunk 32 --dims 1536,3584,3072 --ns 3 --steps 3   # a paper step, one micro-batch

--watch times, inside the same runs, everything "watching a run" adds to a step with --report-to none
(the tracker dispatch, sampled completions built and appended to completions.jsonl, here at every
step: log_completions_freq 1, the worst case) and prints it as a share of the step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.reader import Cache  # noqa: E402
from cache.run_folder import COMPLETIONS, METRICS, RunFolder  # noqa: E402
from pipeline.experts import load_expert, resolve_dtype, resolve_expert  # noqa: E402
from pipeline.extract import pad_ids, expert_forward_pool, load_extract_config, run_extract, tokenize_prompts  # noqa: E402
from pipeline.pooling import seeded_indices  # noqa: E402
from train.config import load_train_config  # noqa: E402
import train.loop  # noqa: E402
from evaluate.records import evaluate  # noqa: E402
from train.loop import run_train  # noqa: E402
from train.trackers import Trackers  # noqa: E402

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
                 rope_theta=1e6)
SMOLLM2_360M = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                    num_key_value_heads=5, tie_word_embeddings=True)
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
TEAM = ["smollm2-135m-instruct", "gemma3-270m", "naive-random",
        {"name": "shape-smollm2-360m", "kind": "random", "model": "llama", "config": SMOLLM2_360M,
         "tokenizer": "smollm2-135m-instruct", "seed": 3},
        {"name": "shape-qwen2.5-0.5b", "kind": "random", "model": "qwen2", "config": QWEN25_05B,
         "tokenizer": "smollm2-135m-instruct", "seed": 4}]


class OnlineExperts:
    """A FeatureSource for run_train: every expert forwards the batch's prompts (tokenize, pad, backbone
    forward, pool) on each call, as a pipeline without a cache does; models stay loaded."""

    def __init__(self, specs, cache_path: Path, pooling: str, dtype, device):
        with Cache(cache_path) as c:
            self.texts = c.prompts()["text"]
        self.experts = [(s, *load_expert(s, dtype, device)) for s in specs]
        self.pooling, self.device = pooling, device
        self.gib = sum(p.numel() * p.element_size() for _, m, _ in self.experts for p in m.parameters()) / 2**30

    def __call__(self, idx: list[int]) -> list[torch.Tensor]:
        out = []
        for spec, model, tok in self.experts:
            ids, _ = tokenize_prompts(tok, [SimpleNamespace(text=self.texts[i]) for i in idx])
            n = np.array([len(x) for x in ids])
            rti, rli = seeded_indices(0, spec.name, n, int(model.config.get_text_config().num_hidden_layers))
            bid, mask = pad_ids(ids, tok.pad_token_id, "right")
            pooled = expert_forward_pool(model.base_model, bid.to(self.device), mask.to(self.device),
                                         torch.from_numpy(rti).to(self.device), rli=torch.from_numpy(rli))
            out.append(pooled[self.pooling].clone())  # a normal tensor: the adapter takes gradients
        return out


WATCH = {"seconds": 0.0}


def _timed(fn, when=lambda *a, **k: True):
    """fn, with its time added to WATCH["seconds"] whenever when(*args) holds."""
    def wrapper(*a, **k):
        if not when(*a, **k):
            return fn(*a, **k)
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            WATCH["seconds"] += time.perf_counter() - t
    return wrapper


def watch_hooks() -> None:
    """Time what watching a run adds to a training step: Trackers.log, completion_records, completions appends."""
    Trackers.log = _timed(Trackers.log)
    train.loop.completion_records = _timed(train.loop.completion_records)
    RunFolder.append = _timed(RunFolder.append, lambda self, name, rec: name == COMPLETIONS)


def shaped_policy(kind: str, root: Path, tokenizer: str = "") -> str:
    """A random-init policy of that exact shape, saved as a folder; its tokenizer is `tokenizer` (a
    folder: real BPE prompt lengths) or a byte-level one (prompts ~4x longer than a BPE's)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from pipeline.experts import byte_tokenizer

    if kind != "qwen2.5-3b":
        raise SystemExit(f"unknown shape {kind!r}; choices: ['qwen2.5-3b']")
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        tok = byte_tokenizer()
        tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                             "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = Qwen2Config(**QWEN25_3B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    del model
    return str(root / "policy")


def print_merge_ab(args, results: dict) -> None:
    print(f"policy {args.policy} ({args.dtype}), {args.batch} prompts x {args.group} completions, {args.tokens} new "
          f"tokens (fixed), medians of steps 2..{args.steps}, two interleaved runs each")
    for k, v in results.items():
        print(f"{k:32s}: {v['step_s']:6.2f} s/step (" + ", ".join(f"{p} {t:.2f}" for p, t in v["parts"].items()) + ")")
    def med(v, get):
        return statistics.median(get(r) for k, r in results.items() if f" {v} #" in k)

    gen = {v: med(v, lambda r: r["parts"]["generate"]) for v in ("off", "on")}
    step = {v: med(v, lambda r: r["step_s"]) for v in ("off", "on")}
    print(f"RATIO generate time, merged / unmerged = {gen['on'] / gen['off']:.3f}")
    print(f"RATIO step time, merged / unmerged = {step['on'] / step['off']:.3f}")


def print_beta_ab(args, results: dict) -> None:
    print(f"policy {args.policy} ({args.dtype}), device {args.device}, {args.batch} prompts x {args.group} "
          f"completions, {args.tokens} new tokens (fixed), medians of steps 2..{args.steps}, two interleaved runs each")
    for k, v in results.items():
        print(f"{k:24s}: {v['step_s']:6.3f} s/step (" + ", ".join(f"{p} {t:.3f}" for p, t in v["parts"].items()) + ")")

    def best(b, get):  # the faster of the interleaved runs: the least disturbed by other load on the machine
        return min(get(r) for k, r in results.items() if k.startswith(f"single, beta {b} #"))

    step = {b: best(b, lambda r: r["step_s"]) for b in ("0.04", "0")}
    ref = {b: best(b, lambda r: r["parts"]["reference"]) for b in ("0.04", "0")}
    print(f"RATIO step time (faster run of each), beta 0 / beta 0.04 = {step['0'] / step['0.04']:.3f}  "
          f"(reference forward {ref['0.04']:.3f} s/step at beta 0.04, {ref['0']:.3f} at beta 0)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="smollm2-135m-instruct")
    ap.add_argument("--ns", default="2,3,5", help="expert counts to time perceiver with (first n of the team)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--accum", type=int, default=1, help="gradient_accumulation_steps (micro-batches a step)")
    ap.add_argument("--tokenizer", default="", help="shape: policies: a tokenizer folder (default: bytes)")
    ap.add_argument("--chunk", type=int, default=0, help="rollout_chunk")
    ap.add_argument("--gc", action="store_true", help="gradient_checkpointing")
    ap.add_argument("--no-online", action="store_true", help="skip the online-expert runs")
    ap.add_argument("--watch", action="store_true", help="time the watching hooks (report_to none, "
                    "completions logged every step) as a share of the step time")
    ap.add_argument("--merge-ab", action="store_true", help="only single, decoding with decode_merged off "
                    "and on, side by side (what merging LoRA for decoding saves)")
    ap.add_argument("--beta-ab", action="store_true", help="only single, beta 0.04 and 0 side by side "
                    "(beta 0 skips the reference forward)")
    ap.add_argument("--dtype", default="auto", help="policy dtype (decode_merged auto merges float32 only)")
    ap.add_argument("--dims", default="", help="instead of the team: cached random 2-layer experts of these "
                    "hidden sizes, e.g. the paper's 1536,3584,3072,2048,3072 (no online runs: toy forwards)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="musk-bench-"))
    policy = args.policy
    if policy.startswith("shape:"):
        policy = shaped_policy(policy.split(":", 1)[1], root, args.tokenizer)
    ns = [int(n) for n in args.ns.split(",")]
    members = TEAM[: max(ns)]
    if args.dims:
        members = [{"name": f"e{i}-{d}", "kind": "random", "model": "llama", "seed": i,
                    "config": {"hidden_size": d, "num_hidden_layers": 2, "num_attention_heads": 8 if d % 8 == 0 else 1,
                               "num_key_value_heads": 8 if d % 8 == 0 else 1, "intermediate_size": 2 * d}}
                   for i, d in enumerate(int(x) for x in args.dims.split(","))]
        args.no_online = True
    team = [resolve_expert(e, "team") for e in members]
    cache = run_extract(load_extract_config(None, {
        "task": {"family": "easy-arithmetic", "train_size": 64, "val_size": 4}, "experts": members,
        "router": None, "hints": False, "out": str(root / "cache.h5"), "device": args.device}),
        progress=False, log=lambda *a: None)
    base = {"policy": policy, "group_size": args.group, "train_batch_size": args.batch,
            "gradient_accumulation_steps": args.accum, "total_training_steps": args.steps, "max_new_tokens": args.tokens,
            "min_new_tokens": args.tokens, "temperature": 1.0, "test_freq": 10_000, "save_freq": 10_000,
            "eval_batches": 1, "val_batch_size": 4, "device": args.device, "rollout_chunk": args.chunk,
            "gradient_checkpointing": args.gc, "report_to": ["none"], "dtype": args.dtype,
            "log_completions_freq": 1 if args.watch else 0}
    if args.watch:
        watch_hooks()
    runs = [("single", None, False, "auto")] + [("perceiver", n, False, "auto") for n in ns]
    if not args.no_online:
        runs += [("perceiver", n, True, "auto") for n in ns]
    if args.merge_ab:  # interleaved off / on, so load on the machine hits both alike
        runs = [("single", None, False, v) for v in ("off", "on", "off", "on")]
    if args.beta_ab:  # interleaved 0.04 / 0, so load on the machine hits both alike
        runs = [("single", None, False, b) for b in ("0.04", "0", "0.04", "0")]
    results = {}
    for i, (method, n, online, merged) in enumerate(runs):
        knob = {"beta": float(merged)} if args.beta_ab else {"decode_merged": merged}
        cfg = load_train_config(None, {**base, "method": method, **knob,
                                       **({"experts": [e.name for e in team[:n]]} if n else {})})
        fn = None
        if online:
            dev = "cuda" if args.device.startswith("cuda") else "cpu"
            fn = OnlineExperts(team[:n], cache, cfg.context.pooling, resolve_dtype("auto", dev), args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        WATCH["seconds"] = 0.0
        run = run_train(cfg, cache, root / f"{method}-{n}-{online}-{i}", evaluator=evaluate, progress=False, log=lambda *a: None,
                        features=fn)
        held = fn.gib if fn else 0.0
        del fn
        m = RunFolder(run).read(METRICS)[1:]
        key = method if n is None else f"perceiver n={n}" + (" online" if online else "")
        if args.merge_ab:
            key = f"single, decode_merged {merged} #{i // 2 + 1}"
        if args.beta_ab:
            key = f"single, beta {merged} #{i // 2 + 1}"
        results[key] = {"step_s": statistics.median(r["step_seconds"] for r in m),
                        "tokens": statistics.median(r["completion_tokens"] for r in m),
                        "parts": {k: statistics.median(r[f"time/{k}"] for r in m)
                                  for k in ("generate", "reference", "policy")},
                        "peak_gb": max((r.get("mem/peak_gb", 0) for r in m), default=0), "held": held,
                        "watch_share": WATCH["seconds"] / sum(r["step_seconds"] for r in RunFolder(run).read(METRICS))}
    if args.merge_ab:
        return print_merge_ab(args, results)
    if args.beta_ab:
        return print_beta_ab(args, results)
    ref = results["single"]["step_s"]
    print(f"policy {args.policy}, device {args.device}, {args.batch} prompts x {args.group} completions, "
          f"{args.tokens} new tokens (fixed), {args.accum} micro-batch(es) a step, rollout_chunk {args.chunk}, "
          f"gradient checkpointing {'on' if args.gc else 'off'}, medians of steps 2..{args.steps}; "
          f"team: {[e.name for e in team]}")
    for k, v in results.items():
        mem = f", peak GPU {v['peak_gb']:.1f} GiB" if v["peak_gb"] else ""
        held = f", expert weights held {v['held']:.2f} GiB" if v["held"] else ""
        parts = ", ".join(f"{p} {t:.2f}" for p, t in v["parts"].items())
        print(f"{k:24s}: {v['step_s']:7.2f} s/step ({parts}; {v['tokens']:.0f} completion tokens){mem}{held}")
    for n in ns:
        k = f"perceiver n={n}"
        print(f"RATIO {k} cached / single step time = {results[k]['step_s'] / ref:.3f}  (target <= 1.10)")
    for k, v in results.items() if args.watch else []:
        print(f"RATIO {k} watching hooks / step time = {v['watch_share']:.4f}  (target <= 0.02)")
    for n in ns if not args.no_online else []:
        k = f"perceiver n={n}"
        print(f"RATIO {k} online / cached step time = {results[k + ' online']['step_s'] / results[k]['step_s']:.2f}x")


if __name__ == "__main__":
    main()
