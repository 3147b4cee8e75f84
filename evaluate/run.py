"""`musk eval RUN_DIR`: a saved run (final/ or a checkpoint) evaluated on a split of its cache under
conditions and expert ablations. Nothing is retrained.

    RUN_DIR/eval/<checkpoint>-<split>[-<ablations>]/records.jsonl   one record per (prompt, condition, sample)
                                                    summary.json    settings + per condition and per task scores
                                                                    + content_controls (each shuffle's partners)

Every input is checked before anything is written. A rerun into the same folder with the same settings
reuses the conditions whose records are complete and computes the rest (records never duplicated);
records.jsonl and summary.json are replaced atomically after each condition, so a kill loses at most
the condition in progress.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache.reader import Cache
from cache.run_folder import EVAL_DIR, RunFolder, read_jsonl, write_jsonl
from core.atomic import atomic_write_text
from core.config import check_finite
from core.errors import MuskError
from core.heldout import problem_key
from pipeline.experts import resolve_device, resolve_dtype
from train.adapters import method_info
from train.config import TrainConfig, config_from_run, flatten
from evaluate.records import Condition, condition_records, summarize
from train.inputs import ExpertView
from train.data import RunData
from train.setup import build_policy, load_data
from evaluate.shuffle import partnered, shuffle_stats, shuffled

CONTEXTS = ("with", "without", "null")
ABLATIONS = ("drop", "shuffle", "only")
SPLITS = ("val", "test", "train")
RECORDS, SUMMARY = "records.jsonl", "summary.json"


@dataclass(frozen=True)
class EvalRequest:
    """What `musk eval` was asked (its command-line options)."""

    run: Path
    checkpoint: str = "final"
    cache: Path | None = None
    split: str = "val"
    limit: int | None = None
    samples: int = 1
    temperature: float | None = None
    # None for both: the default conditions (default_conditions); otherwise exactly what is asked
    # (contexts default ("with",), ablations ())
    contexts: tuple[str, ...] | None = None
    ablations: tuple[str, ...] | None = None
    out: Path | None = None
    seed: int = 0  # seeds the shuffle permutations and the sampling; recorded in summary.json
    # the policy's dtype while decoding: "run" (the run's own `dtype` setting, as its training-time
    # evaluations decoded), or auto / float32 / bfloat16; recorded (resolved) in summary.json
    dtype: str = "run"


def default_out(req: EvalRequest) -> Path:
    """RUN/eval/<checkpoint>-<split>[-<ablations>][-<dtype>][-samples<K>-t<T>]: a dtype or a sampled
    decoding asked for names its own folder, so evaluating a run again in float32, or sampled, does not
    collide with (and is not refused by) the default folder of the run's own dtype, greedy. (--limit
    keeps the name: a folder with another limit is refused, naming the setting.)"""
    tail = "".join("-" + a.replace(":", "_") for a in req.ablations or ())
    if req.dtype != "run":
        tail += f"-{req.dtype}"
    if req.samples != 1 or req.temperature is not None:
        tail += f"-samples{req.samples}" + (f"-t{req.temperature:g}" if req.temperature is not None else "")
    return Path(req.run) / EVAL_DIR / f"{req.checkpoint}-{req.split}{tail}"


def run_config(run: RunFolder) -> tuple[TrainConfig, dict]:
    if not run.config_path.is_file():
        raise MuskError(f"{str(run)!r} is not a run folder (no config.yaml)")
    resolved = run.read_config()
    resolved = flatten(resolved)  # sectioned, or flat from an older musk: the flat form either way
    return config_from_run(resolved, f"{run}/config.yaml"), resolved


def weights_folder(run: RunFolder, checkpoint: str) -> Path:
    path = run.final if checkpoint == "final" else run.path / "checkpoints" / checkpoint
    if not checkpoint == "final" and not (checkpoint.startswith("step_") and checkpoint[5:].isdigit()):
        raise MuskError(f"--checkpoint takes final or step_K, got {checkpoint!r}")
    if not path.is_dir():
        have = sorted(p.name for p in (run.path / "checkpoints").glob("step_*")) if (run.path / "checkpoints").is_dir() else []
        raise MuskError(f"run {str(run)!r} has no {checkpoint} ({str(path)!r} is missing); it has "
                        f"{(['final'] if run.final.is_dir() else []) + have or 'no weights (is it still training?)'}")
    return path


def check_cache(cache_path: Path, resolved: dict, data: RunData) -> None:
    """The cache must hold the run's prompts: the run's own cache (same fingerprint), or one whose
    train split and experts are those the run was trained on (e.g. the same extraction with a test split)."""
    if data.cache_fingerprint == resolved.get("cache_fingerprint"):
        return
    own = Path(str(resolved.get("cache", "")))
    msg = (f"cache {str(cache_path)!r} is not the one run was trained on (fingerprint {data.cache_fingerprint[:12]} vs "
           f"{str(resolved.get('cache_fingerprint'))[:12]})")
    if not own.is_file():
        raise MuskError(f"{msg}, and the run's own cache {str(own)!r} is not there to compare prompts with")
    with Cache(own) as c:
        theirs = c.prompts()
        train = [theirs["text"][i] for i in c.split_indices("train")]
        experts = {n: c.expert_fingerprint(n) for n in data.experts}
    with Cache(cache_path) as c:
        same_experts = all(c.expert_fingerprint(n) == fp for n, fp in experts.items())
    ours = [data.prompts["text"][i] for i in data.train_idx]
    if ours != train or not same_experts:
        raise MuskError(f"{msg}: its {'train prompts' if ours != train else 'experts'} are not the run's, so "
                        "the run's weights and its features do not belong together")


def default_conditions(cfg: TrainConfig, data: RunData, has_gate: bool) -> EvalRequest:
    """What `musk eval` evaluates when neither --context nor --ablate is given: with C; C removed and
    null (its information removed, slots kept) where the method has a C; and the content controls for
    a method that reads experts: each expert's features (or hint) read from another prompt
    (shuffle:NAME) and every expert's at once (shuffle:all, what C adds beyond a prompt-independent
    context). Returned as the request's contexts and ablations."""
    contexts = ("with", "without", "null") if has_gate else ("with",)
    reads = method_info(cfg.method).needs_features or method_info(cfg.method).needs_hints
    ablations = tuple(f"shuffle:{n}" for n in data.experts) + ("shuffle:all",) if reads and data.experts else ()
    return EvalRequest(run=Path("."), contexts=contexts, ablations=ablations)


