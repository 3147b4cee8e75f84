"""Where does GRPO's gradient point on the probe's information channel? At fixed weights (a run's
checkpoint, or the initial ones with the gate open), for a few batches of train_batch_size training
prompts: the gradient of one GRPO micro-batch (the loop's own `generate_trajectory` + `grpo_step`:
group_size rollouts per prompt, group advantages, clipped surrogate, KL) with respect to W_oracle, the
linear map that reads `probe-oracle`'s features into g_phi (Eq. 6), drawn `--draws` times with fresh
rollouts, against the supervised gradient on the same prompts (cross-entropy of the reference answer
given the prompt with C, as benchmarks/probe_supervised.py trains).

What it prints, per batch and pooled over batches:

- cos(GRPO draw, supervised): does one GRPO step push W_oracle towards what reads the answer?
- cos(GRPO draw, GRPO draw'): how consistent two draws on the same prompts are (rollout noise);
  rho = their mean. The mean of n draws has, in expectation, cosine sqrt(n rho / (1 + (n - 1) rho))
  with the draws' expected gradient: the rollouts per prompt a step would need to point where GRPO's
  expectation points with cosine 0.9 is printed as `n90 x group_size`.
- cos(mean of the draws, supervised): where GRPO's expectation points, as far as `--draws` resolve it;
  divided by the mean's expected cosine with the expectation, sqrt(n rho / (1 + (n - 1) rho)), it
  estimates cos(GRPO's expectation, supervised) (an attenuation correction; nan when rho <= 0).
- the share of groups whose rewards all agree (advantage 0: no gradient from that prompt).

    python benchmarks/probe_gradient.py --cache caches/probe.h5 --run runs-probe/perceiver-0 --step 50

Read the numbers with the printed dtype and CPU; the cosines are over W_oracle's d_latent x D entries.
"""

from __future__ import annotations

import argparse
import itertools
import math
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.probe_supervised import answer_nll  # noqa: E402
from core.machine import cpu_name  # noqa: E402
from pipeline.experts import resolve_device, resolve_dtype  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.config import load_train_config  # noqa: E402
from pipeline.rewards import score  # noqa: E402
from train.loop import generate_trajectory, grpo_step  # noqa: E402
from train.setup import build_models, load_data  # noqa: E402


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def supervised_grad(cfg, m, data, idx: list[int], device: str, w: torch.Tensor) -> torch.Tensor:
    """d/dW of the mean NLL (nats/token) of the reference answers + EOS given the prompts with C."""
    m.optimizer.zero_grad(set_to_none=True)
    answer_nll(cfg, m, data, idx, device).backward()  # the loss benchmarks/probe_supervised.py trains on
    return w.grad.detach().float().clone()


def grpo_grad(cfg, m, data, idx: list[int], device: str, w: torch.Tensor, scorer=score) -> tuple[torch.Tensor | None, float]:
    """d/dW of one GRPO micro-batch on prompts idx (fresh rollouts, rewarded by `scorer`); None when every
    group agrees."""
    m.optimizer.zero_grad(set_to_none=True)
    timing = defaultdict(float)
    ro = generate_trajectory(cfg, m, data, idx, device=device, timing=timing, scorer=scorer)
    grpo_step(cfg, m, ro, timing)
    g = None if w.grad is None or not bool(ro.advantages.abs().sum() > 0) else w.grad.detach().float().clone()
    return g, ro.frac_zero_std


def n_for(rho: float, target: float = 0.9) -> float:
    """Draws whose mean has cosine `target` with the expectation, given the mean pairwise cosine rho."""
    if rho <= 0:
        return float("inf")
    return target**2 * (1 - rho) / (rho * (1 - target**2))


def mean_cos(n: int, rho: float) -> float:
    """Expected cosine of the mean of n draws with their expectation, given the mean pairwise cosine rho
    (draws = expectation + independent isotropic noise of equal size)."""
    return math.sqrt(n * rho / (1 + (n - 1) * rho)) if rho > 0 else float("nan")


