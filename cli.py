"""musk: combine frozen language models under RL. `musk extract | train | eval | sweep | report`.

Every command exits 0 on success and, on bad input, prints one paragraph naming the problem (no
traceback) and exits 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import warnings

import typer

warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not the user's business

from core.errors import MuskError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="musk: frozen expert LMs -> cached features -> GRPO with context tokens -> paper tables.",
)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """musk's own warnings (a torn .jsonl line dropped, ...) as one line, without a source location."""
    if category.__name__ == "TornLineWarning":
        typer.echo(f"musk: warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning
warnings.showwarning = _show_warning


def _fail(msg: str) -> None:
    typer.echo(f"musk: error: {msg}", err=True)
    raise typer.Exit(2)


def _threads(n: Optional[int]) -> None:
    """Use n CPU threads (intra-op; torch's default is one per core). Two musk jobs on the same cores
    should split them: each at its full default count oversubscribes the cores and runs several
    times slower."""
    if n is None:
        return
    if n < 1:
        _fail(f"--threads must be at least 1, got {n}")
    import torch

    torch.set_num_threads(n)


def _finite(ctx: typer.Context, param: typer.CallbackParam, value):
    """Every float flag's check: nan and inf are refused, the flag named (core.config.check_finite)."""
    from core.config import check_finite

    _run(check_finite, value, param.opts[0] if param.opts else param.name)
    return value


SET_HELP = ("KEY=VALUE for any config field (repeatable; dotted for nested fields, e.g. task.train_size=64); "
            "VALUE is read as YAML and typed by the config. Recorded in the saved config.")
TRAIN_SET_HELP = ("SECTION.KEY=VALUE for any train config key (repeatable; e.g. grpo.beta=0, optim.lr=1e-4; "
                  "the flat KEY of older configs, beta=0, still works); VALUE is read as YAML and typed by the "
                  "config. Recorded in the saved config.")
THREADS_HELP = "CPU threads for this job (default: torch's, one per core). Split the cores between parallel jobs."


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except MuskError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("musk: interrupted", err=True)
        raise typer.Exit(130)


@app.command()
def extract(
    *,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML extract config; default: the embedded default."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache path (default caches/<family>.h5)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Keep the first N prompts of each split."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Build or complete a feature cache: every expert once over every prompt."""
    from core.config import merge, parse_sets
    from pipeline.extract import ExtractConfig, load_extract_config, run_extract

    _threads(threads)
    named = {"out": str(out) if out is not None else None, "limit": limit}
    overrides = {k: v for k, v in named.items() if v is not None}
    overrides = merge(overrides, _run(parse_sets, ExtractConfig, sets or []))  # --set wins, as in train
    cfg = _run(load_extract_config, str(config) if config else None, overrides)
    _run(run_extract, cfg, progress=not no_progress)


@app.command()
def train(
    ctx: typer.Context,
    *,
    cache: Path = typer.Option(..., "--cache", help="Cache file written by `musk extract`."),
    method: str = typer.Option(..., "--method", help="single | hard-routing | output-collab | perceiver | ffn | prefix"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML train config; default: the embedded default."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (overrides the config)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds: one run each."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<method>-<family>-s<seed>)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Override total_training_steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run folder from its last checkpoint."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Pooling variant read from the cache."),
    num_latents: Optional[int] = typer.Option(None, "--num-latents", help="m, the number of latent queries."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of the LoRA policy.", callback=_finite),
    router_lr: Optional[float] = typer.Option(None, "--router-lr", help="Learning rate of g_phi.", callback=_finite),
    train_batch_size: Optional[int] = typer.Option(None, "--train-batch-size", help="Prompts per micro-batch."),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, "--gradient-accumulation-steps"),
    val_batch_size: Optional[int] = typer.Option(None, "--val-batch-size", help="Prompts per evaluation batch."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay.", callback=_finite),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help="AdamW epsilon.", callback=_finite),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Max global gradient norm.", callback=_finite),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear LR warmup steps."),
    log_freq: Optional[int] = typer.Option(None, "--log-freq", help="Print a line every K steps."),
    save_freq: Optional[int] = typer.Option(None, "--save-freq", help="Checkpoint every K steps."),
    test_freq: Optional[int] = typer.Option(None, "--test-freq", help="Evaluate every K steps."),
    eval_batches: Optional[int] = typer.Option(None, "--eval-batches", help="Evaluation batches."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    report_to: Optional[str] = typer.Option(None, "--report-to",
                                            help="Trackers, comma-separated: none, tensorboard, wandb, trackio."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=TRAIN_SET_HELP),
):
    """GRPO over cached expert features (no expert is loaded)."""
    from core.config import merge
    from evaluate.records import evaluate
    from pipeline.rewards import score
    from train.config import load_train_config, parse_train_sets, sectioned
    from train.loop import run_train

    _threads(threads)
    overrides = {k: v for k, v in {
        "method": method, "total_training_steps": max_steps, "pooling": pooling, "num_latents": num_latents,
        "lr": lr, "router_lr": router_lr, "train_batch_size": train_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps, "save_freq": save_freq, "test_freq": test_freq,
        "val_batch_size": val_batch_size, "weight_decay": weight_decay, "epsilon": epsilon, "grad_clip": grad_clip,
        "warmup_steps": warmup_steps, "log_freq": log_freq, "eval_batches": eval_batches,
        "report_to": [t.strip() for t in report_to.split(",") if t.strip()] if report_to is not None else None,
    }.items() if v is not None}
    overrides = merge(_run(sectioned, overrides), _run(parse_train_sets, sets or []))  # --set wins over the named flags
    seed_list = [seed] if seed is not None else [None]
    if seeds:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            _fail(f"--seeds takes comma-separated integers, got {seeds!r}")
    if len(seed_list) > 1 and (out is not None or resume):
        out_root = out
    else:
        out_root = None
    for s in seed_list:
        ov = dict(overrides)
        if s is not None:
            ov["seed"] = s
        cfg = _run(load_train_config, str(config) if config else None, ov)
        run_out = out
        if out_root is not None:
            run_out = out_root / f"{cfg.method}-s{cfg.seed}"
        _run(run_train, cfg, cache_path=cache, out=run_out, evaluator=evaluate, scorer=_scorer(ctx) or score,
             resume=resume, progress=not no_progress)


@app.command("eval")
def eval_(
    ctx: typer.Context,
    *,
    run: Path = typer.Argument(..., help="A run folder written by `musk train`."),
    checkpoint: str = typer.Option("final", "--checkpoint", help="final, or step_K of the run's checkpoints."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache to read (default: the run's own)."),
    split: str = typer.Option("val", "--split", help="val | test | train."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N prompts of the split."),
    samples: int = typer.Option(1, "--samples", help="K samples per prompt (mean@K, pass@K); 1: greedy."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (with --samples).", callback=_finite),
    context: Optional[str] = typer.Option(None, "--context", help="Comma-separated: with, without (C removed), null "
                                          "(C's information removed, slots kept). Neither --context nor --ablate: "
                                          "with, without, null (where the method has C) and the content controls "
                                          "shuffle:NAME for each expert and shuffle:all (where it reads experts)."),
    ablate: Optional[list[str]] = typer.Option(None, "--ablate", help="drop:NAME, shuffle:NAME, shuffle:all or "
                                                                      "only:NAME (repeatable): an expert taken out, its "
                                                                      "features shuffled across prompts (all: every "
                                                                      "expert's at once), or kept alone."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder (default RUN/eval/<checkpoint>-<split>[-<ablations>])."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffle permutations and of sampling."),
    dtype: str = typer.Option("run", "--dtype", help="Policy dtype while decoding: run (the run's own), auto, "
                                                     "float32, bfloat16."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
):
    """Evaluate a saved run under conditions and expert ablations (records.jsonl, summary.json)."""
    from evaluate.run import EvalRequest, run_eval

    _threads(threads)
    if limit is not None and limit < 1:
        _fail(f"--limit must be at least 1, got {limit}")
    req = EvalRequest(run=run, checkpoint=checkpoint, cache=cache, split=split, limit=limit, samples=samples,
                      temperature=temperature,
                      contexts=tuple(c.strip() for c in context.split(",") if c.strip()) if context is not None else None,
                      ablations=tuple(ablate) if ablate else None, out=out, seed=seed, dtype=dtype)
    _run(run_eval, req, scorer=_scorer(ctx), progress=not no_progress)


@app.command()
def sweep(
    *,
    grid: Path = typer.Argument(..., help="GRID.yaml: out, cache, config, methods, seeds, grid, set, also (docs/sweeps.md)."),
    out: Optional[Path] = typer.Option(None, "--out", help="The sweep folder (overrides the grid's `out`)."),
    executor: str = typer.Option("local", "--executor", help="local (lanes on this machine) | ray (a Ray cluster)."),
    lanes: int = typer.Option(1, "--lanes", help="local: runs at once, each with cores/lanes threads or a GPU of its own."),
    threads: Optional[int] = typer.Option(None, "--threads",
                                          help="CPU threads a run (local default: cores / lanes; ray default: 1)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="ray: the cluster's head, HOST:PORT (default: $RAY_ADDRESS, else a local head)."),
    gpus_per_run: Optional[float] = typer.Option(None, "--gpus-per-run",
                                                 help="ray: GPUs a run asks for (default: 1 where the cluster has GPUs).", callback=_finite),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (runs, what is done) and the estimated time."),
    step_seconds: Optional[float] = typer.Option(None, "--step-seconds",
                                                 help="Seconds a training step for --dry-run's estimate (default: measured by this sweep's runs).", callback=_finite),
    step_figures: Optional[Path] = typer.Option(None, "--step-figures",
                                                help="With --dry-run: a figures JSON with paper_step_seconds (benchmarks/gpu.sh) for the estimate."),
    measure: bool = typer.Option(False, "--measure",
                                 help="With --dry-run: time a few steps of each method here for the estimate."),
    quiet: float = typer.Option(120.0, "--quiet", help="Seconds a run may say nothing before a 'still running' line.", callback=_finite),
):
    """A grid of training runs: skips finished ones, resumes killed ones, retries failed ones."""
    from sweep.runner import run_sweep

    res = _run(run_sweep, grid, out=out, executor=executor, lanes=lanes, threads=threads,
               address=ray_address or os.environ.get("RAY_ADDRESS"), gpus_per_run=gpus_per_run,
               dry_run=dry_run, step_seconds=step_seconds, measure=measure, quiet=quiet, log=typer.echo,
               figures=step_figures)
    if res.failed or res.remaining:
        raise typer.Exit(1)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders, or folders holding run folders."),
    out: Path = typer.Option(Path("report"), "--out", help="Where the tables and figures go."),
):
    """The paper's tables and figures from run folders."""
    from analyze.report import run_report

    _run(run_report, runs, out)


@app.command()
def probe(
    *,
    cache: Path = typer.Argument(..., help="A cache built by `musk extract`."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Whose tokenizer encodes the question-only control "
                                         "(and the first-token labels): expert name, hub id or folder; default: the "
                                         "train default's policy."),
    target: str = typer.Option("answer", "--target", help="What is predicted: answer (the whole reference answer) "
                               "or first-token (the answer's first token in the policy's tokenizer: whether the "
                               "state tells the answers' first tokens apart, which the question alone often does; "
                               "not evidence that the answer is carried; refused when it has one class)."),
    permutations: int = typer.Option(20, "--permutations", help="Shuffled-label fits per probe (at least 20); "
                                     "their mean and 95th percentile are shown."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the table to OUT.md and OUT.csv."),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="Probe on the first N training prompts only."),
    variants: Optional[str] = typer.Option(None, "--variants", help="Comma-separated pooling variants to probe "
                                           "(e.g. last_token); default: every variant in the cache."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
):
    """Is the answer in the state beyond what the question shows? A linear probe per expert and pooling
    variant, from the cache alone, beside a question-only control (expert minus control), the majority
    class, chance 1/K and 20+ shuffled-label fits, with Wilson 95% intervals."""
    from analyze.probe import MIN_PERMUTATIONS, TARGETS, ProbeConfig, probe_cache, probe_markdown, write_probe
    from pipeline.experts import load_tokenizer_from
    from train.config import TrainConfig

    _threads(threads)
    if max_train is not None and max_train < 1:
        _fail("--max-train must be at least 1")
    if target not in TARGETS:
        _fail(f"--target takes one of {list(TARGETS)}, got {target!r}")
    if permutations < MIN_PERMUTATIONS:
        _fail(f"--permutations must be at least {MIN_PERMUTATIONS}, got {permutations}")
    name = policy or TrainConfig().policy.name
    tok = _run(load_tokenizer_from, name)
    chosen = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants is not None else None
    if chosen is not None and not chosen:
        _fail("--variants names no variant")
    cfg = ProbeConfig(max_train=max_train, target=target, permutations=permutations, variants=chosen)
    rows = _run(probe_cache, cache, tok, cfg)
    title = f"Decodability probe ({target}): {cache.name}, question-only control in {name}'s tokenizer"
    typer.echo(probe_markdown(rows, title))
    if out is not None:
        _run(write_probe, rows, out, title)


def _scorer(ctx: typer.Context):
    """The reward `main` was handed (None: the task's own, pipeline.rewards.score)."""
    return (ctx.obj or {}).get("scorer")


def main(scorer=None) -> None:
    """The command line. scorer: (entry JSON, completion, mode) -> reward for `musk train` in place of
    the task's own (tests hand in one with variance: a random policy never answers right)."""
    try:
        app(obj={"scorer": scorer})
    except MuskError as e:  # raised outside a command body
        typer.echo(f"musk: error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