def parse_conditions(req: EvalRequest, cfg: TrainConfig, data: RunData, has_gate: bool) -> list[Condition]:
    """Conditions in order: the contexts asked, then each ablation (of "with"). shuffle:all reads every
    expert from another prompt (one permutation for all of them)."""
    if req.contexts is None and req.ablations is None:
        req = default_conditions(cfg, data, has_gate)
    conds = []
    for c in req.contexts or ("with",):
        if c not in CONTEXTS:
            raise MuskError(f"unknown --context {c!r}; choices: {list(CONTEXTS)}")
        if c != "with" and cfg.method in ("single", "output-collab"):
            raise MuskError(f"--context {c}: method {cfg.method!r} has no context tokens C to remove")
        if c == "null" and not has_gate:
            raise MuskError(f"--context null: method {cfg.method!r} has no C whose information can be removed")
        conds.append(Condition(c, c))
    n = len(data.experts)
    for i_a, a in enumerate(req.ablations or ()):
        kind, _, name = a.partition(":")
        if kind not in ABLATIONS or not name:
            raise MuskError(f"--ablate takes drop:NAME, shuffle:NAME or only:NAME, got {a!r}")
        if n == 0:
            raise MuskError(f"--ablate {a}: method {cfg.method!r} reads no experts, so there is none to {kind}")
        if kind == "shuffle" and name == "all":
            if data.features is None and cfg.method != "output-collab":
                raise MuskError(f"--ablate {a}: method {cfg.method!r} reads no expert features to shuffle")
            conds.append(Condition(a, "with", ExpertView(source={e: {} for e in range(n)})))
            continue
        if name not in data.experts:
            raise MuskError(f"--ablate {a}: unknown expert {name!r}; the run's experts are {data.experts}")
        e = data.experts.index(name)
        if kind == "drop" and n == 1:
            raise MuskError(f"--ablate {a}: the run's only expert is {name!r}; dropping it leaves no expert (use "
                            "--context without to remove C)")
        if kind == "shuffle":
            if data.features is None and cfg.method != "output-collab":
                raise MuskError(f"--ablate {a}: method {cfg.method!r} reads no expert features to shuffle")
            view = ExpertView(source={e: {}})  # rows filled in once the evaluated prompts are known
        else:
            keep = torch.zeros(n, dtype=torch.bool) if kind == "only" else torch.ones(n, dtype=torch.bool)
            keep[e] = kind == "only"
            view = ExpertView(keep=keep)
        conds.append(Condition(a, "with", view))
    if len({c.name for c in conds}) != len(conds):
        raise MuskError(f"a condition is asked twice: {[c.name for c in conds]}")
    return conds