def main(scorer=score) -> None:
    """The command; scorer: the task's reward (tests hand in one with variance for a random policy)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--config", default="configs/train/probe.yaml")
    ap.add_argument("--run", type=Path, default=None, help="A perceiver run folder whose checkpoint to read.")
    ap.add_argument("--step", type=int, default=None, help="Its checkpoint step (default: the latest).")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expert", default="probe-oracle")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_train_config(args.config, {"method": "perceiver", "seed": args.seed})
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    data = load_data(cfg, args.cache)
    m = build_models(cfg, data, device, dtype)
    where = "initial weights, gate open (r_t = 1)"
    if args.run is not None:
        path = args.run / "checkpoints" / f"step_{args.step}" if args.step else None
        path = path or sorted((args.run / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
        ckpt.load_checkpoint(path, m.peft, m.adapter, m.optimizer)
        where = f"{args.run.name} at {path.name}"
    m.adapter.out.set_step(10**9, cfg.gate_warmup_steps)  # r_t = 1: the gate as after warmup
    w = m.adapter.experts.proj[data.experts.index(args.expert)].weight  # W_oracle [d_latent, D]
    print(f"GRPO vs supervised gradient on W[{args.expert}] {tuple(w.shape)}: {where}; {args.batches} batches x "
          f"{cfg.train_batch_size} prompts, {args.draws} GRPO draws of {cfg.group_size} rollouts each; dtype "
          f"{str(dtype).removeprefix('torch.')}, {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    rng = np.random.default_rng(cfg.seed)
    pooled = defaultdict(list)
    for b in range(args.batches):
        idx = [int(i) for i in rng.choice(data.train_idx, cfg.train_batch_size, replace=False)]
        sup = supervised_grad(cfg, m, data, idx, device, w)
        draws, zero = [], []
        for _ in range(args.draws):
            g, fz = grpo_grad(cfg, m, data, idx, device, w, scorer)
            zero.append(fz)
            if g is not None:
                draws.append(g)
        to_sup = [_cos(g, sup) for g in draws]
        pair = [_cos(a, c) for a, c in itertools.combinations(draws, 2)]
        mean_sup = _cos(torch.stack(draws).mean(0), sup) if draws else float("nan")
        for k, v in (("cos_draw_sup", to_sup), ("cos_draw_draw", pair), ("frac_zero_std", zero)):
            pooled[k] += v
        pooled["cos_mean_sup"].append(mean_sup)
        print(f"batch {b}: cos(draw, supervised) {np.mean(to_sup):+.3f} (sd {np.std(to_sup):.3f}, {len(draws)} draws "
              f"with signal) | cos(draw, draw') {np.mean(pair) if pair else float('nan'):+.3f} | cos(mean of draws, "
              f"supervised) {mean_sup:+.3f} | groups with one reward {np.mean(zero):.2f}", flush=True)
    rho = float(np.mean(pooled["cos_draw_draw"])) if pooled["cos_draw_draw"] else float("nan")
    res = {k: float(np.mean(v)) for k, v in pooled.items()}
    res["cos_expectation_sup"] = res["cos_mean_sup"] / mean_cos(args.draws, rho)  # attenuation-corrected
    res.update(where=where, dtype=str(dtype), n90_draws=n_for(rho), group_size=cfg.group_size)
    print(f"RESULT {where}: cos(GRPO draw, supervised) = {res['cos_draw_sup']:+.3f}; cos(draw, draw') = {rho:+.3f}; "
          f"cos(mean of {args.draws} draws, supervised) = {res['cos_mean_sup']:+.3f}, so cos(GRPO's expectation, supervised) "
          f"~ {res['cos_expectation_sup']:+.2f}; draws for cos 0.9 with GRPO's own "
          f"expectation: {res['n90_draws']:.1f} x {cfg.group_size} rollouts per prompt")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
