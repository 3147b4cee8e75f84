"""Can the context path carry the probe's answer at all? The same models, context path, learning rates,
prompts per step and number of updates as a GRPO run of the probe preset, with the reward replaced by
supervision: each step minimises the cross-entropy of the reference answer (its tokens and EOS) given
the prompt with C spliced in, teacher-forced. Then greedy accuracy on the held-out split with C, with
`probe-oracle`'s features read from another question (a derangement, as `musk eval --ablate
shuffle:probe-oracle`), and with C removed, and the paired differences.

If the supervised run reads the answer through C (with C far above the shuffled oracle) while GRPO runs
of the same budget do not, the path can carry the information and what is missing is the learning
signal: GRPO's reward reaches g_phi only through the few groups whose rollouts differ, one scalar per
completion, while supervision gives every answer token a gradient.

    python benchmarks/probe_supervised.py --cache caches/probe.h5 --steps 50 --seed 0 --threads 1
    python benchmarks/probe_supervised.py --cache caches/probe.h5 --method prefix   # no experts: no content

Prints one line per evaluation and `RESULT ...` lines; --json writes the figures. Read the numbers with
the dtype printed (auto: bf16 on CPUs with bf16 instructions, float32 otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyze.stats import paired_bootstrap  # noqa: E402
from core.machine import cpu_name  # noqa: E402
from pipeline.experts import resolve_device, resolve_dtype  # noqa: E402
from train.config import load_train_config  # noqa: E402
from evaluate.records import condition_records  # noqa: E402
from evaluate.run import EvalRequest, parse_conditions, shuffled  # noqa: E402
from train.optim import set_lr, clip_gradients  # noqa: E402
from train.recipes import answer_nll  # noqa: E402
from train.setup import build_models, load_data  # noqa: E402


def supervised_step(cfg, m, data, idx: list[int], device: str) -> float:
    """One update on prompts idx: mean negative log-likelihood of the reference answer tokens (nats/token)."""
    loss = answer_nll(cfg, m, data, idx, device)
    m.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(m.optimizer, cfg.grad_clip, cfg.grad_clip_scope)  # as a GRPO step clips
    m.optimizer.step()
    return float(loss.detach())


def evaluate_conditions(cfg, m, data, device: str, expert: str) -> dict[str, list[float]]:
    """Greedy correctness per held-out prompt under with C, the expert shuffled, and C removed."""
    rows = np.asarray(data.val_idx)
    req = EvalRequest(run=Path("."), contexts=("with", "without"),
                      ablations=(f"shuffle:{expert}",) if expert in data.experts else ())
    questions = [data.prompts["text"][r] for r in rows]  # as `musk eval`: a derangement over distinct questions
    conds = [shuffled(c, rows, 0, questions) for c in parse_conditions(req, cfg, data, has_gate=True)]
    m.peft.eval()
    m.adapter.eval()
    out = {c.name: [float(r["correct"]) for r in condition_records(cfg, m, data, rows, c, device=device)] for c in conds}
    m.peft.train()
    m.adapter.train()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--config", default="configs/train/probe.yaml")
    ap.add_argument("--method", default="perceiver")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expert", default="probe-oracle", help="The expert whose features are shuffled.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_train_config(args.config, {"method": args.method, "seed": args.seed})
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    data = load_data(cfg, args.cache)
    m = build_models(cfg, data, device, dtype)
    rng = np.random.default_rng(cfg.seed)
    B = cfg.train_batch_size * cfg.gradient_accumulation_steps  # prompts per step, as a GRPO step reads
    print(f"supervised probe: {args.method}, seed {cfg.seed}, {args.steps} steps x {B} prompts, dtype "
          f"{str(dtype).removeprefix('torch.')}, {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads), torch "
          f"{torch.__version__}, {len(data.val_idx)} held-out prompts", flush=True)
    figures, t0 = {"method": args.method, "seed": cfg.seed, "dtype": str(dtype), "evals": []}, time.perf_counter()
    for step in range(1, args.steps + 1):
        set_lr(m.optimizer, step, cfg.warmup_steps)  # the same warmups as a GRPO run
        if hasattr(m.adapter, "out") and hasattr(m.adapter.out, "set_step"):
            m.adapter.out.set_step(step, cfg.gate_warmup_steps)
        idx = [int(i) for i in rng.choice(data.train_idx, B, replace=False)]
        loss = supervised_step(cfg, m, data, idx, device)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate_conditions(cfg, m, data, device, args.expert)
            line = {k: 100 * float(np.mean(v)) for k, v in acc.items()}
            diffs = {}
            for k in acc:
                if k != "with":
                    ci = paired_bootstrap(acc["with"], acc[k])
                    diffs[f"with - {k}"] = [100 * ci.diff, 100 * ci.lo, 100 * ci.hi]
            figures["evals"].append({"step": step, "loss": loss, "accuracy": line, "paired": diffs})
            print(f"step {step} loss {loss:.3f} | " + ", ".join(f"{k} {v:.1f}%" for k, v in line.items()) + " | "
                  + ", ".join(f"{k} {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]" for k, d in diffs.items())
                  + f" | {time.perf_counter() - t0:.0f} s", flush=True)
    last = figures["evals"][-1]
    for k, d in last["paired"].items():
        print(f"RESULT {args.method} seed {cfg.seed} step {last['step']}: {k} = {d[0]:+.1f} points "
              f"[{d[1]:+.1f}, {d[2]:+.1f}] (paired over {len(data.val_idx)} prompts)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