def weights_digest(folder: Path) -> str:
    """sha256 over the names and bytes of the weight files in `folder` (final/ or a checkpoint)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# What makes two evaluation folders one setting (the report never pools folders that differ in one).
SETTING_KEYS = ("checkpoint", "split", "n_prompts", "limit", "samples", "temperature", "decoding", "seed", "dtype")


def settings(req: EvalRequest, run: RunFolder, data: RunData, rows: np.ndarray, *, dtype: torch.dtype,
             weights_sha: str = "") -> dict:
    """The evaluation's settings as summary.json records them: decoding is greedy only without a
    temperature (--samples 1 at a temperature is one sampled completion); weights_sha the digest of
    the weights evaluated."""
    return {"run": str(run.path.resolve()), "checkpoint": req.checkpoint, "cache_fingerprint": data.cache_fingerprint,
            "split": req.split, "n_prompts": len(rows), "limit": req.limit, "samples": req.samples,
            "temperature": req.temperature, "decoding": "greedy" if req.temperature is None else "sampled",
            "seed": req.seed, "dtype": str(dtype).removeprefix("torch."), "weights_sha": weights_sha}


def _differs(old: dict, new: dict) -> list[str]:
    """Settings of an earlier evaluation in the folder that differ from these; a summary that does not
    record one (written by an older musk) differs in it."""
    return sorted(k for k, v in new.items() if old.get(k) != v)


def eval_dtype(req: EvalRequest, cfg: TrainConfig, resolved: dict, device: str, log=print) -> torch.dtype:
    """--dtype run: the dtype the run trained in (config.yaml's dtype_resolved); a run made before it was
    recorded resolves its `dtype` setting on this machine, and the log says so."""
    if req.dtype != "run":
        return resolve_dtype(req.dtype, device)
    if resolved.get("dtype_resolved"):
        return resolve_dtype(str(resolved["dtype_resolved"]), device)
    dtype = resolve_dtype(cfg.policy.dtype, device)
    log(f"musk eval: the run does not record the dtype it trained in; its dtype {cfg.policy.dtype!r} resolves to "
        f"{str(dtype).removeprefix('torch.')} on this machine")
    return dtype


def run_eval(req: EvalRequest, *, scorer=None, progress: bool = True, log=print) -> Path:
    """Evaluate; returns the folder holding records.jsonl and summary.json. scorer: (entry JSON,
    completion, mode) -> reward (default: the task's own, pipeline.rewards.score). Builds the policy
    alone (build_policy): no optimizer."""
    check_finite(req.temperature, "--temperature")  # before anything is read: nan passes every `<= 0`
    run = RunFolder(req.run)
    cfg, resolved = run_config(run)
    # evaluation decodes with musk's own decoder, on whatever device this machine has
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, rollout_engine="musk"),
                              run=dataclasses.replace(cfg.run, device="auto"))
    folder = weights_folder(run, req.checkpoint)
    if req.split not in SPLITS:
        raise MuskError(f"unknown --split {req.split!r}; choices: {list(SPLITS)}")
    if req.samples < 1 or (req.samples > 1 and req.temperature is None):
        raise MuskError("--samples K needs K >= 1, and K > 1 needs --temperature T (greedy decoding has one answer)")
    if req.temperature is not None and req.temperature <= 0:
        raise MuskError(f"--temperature must be positive, got {req.temperature}")
    cache_path = Path(req.cache) if req.cache is not None else Path(str(resolved.get("cache")))
    data = load_data(cfg, cache_path)
    check_cache(cache_path, resolved, data)
    rows = np.nonzero(np.array(data.prompts["split"]) == req.split)[0][: req.limit]
    if len(rows) == 0:
        raise MuskError(f"cache {str(cache_path)!r} has no {req.split!r} prompts")
    has_c = method_info(cfg.method).has_context  # g_phi with an output projection (and a null C)
    # a shuffle's partner: same dataset, another problem, another reference answer (evaluate/shuffle.py)
    questions = [problem_key(data.prompts["text"][r]) for r in rows]
    tasks, answers = [data.prompts["task"][r] for r in rows], [data.prompts["answer"][r] for r in rows]
    conds = parse_conditions(req, cfg, data, has_c)  # before the model loads
    if req.contexts is None and req.ablations is None and all(  # defaults: nothing to shuffle
            len({q for q, t in zip(questions, tasks) if t == d}) < 2 for d in set(tasks)):
        log(f"content controls left out: no dataset of the evaluated prompts holds two distinct questions "
            f"({len(set(questions))} in {len(set(tasks))} dataset(s)); a shuffle within a dataset needs two or more")
        conds = [c for c in conds if not c.name.startswith("shuffle:")]
    conds = [shuffled(c, rows, req.seed, questions, datasets=tasks, answers=answers, log=log) for c in conds]
    controls = {c.name: shuffle_stats(c, rows, tasks, answers) for c in conds if c.view.source}
    device = resolve_device(cfg.run.device)
    dtype = eval_dtype(req, cfg, resolved, device, log)
    out = Path(req.out) if req.out is not None else default_out(req)
    here = settings(req, run, data, rows, dtype=dtype, weights_sha=weights_digest(folder))
    old = json.loads((out / SUMMARY).read_text()) if (out / SUMMARY).is_file() else None
    diff = _differs(old, here) if old is not None else []
    if diff:
        raise MuskError(f"{str(out)!r} holds an evaluation with other settings or weights ({diff}); use another --out")
    m = build_policy(cfg, data, device, dtype)  # no optimizer: nothing is trained
    m.load(folder, final=req.checkpoint == "final")
    meta = {**here, "method": cfg.method, "team": data.experts, "content_controls": controls}
    records = read_jsonl(out / RECORDS) if old is not None else []
    m.train(False)
    for cond in tqdm(conds, desc="musk eval", unit="condition", disable=not progress):
        cond_rows = partnered(cond, rows)  # a shuffle leaves out the rows with no partner in their dataset
        want = {(int(r), s) for r in cond_rows for s in range(req.samples)}
        have = {(r["prompt"], r["sample"]) for r in records if r["condition"] == cond.name}
        if have == want:
            continue  # complete from an earlier run into this folder
        records = [r for r in records if r["condition"] != cond.name]
        records += condition_records(cfg, m, data, cond_rows, cond, device=device, samples=req.samples,
                                     temperature=req.temperature, seed=req.seed, scorer=scorer)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / RECORDS, records)
        atomic_write_text(out / SUMMARY, json.dumps({**meta, "conditions": summarize(records, sampled=req.temperature is not None)},
                                                        indent=2))
    if not (out / SUMMARY).is_file():  # nothing left to compute and nothing written yet cannot happen
        raise MuskError(f"no conditions to evaluate into {str(out)!r}")
    log(f"musk eval: {len(conds)} conditions x {len(rows)} prompts x {req.samples} samples -> {out}")
    return out
