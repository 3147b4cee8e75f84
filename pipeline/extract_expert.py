"""One expert's group of the cache: its model loaded once, the feature pass (pipeline/feature_pass.py),
its hints (pipeline/hints.py) and solo answers (pipeline/solo.py) computed into the parts folder
batch by batch, then gathered and checked (pipeline/parts.py). Probe experts build their vectors from
the prompts' answers or seeds instead (pipeline/probes.py). Under torchrun each rank computes its
round-robin share of the batches; after a barrier every rank reads all of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cache.reader import Cache
from core import dist
from core.config import to_dict
from pipeline import solo as solo_mod
from pipeline.experts import KINDS, load_expert, reference_spec
from pipeline.feature_pass import length_batches, feature_batches, tokenize_prompts
from pipeline.hints import hint_batches, hint_batches_vllm, greedy_hints
from pipeline.parts import check_finite, gather_parts
from pipeline.pooling import seeded_indices
from pipeline.probes import PROBE_KINDS, noise_features, oracle_features, probe_arrays, probe_config


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


def extract_one_expert(cfg, spec, prompts, parts, *, group, device, dtype, bar) -> tuple[dict, dict]:
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
        hint_batches_vllm(cfg, spec, model, tok, ids=ids, n_tokens=n_tokens, parts=parts, group=group, bar=bar)
    elif cfg.hints:
        hint_batches(cfg, model, tok, ids, n_tokens=n_tokens, parts=parts, group=group, device=device, bar=bar)
    solo = _solo_decode(cfg, spec, prompts, model, tok=tok, ids=ids, parts=parts, group=group, device=device, bar=bar)
    dist.barrier()
    feats = gather_parts(parts, group, "feat", length_batches(n_tokens, cfg.batch_size), N=N, name=spec.name)
    check_finite(feats, spec.name, prompts)
    hints = None
    if cfg.hints:
        h = gather_parts(parts, group, "hint", length_batches(n_tokens, cfg.hint_batch_size), N=N, name=spec.name)
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
        s_attrs, s_arrays = _solo_gather(cfg, spec, prompts, solo, parts=parts, group=group, device=device,
                                         hints={"text": hints, "n_tokens": hint_tokens} if hints is not None else None)
        attrs, arrays = {**attrs, **s_attrs}, {**arrays, **s_arrays}
    del model
    return attrs, arrays


def _solo_decode(cfg, spec, prompts, model, *, tok, ids, parts, group, device, bar) -> tuple | None:
    """This rank's share of the expert's solo decodes (pipeline/solo.py) into the parts folder; None
    when solo is off or the expert is a probe. Returns (source, batches): source "hint" when the hint
    decode already is the solo decode (nothing decoded twice), else "decode"."""
    if not cfg.solo or spec.kind in PROBE_KINDS:
        return None
    sids = solo_mod.solo_ids(tok, cfg.task.system_prompt(), prompts)
    batches = length_batches(np.array([len(x) for x in sids], dtype=np.int64), cfg.hint_batch_size)
    if solo_mod.reuses_hint(ids if cfg.hints else None, sids, cfg.hint_max_new_tokens, cfg.solo_max_new_tokens,
                            cfg.hint_engine):
        return "hint", batches
    solo_mod.solo_batches(model, tok, sids, batches, max_new_tokens=cfg.solo_max_new_tokens, parts=parts, group=group,
                          device=device, greedy_fn=greedy_hints, bar=bar)
    return "decode", batches


def _solo_gather(cfg, spec, prompts, solo: tuple, *, parts, group, device, hints: dict | None) -> tuple[dict, dict]:
    """(attrs, arrays) of the expert's scored solo answers, from the parts folder or the hints reused."""
    source, batches = solo
    if source == "hint":
        texts, n_tok, seconds = hints["text"], hints["n_tokens"], float("nan")  # the hint decode's time is not kept
    else:
        got = gather_parts(parts, group, "solo", batches, N=len(prompts), name=spec.name)
        texts, n_tok, seconds = got["text"], got["n_tokens"], float(got["seconds"].sum())
    return solo_mod.solo_result(prompts, texts, n_tok, seconds, source=source, max_new_tokens=cfg.solo_max_new_tokens,
                                mode=cfg.solo_answer_extraction, device=device)


def complete_solo(cfg, spec, prompts, out: Path, *, parts, group, device, dtype, bar) -> tuple[dict, dict]:
    """The solo answers of an expert the cache already holds: its model is loaded for the decode
    only; its stored features are neither read nor recomputed."""
    model, tok = load_expert(spec, dtype, device)
    ids, _ = tokenize_prompts(tok, prompts)
    solo = _solo_decode(cfg, spec, prompts, model, tok=tok, ids=ids, parts=parts, group=group, device=device, bar=bar)
    dist.barrier()
    hints = None
    if solo[0] == "hint":
        with Cache(out) as c:
            hints = {"text": np.array(c.hints(spec.name), dtype=object), "n_tokens": c.column(spec.name, "hint_n_tokens")}
    result = _solo_gather(cfg, spec, prompts, solo, parts=parts, group=group, device=device, hints=hints)
    del model
    return result
