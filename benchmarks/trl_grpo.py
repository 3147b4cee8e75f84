"""A GRPO step: `musk train --method single` against TRL's GRPOTrainer, side by side in one run.

Same policy weights and dtype, LoRA rank/alpha/targets, prompts (musk's chat-formatted prompt
text, fed to TRL as plain strings), group size, prompts per step, reward function, KL coefficient,
clip range, loss normalisation (TRL's loss_type="grpo" is musk's per-completion mean), learning
rate and one optimisation pass per batch. Completions have a fixed length in both: EOS is
suppressed until max_new_tokens (musk's min_new_tokens, TRL's generation_kwargs min_new_tokens),
so both time the same number of tokens. Gradient checkpointing is off in both (musk's default;
TRL defaults to on, which trades time for memory). Medians of steps 2..N (step 1 warms up).

    pip install -e '.[bench]'
    python benchmarks/trl_grpo.py [--steps 6] [--batch 2] [--group 4] [--tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.reader import Cache  # noqa: E402
from cache.run_folder import METRICS, RunFolder  # noqa: E402
from core.config import from_dict  # noqa: E402
from pipeline.experts import load_expert, resolve_dtype  # noqa: E402
from pipeline.extract import load_extract_config, run_extract  # noqa: E402
from pipeline.tasks import TaskConfig  # noqa: E402
from train.config import load_train_config  # noqa: E402
from evaluate.records import evaluate  # noqa: E402
from train.loop import run_train  # noqa: E402
from train.inputs import build_prompt_text  # noqa: E402
from train.policy import policy_spec  # noqa: E402
from pipeline.rewards import score  # noqa: E402


def musk_steps(cfg, cache: Path, out: Path) -> list[dict]:
    run = run_train(cfg, cache, out, evaluator=evaluate, scorer=score, progress=False, log=lambda *a: None)
    return RunFolder(run).read(METRICS)


def trl_steps(cfg, cache: Path, out: Path) -> list[float]:
    import yaml
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    with Cache(cache) as c:
        prompts = c.prompts()
        task = from_dict(TaskConfig, yaml.safe_load(c.config_yaml)["task"], "cache task config")
    model, tok = load_expert(policy_spec(cfg.policy.name), resolve_dtype(cfg.policy.dtype, "cpu"), "cpu")
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)  # load_expert freezes; PEFT re-freezes the base itself
    train = [i for i, s in enumerate(prompts["split"]) if s == "train"]
    system = task.system_prompt()
    data = Dataset.from_dict({"prompt": [build_prompt_text(tok, system, prompts["text"][i]) for i in train],
                              "entry": [prompts["entry"][i] for i in train]})

    def reward(completions, entry, **_):
        return [score(e, c, cfg.sampling.answer_extraction) for e, c in zip(entry, completions)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=cfg.optim.train_batch_size * cfg.grpo.group_size,
        num_generations=cfg.grpo.group_size, gradient_accumulation_steps=1, max_steps=cfg.optim.total_training_steps,
        max_completion_length=cfg.sampling.max_new_tokens, generation_kwargs={"min_new_tokens": cfg.sampling.max_new_tokens},
        temperature=cfg.sampling.temperature, beta=cfg.grpo.beta, epsilon=cfg.grpo.clip_eps, loss_type="grpo",
        scale_rewards="group", num_iterations=1, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        adam_epsilon=cfg.optim.epsilon, max_grad_norm=cfg.optim.grad_clip, lr_scheduler_type="constant",
        gradient_checkpointing=cfg.run.gradient_checkpointing, use_cpu=True, bf16=False, save_strategy="no",
        logging_steps=1, report_to="none", seed=cfg.seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=cfg.policy.lora_rank, lora_alpha=cfg.policy.lora_alpha, lora_dropout=cfg.policy.lora_dropout,
                      target_modules=list(cfg.policy.lora_target_modules), task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2, help="prompts per step")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt")
    ap.add_argument("--tokens", type=int, default=48, help="fixed completion length")
    args = ap.parse_args()
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    root = Path(tempfile.mkdtemp(prefix="musk-trl-"))
    # Prompts come from a musk cache (single reads no features: one tiny expert, no hints/router).
    cache = run_extract(load_extract_config(None, {
        "task": {"family": "easy-arithmetic", "train_size": 8 * args.steps * args.batch, "val_size": 4},
        "experts": [{"name": "tiny", "kind": "random", "model": "llama", "seed": 0,
                     "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "num_key_value_heads": 2, "intermediate_size": 64}}],
        "router": None, "hints": False, "out": str(root / "cache.h5"), "device": "cpu"}),
        progress=False, log=lambda *a: None)
    cfg = load_train_config(None, {
        "method": "single", "policy": args.policy, "group_size": args.group, "train_batch_size": args.batch,
        "gradient_accumulation_steps": 1, "total_training_steps": args.steps, "max_new_tokens": args.tokens,
        "min_new_tokens": args.tokens, "test_freq": 10_000, "save_freq": 10_000, "eval_batches": 1,
        "val_batch_size": 4, "device": "cpu"})

    # Interleaved: musk, TRL, musk again, so drift in the shared machine's load hits both.
    m1 = musk_steps(cfg, cache, root / "musk-1")
    trl_t = trl_steps(cfg, cache, root / "trl")
    m2 = musk_steps(cfg, cache, root / "musk-2")
    musk_t = [r["step_seconds"] for r in m1[1:] + m2[1:]]
    tokens = {r["completion_tokens"] for r in m1 + m2}
    m, t = statistics.median(musk_t), statistics.median(trl_t[1:])
    phases = {k: statistics.median(r[f"time/{k}"] for r in m1[1:] + m2[1:])
              for k in ("generate", "reward", "policy", "reference")}
    print(f"policy {args.policy}, cpu ({torch.get_num_threads()} threads), LoRA r={cfg.policy.lora_rank}, "
          f"{args.batch} prompts x {args.group} completions x {args.tokens} tokens (fixed; musk completion "
          f"tokens per step: {sorted(tokens)}), TRL {trl.__version__}, medians of steps 2..{args.steps}")
    print(f"TRL GRPOTrainer : {t:7.2f} s/step  (steps: {', '.join(f'{x:.2f}' for x in trl_t)})")
    print(f"musk train      : {m:7.2f} s/step  (steps: {', '.join(f'{x:.2f}' for x in musk_t)})")
    print("musk phases     : " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    print(f"RATIO GRPO step speedup vs TRL = {t / m:.2f}x  (target >= 3x)")


if __name__ == "__main__":
    main()
