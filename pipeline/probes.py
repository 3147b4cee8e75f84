"""Probe experts: expert kinds built in code whose right answer is known by construction.

Like a probe environment in RL, a probe team asks one question at a time:

- `probe-oracle` stores, in every pooling variant, a vector that encodes the prompt's reference
  answer. Default encoding `token-embeddings`: the reference LM's own input embeddings (normally the
  policy's) of the answer's first `slots` tokens, concatenated in order and zero-padded to a fixed
  size [slots * d], plus a little Gaussian noise. A linear map can carry it to the policy's
  embedding space, so a run asks "can information reach the policy through C?", not "can RL learn a
  lookup table?". `random-code` (the harder variant) stores a seeded random vector per distinct
  answer instead: only a memorised table can use it, and it cannot generalise to unseen answers.
  The oracle's vector depends on the answer alone (its noise is seeded by the answer).
- `probe-noise` stores a vector of the same shape and the same per-dimension mean and std as the
  oracle's, drawn per prompt from a seed: it carries no information about the prompt.

Probes produce no text: their hint is the empty string (the probe must reach the policy through the
cached features only, never as text).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import MuskError
from core.config import from_dict

PROBE_KINDS = ("probe-oracle", "probe-noise")
ENCODINGS = ("token-embeddings", "random-code")


@dataclass(frozen=True)
class ProbeConfig:
    """The `config` mapping of a probe expert's spec (its `model` names the reference LM)."""

    encoding: str = "token-embeddings"
    """token-embeddings (the reference LM's input embeddings of the answer's tokens) or random-code."""
    slots: int = 8
    """Answer tokens kept (in order, zero-padded): the vector has slots * d entries."""
    noise: float = 0.1
    """Oracle only: std of the added Gaussian noise, relative to the reference embeddings' RMS."""

    def validate(self) -> None:
        if self.encoding not in ENCODINGS:
            raise MuskError(f"probe encoding {self.encoding!r} unknown; choices: {list(ENCODINGS)}")
        if self.slots < 1:
            raise MuskError(f"probe slots must be at least 1, got {self.slots}")
        if self.noise < 0:
            raise MuskError(f"probe noise must be >= 0, got {self.noise}")


def probe_config(spec) -> ProbeConfig:
    return from_dict(ProbeConfig, dict(spec.config), f"expert {spec.name!r} config")


def _rng(*key) -> np.random.Generator:
    """A generator seeded by a stable hash of `key` (no dependence on order, process or platform)."""
    digest = hashlib.sha256(json.dumps(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def answer_token_embeddings(answers: list[str], tok, embedding: torch.Tensor, slots: int) -> np.ndarray:
    """[N, slots * d]: each answer's first `slots` token embeddings, in order, zero-padded.

    embedding: the reference LM's [V, d] input embedding matrix, already multiplied by its
    embedding scale (Gemma), i.e. the vectors the LM itself reads for those tokens.
    """
    E = embedding.detach().float().cpu().numpy()
    d = E.shape[1]
    out = np.zeros((len(answers), slots, d), dtype=np.float32)
    for i, a in enumerate(answers):
        ids = tok(str(a), add_special_tokens=False)["input_ids"][:slots]
        out[i, : len(ids)] = E[ids]
    return out.reshape(len(answers), slots * d)


def oracle_features(answers: list[str], tok, embedding: torch.Tensor, cfg: ProbeConfig, seed: int) -> np.ndarray:
    """[N, slots * d] float32, a function of the answer only (and of the seed)."""
    E = embedding.detach().float()
    rms = float(E.pow(2).mean().sqrt())
    d = E.shape[1] * cfg.slots
    if cfg.encoding == "random-code":
        return np.stack([_rng("code", seed, str(a)).standard_normal(d).astype(np.float32) * rms for a in answers])
    clean = answer_token_embeddings(answers, tok, E, cfg.slots)
    noise = np.stack([_rng("oracle-noise", seed, str(a)).standard_normal(d).astype(np.float32) for a in answers])
    return clean + np.float32(cfg.noise * rms) * noise


def noise_features(texts: list[str], like: np.ndarray, seed: int) -> np.ndarray:
    """[N, D] float32 drawn per prompt (seeded by the prompt's text), with the per-dimension mean
    and std of `like` [N, D] (the oracle's features): same shape and scale, no information."""
    mean, std = like.mean(0), like.std(0)
    z = np.stack([_rng("noise", seed, t).standard_normal(like.shape[1]).astype(np.float32) for t in texts])
    return (mean + std * z).astype(np.float32)


def probe_arrays(vectors: np.ndarray, n_tokens: np.ndarray, draws: int, hints: bool) -> dict[str, np.ndarray]:
    """The cache datasets of a probe expert: the same vector [N, D] in every pooling variant (the
    random ones repeated over their `draws` draws, indices 0), n_tokens, and empty hints."""
    from cache.schema import POOLED, RANDOM_VARIANTS

    N = len(vectors)
    out: dict[str, np.ndarray] = {
        v: np.repeat(vectors[:, None], draws, axis=1) if v in RANDOM_VARIANTS else vectors for v in POOLED
    }
    out["random_token_index"] = np.zeros((N, draws), dtype=np.int64)
    out["random_layer_index"] = np.zeros((N, draws), dtype=np.int64)
    out["n_tokens"] = np.asarray(n_tokens, dtype=np.int64)
    if hints:
        out["hint"] = np.array([""] * N, dtype=object)
        out["hint_n_tokens"] = np.zeros(N, dtype=np.int64)
    return out
